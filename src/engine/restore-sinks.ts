/**
 * Restore sinks besides the raw file of restore.ts: a qcow2 image and an existing block device
 * (a disk, a partition, an LVM logical volume).
 *
 * Both run the restore path of restore.ts: index → chunks fetched in parallel (bounded) and
 * verified on worker threads → positioned writes, in whatever order the fetches finish; onto a
 * device around the page cache (O_DIRECT) where it takes it, as for raw files (chunk-writer.ts).
 *
 * qcow2: `qemu-img create` makes an empty image of the disk's size under a temporary name
 * beside the target; qemu-storage-daemon exports it writable over NBD; Strata's NBD client
 * writes the non-zero chunks, flushes, and the daemon is stopped (closing the image cleanly)
 * before the rename. Zero chunks are never written, so they stay unallocated clusters.
 *
 * Block device: a device keeps whatever it held before, so zero chunks must be written too.
 * They are written as zeros: discard/zero-range (BLKZEROOUT, fallocate) is faster where the
 * device supports it, but whether a device then reads back zeros depends on the device and
 * Node cannot issue the ioctl, so plain writes are the one way we know to be right. The device
 * is opened O_EXCL (the kernel refuses if it is mounted or held by device-mapper) and synced
 * at the end. It must be at least as large as the disk; bytes past the disk's end are left
 * alone.
 */
import { randomBytes } from "node:crypto";
import { constants, promises as fs } from "node:fs";
import { basename, dirname, join } from "node:path";
import { StorageDaemon } from "../image/storage-daemon.js";
import { NbdClient } from "../nbd/index.js";
import type { FixedIndex } from "../repo/fixed-index.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, errnoCode, ioError, isNotFound, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { runProgram } from "../util/process.js";
import { noProgress } from "../util/progress.js";
import { ChunkWriter, chunkRuns, restoreInflight, restoreRunChunks } from "./chunk-writer.js";
import type { RestoreDiskOptions, RestoreDiskResult } from "./restore.js";

/** Largest zero write to a device, and the size of the one shared zero buffer. */
const ZERO_WRITE = 8 * 1024 * 1024;

/**
 * Runs `writeChunks` (fetch, verify, write; returns the bytes written) for every non-zero chunk
 * of `index`, in runs of at most `run` consecutive chunks, at most `inflight` at a time, and the
 * `extra` jobs beside them; returns the bytes of chunks written.
 */
async function pumpChunks(
  repo: Repository,
  index: FixedIndex,
  what: string,
  options: RestoreDiskOptions & { total?: number; run?: number; extra?: Array<() => Promise<number>> },
  writeChunks: (first: number, count: number) => Promise<number>,
): Promise<number> {
  const progress = options.progress ?? noProgress;
  type Work = { chunks: [number, number] } | { run: () => Promise<number> };
  const todo: Work[] = chunkRuns(index, options.run ?? 1).map((chunks) => ({ chunks }));
  for (const run of options.extra ?? []) todo.push({ run });
  let chunkBytes = 0;
  for (const w of todo) {
    if (!("chunks" in w)) continue;
    for (let k = 0; k < w.chunks[1]; k++) chunkBytes += index.chunkLength(w.chunks[0] + k);
  }
  const total = options.total ?? chunkBytes;
  progress.emit({ type: "start", job: "restore", total, message: what });
  let done = 0;
  let bytesWritten = 0;
  await forEachLimit(
    todo,
    options.inflight ?? repo.codec().threads * 2 + 2,
    async (w) => {
      options.signal?.throwIfAborted();
      if ("run" in w) {
        const n = await w.run();
        done += n;
      } else {
        const n = await writeChunks(w.chunks[0], w.chunks[1]);
        bytesWritten += n;
        done += n;
      }
      progress.emit({ type: "progress", job: "restore", done, total });
    },
    options.signal,
  );
  progress.emit({ type: "end", job: "restore" });
  return bytesWritten;
}

async function checkFileTarget(target: string, force: boolean): Promise<void> {
  const existing = await fs.lstat(target).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot inspect restore target ${target}`, err);
  });
  if (existing && !force)
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `restore target ${target} exists (use --force to replace it)`,
    );
  if (existing && !existing.isFile())
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `restore target ${target} exists and is not a regular file`,
    );
}

/** Restores a disk as a sparse qcow2 image at `target` (written under a temporary name, then renamed). */
export async function restoreDiskToQcow2(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  target: string,
  options: RestoreDiskOptions = {},
): Promise<RestoreDiskResult> {
  const index = await repo.index(snap, disk);
  await checkFileTarget(target, options.force === true);
  const tmp = join(dirname(target), `.${basename(target)}.strata-${randomBytes(4).toString("hex")}`);
  let daemon: StorageDaemon | undefined;
  let client: NbdClient | undefined;
  try {
    try {
      await runProgram("qemu-img", ["create", "-q", "-f", "qcow2", tmp, String(index.size)]);
    } catch (err) {
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `cannot create ${tmp}: ${(err as Error).message}`, {
        cause: err,
      });
    }
    await fs.chmod(tmp, 0o600);
    daemon = await StorageDaemon.start([{ path: tmp, format: "qcow2", name: "restore", writable: true }]);
    const inflight = options.inflight ?? repo.codec().threads * 2 + 2;
    client = await NbdClient.connect(
      { path: daemon.socket },
      {
        exportName: "restore",
        maxInFlight: inflight,
        ...(options.signal === undefined ? {} : { signal: options.signal }),
      },
    );
    const c = client;
    const what = `${snap.vm}/${snap.time} ${disk}`;
    const bytesWritten = await pumpChunks(repo, index, what, options, async (i) => {
      const data = await repo.readChunk(index.digest(i));
      if (data.length !== index.chunkLength(i)) {
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `chunk ${index.digest(i).toString("hex")} has the wrong length for ${what}`,
        );
      }
      await c.write(i * index.chunkSize, data);
      return data.length;
    });
    await client.flush();
    await client.close();
    client = undefined;
    await daemon.stop();
    daemon = undefined;
    await fs.rename(tmp, target);
    return { disk, path: target, size: index.size, bytesWritten };
  } catch (err) {
    await client?.close().catch(() => {});
    await daemon?.stop().catch(() => {});
    await fs.rm(tmp, { force: true });
    if (err instanceof StrataError) throw err;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot write restore target ${target}`, err);
  }
}

