/**
 * Where a filesystem is in a restore point: the disks' partition tables (MBR with logical
 * partitions, or GPT), the filesystem in each partition (by magic number), the LVM volume groups
 * assembled across disks and their logical volumes, and the `DISK:PART` / `[DISK:]VG/LV`
 * selections that name one of them.
 */
import { type ByteSource, slice } from "../../image/byte-source.js";
import { blankHead, detectFilesystem, type FsType } from "../../image/fs-detect.js";
import {
  concat,
  type LogicalVolume,
  linearExtents,
  lvLayout,
  MAX_LVS,
  parseVolumeGroup,
  pvsOf,
  readPhysicalVolume,
  type VolumeGroup,
} from "../../image/lvm.js";
import { type Partition, readPartitionTable } from "../../image/partitions.js";
import type { Repository, SnapshotRef } from "../../repo/repository.js";
import { checkpoint } from "../../util/checkpoint.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { type DiskSource, openSnapshotDisk, type ServeSourceOptions } from "../serve.js";

/**
 * Chunk cache per disk for file restores. Reads are mostly sequential, so a small cache (which
 * still leaves room for read-ahead) does as well as serve's 256 MiB.
 */
export const FILES_CACHE_BYTES = 64 * 1024 * 1024;

/**
 * Which filesystem: a disk of the restore point and a partition of it, or an LVM logical volume
 * (all optional), and for Btrfs the subvolume.
 */
export interface FsSelection {
  disk?: string;
  /** Partition number; 0 means the whole disk (no partition table). */
  partition?: number;
  /** An LVM logical volume, by volume group and name. */
  volume?: { vg: string; lv: string };
  /** Btrfs only: this subvolume (path from the top level; "/" for the top level) instead of the default. */
  subvolume?: string;
}

/** LVM's characters for VG and LV names. */
const LVM_NAME = "[A-Za-z0-9_.+-]+";

/** Parses `DISK`, `DISK:PART`, `:PART`, `VG/LV` or `DISK:VG/LV`. */
export function parseSelection(spec: string): FsSelection {
  const lv = new RegExp(`^(?:([^:/]*):)?(${LVM_NAME})/(${LVM_NAME})$`).exec(spec);
  if (lv) return { ...(lv[1] ? { disk: lv[1] } : {}), volume: { vg: lv[2]!, lv: lv[3]! } };
  const m = /^([^:/]*)(?::(\d+))?$/.exec(spec);
  if (!m || (m[1] === "" && m[2] === undefined))
    throw new StrataError(
      ErrorCode.USAGE,
      `"${spec}" is not DISK, DISK:PARTITION, :PARTITION, VG/LV or DISK:VG/LV`,
    );
  return {
    ...(m[1] ? { disk: m[1] } : {}),
    ...(m[2] !== undefined ? { partition: Number(m[2]) } : {}),
  };
}

/**
 * A partition (or the whole disk: number 0, for a disk without a partition table) and the
 * filesystem found in it.
 */
export interface PartitionInfo extends Partition {
  /** What the magic numbers say, or null. */
  filesystem: FsType | null;
  /** For an LVM physical volume: the volume group it belongs to, when its metadata says. */
  volumeGroup?: string;
}

export interface DiskLayout {
  disk: string;
  size: number;
  scheme: "mbr" | "gpt" | "none";
  partitions: PartitionInfo[];
}

/** An LVM logical volume as `files ls` shows it (hidden parts of pools and RAIDs are left out). */
export interface LogicalVolumeInfo {
  /** "vg0/root": what a selection names. */
  name: string;
  size: number;
  /** "linear", "striped", "thin", "raid1"… */
  layout: string;
  /** What the magic numbers say, for a linear LV whose PVs are all there; otherwise null. */
  filesystem: FsType | null;
  /** A linear LV whose first 68 KiB are zeros, where any filesystem's signature would be: none is there. */
  blank: boolean;
  /** PVs it needs that no disk of the restore point holds (see {@link PhysicalVolumeInfo}). */
  missing: string[];
}

export interface PhysicalVolumeInfo {
  /** LVM's UUID, with its dashes. */
  uuid: string;
  /** "root:3" (a partition) or "data" (a whole disk); null when no disk of the restore point holds it. */
  location: string | null;
  /** The device it had in the guest when the metadata was last written ("/dev/sdb"), a hint. */
  device?: string;
}

export interface VolumeGroupInfo {
  name: string;
  size: number;
  pvs: PhysicalVolumeInfo[];
  lvs: LogicalVolumeInfo[];
}

