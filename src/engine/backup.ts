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

/** What the engine needs of a disk to back it up. */
export interface DiskSource {
  name: string;
  /** Where it comes from, for people. */
  source: string;
  size: number;
  /** Exactly `length` bytes at `offset`, in a buffer that owns its memory. */
  read(offset: number, length: number): Promise<Buffer>;
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
      const chunkIndices = (function* () {
        for (let i = 0; i < index.count; i++) yield i;
      })();
      await forEachLimit(
        chunkIndices,
        inflight,
        async (i) => {
          options.signal?.throwIfAborted();
          const length = index.chunkLength(i);
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
