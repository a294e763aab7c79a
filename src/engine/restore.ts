/**
 * Restore of a disk to a raw file: index → chunks fetched in parallel (bounded), each verified
 * on a worker thread → positioned writes. All-zero chunks are never written, so the file is
 * sparse. The data goes to a temporary file beside the target, renamed into place once
 * complete and synced: a failed restore never leaves a file that looks whole.
 *
 * Writes bypass the page cache (O_DIRECT) where the filesystem allows it: the worker that
 * verifies a chunk puts its plaintext straight into page-aligned shared memory, and the disk
 * takes it from there. Measured on this machine's disk: buffered writes ran at ~650 MB/s,
 * CPU-bound in the kernel's copy into the page cache, and then still had to be flushed; direct
 * writes at ~1.6 GB/s. Filesystems without O_DIRECT (tmpfs), and a last chunk that is not a
 * whole number of 4 KiB blocks, are written through the page cache as before.
 */
import { randomBytes } from "node:crypto";
import { constants, promises as fs } from "node:fs";
import { basename, dirname, join } from "node:path";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { AlignedSlots } from "../util/aligned.js";
import { ErrorCode, errnoCode, ioError, isNotFound, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { defaultInflight } from "./backup.js";

/** Written bytes between early flushes of a restore target (buffered writes). */
const EARLY_FLUSH_BYTES = 256 * 1024 * 1024;

/** Direct I/O wants offsets and lengths in whole blocks: 4 KiB suits 512-byte and 4K devices. */
const DIRECT_ALIGN = 4096;

/** Writes all of `data` at `position`. */
async function writeAll(fh: fs.FileHandle, data: Uint8Array, position: number): Promise<void> {
  let off = 0;
  while (off < data.length) {
    const { bytesWritten } = await fh.write(data, off, data.length - off, position + off);
    off += bytesWritten;
  }
}

/** A second handle on `path` with O_DIRECT, or undefined where the filesystem refuses it. */
async function openDirect(path: string): Promise<fs.FileHandle | undefined> {
  try {
    return await fs.open(path, constants.O_WRONLY | constants.O_DIRECT);
  } catch {
    return undefined;
  }
}

export interface RestoreDiskOptions {
  /** Replace an existing target. */
  force?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
  inflight?: number;
  /** Write around the page cache where the filesystem allows it (default true). */
  direct?: boolean;
}

export interface RestoreDiskResult {
  disk: string;
  path: string;
  size: number;
  /** Bytes written (non-zero chunks). */
  bytesWritten: number;
}

export async function restoreDiskToFile(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  target: string,
  options: RestoreDiskOptions = {},
): Promise<RestoreDiskResult> {
  const progress = options.progress ?? noProgress;
  const index = await repo.index(snap, disk);
  const existing = await fs.lstat(target).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot inspect restore target ${target}`, err);
  });
  if (existing && !options.force) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `restore target ${target} exists (use --force to replace it)`,
    );
  }
  if (existing && !existing.isFile()) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `restore target ${target} exists and is not a regular file`,
    );
  }
  const tmp = join(dirname(target), `.${basename(target)}.strata-${randomBytes(4).toString("hex")}`);
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(tmp, "wx", 0o600);
  } catch (err) {
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot create ${tmp}`, err);
  }
  let direct: fs.FileHandle | undefined;
  let bytesWritten = 0;
  let buffered = 0;
  let flushedAt = 0;
  let flushing: Promise<void> | undefined;
  let flushError: unknown;
  try {
    await fh.truncate(index.size);
    const todo: number[] = [];
    for (let i = 0; i < index.count; i++) if (!index.isZero(i)) todo.push(i);
    const total = todo.reduce((n, i) => n + index.chunkLength(i), 0);
    progress.emit({ type: "start", job: "restore", total, message: `${snap.vm}/${snap.time} ${disk}` });
    // Each chunk in flight holds its stored and its plain bytes: a few per worker is enough here.
    const inflight =
      options.inflight ??
      Math.min(defaultInflight(repo.codec().threads, index.chunkSize), repo.codec().threads * 4);
    if (options.direct !== false) direct = await openDirect(tmp);
    const slots = direct ? new AlignedSlots(inflight, index.chunkSize) : undefined;
    const wrongLength = (i: number) =>
      new StrataError(
        ErrorCode.DATA_CORRUPT,
        `chunk ${index.digest(i).toString("hex")} has the wrong length for ${disk}`,
      );
    /** Writes through the page cache. */
    const writeBuffered = async (data: Uint8Array, position: number) => {
      await writeAll(fh, data, position);
      buffered += data.length;
      // Start writeback early, one flush at a time, so the disk writes while chunks decode
      // instead of all at the final sync.
      if (buffered - flushedAt >= EARLY_FLUSH_BYTES && !flushing) {
        flushedAt = buffered;
        // A writeback error is reported to one sync only: keep it for the final check.
        flushing = fh
          .datasync()
          .catch((err: unknown) => {
            flushError ??= err;
          })
          .finally(() => {
            flushing = undefined;
          });
      }
    };
    await forEachLimit(
      todo,
      inflight,
      async (i) => {
        options.signal?.throwIfAborted();
        const position = i * index.chunkSize;
        const length = index.chunkLength(i);
        if (!slots) {
          const data = await repo.readChunk(index.digest(i));
          if (data.length !== length) throw wrongLength(i);
          await writeBuffered(data, position);
        } else {
          const slot = await slots.take();
          try {
            const n = await repo.readChunkInto(index.digest(i), {
              memory: slots.memory,
              offset: slots.offset(slot),
              capacity: slots.slotSize,
            });
            if (n !== length) throw wrongLength(i);
            const data = slots.view(slot, n);
            const d = direct;
            if (d && position % DIRECT_ALIGN === 0 && n % DIRECT_ALIGN === 0) {
              try {
                await writeAll(d, data, position);
              } catch (err) {
                // A filesystem that opened with O_DIRECT but refuses this write: the page cache
                // from here on.
                if (errnoCode(err) !== "EINVAL") throw err;
                direct = undefined;
                await writeBuffered(data, position);
              }
            } else {
              await writeBuffered(data, position);
            }
          } finally {
            slots.give(slot);
          }
        }
        bytesWritten += length;
        progress.emit({ type: "progress", job: "restore", done: bytesWritten, total });
      },
      options.signal,
    );
    await flushing;
    if (flushError !== undefined) throw flushError;
    // fsync is per file, not per handle: this covers the direct writes' metadata and the disk's
    // write cache too.
    await fh.sync();
    await direct?.close();
    direct = undefined;
    await fh.close();
    await fs.rename(tmp, target);
    progress.emit({ type: "end", job: "restore" });
  } catch (err) {
    await flushing;
    await direct?.close().catch(() => {});
    await fh.close().catch(() => {});
    await fs.rm(tmp, { force: true });
    if (err instanceof StrataError) throw err;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot write restore target ${target}`, err);
  }
  return { disk, path: target, size: index.size, bytesWritten };
}
