/**
 * Copy: restore points from one repository into another (a local one to an S3 bucket offsite, a
 * bucket back to a local directory, a directory to another), under the same VM name and time.
 *
 * For each restore point: already in the target (its manifest is there) → nothing is sent;
 * otherwise its chunks go through a writer of the target exactly like a backup's (backup lock
 * claiming `vm/time`, so gc on the target sees it and keeps what it relies on), then its fixed
 * indexes, its config blob and, last, its manifest: a copy killed at any instant leaves no
 * partial restore point, only packs for gc.
 *
 * Chunk names are keyed per repository (format v2: BLAKE3 keyed with the repository's MAC key
 * when encrypted; format v1: SHA-256/HMAC), so a chunk keeps its name only between two
 * repositories whose names agree (same format family, both unencrypted or the same MAC key).
 * Then a chunk the target holds is skipped without reading the source at all. Otherwise every
 * chunk is read from the source (verified against its source name), named again with the
 * target's key, and sent only when the target lacks it under that name. Every chunk sent is read
 * from the source, verified, and encoded again under the target's key (zstd, AES-256-GCM when
 * the target is encrypted): nothing unverified reaches the target, and the source's key never does.
 *
 * Resuming after a kill -9: the packs the target has stored are named by an index object every
 * {@link COPY_CHECKPOINT_MS} ({@link BackupWriter.checkpoint}), so the next run finds their chunks
 * present and does not send them again (unless a gc condemned them in between: then they are
 * sent again, which is what gc's protocol expects).
 */
import { FixedIndex } from "../repo/fixed-index.js";
import { ZERO_DIGEST } from "../repo/format.js";
import type { Manifest, ManifestDisk } from "../repo/manifest.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { defaultInflight } from "./backup.js";

export interface CopyOptions {
  progress?: ProgressSink;
  signal?: AbortSignal;
  /** Chunks in flight at once (read, verified, encoded, sent). */
  inflight?: number;
  /** One line per restore point, for people. */
  log?: (message: string) => void;
  /**
   * How often, at most, the packs stored so far are made findable in the target (one index
   * object each time): what a rerun after a kill would have to send again. Default 30 s.
   */
  checkpointMs?: number;
}

/** Default {@link CopyOptions.checkpointMs}: a 1 TiB copy at 100 MB/s writes ~370 index objects. */
export const COPY_CHECKPOINT_MS = 30_000;

export interface CopiedPoint {
  id: string;
  /** "copied": written to the target now; "present": the target had it already. */
  state: "copied" | "present";
  /** Plaintext bytes of its disks. */
  size: number;
  /** Chunks sent to the target (the target lacked them), and their stored bytes. */
  chunksSent: number;
  bytesSent: number;
  /** Non-zero chunks the target already held. */
  chunksPresent: number;
  chunksZero: number;
}

export interface CopyReport {
  points: CopiedPoint[];
  copied: number;
  present: number;
  chunksSent: number;
  bytesSent: number;
  chunksPresent: number;
  /** True when chunks had to be named again under the target's key (keys or formats differ). */
  renamed: boolean;
}

/**
 * True when a chunk has the same name in both repositories: same digest (SHA-256 in v1, BLAKE3
 * in v2), and both unencrypted or keyed with the same MAC key.
 */
export function sameChunkNames(a: Repository, b: Repository): boolean {
  if (a.digestKind !== b.digestKind) return false;
  if (a.keys === undefined || b.keys === undefined) return a.keys === b.keys;
  return a.keys.macKey.equals(b.keys.macKey);
}

/** Refuses what can't be copied: the same repository, or another chunk size. */
export function checkCopyable(from: Repository, to: Repository): void {
  if (from.config.id === to.config.id)
    throw new StrataError(
      ErrorCode.USAGE,
      `${from.store.location} and ${to.store.location} are the same repository (id ${from.config.id})`,
    );
  if (from.chunkSize !== to.chunkSize)
    throw new StrataError(
      ErrorCode.USAGE,
      `the repositories have different chunk sizes (${from.chunkSize} bytes in ${from.store.location}, ` +
        `${to.chunkSize} in ${to.store.location}): create the target with "strata init --chunk-size ${from.chunkSize}"`,
    );
}

/** The fields that say two manifests describe the same restore point, whatever the keys. */
function identity(m: Manifest): string {
  return JSON.stringify([
    m.mode,
    m.consistency,
    m.parent,
    m.host,
    m.durationMs,
    m.disks.map((d) => [d.name, d.size, d.source]),
    m.config === null ? null : [m.config.name, m.config.size],
  ]);
}