/** Size in bytes of the block device with device number `rdev` (Linux sysfs). */
async function blockDeviceSize(path: string, rdev: number): Promise<number> {
  // Linux dev_t: major = bits 8-19 and 32-43, minor = bits 0-7 and 20-31.
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((Math.floor(rdev / 4096) & 0xfff00) >>> 0);
  try {
    const sectors = Number((await fs.readFile(`/sys/dev/block/${major}:${minor}/size`, "utf8")).trim());
    if (Number.isSafeInteger(sectors)) return sectors * 512;
  } catch {
    // No sysfs: ask blockdev.
  }
  return Number((await runProgram("blockdev", ["--getsize64", path])).trim());
}

export interface RestoreDeviceResult extends RestoreDiskResult {
  /** Bytes of zero chunks written as zeros. */
  bytesZeroed: number;
  /** Size of the device (bytes past the disk's size are untouched). */
  deviceSize: number;
}

/**
 * Restores a disk onto an existing block device, overwriting it: every non-zero chunk is
 * written, every zero chunk written as zeros, then the device is synced. Refuses without
 * `force`, and refuses a device smaller than the disk.
 */
export async function restoreDiskToDevice(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  device: string,
  options: RestoreDiskOptions = {},
): Promise<RestoreDeviceResult> {
  const index = await repo.index(snap, disk);
  const st = await fs.stat(device).catch((err: unknown) => {
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot use device ${device}`, err);
  });
  if (!st.isBlockDevice()) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `${device} is not a block device (restore into a directory of image files with --target)`,
    );
  }
  const deviceSize = await blockDeviceSize(device, st.rdev);
  if (deviceSize < index.size) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `device ${device} holds ${deviceSize} bytes, too small for disk ${disk} of ${index.size} bytes`,
    );
  }
  if (!options.force) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `restoring onto ${device} destroys everything on it: add --force if that is what you want`,
    );
  }
  let fh: fs.FileHandle;
  try {
    fh = await fs.open(device, constants.O_RDWR | constants.O_EXCL);
  } catch (err) {
    if (errnoCode(err) === "EBUSY")
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `device ${device} is in use (mounted or held open)`, {
        cause: err,
      });
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot open device ${device}`, err);
  }
  let writer: ChunkWriter | undefined;
  try {
    // Zero chunks, merged into runs and cut into pieces of at most ZERO_WRITE bytes.
    const zeroRuns: Array<[number, number]> = [];
    for (let i = 0; i < index.count; i++) {
      if (!index.isZero(i)) continue;
      const start = i * index.chunkSize;
      const len = index.chunkLength(i);
      const last = zeroRuns[zeroRuns.length - 1];
      if (last && last[0] + last[1] === start && last[1] + len <= ZERO_WRITE) last[1] += len;
      else zeroRuns.push([start, len]);
    }
    const inflight = options.inflight ?? restoreInflight(repo.codec().threads, index.chunkSize);
    const run = restoreRunChunks(index.chunkSize);
    writer = await ChunkWriter.open(fh, device, {
      chunkSize: index.chunkSize,
      inflight,
      run,
      direct: options.direct !== false,
      zeroWrite: Math.min(
        ZERO_WRITE,
        zeroRuns.reduce((m, r) => Math.max(m, r[1]), 0),
      ),
    });
    const w = writer;
    let bytesZeroed = 0;
    const extra = zeroRuns.map(([start, len]) => async () => {
      await w.zeros(start, len);
      bytesZeroed += len;
      return len;
    });
    const what = `${snap.vm}/${snap.time} ${disk}`;
    const bytesWritten = await pumpChunks(
      repo,
      index,
      what,
      { ...options, inflight, run, total: index.size, extra },
      (first, count) => w.run(repo, index, first, count, what),
    );
    await writer.finish();
    await fh.close();
    return { disk, path: device, size: index.size, bytesWritten, bytesZeroed, deviceSize };
  } catch (err) {
    await writer?.abandon();
    await fh.close().catch(() => {});
    if (err instanceof StrataError) throw err;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot write device ${device}`, err);
  }
}
