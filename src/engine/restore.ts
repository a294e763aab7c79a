/**
 * Restore of a disk to a raw file: index → chunks fetched in parallel (bounded), each verified
 * on a worker thread → positioned writes. All-zero chunks are never written, so the file is
 * sparse. The data goes to a temporary file beside the target, renamed into place once
 * complete and synced: a failed restore never leaves a file that looks whole.
 * Writes go around the page cache where the filesystem allows it ({@link ChunkWriter}).
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, dirname, join } from "node:path";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, ioError, isNotFound, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { ChunkWriter, chunkRuns, restoreInflight, restoreRunChunks } from "./chunk-writer.js";

export interface RestoreDiskOptions {
  /** Replace an existing target. */
  force?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
  /** Work in flight at once: runs of consecutive chunks for raw files and devices, else chunks. */
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
  let writer: ChunkWriter | undefined;
  let bytesWritten = 0;
  try {
    await fh.truncate(index.size);
    const run = restoreRunChunks(index.chunkSize);
    const runs = chunkRuns(index, run);
    let total = 0;
    for (const [first, count] of runs) for (let k = 0; k < count; k++) total += index.chunkLength(first + k);
    progress.emit({ type: "start", job: "restore", total, message: `${snap.vm}/${snap.time} ${disk}` });
    const inflight = options.inflight ?? restoreInflight(repo.codec().threads, index.chunkSize);
    writer = await ChunkWriter.open(fh, tmp, {
      chunkSize: index.chunkSize,
      inflight,
      run,
      direct: options.direct !== false,
    });
    const w = writer;
    await forEachLimit(
      runs,
      inflight,
      async ([first, count]) => {
        options.signal?.throwIfAborted();
        const n = await w.run(repo, index, first, count, disk);
        bytesWritten += n;
        progress.emit({ type: "progress", job: "restore", done: bytesWritten, total });
      },
      options.signal,
    );
    await writer.finish();
    await fh.close();
    await fs.rename(tmp, target);
    progress.emit({ type: "end", job: "restore" });
  } catch (err) {
    await writer?.abandon();
    await fh.close().catch(() => {});
    await fs.rm(tmp, { force: true });
    if (err instanceof StrataError) throw err;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot write restore target ${target}`, err);
  }
  return { disk, path: target, size: index.size, bytesWritten };
}
