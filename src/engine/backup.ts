/**
 * Backup: disks → fixed chunks → (zero? skip) → digest → stored already? touch : encode + store
 * → index → manifest.
 *
 * Reads run ahead of the workers by a bounded number of chunks, so at most `inflight` chunk
 * buffers exist at once whatever the disk size; digest and encode run on worker threads. Zero
 * chunks are detected before any hashing and never stored.
 */
import { FixedIndex } from "../repo/fixed-index.js";
import { ZERO_DIGEST } from "../repo/format.js";
import type { BackupMode, Consistency, Manifest, ManifestDisk } from "../repo/manifest.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";

/** A run of a disk; `zero` when it reads as zeros (a hole, or zeros the format knows of). */
export interface DataExtent {
  offset: number;
  length: number;
  zero: boolean;
}

/** What the engine needs of a disk to back it up. */
export interface DiskSource {
  name: string;
  /** Where it comes from, for people. */
  source: string;
  size: number;
  /** Exactly `length` bytes at `offset`, in a buffer that owns its memory. */
  read(offset: number, length: number): Promise<Buffer>;
  /**
   * Which parts of the disk read as zeros, when the source knows (image metadata, SEEK_HOLE,
   * NBD base:allocation). Chunks wholly inside such parts are never read.
   */
  allocation?(): Promise<DataExtent[]>;
}

/** For each chunk, whether any byte of it may be non-zero according to `extents`. */
export function chunksWithData(extents: readonly DataExtent[], size: number, chunkSize: number): Uint8Array {
  const count = Math.ceil(size / chunkSize);
  const data = new Uint8Array(count);
  let covered = 0;
  for (const e of extents) {
    if (e.offset !== covered)
      throw new StrataError(ErrorCode.INTERNAL, `allocation map has a gap at ${covered}`);
    covered = e.offset + e.length;
    if (e.zero || e.length === 0) continue;
    const first = Math.floor(e.offset / chunkSize);
    const last = Math.min(count - 1, Math.floor((e.offset + e.length - 1) / chunkSize));
    data.fill(1, first, last + 1);
  }
  if (covered < size) data.fill(1, Math.floor(covered / chunkSize));
  return data;
}

export interface BackupOptions {
  vm: string;
  disks: readonly DiskSource[];
  mode: BackupMode;
  consistency: Consistency;
  /** The VM configuration, stored with the restore point. */
  config?: Buffer;
  progress?: ProgressSink;
  signal?: AbortSignal;
  /** Chunks in flight at once (read, hashed, encoded, written). */
  inflight?: number;
}

export interface BackupResult {
  manifest: Manifest;
  /** The restore point's id, "vm/time". */
  id: string;
}

export async function backup(repo: Repository, options: BackupOptions): Promise<BackupResult> {
  const progress = options.progress ?? noProgress;
  const names = new Set<string>();
  for (const d of options.disks) {
    if (names.has(d.name)) throw new StrataError(ErrorCode.USAGE, `two disks are named "${d.name}"`);
    names.add(d.name);
  }
  if (options.disks.length === 0)
    throw new StrataError(ErrorCode.USAGE, "nothing to back up: no disks given");
  const started = repo.clock.now();
  const writer = await repo.startBackup(options.vm, `backup of ${options.vm}`);
  try {
    const previous = (await repo.snapshots(options.vm, () => {})).at(-1);
    const total = options.disks.reduce((n, d) => n + d.size, 0);
    progress.emit({ type: "start", job: "backup", total, message: `${options.vm}/${writer.time}` });
    let doneBytes = 0;
    let newBytes = 0;
    const disks: ManifestDisk[] = [];
    const chunkSize = repo.chunkSize;
    const zero = Buffer.alloc(chunkSize);
    const inflight = options.inflight ?? repo.codec().threads * 2 + 2;
    for (const disk of options.disks) {
      const index = new FixedIndex(disk.size, chunkSize);
      const stats: ManifestDisk = {
        name: disk.name,
        size: disk.size,
        indexChecksum: "",
        source: disk.source,
        bytesRead: 0,
        bytesNew: 0,
        bytesStored: 0,
        chunksNew: 0,
        chunksReused: 0,
        chunksZero: 0,
      };
      const hasData = disk.allocation
        ? chunksWithData(await disk.allocation(), disk.size, chunkSize)
        : undefined;
      const chunkIndices = (function* () {
        for (let i = 0; i < index.count; i++) yield i;
      })();
      await forEachLimit(
        chunkIndices,
        inflight,
        async (i) => {
          options.signal?.throwIfAborted();
          const length = index.chunkLength(i);
          if (hasData && hasData[i] === 0) {
            index.setDigest(i, ZERO_DIGEST);
            stats.chunksZero++;
            doneBytes += length;
            progress.emit({ type: "progress", job: "backup", done: doneBytes, total, bytesNew: newBytes });
            return;
          }
          const data = await disk.read(i * chunkSize, length);
          stats.bytesRead += length;
          if (data.equals(length === chunkSize ? zero : zero.subarray(0, length))) {
            index.setDigest(i, ZERO_DIGEST);
            stats.chunksZero++;
          } else {
            const hashed = await repo.codec().hash(data);
            index.setDigest(i, hashed.digest);
            const r = await writer.putChunk(hashed.digest, hashed.data);
            if (r.state === "new") {
              stats.chunksNew++;
              stats.bytesNew += length;
              stats.bytesStored += r.stored;
              newBytes += length;
            } else {
              stats.chunksReused++;
            }
          }
          doneBytes += length;
          progress.emit({ type: "progress", job: "backup", done: doneBytes, total, bytesNew: newBytes });
        },
        options.signal,
      );
      stats.indexChecksum = index.checksum();
      await writer.writeIndex(disk.name, index);
      disks.push(stats);
    }
    const config = options.config ? await writer.writeBlob("config.blob", options.config) : null;
    const manifest = await writer.commit({
      mode: options.mode,
      consistency: options.consistency,
      parent: previous?.time ?? null,
      disks,
      config,
      bitmap: null,
      durationMs: repo.clock.now() - started,
    });
    progress.emit({ type: "end", job: "backup" });
    return { manifest, id: `${options.vm}/${writer.time}` };
  } catch (err) {
    await writer.abort();
    throw err;
  }
}
