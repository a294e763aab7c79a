/**
 * Point-in-time restore: the disks of a protected VM as they were at an instant T, from a base
 * restore point and the VM's write journal (src/journal).
 *
 * The base is the newest restore point recorded in the journal as cut at or before T: its disks
 * are restored to raw files, then every journal entry from the base's start up to T is replayed
 * onto them in journal order (entries older than the start were on the disks before the view was
 * cut; replaying later ones the base already holds is harmless in order: see
 * src/journal/index.ts). Without such a base, the journal's own initial copy is the base: sparse
 * files of the disks' sizes and every entry from the first up to T, for any T after the copy was
 * done (journal.json's syncedNs). The files get their final names only once replay is complete
 * and synced.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { JournalBase } from "../journal/meta.js";
import { JournalReader, type ReplayResult, replayJournal } from "../journal/reader.js";
import { RawFileTarget } from "../journal/targets.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ProgressSink } from "../util/progress.js";
import { type RestoreDiskResult, restoreDiskToFile } from "./restore.js";

export interface InstantRestoreOptions {
  /** The VM's journal directory. */
  journal: string;
  vm: string;
  /** The instant, host time in ns since the Unix epoch. */
  atNs: bigint;
  /**
   * The latest instant the journal is known complete for (ns): its last entry, or later when the
   * protect that writes it runs (or stopped cleanly) with no write since. T beyond it is refused.
   */
  completeUntilNs?: bigint;
  /** Directory the disks go to, as <disk>.raw. */
  target: string;
  force?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface InstantRestoreResult {
  base: string;
  disks: RestoreDiskResult[];
  replay: ReplayResult;
  /** The protected window when the restore ran: from the first base's cut to the last entry. */
  window: { fromNs: bigint | undefined; toNs: bigint | undefined };
}

const iso = (ns: bigint) => new Date(Number(ns / 1_000_000n)).toISOString();

/** The newest usable base cut at or before `atNs`; a clear error naming the window otherwise. */
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

export async function restoreAtInstant(
  repo: Repository,
  o: InstantRestoreOptions,
): Promise<InstantRestoreResult> {
  const reader = await JournalReader.open(o.journal, repo.keys);
  const meta = reader.meta;
  if (meta.vm !== o.vm)
    throw new StrataError(ErrorCode.USAGE, `journal ${o.journal} belongs to VM ${meta.vm}, not ${o.vm}`);
  if (meta.repository !== repo.config.id)
    throw new StrataError(
      ErrorCode.USAGE,
      `journal ${o.journal} belongs to another repository (${meta.repository}), not ${repo.store.location}`,
    );
  const win = await reader.window();
  const dropped = meta.droppedBeforeNs === undefined ? undefined : BigInt(meta.droppedBeforeNs);
  const synced = meta.syncedNs === undefined || dropped !== undefined ? undefined : BigInt(meta.syncedNs);
  // The newest base restore point cut by T; else the journal's own initial copy.
  const usable = meta.bases.filter((b) => dropped === undefined || BigInt(b.startNs) >= dropped);
  const cutBefore = usable.filter((b) => BigInt(b.cutNs) <= o.atNs).at(-1);
  const base =
    cutBefore ??
    (synced !== undefined && synced <= o.atNs
      ? undefined
      : chooseBase(usable, o.atNs, dropped, o.vm, synced));
  const fromNs = base ? BigInt(base.cutNs) : synced!;
  const until = o.completeUntilNs ?? win.toNs ?? fromNs;
  if (o.atNs > until)
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `${iso(o.atNs)} is after VM ${o.vm}'s protected window, which ends at ${iso(until)} (the journal knows nothing later)`,
    );
  const snap = base ? await repo.findSnapshot(base.snapshot) : undefined;
  await fs.mkdir(o.target, { recursive: true });
  const disks: RestoreDiskResult[] = [];
  const files = new Map<string, string>();
  const partial = (name: string) => join(o.target, `.${name}.raw.at-instant`);
  try {
    for (const d of meta.disks) {
      const final = join(o.target, `${d.name}.raw`);
      if (!o.force && (await fs.lstat(final).catch(() => undefined)))
        throw new StrataError(
          ErrorCode.TARGET_CONFLICT,
          `restore target ${final} exists (use --force to replace it)`,
        );
      files.set(d.name, partial(d.name));
      if (snap && base) {
        if (!snap.manifest.disks.some((x) => x.name === d.name))
          throw new StrataError(
            ErrorCode.DATA_MISSING,
            `base restore point ${base.snapshot} has no disk ${d.name}`,
          );
        const r = await restoreDiskToFile(repo, snap, d.name, partial(d.name), {
          force: true,
          ...(o.progress ? { progress: o.progress } : {}),
          ...(o.signal ? { signal: o.signal } : {}),
        });
        disks.push({ ...r, path: final });
      } else {
        // A sparse file of the disk's size: the journal's initial copy writes every byte of it.
        const fh = await fs.open(partial(d.name), "w", 0o600);
        try {
          await fh.truncate(d.size);
        } finally {
          await fh.close();
        }
        disks.push({ disk: d.name, path: final, size: d.size, bytesWritten: 0 });
      }
    }
    const target = await RawFileTarget.open(files);
    let replay: ReplayResult;
    try {
      replay = await replayJournal(reader, target, {
        ...(base ? { fromNs: BigInt(base.startNs) } : {}),
        untilNs: o.atNs,
        ...(o.signal ? { signal: o.signal } : {}),
      });
    } finally {
      await target.close();
    }
    for (const d of meta.disks) await fs.rename(partial(d.name), join(o.target, `${d.name}.raw`));
    return {
      base: base ? base.snapshot : "the journal's initial copy",
      disks,
      replay,
      window: { fromNs, toNs: win.toNs },
    };
  } catch (err) {
    for (const p of files.values()) await fs.rm(p, { force: true }).catch(() => {});
    throw err;
  }
}