/** The disks of a restore point, their partitions, and the LVM volume groups on them. */
export interface RestorePointLayout {
  disks: DiskLayout[];
  volumeGroups: VolumeGroupInfo[];
  /** What could not be read or was left out (unreadable LVM metadata, LVs beyond a limit). */
  warnings: string[];
}

/** Opens one disk of a restore point as a byte source. */
export function openDisk(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  options: ServeSourceOptions = {},
): Promise<DiskSource> {
  return openSnapshotDisk(repo, snap, disk, options);
}

/** The partitions of a disk and the filesystem in each. */
export async function diskLayout(disk: string, source: ByteSource): Promise<DiskLayout> {
  const table = await readPartitionTable(source);
  const parts: Array<Omit<PartitionInfo, "filesystem">> =
    table.scheme === "none"
      ? [{ number: 0, start: 0, size: source.size, type: "", typeName: "whole disk" }]
      : table.partitions;
  const partitions: PartitionInfo[] = [];
  for (const p of parts) {
    const fsType = p.size > 0 ? await detectFilesystem(slice(source, p.start, p.size)) : undefined;
    partitions.push({ ...p, filesystem: fsType ?? null });
  }
  return { disk, size: source.size, scheme: table.scheme, partitions };
}

/** A PV found on a disk of the restore point. */
interface FoundPv {
  disk: string;
  partition: number;
  source: ByteSource;
}

/** A volume group, its PVs found on the restore point's disks (by key), and how ls shows it. */
export interface ScannedGroup {
  vg: VolumeGroup;
  found: Map<string, FoundPv>;
  info: VolumeGroupInfo;
}

interface Scan {
  disks: DiskLayout[];
  groups: ScannedGroup[];
  warnings: string[];
}

function pvLocation(pv: FoundPv): string {
  return pv.partition === 0 ? pv.disk : `${pv.disk}:${pv.partition}`;
}

function dashedUuid(u: string): string {
  return u.length === 32
    ? [
        u.slice(0, 6),
        u.slice(6, 10),
        u.slice(10, 14),
        u.slice(14, 18),
        u.slice(18, 22),
        u.slice(22, 26),
        u.slice(26),
      ].join("-")
    : u;
}

/**
 * Reads the partition tables of every disk of the restore point and the LVM metadata of every
 * PV on them; volume groups are assembled across disks.
 */
export async function scanRestorePoint(
  repo: Repository,
  snap: SnapshotRef,
  options: ServeSourceOptions,
  signal?: AbortSignal,
): Promise<Scan> {
  const disks: DiskLayout[] = [];
  const byUuid = new Map<string, FoundPv>();
  const tick = checkpoint(signal);
  const texts: Array<{ text: string; seqno: number; where: string }> = [];
  const warnings: string[] = [];
  for (const { name } of snap.manifest.disks) {
    await tick();
    const source = await openDisk(repo, snap, name, options);
    const layout = await diskLayout(name, source);
    disks.push(layout);
    for (const p of layout.partitions) {
      if (p.filesystem !== "LVM2_member") continue;
      const pvSource = slice(source, p.start, p.size);
      const where = p.number === 0 ? name : `${name}:${p.number}`;
      // A damaged label only hides this PV; the VG is reported with it missing.
      const pv = await readPhysicalVolume(pvSource).catch((err: unknown) => {
        warnings.push(`the LVM label on ${where} cannot be read: ${describeError(err)}`);
        return undefined;
      });
      if (!pv) continue;
      byUuid.set(pv.uuid, { disk: name, partition: p.number, source: pvSource });
      if (pv.metadata) texts.push({ ...pv.metadata, where });
    }
  }
  // The newest copy of each VG's metadata (by id; a VG's PVs all carry the same seqno normally).
  const newest = new Map<string, VolumeGroup>();
  const parsed = new Set<string>(); // every PV of a VG normally holds the same text: parse it once
  for (const t of texts.sort((a, b) => b.seqno - a.seqno)) {
    await tick();
    if (parsed.has(t.text)) continue;
    parsed.add(t.text);
    let vg: VolumeGroup;
    try {
      vg = parseVolumeGroup(t.text);
    } catch (err) {
      warnings.push(`the LVM metadata on ${t.where} cannot be read: ${describeError(err)}`);
      continue;
    }
    if (newest.has(vg.id)) continue;
    newest.set(vg.id, vg);
    if (vg.omittedLvs > 0 || vg.omittedPvs > 0)
      warnings.push(
        `volume group ${vg.name} lists ${vg.lvs.length + vg.omittedLvs} logical and ` +
          `${vg.pvs.length + vg.omittedPvs} physical volumes; Strata reads the first ${MAX_LVS} of each ` +
          "and leaves the rest out",
      );
  }
  const groups: ScannedGroup[] = [];
  for (const vg of newest.values()) {
    const found = new Map<string, FoundPv>();
    for (const pv of vg.pvs) {
      const f = byUuid.get(pv.uuid);
      if (f) found.set(pv.key, f);
    }
    for (const f of found.values()) {
      const part = disks.find((d) => d.disk === f.disk)?.partitions.find((p) => p.number === f.partition);
      if (part) part.volumeGroup = vg.name;
    }
    const pvName = (key: string) => {
      const pv = vg.pvByKey.get(key);
      return pv ? dashedUuid(pv.uuid) + (pv.device ? ` (${pv.device} in the guest)` : "") : key;
    };
    const lvs: LogicalVolumeInfo[] = [];
    for (const lv of vg.lvs.filter((l) => l.visible)) {
      await tick();
      const missing = [...pvsOf(vg, lv)].filter((k) => !found.has(k)).map(pvName);
      const probe =
        missing.length === 0 ? await probeLinear(vg, lv, found) : { filesystem: null, blank: false };
      lvs.push({
        name: `${vg.name}/${lv.name}`,
        size: lv.size,
        layout: lvLayout(lv),
        ...probe,
        missing,
      });
    }
    groups.push({
      vg,
      found,
      info: {
        name: vg.name,
        size: vg.pvs.reduce((n, p) => n + p.peCount, 0) * vg.extentSize,
        pvs: vg.pvs.map((p) => {
          const f = found.get(p.key);
          return {
            uuid: dashedUuid(p.uuid),
            location: f ? pvLocation(f) : null,
            ...(p.device === undefined ? {} : { device: p.device }),
          };
        }),
        lvs,
      },
    });
  }
  groups.sort((a, b) => a.vg.name.localeCompare(b.vg.name));
  return { disks, groups, warnings };
}

