/**
 * forget (apply retention, remove manifests) and gc (mark and sweep chunks).
 *
 * gc is safe beside running backups. It marks every chunk that a complete restore point
 * references, then removes the rest that no live backup may rely on, judged against
 * cutoff = min(gc start, start of the oldest live backup) − grace. Format v1 sweeps chunk objects
 * with Store.deleteIfUntouched(cutoff): a backup touches every chunk it reuses and writes every
 * chunk it stores after it started, so nothing a live backup relies on is older than the cutoff.
 * Stored times are compared against the cutoff less STORE_TIME_SLACK_MS: a store may stamp an
 * object a little before the moment it was written.
 * Format v2 condemns packs first and deletes them in a later run (gc-packs.ts). A damaged manifest or index stops gc before it sweeps anything: it
 * can't know what such a restore point needs.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { keys, TIME_RE } from "./format.js";
import { gcPacks, type PackGcReport } from "./gc-packs.js";
import { isStale, type LockInfo, listLocks } from "./locks.js";
import type { Repository, SnapshotRef } from "./repository.js";
import { applyRetention, isEmptyPolicy, type KeepPolicy, type KeepRule } from "./retention.js";
import { type Retention, STORE_TIME_SLACK_MS } from "./store.js";

export interface ForgetPlan {
  keep: Array<{ id: string; reasons: KeepRule[] }>;
  remove: string[];
  /** Restore points the policy would remove but that are locked (S3 Object Lock): kept, with until when. */
  locked: Array<{ id: string; until: string }>;
}

/** Applies `policy` to each VM's restore points (or only `vm`'s); removes unless `dryRun`. */
export async function forget(
  repo: Repository,
  policy: KeepPolicy,
  options: { vm?: string; dryRun?: boolean } = {},
): Promise<ForgetPlan> {
  if (isEmptyPolicy(policy)) {
    throw new StrataError(
      ErrorCode.USAGE,
      "no keep policy given (e.g. --keep-last 7 --keep-daily 14): nothing would be kept, so nothing is removed",
    );
  }
  if (!options.dryRun) await repo.store.checkDelete?.();
  const lock = options.dryRun ? undefined : await repo.lock("exclusive", "forget");
  try {
    const snaps = await repo.snapshots(options.vm);
    const byVm = new Map<string, SnapshotRef[]>();
    for (const s of snaps) byVm.set(s.vm, [...(byVm.get(s.vm) ?? []), s]);
    const plan: ForgetPlan = { keep: [], remove: [], locked: [] };
    for (const group of byVm.values()) {
      const d = applyRetention(group, policy, (s) => Date.parse(s.time));
      plan.keep.push(...d.keep.map((k) => ({ id: `${k.item.vm}/${k.item.time}`, reasons: k.reasons })));
      plan.remove.push(...d.remove.map((s) => `${s.vm}/${s.time}`));
    }
    plan.locked = await lockedOf(repo, plan.remove);
    const held = new Set(plan.locked.map((l) => l.id));
    plan.remove = plan.remove.filter((id) => !held.has(id));
    if (!options.dryRun) await removeSnapshots(repo, plan.remove);
    return plan;
  } finally {
    await lock?.release();
  }
}

/**
 * Removes the named restore points ("vm/time"); each must exist. Returns their ids, and those
 * kept because they are locked.
 */
export async function forgetIds(
  repo: Repository,
  ids: readonly string[],
  dryRun = false,
): Promise<{ removed: string[]; locked: ForgetPlan["locked"] }> {
  if (!dryRun) await repo.store.checkDelete?.();
  const lock = dryRun ? undefined : await repo.lock("exclusive", "forget");
  try {
    const snaps: SnapshotRef[] = [];
    for (const id of ids) snaps.push(await repo.findSnapshot(id));
    const resolved = [...new Set(snaps.map((s) => `${s.vm}/${s.time}`))];
    const locked = await lockedOf(repo, resolved);
    const held = new Set(locked.map((l) => l.id));
    const removed = resolved.filter((id) => !held.has(id));
    if (!dryRun) await removeSnapshots(repo, removed);
    return { removed, locked };
  } finally {
    await lock?.release();
  }
}

/**
 * Which of the restore points can't be removed yet: an object of theirs is under a retention
 * that has not passed (S3 Object Lock). Nothing of those is deleted, so none is left half gone.
 */
