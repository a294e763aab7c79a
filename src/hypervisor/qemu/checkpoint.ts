/**
 * QEMU's checkpoint record: per disk, the persistent (qcow2) or in-memory (raw) dirty bitmap a
 * restore point started, kept in the manifest's `bitmap` field as
 * `{kind: "qemu-bitmap", repository, disks: {NAME: {node, bitmap, size, persistent}}}`.
 * Restore points written before adapters existed hold the same record without `kind`; the engine
 * (vm-backup.ts, checkpointOf) hands them over as "qemu-bitmap".
 *
 * A checkpoint bitmap is trusted only when it provably belongs to the latest restore point: that
 * restore point's record names it for the disk (and carries this repository's id), it exists on
 * the disk's node, records, is neither busy nor inconsistent, and the disk size is unchanged.
 * Anything else means a full read (dedup keeps storage small), and the reason is logged and
 * recorded in the manifest. The record comes from a repository others may write: it is checked
 * against a schema before anything in it is used.
 */
import { z } from "zod";
import { schemaProblem, text, whole } from "../../util/schema.js";
import type { CheckpointRecord } from "../adapter.js";
import type { LiveDisk } from "./live.js";

export const QEMU_CHECKPOINT_KIND = "qemu-bitmap";

export interface QemuCheckpointDisk {
  node: string;
  bitmap: string;
  size: number;
  persistent: boolean;
}

export interface QemuCheckpoint extends CheckpointRecord {
  kind: typeof QEMU_CHECKPOINT_KIND;
  repository: string;
  disks: Record<string, QemuCheckpointDisk>;
}

/** Prefix of this repository's checkpoint bitmaps: `strata-<first 8 of the repository id>-`. */
export function bitmapPrefix(repository: string): string {
  return `strata-${repository.slice(0, 8)}-`;
}

/** A new checkpoint bitmap's name. */
export function newBitmapName(repository: string, now = Date.now()): string {
  return `${bitmapPrefix(repository)}${now.toString(36)}`;
}

/** The record's envelope: a disk map whose entries are checked one by one. */
const QemuCheckpointSchema = z.object({
  kind: z.literal(QEMU_CHECKPOINT_KIND),
  repository: text("the repository id", 256),
  disks: z.record(text("a disk name", 256), z.unknown(), { error: "the disks are not a map" }),
});

const QemuCheckpointDiskSchema = z.object({
  node: text("the node-name", 256),
  bitmap: z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, "not a bitmap name Strata makes"),
  size: whole("the disk size", Number.MAX_SAFE_INTEGER),
  persistent: z.boolean(),
});

/**
 * The record as QEMU's, or a reason why it is not usable. Disk entries that do not fit the
 * schema are left out (those disks are read whole); a record of another kind is not QEMU's.
 */
export function parseQemuCheckpoint(
  rec: CheckpointRecord | null | undefined,
): { checkpoint: QemuCheckpoint } | { reason: string } {
  if (!rec) return { reason: "the latest restore point has no checkpoint bitmap" };
  if (rec.kind !== QEMU_CHECKPOINT_KIND)
    return { reason: `the latest restore point's checkpoint is a ${String(rec.kind)} record, not QEMU's` };
  const bad = schemaProblem(QemuCheckpointSchema, rec);
  if (bad !== undefined)
    return { reason: `the latest restore point's checkpoint record is malformed (${bad})` };
  const r = QemuCheckpointSchema.parse(rec);
  const out: Record<string, QemuCheckpointDisk> = {};
  for (const [name, v] of Object.entries(r.disks)) {
    const d = QemuCheckpointDiskSchema.safeParse(v);
    if (d.success) out[name] = d.data;
  }
  return { checkpoint: { kind: QEMU_CHECKPOINT_KIND, repository: r.repository, disks: out } };
}

/** The latest restore point as the session sees it (BackupRequest.previous). */
export interface PreviousPoint {
  time: string;
  checkpoint: CheckpointRecord | null;
}

/** Decides, per disk, whether the previous checkpoint bitmap is trusted; returns trusted names and reasons. */
export function trustBitmaps(
  repository: string,
  disks: readonly Pick<LiveDisk, "name" | "size" | "format" | "bitmaps">[],
  previous: PreviousPoint | undefined,
): { trusted: Map<string, string>; reasons: Map<string, string> } {
  const trusted = new Map<string, string>();
  const reasons = new Map<string, string>();
  const parsed = previous ? parseQemuCheckpoint(previous.checkpoint) : undefined;
  const rec = parsed && "checkpoint" in parsed ? parsed.checkpoint : undefined;
  for (const d of disks) {
    const why = (() => {
      if (!previous) return "first backup of this VM";
      if (!rec || rec.repository !== repository)
        return "the latest restore point has no checkpoint bitmap from this repository";
      const r = rec.disks[d.name];
      if (!r) return "the latest restore point has no checkpoint bitmap for this disk";
      if (!r.bitmap.startsWith(bitmapPrefix(repository)))
        return `checkpoint bitmap ${r.bitmap} is not one of this repository's`;
      if (r.size !== d.size) return `the disk changed size (${r.size} → ${d.size})`;
      const b = d.bitmaps.find((x) => x.name === r.bitmap);
      if (!b) {
        return r.persistent
          ? `checkpoint bitmap ${r.bitmap} is missing (deleted, or QEMU did not close the image cleanly)`
          : `checkpoint bitmap ${r.bitmap} is gone: bitmaps of ${d.format} disks live in QEMU's memory and the VM was restarted`;
      }
      if (b.inconsistent)
        return `checkpoint bitmap ${r.bitmap} is inconsistent (QEMU did not close the image cleanly)`;
      if (b.busy) return `checkpoint bitmap ${r.bitmap} is in use by another job`;
      if (!b.recording) return `checkpoint bitmap ${r.bitmap} is not recording`;
      return undefined;
    })();
    if (why === undefined) trusted.set(d.name, rec!.disks[d.name]!.bitmap);
    else reasons.set(d.name, why);
  }
  return { trusted, reasons };
}

/** The record a restore point keeps: the new bitmap on each of `disks`. */
export function checkpointRecord(
  repository: string,
  bitmap: string,
  disks: readonly Pick<LiveDisk, "name" | "node" | "size" | "format">[],
): QemuCheckpoint {
  return {
    kind: QEMU_CHECKPOINT_KIND,
    repository,
    disks: Object.fromEntries(
      disks.map((d) => [d.name, { node: d.node, bitmap, size: d.size, persistent: d.format === "qcow2" }]),
    ),
  };
}