/** The bytes of a linear LV, from the PVs found; undefined when it is not linear. */
function linearSource(
  vg: VolumeGroup,
  lv: LogicalVolume,
  found: Map<string, FoundPv>,
): ByteSource | undefined {
  const extents = linearExtents(vg, lv);
  if (!extents) return undefined;
  try {
    return concat(extents.map((e) => slice(found.get(e.pv)!.source, e.offset, e.length)));
  } catch {
    return undefined; // extents beyond the PV: metadata and disk disagree
  }
}

/** What the magic numbers say of a linear LV, and whether its head is all zeros. */
async function probeLinear(
  vg: VolumeGroup,
  lv: LogicalVolume,
  found: Map<string, FoundPv>,
): Promise<{ filesystem: FsType | null; blank: boolean }> {
  const source = linearSource(vg, lv, found);
  if (!source) return { filesystem: null, blank: false };
  const filesystem = (await detectFilesystem(source)) ?? null;
  return { filesystem, blank: filesystem === null && (await blankHead(source)) };
}

/** What a logical volume holds, in words, for listings and messages. */
export function lvContents(lv: LogicalVolumeInfo): string {
  if (lv.missing.length > 0) return "needs a missing PV";
  if (lv.filesystem !== null) return lv.filesystem;
  if (lv.blank) return "blank (zeros)";
  return lv.layout === "linear" ? "no known filesystem" : "filesystem seen once mounted";
}

/**
 * The disks of a restore point (or only `disk`), their partitions and filesystems, and the LVM
 * volume groups and logical volumes on them (with `disk`: those with a PV on it).
 */
export async function restorePointLayout(
  repo: Repository,
  snap: SnapshotRef,
  disk?: string,
  options: ServeSourceOptions = { cacheBytes: FILES_CACHE_BYTES },
  signal?: AbortSignal,
): Promise<RestorePointLayout> {
  if (disk !== undefined && !snap.manifest.disks.some((d) => d.name === disk))
    await openDisk(repo, snap, disk, options); // fails with the repository's own NOT_FOUND
  const scan = await scanRestorePoint(repo, snap, options, signal);
  if (disk === undefined)
    return { disks: scan.disks, volumeGroups: scan.groups.map((g) => g.info), warnings: scan.warnings };
  return {
    warnings: scan.warnings,
    disks: scan.disks.filter((d) => d.disk === disk),
    volumeGroups: scan.groups
      .filter((g) => [...g.found.values()].some((f) => f.disk === disk))
      .map((g) => g.info),
  };
}