async function lockedOf(repo: Repository, ids: readonly string[]): Promise<ForgetPlan["locked"]> {
  const store = repo.store;
  if (ids.length === 0 || !store.retention || !(await store.objectLock?.())) return [];
  const now = repo.clock.now();
  const out: ForgetPlan["locked"] = [];
  await forEachLimit(ids, 8, async (id) => {
    const [vm, time] = id.split("/") as [string, string];
    let until = 0;
    for await (const o of store.list(`${keys.snapshotDir(vm, time)}/`)) {
      const r = await store.retention!(o.key);
      if (r && r.untilMs > now) until = Math.max(until, r.untilMs);
    }
    if (until > 0) out.push({ id, until: new Date(until).toISOString() });
  });
  return out.sort((a, b) => a.id.localeCompare(b.id));
}

async function removeSnapshots(repo: Repository, ids: readonly string[]): Promise<void> {
  for (const id of ids) {
    const [vm, time] = id.split("/") as [string, string];
    // The manifest goes first: from then on the restore point no longer exists.
    await repo.store.delete(keys.manifest(vm, time));
    await repo.store.flush();
    await repo.store.deletePrefix(`${keys.snapshotDir(vm, time)}/`);
  }
  await repo.store.flush();
}

export interface GcReport extends Partial<PackGcReport> {
  chunksReferenced: number;
  chunksRemoved: number;
  bytesFreed: number;
  /** Format v1: unreferenced chunks kept because they were written or touched after the cutoff. */
  chunksKeptRecent?: number;
  incompleteRemoved: number;
  tempsRemoved: number;
  cutoff: string;
  /**
   * Objects gc would have deleted but kept because they are locked (S3 Object Lock), each as
   * "key (until time)"; gc deletes them once their retention has passed.
   */
  locked: string[];
}

export const DEFAULT_GC_GRACE_MS = 60 * 60_000;

export async function gc(
  repo: Repository,
  options: {
    graceMs?: number;
    dryRun?: boolean;
    /** Format v2: repack packs with more than this share of unused bytes (0..1). */
    repackUnused?: number;
    /** Format v2: rewrite packs not yet recompressed at this zstd level. */
    recompress?: number;
    progress?: ProgressSink;
    signal?: AbortSignal;
  } = {},
): Promise<GcReport> {
  const progress = options.progress ?? noProgress;
  const grace = options.graceMs ?? DEFAULT_GC_GRACE_MS;
  if (!options.dryRun) await repo.store.checkDelete?.();
  const lock = await repo.lock("exclusive", "gc");
  try {
    const start = repo.clock.now();
    // Writers first: anything a backup registered before this point is protected by the cutoff;
    // anything it writes later is newer than the gc start.
    const live: LockInfo[] = [];
    for (const l of await listLocks(repo.store, repo.clock)) {
      if (!isStale(l, repo.clock)) live.push(l);
      else if (!options.dryRun) await repo.store.delete(keys.lock(l.id));
    }
    const oldestWriter = Math.min(start, ...live.filter((l) => l.kind === "backup").map((l) => l.started));
    const cutoff = oldestWriter - grace;
    // Stored times may lie a little before the moment they stand for (store.ts).
    const storedCutoff = cutoff - STORE_TIME_SLACK_MS;
    const claims = new Set(live.map((l) => l.claim).filter((c): c is string => c !== undefined));

    const damaged: string[] = [];
    const snaps = await repo.snapshots(undefined, (vm, time, err) =>
      damaged.push(`${vm}/${time}: ${err.message}`),
    );
    const marked = new Set<string>();
    for (const snap of snaps) {
      for (const d of snap.manifest.disks) {
        try {
          const index = await repo.index(snap, d.name);
          for (let i = 0; i < index.count; i++)
            if (!index.isZero(i)) marked.add(index.digest(i).toString("hex"));
        } catch (err) {
          damaged.push(err instanceof Error ? err.message : String(err));
        }
      }
    }
    if (damaged.length > 0) {
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `gc stopped before removing anything: ${damaged.length} restore point(s) can't be read, so the chunks they need are unknown:\n  ${damaged.join("\n  ")}\nRun "strata verify", then forget or repair them.`,
      );
    }

    const locked: string[] = [];
    const keptLocked = (err: unknown): void => {
      if (!repo.store.isLocked?.(err)) throw err;
      locked.push((err as Error).message);
    };
    // Restore points whose writer died before the manifest: their folders are garbage.
    let incompleteRemoved = 0;
    const folders = new Map<string, number>();
    for await (const obj of repo.store.list("vms/")) {
      const parts = obj.key.split("/");
      if (parts.length !== 4 || !TIME_RE.test(parts[2]!)) continue;
      const id = `${parts[1]}/${parts[2]}`;
      const newest = Math.max(folders.get(id) ?? 0, obj.mtimeMs);
      folders.set(id, parts[3] === "manifest.json" ? Number.POSITIVE_INFINITY : newest);
    }
    for (const [id, newest] of folders) {
      if (newest === Number.POSITIVE_INFINITY || claims.has(id) || newest >= storedCutoff) continue;
      if (!options.dryRun) {
        const [vm, time] = id.split("/") as [string, string];
        try {
          await repo.store.deletePrefix(`${keys.snapshotDir(vm, time)}/`);
        } catch (err) {
          keptLocked(err);
          continue;
        }
      }
      incompleteRemoved++;
    }

    // Index objects gc writes name every pack the restore points need: locked as long as the
    // longest-locked restore point (a backup extends them later for its own).
    const retain = longestRetention(snaps, repo.clock.now());
    const swept =
      repo.layout.version === 1
        ? await sweepChunkObjects(repo, marked, storedCutoff, { ...options, progress })
        : await gcPacks(repo, marked, cutoff, {
            ...options,
            progress,
            ...(retain ? { retain } : {}),
            onLocked: (what) => locked.push(what),
          });
    const tempsRemoved = options.dryRun ? 0 : await repo.store.sweepTemporary(storedCutoff);
    await repo.store.flush();
    return {
      chunksReferenced: marked.size,
      incompleteRemoved,
      tempsRemoved,
      cutoff: new Date(cutoff).toISOString(),
      ...swept,
      locked,
    };
  } finally {
    await lock.release();
  }
}

