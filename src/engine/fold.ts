/**
 * Folding a protected VM's journal into the repository: the disks at an instant F become an
 * ordinary restore point (deduplicated like every other, complete, so forget and gc treat it as
 * any), recorded in the journal as a base cut at F; replay for later instants starts after F.
 * Then segments older than the window are dropped, keeping the newest base cut before the window
 * starts and every entry after it, so every instant of the window stays restorable.
 *
 * What is read: the disks at F come from the journal's extents over the previous base
 * (src/engine/pit.ts). When that base is the VM's latest restore point, only the chunks the
 * journal wrote since it are read (the others are carried over by digest); the first fold over
 * the journal's own initial copy reads only what the journal holds (the rest is zeros).
 */

import type { ExtentMap } from "../journal/overlay.js";
import type { JournalWriter } from "../journal/writer.js";
import type { Consistency } from "../repo/manifest.js";
import type { Repository } from "../repo/repository.js";
import { type DiskSource as BackupDisk, type BackupResult, backup, type DataExtent } from "./backup.js";
import { openInstant } from "./pit.js";

export interface FoldOptions {
  vm: string;
  /** The journal's directory and its writer (the running protect's). */
  journal: string;
  writer: JournalWriter;
  /** The instant folded (ns): every entry up to it is in the journal file. */
  atNs: bigint;
  consistency: Consistency;
  /** Drop segments no instant after this (ns) needs; undefined: keep everything. */
  windowStartNs?: bigint;
  log?: (message: string) => void;
  signal?: AbortSignal;
}

export interface FoldResult extends BackupResult {
  atNs: bigint;
  durationMs: number;
  bytesRead: number;
  segmentsDropped: number;
}

/** `map`'s extents as a gap-free cover of [0, size): `data(ref)` says which read as data. */
function cover(map: ExtentMap, size: number, data: (zero: boolean) => boolean): DataExtent[] {
  const out: DataExtent[] = [];
  let pos = 0;
  const push = (offset: number, length: number, zero: boolean) => {
    if (length <= 0) return;
    const last = out.at(-1);
    if (last && last.zero === zero && last.offset + last.length === offset) last.length += length;
    else out.push({ offset, length, zero });
  };
  for (const e of map.extents) {
    push(pos, e.start - pos, true);
    push(e.start, e.end - e.start, !data(e.ref.zero));
    pos = e.end;
  }
  push(pos, size - pos, true);
  return out;
}

export async function foldJournal(repo: Repository, o: FoldOptions): Promise<FoldResult> {
  const t0 = Date.now();
  const inst = await openInstant(repo, o.journal, { vm: o.vm, atNs: o.atNs, completeUntilNs: o.atNs });
  let result: BackupResult;
  try {
    const view = inst.instant.view;
    const baseRef = inst.instant.base;
    const latest = (await repo.snapshots(o.vm, () => {})).at(-1);
    const baseTime = baseRef.includes("/") ? baseRef.slice(baseRef.indexOf("/") + 1) : undefined;
    const disks: BackupDisk[] = [];
    for (const d of inst.manifest.disks) {
      const src = await inst.openDisk(d.name, { cacheBytes: 32 * 1024 * 1024 });
      const map = view.maps.get(d.name)!;
      disks.push({
        name: d.name,
        source: `journal ${o.journal} at ${inst.time}`,
        size: d.size,
        read: (offset, length) => src.read(offset, length),
        // Over the initial copy: what the journal never wrote reads as zeros.
        ...(baseTime === undefined ? { allocation: async () => cover(map, d.size, (zero) => !zero) } : {}),
        // Over a base restore point: the journal's extents since it are the changes.
        ...(baseTime !== undefined && latest?.time === baseTime
          ? { changes: { since: baseTime, extents: async () => cover(map, d.size, () => true) } }
          : {}),
        ...(baseTime !== undefined && latest?.time !== baseTime
          ? { fullReadReason: `the journal's base ${baseRef} is not the VM's latest restore point` }
          : {}),
      });
    }
    const donor = inst.instant.configFrom;
    const config = donor?.manifest.config ? await repo.blob(donor, donor.manifest.config) : undefined;
    result = await backup(repo, {
      vm: o.vm,
      disks,
      mode: "snapshot",
      consistency: o.consistency,
      ...(config ? { config } : {}),
      ...(o.log ? { log: o.log } : {}),
      ...(o.signal ? { signal: o.signal } : {}),
    });
  } finally {
    await inst.close();
  }
  // The restore point holds every entry up to F: replay for later instants starts after it.
  await o.writer.addBase(result.id, o.atNs + 1n, o.atNs);
  let segmentsDropped = 0;
  if (o.windowStartNs !== undefined) {
    const keep = o.writer.bases.filter((b) => BigInt(b.cutNs) <= o.windowStartNs!).at(-1);
    if (keep) segmentsDropped = await o.writer.dropBefore(BigInt(keep.startNs));
  }
  return {
    ...result,
    atNs: o.atNs,
    durationMs: Date.now() - t0,
    bytesRead: result.manifest.disks.reduce((n, d) => n + d.bytesRead, 0),
    segmentsDropped,
  };
}
