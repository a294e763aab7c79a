/**
 * An instant of a protected VM as a restore point: `web1@2026-11-29T08:01:23.250Z` (or
 * `web1@-90s`) for serve, files and instant, served from the journal's extents up to T over its
 * base (src/journal/overlay.ts) without writing an image first. `strata restore VM@T` writes
 * the same bytes to files (pit-restore.ts); both choose the base here.
 */
import { hostname } from "node:os";
import type { JournalBase, JournalMeta } from "../journal/meta.js";
import { JournalView } from "../journal/overlay.js";
import { JournalReader } from "../journal/reader.js";
import type { Consistency, Manifest } from "../repo/manifest.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { type DiskSource, type DiskViewRef, emptyCacheStats, RestorePointSource } from "./serve.js";

const iso = (ns: bigint) => new Date(Number(ns / 1_000_000n)).toISOString();

export interface InstantPlanOptions {
  vm: string;
  /** The instant, host time in ns since the Unix epoch. */
  atNs: bigint;
  /**
   * The latest instant the journal is known complete for (ns): its last entry, or later when the
   * protect that writes it runs (or stopped cleanly) with no write since. T beyond it is refused.
   */
  completeUntilNs?: bigint;
}

export interface InstantPlan {
  reader: JournalReader;
  /** The base restore point cut by T; undefined: the journal's own initial copy is the base. */
  base?: JournalBase;
  snap?: SnapshotRef;
  /** Replay starts here (ns); undefined: from the first entry. */
  replayFromNs?: bigint;
  /** The protected window when planned: from the base's cut (or the initial copy) to the end. */
  window: { fromNs: bigint; toNs: bigint | undefined };
}

/** The newest base cut at or before `atNs`; a clear error naming the window otherwise. */
export function chooseBase(
  bases: readonly JournalBase[],
  atNs: bigint,
  droppedBeforeNs: bigint | undefined,
  vm: string,
  syncedNs?: bigint,
): JournalBase {
  const usable = bases.filter((b) => droppedBeforeNs === undefined || BigInt(b.startNs) >= droppedBeforeNs);
  const base = usable.filter((b) => BigInt(b.cutNs) <= atNs).at(-1);
  if (base) return base;
  const starts = [...usable.map((b) => BigInt(b.cutNs)), ...(syncedNs === undefined ? [] : [syncedNs])];
  let from: bigint | undefined;
  for (const x of starts) if (from === undefined || x < from) from = x;
  throw new StrataError(
    ErrorCode.NOT_FOUND,
    from === undefined
      ? `VM ${vm}'s journal does not hold its disks whole yet (no base, initial copy not done): nothing can be restored from it`
      : `${iso(atNs)} is before VM ${vm}'s protected window, which starts at ${iso(from)}`,
  );
}

/**
 * Opens the journal in `dir`, checks it is the VM's and the repository's, and picks the base for
 * T: the newest base restore point cut by T, else the journal's own initial copy.
 */
export async function planInstant(
  repo: Repository,
  dir: string,
  o: InstantPlanOptions,
): Promise<InstantPlan> {
  const reader = await JournalReader.open(dir, repo.keys);
  const meta = reader.meta;
  if (meta.vm !== o.vm)
    throw new StrataError(ErrorCode.USAGE, `journal ${dir} belongs to VM ${meta.vm}, not ${o.vm}`);
  if (meta.repository !== repo.config.id)
    throw new StrataError(
      ErrorCode.USAGE,
      `journal ${dir} belongs to another repository (${meta.repository}), not ${repo.store.location}`,
    );
  const win = await reader.window();
  const dropped = meta.droppedBeforeNs === undefined ? undefined : BigInt(meta.droppedBeforeNs);
  const synced = meta.syncedNs === undefined || dropped !== undefined ? undefined : BigInt(meta.syncedNs);
  const usable = meta.bases.filter((b) => dropped === undefined || BigInt(b.startNs) >= dropped);
  // The newest base cut by T whose restore point is still there (one forgotten since is passed
  // over: an older one plus more of the journal gives the same bytes); else the initial copy.
  let base: JournalBase | undefined;
  let snap: SnapshotRef | undefined;
  const gone: string[] = [];
  for (const b of usable.filter((x) => BigInt(x.cutNs) <= o.atNs).reverse()) {
    try {
      snap = await repo.findSnapshot(b.snapshot);
      base = b;
      break;
    } catch (err) {
      if (!(err instanceof StrataError && err.code === ErrorCode.NOT_FOUND)) throw err;
      gone.push(b.snapshot);
    }
  }
  if (!base && !(synced !== undefined && synced <= o.atNs)) {
    if (gone.length > 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `${iso(o.atNs)} of VM ${o.vm} needs a base restore point the repository no longer holds (${gone.join(", ")}; forgotten?), and the journal before it was dropped`,
      );
    chooseBase(usable, o.atNs, dropped, o.vm, synced);
  }
  const fromNs = base ? BigInt(base.cutNs) : synced!;
  const until = o.completeUntilNs ?? win.toNs ?? fromNs;
  if (o.atNs > until)
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `${iso(o.atNs)} is after VM ${o.vm}'s protected window, which ends at ${iso(until)} (the journal knows nothing later)`,
    );
  const gap = (meta.gaps ?? []).find(
    (g) => o.atNs >= BigInt(g.fromNs) && (g.toNs === undefined || o.atNs < BigInt(g.toNs)),
  );
  if (gap)
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `${iso(o.atNs)} of VM ${o.vm} is inside a gap of its journal, ${iso(BigInt(gap.fromNs))} .. ${gap.toNs === undefined ? "(resume not finished)" : iso(BigInt(gap.toNs))}: protection was down then and resumed from a dirty bitmap, so the journal does not hold the disks at that instant; choose one before or after the gap`,
    );
  for (const d of meta.disks)
    if (snap && !snap.manifest.disks.some((x) => x.name === d.name))
      throw new StrataError(
        ErrorCode.DATA_MISSING,
        `base restore point ${base!.snapshot} has no disk ${d.name}`,
      );
  return {
    reader,
    ...(base ? { base, replayFromNs: BigInt(base.startNs) } : {}),
    ...(snap ? { snap } : {}),
    window: { fromNs, toNs: win.toNs },
  };
}