/** The latest retention of the restore points (COMPLIANCE if any of those is), if it has not passed. */
function longestRetention(snaps: readonly SnapshotRef[], now: number): Retention | undefined {
  let until = 0;
  let compliance = false;
  for (const s of snaps) {
    const im = s.manifest.immutable;
    if (!im) continue;
    until = Math.max(until, Date.parse(im.until));
    compliance ||= im.mode === "COMPLIANCE";
  }
  return until > now ? { mode: compliance ? "COMPLIANCE" : "GOVERNANCE", untilMs: until } : undefined;
}

/** Format v1: deletes every unreferenced chunk object not written or touched since the cutoff. */
async function sweepChunkObjects(
  repo: Repository,
  marked: ReadonlySet<string>,
  cutoff: number,
  options: { dryRun?: boolean; progress: ProgressSink; signal?: AbortSignal },
): Promise<{ chunksRemoved: number; bytesFreed: number; chunksKeptRecent: number }> {
  const progress = options.progress;
  const candidates: Array<{ key: string; size: number }> = [];
  let total = 0;
  let keptRecent = 0;
  for await (const obj of repo.store.list("chunks/")) {
    total++;
    const hex = obj.key.slice(obj.key.lastIndexOf("/") + 1);
    if (marked.has(hex)) continue;
    if (obj.mtimeMs >= cutoff) keptRecent++;
    else candidates.push({ key: obj.key, size: obj.size });
  }
  progress.emit({
    type: "start",
    job: "gc",
    total: candidates.length,
    message: `${candidates.length} of ${total} chunks unreferenced`,
  });
  let removed = 0;
  let freed = 0;
  let done = 0;
  await forEachLimit(
    candidates,
    16,
    async (c) => {
      if (options.dryRun || (await repo.store.deleteIfUntouched(c.key, cutoff))) {
        removed++;
        freed += c.size;
      } else {
        keptRecent++;
      }
      progress.emit({ type: "progress", job: "gc", done: ++done, total: candidates.length });
    },
    options.signal,
  );
  progress.emit({ type: "end", job: "gc" });
  return { chunksRemoved: removed, bytesFreed: freed, chunksKeptRecent: keptRecent };
}
