/**
 * Restore of a disk to a raw file: index → chunks fetched in parallel (bounded), each verified
 * on a worker thread → positioned writes. All-zero chunks are never written, so the file is
 * sparse. The data goes to a temporary file beside the target, renamed into place once
 * complete and synced: a failed restore never leaves a file that looks whole.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, dirname, join } from "node:path";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, ioError, isNotFound, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { defaultInflight } from "./backup.js";

/** Written bytes between early flushes of a restore target. */
const EARLY_FLUSH_BYTES = 256 * 1024 * 1024;

export interface RestoreDiskOptions {
  /** Replace an existing target. */
  force?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
  inflight?: number;
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
  let bytesWritten = 0;
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
    await forEachLimit(
      todo,
      inflight,
      async (i) => {
        options.signal?.throwIfAborted();
        const data = await repo.readChunk(index.digest(i));
        if (data.length !== index.chunkLength(i)) {
          throw new StrataError(
            ErrorCode.DATA_CORRUPT,
            `chunk ${index.digest(i).toString("hex")} has the wrong length for ${disk}`,
          );
        }
        let off = 0;
        while (off < data.length) {
          const { bytesWritten: n } = await fh.write(data, off, data.length - off, i * index.chunkSize + off);
          off += n;
        }
        bytesWritten += data.length;
        // Start writeback early, one flush at a time, so the disk writes while chunks decode
        // instead of all at the final sync.
        if (bytesWritten - flushedAt >= EARLY_FLUSH_BYTES && !flushing) {
          flushedAt = bytesWritten;
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
        progress.emit({ type: "progress", job: "restore", done: bytesWritten, total });
      },
      options.signal,
    );
    await flushing;
    if (flushError !== undefined) throw flushError;
    await fh.sync();
    await fh.close();
    await fs.rename(tmp, target);
    progress.emit({ type: "end", job: "restore" });
  } catch (err) {
    await flushing;
    await fh.close().catch(() => {});
    await fs.rm(tmp, { force: true });
    if (err instanceof StrataError) throw err;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot write restore target ${target}`, err);
  }
  return { disk, path: target, size: index.size, bytesWritten };
}
