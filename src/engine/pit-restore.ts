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
import { type ReplayResult, replayJournal } from "../journal/reader.js";
import { RawFileTarget } from "../journal/targets.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ProgressSink } from "../util/progress.js";
import { planInstant } from "./pit.js";
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

export async function restoreAtInstant(
  repo: Repository,
  o: InstantRestoreOptions,
): Promise<InstantRestoreResult> {
  const plan = await planInstant(repo, o.journal, o);
  const { reader, base, snap } = plan;
  const meta = reader.meta;
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
      if (snap) {
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
        ...(plan.replayFromNs === undefined ? {} : { fromNs: plan.replayFromNs }),
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
      window: plan.window,
    };
  } catch (err) {
    for (const p of files.values()) await fs.rm(p, { force: true }).catch(() => {});
    throw err;
  }
}