/** An instant of a protected VM, usable wherever a restore point is (see {@link DiskViewRef}). */
export interface InstantRef extends DiskViewRef {
  instant: {
    journal: string;
    atNs: bigint;
    /** "VM/TIME" of the base, or "the journal's initial copy". */
    base: string;
    /** The VM's restore point whose configuration instant recovery boots with. */
    configFrom?: SnapshotRef;
    view: JournalView;
  };
  close(): Promise<void>;
}

export function isInstantRef(snap: SnapshotRef): snap is InstantRef {
  return "instant" in snap && typeof (snap as InstantRef).close === "function";
}

/**
 * The VM's disks at T as a restore point: `time` is T (ISO with ms), consistency
 * crash-consistent, disks from the journal; each disk reads the journal's extents up to T over
 * the base. The configuration (for instant recovery) is the newest restore point's of the VM at
 * or before T (else its newest). Close it when done (segment files stay open while it lives).
 */
export async function openInstant(
  repo: Repository,
  journal: string,
  o: InstantPlanOptions & { cacheBytes?: number; consistency?: Consistency },
): Promise<InstantRef> {
  const plan = await planInstant(repo, journal, o);
  const view = await JournalView.open(plan.reader, repo.keys, {
    untilNs: o.atNs,
    ...(plan.replayFromNs === undefined ? {} : { fromNs: plan.replayFromNs }),
    ...(o.cacheBytes === undefined ? {} : { cacheBytes: o.cacheBytes }),
  });
  const time = iso(o.atNs);
  const points = await repo.snapshots(o.vm);
  const configFrom =
    points
      .filter((p) => p.manifest.config !== null && Date.parse(p.time) <= Number(o.atNs / 1_000_000n))
      .at(-1) ?? points.filter((p) => p.manifest.config !== null).at(-1);
  const manifest: Manifest = {
    format: "strata-manifest",
    version: 1,
    vm: o.vm,
    time,
    mode: "snapshot",
    consistency: o.consistency ?? "crash-consistent",
    parent: plan.snap ? plan.snap.time : null,
    disks: plan.reader.meta.disks.map((d) => ({
      name: d.name,
      size: d.size,
      indexChecksum: "",
      source: `journal ${journal}`,
      bytesRead: 0,
      bytesNew: 0,
      bytesStored: 0,
      chunksNew: 0,
      chunksReused: 0,
      chunksZero: 0,
    })),
    config: null,
    bitmap: null,
    host: hostname(),
    durationMs: 0,
    tool: "strata",
  };
  return {
    vm: o.vm,
    time,
    manifest,
    instant: {
      journal,
      atNs: o.atNs,
      base: plan.base ? plan.base.snapshot : "the journal's initial copy",
      ...(configFrom ? { configFrom } : {}),
      view,
    },
    async openDisk(disk, options): Promise<DiskSource> {
      const base = plan.snap ? await RestorePointSource.open(repo, plan.snap, disk, options) : undefined;
      const bytes = view.disk(disk, base);
      return {
        size: bytes.size,
        read: (offset, length) => bytes.read(offset, length),
        stats: () => base?.stats() ?? emptyCacheStats(0),
      };
    },
    close: () => view.close(),
  };
}

/**
 * The first instant the journal in `meta` can give (ns): the earliest cut of a base whose
 * segments are kept and whose restore point the repository still holds, or the end of the
 * initial copy while no segment was dropped; undefined when there is none yet.
 */
export async function protectedFrom(repo: Repository, meta: JournalMeta): Promise<bigint | undefined> {
  const dropped = meta.droppedBeforeNs === undefined ? undefined : BigInt(meta.droppedBeforeNs);
  if (dropped === undefined && meta.syncedNs !== undefined) {
    const synced = BigInt(meta.syncedNs);
    if (!meta.bases.some((b) => BigInt(b.cutNs) < synced)) return synced;
  }
  const held = new Set((await repo.snapshots(meta.vm, () => {})).map((s) => `${s.vm}/${s.time}`));
  let from: bigint | undefined;
  for (const b of meta.bases) {
    if (dropped !== undefined && BigInt(b.startNs) < dropped) continue;
    if (!held.has(b.snapshot)) continue;
    if (from === undefined || BigInt(b.cutNs) < from) from = BigInt(b.cutNs);
  }
  if (dropped === undefined && meta.syncedNs !== undefined) {
    const synced = BigInt(meta.syncedNs);
    if (from === undefined || synced < from) from = synced;
  }
  return from;
}
