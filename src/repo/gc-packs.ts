/**
 * gc of a format v2 repository: chunks live in packs that are never changed, and writers reuse a
 * chunk by finding it in the pack index, without touching anything. So gc can't delete a pack the
 * moment no restore point needs it: a backup that read the index before may be about to reference
 * one of its chunks. Instead a pack goes through two gc runs:
 *
 * 1. condemn: gc writes a new index in which the pack is "condemned at T" (T just before the
 *    index is stored). Writers that read the index from then on don't reuse its chunks (they
 *    store them anew if they meet them); readers still find them there.
 * 2. delete: a later gc deletes the pack if T < cutoff, the same cutoff as ever:
 *    min(gc start, start of the oldest live backup) − grace. Every backup that could have
 *    read the index before T has then ended, so it either committed — and gc, which lists locks
 *    before restore points, sees its manifest — or left nothing behind. If a complete restore
 *    point does need a chunk of the pack (such a backup committed it), the pack is live again
 *    instead ("resurrected").
 *
 * The grace covers clock skew between hosts and the time it takes to store the new index.
 *
 * A pack most of whose bytes no restore point needs is repacked: its needed chunks are read,
 * verified and written to new packs, and the old pack is condemned like an unused one.
 * With `recompress` (a zstd level), every other live pack not yet recompressed is rewritten the
 * same way, each needed chunk decoded, verified and encoded again at that level: backups store
 * at a fast level to keep up with the disk, and an idle host can then make the stored bytes
 * smaller. Chunk names come from the plaintext, so no restore point changes.
 * Packs that no index names (a backup or a repack that died before its index was stored) are
 * deleted once they were created before the cutoff (less the stores' time slack): a live
 * writer's packs are all newer.
 *
 * Crash safety: new packs are stored before the index that names them; the new index is stored
 * (naming the index objects it replaces as superseded) before any pack or old index object is
 * deleted. Killed at any point, the repository holds either the old index or the new one, and
 * every pack either of them needs (see pack-index.ts for a state split over several objects).
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import type { ProgressSink } from "../util/progress.js";
import { keys, PACK_ID_RE } from "./format.js";
import { loadPackIndex, writeIndexObjects } from "./layout.js";
import { PackWriter } from "./pack.js";
import { PACK_FLAG_RECOMPRESSED, type PackRecord } from "./pack-index.js";
import type { Repository } from "./repository.js";
import { type Retention, STORE_TIME_SLACK_MS } from "./store.js";

/** Repack a pack when more than this share of its bytes is unused. */
export const DEFAULT_REPACK_UNUSED = 0.5;

export interface PackGcReport {
  packsDeleted: number;
  packsCondemned: number;
  packsRepacked: number;
  packsResurrected: number;
  orphansDeleted: number;
  /** Condemned packs kept for a later gc (a writer that might use them may still run). */
  packsWaiting: number;
  chunksRemoved: number;
  bytesFreed: number;
  /** Unused chunks left in packs that are mostly used. */
  chunksKeptInPacks: number;
  /** Packs rewritten at a stronger zstd level (counted in packsRepacked too). */
  packsRecompressed: number;
  /** Packs kept as they were because a chunk in them is damaged, with why. */
  packsNotRepacked: string[];
  /** Packs that would have been deleted but are locked (S3 Object Lock); a later gc deletes them. */
  packsLocked: number;
  /** Stored bytes of the chunks repacked, before and after. */
  repackedBytesBefore: number;
  repackedBytesAfter: number;
}