/** Copies `snaps` (oldest first, as listed) from `from` into `to`. */
export async function copySnapshots(
  from: Repository,
  to: Repository,
  snaps: readonly SnapshotRef[],
  options: CopyOptions = {},
): Promise<CopyReport> {
  checkCopyable(from, to);
  const progress = options.progress ?? noProgress;
  const renamed = !sameChunkNames(from, to);
  const total = snaps.reduce((n, s) => n + s.manifest.disks.reduce((m, d) => m + d.size, 0), 0);
  progress.emit({ type: "start", job: "copy", total, message: `${snaps.length} restore point(s)` });
  const state = { done: 0, sent: 0, total, checkpointed: Date.now() };
  const report: CopyReport = {
    points: [],
    copied: 0,
    present: 0,
    chunksSent: 0,
    bytesSent: 0,
    chunksPresent: 0,
    renamed,
  };
  for (const snap of snaps) {
    options.signal?.throwIfAborted();
    const point = await copyPoint(from, to, snap, renamed, state, progress, options);
    report.points.push(point);
    if (point.state === "copied") report.copied++;
    else report.present++;
    report.chunksSent += point.chunksSent;
    report.bytesSent += point.bytesSent;
    report.chunksPresent += point.chunksPresent;
    options.log?.(
      point.state === "present"
        ? `${point.id}: already in the target`
        : `${point.id}: copied, ${point.chunksSent} chunks sent, ${point.chunksPresent} already there`,
    );
  }
  progress.emit({ type: "end", job: "copy" });
  return report;
}

async function copyPoint(
  from: Repository,
  to: Repository,
  snap: SnapshotRef,
  renamed: boolean,
  state: { done: number; sent: number; total: number; checkpointed: number },
  progress: ProgressSink,
  options: CopyOptions,
): Promise<CopiedPoint> {
  const id = `${snap.vm}/${snap.time}`;
  const size = snap.manifest.disks.reduce((n, d) => n + d.size, 0);
  const point: CopiedPoint = {
    id,
    state: "present",
    size,
    chunksSent: 0,
    bytesSent: 0,
    chunksPresent: 0,
    chunksZero: 0,
  };
  const tick = (bytes: number) => {
    state.done += bytes;
    progress.emit({
      type: "progress",
      job: "copy",
      done: state.done,
      total: state.total,
      bytesNew: state.sent,
    });
  };
  const existing = await presentIn(to, snap);
  if (existing) {
    if (identity(existing) !== identity(snap.manifest))
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${to.store.location} already holds a different restore point ${id}: not overwritten`,
      );
    tick(size);
    return point;
  }
  point.state = "copied";
  const writer = await to.startRestorePoint(snap.vm, snap.time, `copy of ${id} from ${from.store.location}`);
  try {
    const inflight = options.inflight ?? defaultInflight(to.codec().threads, to.chunkSize);
    const disks: ManifestDisk[] = [];
    for (const disk of snap.manifest.disks) {
      const source = await from.index(snap, disk.name);
      const index = new FixedIndex(disk.size, to.chunkSize);
      const what = `${id}/${disk.name}`;
      await forEachLimit(
        (function* () {
          for (let i = 0; i < source.count; i++) yield i;
        })(),
        inflight,
        async (i) => {
          options.signal?.throwIfAborted();
          const length = source.chunkLength(i);
          if (source.isZero(i)) {
            index.setDigest(i, ZERO_DIGEST);
            point.chunksZero++;
            tick(length);
            return;
          }
          const digest = source.digest(i);
          // Same names in both: what the target holds is known without reading the source.
          if (!renamed && (await writer.haveChunk(digest))) {
            index.setDigest(i, digest);
            point.chunksPresent++;
            tick(length);
            return;
          }
          // Verified against its name in the source (a damaged chunk stops the copy).
          const plain = await from.readChunk(digest);
          if (plain.length !== length)
            throw new StrataError(
              ErrorCode.DATA_CORRUPT,
              `chunk ${digest.toString("hex")} has the wrong length for ${what}`,
            );
          const named = renamed ? await to.codec().hash(plain) : { digest, data: plain };
          index.setDigest(i, named.digest);
          const r = await writer.putChunk(named.digest, named.data);
          if (r.state === "new") {
            point.chunksSent++;
            point.bytesSent += r.stored;
            state.sent += r.stored;
            // The packs stored so far become findable: a rerun after a kill does not send them again.
            if (Date.now() - state.checkpointed >= (options.checkpointMs ?? COPY_CHECKPOINT_MS)) {
              state.checkpointed = Date.now();
              if ((await writer.checkpoint()) === 0) state.checkpointed = 0;
            }
          } else {
            point.chunksPresent++;
          }
          tick(length);
        },
        options.signal,
      );
      await writer.writeIndex(disk.name, index);
      disks.push({ ...disk, indexChecksum: index.checksum() });
    }
    const config = snap.manifest.config
      ? await writer.writeBlob(snap.manifest.config.name, await from.blob(snap, snap.manifest.config))
      : null;
    const m = snap.manifest;
    // Every chunk, index and blob is durable in the target before the manifest is written.
    await writer.commit(
      {
        mode: m.mode,
        consistency: m.consistency,
        parent: m.parent,
        disks,
        config,
        bitmap: m.bitmap,
        durationMs: m.durationMs,
      },
      m.host,
    );
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return point;
}

/** The target's manifest of the same restore point, or undefined when it has none. */
async function presentIn(to: Repository, snap: SnapshotRef): Promise<Manifest | undefined> {
  try {
    return await to.manifest(snap.vm, snap.time);
  } catch (err) {
    if (err instanceof StrataError && err.code === ErrorCode.NOT_FOUND) return undefined;
    throw err;
  }
}