export async function gcPacks(
  repo: Repository,
  marked: ReadonlySet<string>,
  cutoff: number,
  options: {
    dryRun?: boolean;
    repackUnused?: number;
    /** zstd level to recompress live packs at (not yet recompressed ones); none by default. */
    recompress?: number;
    progress: ProgressSink;
    signal?: AbortSignal;
    /** Retention for the index objects gc writes (S3 Object Lock). */
    retain?: Retention;
    /** Told of each object kept because it is locked ("key (until time)"). */
    onLocked?: (what: string) => void;
  },
): Promise<PackGcReport> {
  const store = repo.store;
  const codec = repo.codec();
  const index = await loadPackIndex(store, codec);
  const report: PackGcReport = {
    packsDeleted: 0,
    packsCondemned: 0,
    packsRepacked: 0,
    packsResurrected: 0,
    orphansDeleted: 0,
    packsWaiting: 0,
    chunksRemoved: 0,
    bytesFreed: 0,
    chunksKeptInPacks: 0,
    packsRecompressed: 0,
    packsNotRepacked: [],
    packsLocked: 0,
    repackedBytesBefore: 0,
    repackedBytesAfter: 0,
  };

  // A chunk a restore point needs but no index knows: its pack may look orphaned. Stop.
  const lost = [...marked].filter((hex) => !index.locate(hex));
  if (lost.length > 0) {
    throw new StrataError(
      ErrorCode.DATA_MISSING,
      `gc stopped before removing anything: ${lost.length} chunk(s) that restore points need are in no pack index (first: ${lost[0]}). Run "strata verify".`,
    );
  }

  const listed = new Map<string, { size: number; created: number }>();
  for await (const o of store.list("packs/")) {
    const id = o.key.slice(o.key.lastIndexOf("/") + 1);
    if (PACK_ID_RE.test(id) && o.key === keys.pack(id)) listed.set(id, { size: o.size, created: o.mtimeMs });
  }

  const next: PackRecord[] = [];
  const remove: string[] = [];
  const live: PackRecord[] = [];
  for (const p of index.packs.values()) {
    if (p.condemnedAt === 0) live.push(p);
    else if (p.condemnedAt >= cutoff) {
      report.packsWaiting++;
      next.push(p);
    } else if (p.entries.some((e) => marked.has(e.digest) && !index.hasLive(e.digest))) {
      report.packsResurrected++;
      live.push({ ...p, condemnedAt: 0 });
    } else {
      remove.push(p.id);
      report.chunksRemoved += p.entries.length;
    }
  }

  // Which copy of a chunk counts as used: the first live pack that holds it.
  const counted = new Set<string>();
  const repack: Array<{ pack: PackRecord; used: PackRecord["entries"] }> = [];
  const condemn: PackRecord[] = [];
  const threshold = options.repackUnused ?? DEFAULT_REPACK_UNUSED;
  for (const p of live) {
    const used = p.entries.filter((e) => marked.has(e.digest) && !counted.has(e.digest));
    for (const e of used) counted.add(e.digest);
    const total = p.entries.reduce((n, e) => n + e.length, 0);
    const usedBytes = used.reduce((n, e) => n + e.length, 0);
    if (used.length === 0) condemn.push(p);
    else if (total - usedBytes > threshold * total) repack.push({ pack: p, used });
    else if (options.recompress !== undefined && ((p.flags ?? 0) & PACK_FLAG_RECOMPRESSED) === 0) {
      repack.push({ pack: p, used });
      report.packsRecompressed++;
    } else {
      report.chunksKeptInPacks += p.entries.length - used.length;
      next.push(p);
    }
  }

  // Orphans: stored, named by no index, and older than any live writer. A pack's stored time may
  // lie a little before the moment it was written (store.ts): one a writer stored just after it
  // started must not look older than the writer.
  for (const [id, info] of listed) {
    if (!index.packs.has(id) && info.created < cutoff - STORE_TIME_SLACK_MS) {
      remove.push(id);
      report.orphansDeleted++;
    }
  }

  // Packs under a retention that has not passed can't be deleted yet: a condemned one stays in the
  // index as it is (a later gc deletes it), an unfinished one stays where it is.
  if (remove.length > 0 && store.retention && (await store.objectLock?.())) {
    const now = repo.clock.now();
    const held = new Set<string>();
    await forEachLimit(remove, 16, async (id) => {
      const r = await store.retention!(keys.pack(id));
      if (r && r.untilMs > now) {
        held.add(id);
        options.onLocked?.(`${keys.pack(id)} (until ${new Date(r.untilMs).toISOString()})`);
      }
    });
    for (const id of held) {
      const p = index.packs.get(id);
      if (p) {
        next.push(p);
        report.chunksRemoved -= p.entries.length;
      } else report.orphansDeleted--;
      report.packsLocked++;
    }
    remove.splice(0, remove.length, ...remove.filter((id) => !held.has(id)));
  }

  options.progress.emit({
    type: "start",
    job: "gc",
    total: repack.length,
    message: `${condemn.length} pack(s) unused, ${repack.length} to repack, ${remove.length} to delete`,
  });
  report.packsCondemned = condemn.length;
  report.packsRepacked = repack.length;
  for (const p of remove) report.bytesFreed += listed.get(p)?.size ?? 0;
  if (options.dryRun) {
    options.progress.emit({ type: "end", job: "gc" });
    return report;
  }

  // Repack: needed chunks into new packs, each verified on the way; the old packs are condemned.
  if (repack.length > 0) {
    const level = options.recompress;
    const writer = new PackWriter(
      store,
      codec,
      repo.chunkSize,
      undefined,
      level === undefined ? 0 : PACK_FLAG_RECOMPRESSED,
    );
    let done = 0;
    try {
      for (const { pack, used } of repack) {
        options.signal?.throwIfAborted();
        // Chunks of one pack in parallel on the codec's workers; each is added as it is ready.
        // A damaged chunk keeps its pack live as it is (verify names it), and gc goes on: one bad
        // chunk must not stop the space of every other pack from being freed.
        const damaged = await forEachLimit(used, codec.threads * 2, async (e) => {
          const stored = await store.getRange(keys.pack(pack.id), e.offset, e.length);
          // Decoding checks tag and digest: a damaged chunk is not copied as if it were good.
          const plain = await codec.decode(
            Buffer.from(stored),
            Buffer.from(e.digest, "hex"),
            `${e.digest} in pack ${pack.id}`,
          );
          const out = level === undefined ? stored : (await codec.encode(plain, level)).blob;
          // A stronger level that does not shrink a chunk keeps the bytes it had.
          const kept = out.length < stored.length ? out : stored;
          report.repackedBytesBefore += stored.length;
          report.repackedBytesAfter += kept.length;
          await writer.add(e.digest, kept);
        }).then(
          () => undefined,
          (err: unknown) => {
            if (err instanceof StrataError && err.code === ErrorCode.DATA_CORRUPT) return err;
            throw err;
          },
        );
        if (damaged) {
          report.packsNotRepacked.push(`${pack.id}: ${damaged.message}`);
          next.push(pack);
          continue;
        }
        report.chunksRemoved += pack.entries.length - used.length;
        condemn.push(pack);
        options.progress.emit({ type: "progress", job: "gc", done: ++done, total: repack.length });
      }
      next.push(...(await writer.finish()));
      report.packsRepacked -= report.packsNotRepacked.length;
    } catch (err) {
      await writer.abandon();
      throw err;
    }
  }

  const changed = condemn.length > 0 || remove.length > 0 || report.packsResurrected > 0;
  if (changed || index.objects.size > 1) {
    // T is taken now, just before the index that condemns is stored (see the top of this file).
    const t = Math.max(repo.clock.now(), cutoff + 1);
    for (const p of condemn) next.push({ ...p, condemnedAt: t });
    const written = new Set(
      await writeIndexObjects(store, codec, next, [...index.objects.keys()], true, options.retain),
    );
    await store.flush();
    const unlessLocked = async (key: string): Promise<boolean> => {
      try {
        await store.delete(key);
        return true;
      } catch (err) {
        if (!store.isLocked?.(err)) throw err;
        options.onLocked?.((err as Error).message);
        return false;
      }
    };
    for (const id of remove) {
      if (await unlessLocked(keys.pack(id))) continue;
      report.packsLocked++;
      report.bytesFreed -= listed.get(id)?.size ?? 0;
    }
    // A superseded index object still locked stays; readers ignore it, the next gc supersedes it again.
    for (const name of index.objects.keys()) if (!written.has(name)) await unlessLocked(keys.packIndex(name));
  }
  report.packsDeleted = remove.length - report.orphansDeleted;
  options.progress.emit({ type: "end", job: "gc" });
  return report;
}
