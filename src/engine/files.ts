/**
 * Single-file restore: browse and copy files from inside a restore point's disks, straight
 * from the repository, without restoring the disk.
 *
 * Design. A disk of a restore point is a {@link RestorePointSource}: reads map to chunks through
 * the fixed index, chunks are fetched on demand, verified and cached (LRU, bounded), and
 * sequential reads fetch ahead. Everything above it only sees a read-only `ByteSource`: the
 * partition table (MBR with logical partitions, or GPT) is parsed from it, a partition is a
 * slice of it, and the filesystem in the slice is recognised by its magic number and read
 * in-process (ext2/3/4 through libext2fs in WebAssembly, with the journal of an uncleanly
 * unmounted filesystem replayed in memory; FAT12/16/32 by our own reader). So listing a
 * directory of a 100 GiB disk fetches a handful of chunks, and nothing is ever written to the
 * repository or the guest. XFS, Btrfs and NTFS are read through libguestfs when guestfish is
 * installed (a sandboxed appliance VM against an NBD export of the disk, see files-guestfs.ts);
 * anything else (LUKS, swap, unknown) is named in a clear error.
 *
 * LVM. The label and metadata of every physical volume on every disk are read in-process
 * (image/lvm.ts), so `files ls` lists volume groups and their logical volumes (a VG may span
 * disks; a PV no disk holds is named as missing) without starting anything, and a linear LV's
 * filesystem is recognised by magic number through its extents. A selection names an LV as
 * `[DISK:]VG/LV`; its files are read through libguestfs with every disk that holds a PV of its
 * VG attached, whatever filesystem it holds. A missing VG or LV, a missing PV, swap, or an LV
 * whose head is all zeros fail before any appliance boots.
 *
 * `restoreFiles` first walks everything asked for (so a missing path fails before anything is
 * written), then writes files, symlinks and directories under the target directory, keeping
 * mode, times and, when running as root, owners; directories get their times and modes last,
 * after their contents. `tarFiles` writes the same walk as a pax tar stream, with backpressure.
 * A damaged or missing chunk fails the read: a file is never restored with wrong bytes.
 */
import { once } from "node:events";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { Writable } from "node:stream";
import { type ByteSource, slice } from "../image/byte-source.js";
import { blankHead, detectFilesystem, type FsType } from "../image/fs-detect.js";
import { openFileSystem } from "../image/fs-open.js";
import type { FileSystemReader, FsEntry } from "../image/fs-types.js";
import { normalPath, pieceFor, READ_PIECE } from "../image/fs-types.js";
import {
  concat,
  type LogicalVolume,
  linearExtents,
  lvLayout,
  parseVolumeGroup,
  pvsOf,
  readPhysicalVolume,
  type VolumeGroup,
} from "../image/lvm.js";
import { type Partition, readPartitionTable } from "../image/partitions.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, errnoCode, ioError, StrataError } from "../util/errors.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { formatBytes } from "../util/sizes.js";
import { padding, tarEnd, tarHeader } from "../util/tar.js";
import {
  type BtrfsSubvolume,
  GUESTFS_TYPES,
  GuestfishReader,
  haveGuestfish,
  NOT_FILESYSTEMS,
} from "./files-guestfs.js";
import { RestorePointSource, type ServeSourceOptions } from "./serve.js";

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
}

/** Opens one disk of a restore point as a byte source. */
export function openDisk(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  options: ServeSourceOptions = {},
): Promise<RestorePointSource> {
  return RestorePointSource.open(repo, snap, disk, options);
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
interface ScannedGroup {
  vg: VolumeGroup;
  found: Map<string, FoundPv>;
  info: VolumeGroupInfo;
}

interface Scan {
  disks: DiskLayout[];
  groups: ScannedGroup[];
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
async function scanRestorePoint(
  repo: Repository,
  snap: SnapshotRef,
  options: ServeSourceOptions,
): Promise<Scan> {
  const disks: DiskLayout[] = [];
  const byUuid = new Map<string, FoundPv>();
  const texts: Array<{ text: string; seqno: number }> = [];
  for (const { name } of snap.manifest.disks) {
    const source = await openDisk(repo, snap, name, options);
    const layout = await diskLayout(name, source);
    disks.push(layout);
    for (const p of layout.partitions) {
      if (p.filesystem !== "LVM2_member") continue;
      const pvSource = slice(source, p.start, p.size);
      // A damaged label only hides this PV; the VG is reported with it missing.
      const pv = await readPhysicalVolume(pvSource).catch(() => undefined);
      if (!pv) continue;
      byUuid.set(pv.uuid, { disk: name, partition: p.number, source: pvSource });
      if (pv.metadata) texts.push(pv.metadata);
    }
  }
  // The newest copy of each VG's metadata (by id; a VG's PVs all carry the same seqno normally).
  const newest = new Map<string, VolumeGroup>();
  for (const t of texts.sort((a, b) => b.seqno - a.seqno)) {
    let vg: VolumeGroup;
    try {
      vg = parseVolumeGroup(t.text);
    } catch {
      continue;
    }
    if (!newest.has(vg.id)) newest.set(vg.id, vg);
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
      const pv = vg.pvs.find((p) => p.key === key);
      return pv ? dashedUuid(pv.uuid) + (pv.device ? ` (${pv.device} in the guest)` : "") : key;
    };
    const lvs: LogicalVolumeInfo[] = [];
    for (const lv of vg.lvs.filter((l) => l.visible)) {
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
  return { disks, groups };
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
): Promise<RestorePointLayout> {
  if (disk !== undefined && !snap.manifest.disks.some((d) => d.name === disk))
    await openDisk(repo, snap, disk, options); // fails with the repository's own NOT_FOUND
  const scan = await scanRestorePoint(repo, snap, options);
  if (disk === undefined) return { disks: scan.disks, volumeGroups: scan.groups.map((g) => g.info) };
  return {
    disks: scan.disks.filter((d) => d.disk === disk),
    volumeGroups: scan.groups
      .filter((g) => [...g.found.values()].some((f) => f.disk === disk))
      .map((g) => g.info),
  };
}

export interface FileBrowserOptions extends ServeSourceOptions {
  /** Stops a slow open (an appliance boot). */
  signal?: AbortSignal;
}

/** One filesystem of a restore point, open for browsing and copying. */
export class FileBrowser {
  private constructor(
    readonly snap: SnapshotRef,
    /** The disk (for a logical volume: the first disk with one of its PVs). */
    readonly disk: string,
    /** The partition, unless this is a logical volume. */
    readonly partition: PartitionInfo | undefined,
    /** The logical volume ("vg0/root"), if this is one. */
    readonly volume: string | undefined,
    readonly fs: FileSystemReader,
    /** "web1/2026-…Z disk root partition 2", for messages. */
    readonly where: string,
  ) {}

  /**
   * Opens the filesystem `sel` points at. Without a disk, the restore point must have one disk;
   * without a partition, the disk must have one partition (or none); otherwise the error lists
   * the choices, logical volumes included. A logical volume is found on whichever disks hold its
   * volume group's PVs, and read through libguestfs.
   */
  static async open(
    repo: Repository,
    snap: SnapshotRef,
    sel: FsSelection,
    options: FileBrowserOptions = { cacheBytes: FILES_CACHE_BYTES },
  ): Promise<FileBrowser> {
    const id = `${snap.vm}/${snap.time}`;
    const { signal, ...sourceOptions } = options;
    if (sel.volume) return FileBrowser.openVolume(repo, snap, sel, sel.volume, sourceOptions, signal);
    const disks = snap.manifest.disks.map((d) => d.name);
    let disk = sel.disk;
    if (disk === undefined) {
      if (disks.length !== 1)
        throw new StrataError(
          ErrorCode.USAGE,
          `restore point ${id} has ${disks.length} disks (${disks.join(", ")}): say which, as DISK, DISK:PARTITION or VG/LV`,
        );
      disk = disks[0]!;
    }
    const source = await openDisk(repo, snap, disk, sourceOptions);
    const layout = await diskLayout(disk, source);
    // PVs are only looked into (on every disk: a VG may span them) when they matter.
    const volumes = async () =>
      layout.partitions.some((p) => p.filesystem === "LVM2_member")
        ? (await scanRestorePoint(repo, snap, sourceOptions)).groups
        : [];
    const lvChoices = (groups: ScannedGroup[]) =>
      groups
        .filter((g) => [...g.found.values()].some((f) => f.disk === disk))
        .flatMap((g) => g.info.lvs)
        .map((lv) => `${disk}:${lv.name} (${lv.layout}, ${formatBytes(lv.size)}, ${lvContents(lv)})`);
    const choice = (p: PartitionInfo) =>
      `${disk}:${p.number} (${p.typeName}, ${formatBytes(p.size)}, ${p.filesystem ?? "no known filesystem"})`;
    let part: PartitionInfo | undefined;
    if (layout.scheme === "none") {
      if (sel.partition !== undefined && sel.partition !== 0)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `disk ${disk} of ${id} has no partition table, so no partition ${sel.partition}: use ${disk}`,
        );
      part = layout.partitions[0]!;
    } else if (sel.partition !== undefined) {
      part = layout.partitions.find((p) => p.number === sel.partition);
      if (!part)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `disk ${disk} of ${id} has no partition ${sel.partition}; it has: ${layout.partitions.map(choice).join(", ")}`,
        );
    } else if (layout.partitions.length === 1) {
      part = layout.partitions[0]!;
    } else {
      const lvs = lvChoices(await volumes());
      throw new StrataError(
        ErrorCode.USAGE,
        layout.partitions.length === 0
          ? `disk ${disk} of ${id} has an empty ${layout.scheme} partition table`
          : `disk ${disk} of ${id} has ${layout.partitions.length} partitions, say which: ${layout.partitions.map(choice).join(", ")}` +
              (lvs.length > 0 ? `; or a logical volume: ${lvs.join(", ")}` : ""),
      );
    }
    const where = `${id} disk ${disk}${part.number === 0 ? "" : ` partition ${part.number}`}`;
    if (part.filesystem === "LVM2_member") {
      const groups = await volumes();
      const group = groups.find((g) =>
        [...g.found.values()].some((f) => f.disk === disk && f.partition === part.number),
      );
      const lvs = group ? lvChoices([group]) : [];
      throw new StrataError(
        ErrorCode.USAGE,
        group
          ? `${where} is an LVM physical volume of volume group ${group.vg.name}: name a logical volume` +
              (lvs.length > 0 ? `: ${lvs.join(", ")}` : ", but it has none")
          : `${where} is an LVM physical volume whose metadata Strata cannot read (no volume group found)`,
      );
    }
    if (sel.subvolume !== undefined && part.filesystem !== "btrfs")
      throw new StrataError(
        ErrorCode.USAGE,
        `--subvolume is for Btrfs; ${where} holds ${part.filesystem ?? "no known filesystem"}`,
      );
    let fsys: FileSystemReader;
    if (part.filesystem !== null && GUESTFS_TYPES.has(part.filesystem) && haveGuestfish()) {
      fsys = await GuestfishReader.open(repo, snap, {
        disks: [disk],
        device: { disk, partition: part.number },
        ...(sel.subvolume === undefined ? {} : { subvolume: sel.subvolume }),
        where,
        ...(signal === undefined ? {} : { signal }),
      });
    } else {
      fsys = await openFileSystem(slice(source, part.start, part.size), where);
    }
    return new FileBrowser(snap, disk, part, undefined, fsys, where);
  }

  /** Opens a logical volume through libguestfs, with every disk holding a PV of its VG attached. */
  private static async openVolume(
    repo: Repository,
    snap: SnapshotRef,
    sel: FsSelection,
    want: { vg: string; lv: string },
    options: ServeSourceOptions,
    signal: AbortSignal | undefined,
  ): Promise<FileBrowser> {
    const id = `${snap.vm}/${snap.time}`;
    const name = `${want.vg}/${want.lv}`;
    if (sel.disk !== undefined && !snap.manifest.disks.some((d) => d.name === sel.disk))
      await openDisk(repo, snap, sel.disk, options); // fails with the repository's own NOT_FOUND
    if (sel.partition !== undefined)
      throw new StrataError(ErrorCode.USAGE, "name a partition or a logical volume, not both");
    const { groups } = await scanRestorePoint(repo, snap, options);
    const all = groups.map((g) => g.vg.name);
    const named = groups.filter((g) => g.vg.name === want.vg);
    if (named.length === 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no LVM volume group ${want.vg} in ${id}` +
          (all.length > 0
            ? `; it has: ${[...new Set(all)].join(", ")}`
            : "; no disk of it holds an LVM physical volume Strata can read"),
      );
    const onDisk =
      sel.disk === undefined
        ? named
        : named.filter((g) => [...g.found.values()].some((f) => f.disk === sel.disk));
    if (onDisk.length === 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `volume group ${want.vg} of ${id} has no physical volume on disk ${sel.disk}; its PVs are on ` +
          named.flatMap((g) => g.info.pvs.map((p) => p.location ?? "a missing disk")).join(", "),
      );
    if (onDisk.length > 1)
      throw new StrataError(
        ErrorCode.USAGE,
        `${id} has ${onDisk.length} volume groups named ${want.vg} (on ${onDisk.map((g) => g.info.pvs.map((p) => p.location).join("+")).join(" and ")}): ` +
          "name the disk as DISK:VG/LV",
      );
    const group = onDisk[0]!;
    const info = group.info.lvs.find((l) => l.name === name);
    if (!info)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `volume group ${want.vg} of ${id} has no logical volume ${want.lv}; it has: ` +
          (group.info.lvs.map((l) => l.name.slice(want.vg.length + 1)).join(", ") || "none"),
      );
    const where = `${id} logical volume ${name}`;
    if (info.missing.length > 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `${where} needs LVM physical volume${info.missing.length > 1 ? "s" : ""} ${info.missing.join(", ")}, ` +
          `which no disk of ${id} holds (back up every disk the volume group spans)`,
      );
    if (sel.subvolume !== undefined && info.filesystem !== null && info.filesystem !== "btrfs")
      throw new StrataError(ErrorCode.USAGE, `--subvolume is for Btrfs; ${where} holds ${info.filesystem}`);
    if (info.filesystem !== null && NOT_FILESYSTEMS.has(info.filesystem))
      throw new StrataError(ErrorCode.USAGE, `${where} holds ${info.filesystem}, not a filesystem`);
    // Only a head with bytes in it is worth an appliance boot: blkid would find nothing in zeros.
    if (info.blank)
      throw new StrataError(
        ErrorCode.USAGE,
        `${where} holds no filesystem: its first 68 KiB, where every filesystem keeps its signature, are zeros`,
      );
    if (!haveGuestfish())
      throw new StrataError(
        ErrorCode.USAGE,
        `${where} is an LVM logical volume, which Strata reads through libguestfs: install libguestfs-tools ` +
          "(or serve the restore point with `strata serve` and activate the volume group elsewhere)",
      );
    // The disks holding its VG's PVs, in the restore point's order (LVM needs them all to
    // activate the VG cleanly, and an LV may span them).
    const pvDisks = new Set([...group.found.values()].map((f) => f.disk));
    const disks = snap.manifest.disks.map((d) => d.name).filter((d) => pvDisks.has(d));
    const fsys = await GuestfishReader.open(repo, snap, {
      disks,
      device: want,
      ...(sel.subvolume === undefined ? {} : { subvolume: sel.subvolume }),
      where,
      ...(signal === undefined ? {} : { signal }),
    });
    return new FileBrowser(snap, disks[0]!, undefined, name, fsys, where);
  }

  /** Btrfs subvolumes of the filesystem (empty for other types). */
  async subvolumes(): Promise<BtrfsSubvolume[]> {
    return this.fs instanceof GuestfishReader ? this.fs.subvolumes() : [];
  }

  /** The entries of a directory, or the entry itself when `path` is not a directory. */
  async list(path: string): Promise<FsEntry[]> {
    const entry = await this.stat(path);
    return entry.kind === "directory" ? this.fs.list(entry.path) : [entry];
  }

  /** The entry at `path`, with where it is in a NOT_FOUND message. */
  async stat(path: string): Promise<FsEntry> {
    try {
      return await this.fs.stat(normalPath(path));
    } catch (err) {
      if (err instanceof StrataError && err.code === ErrorCode.NOT_FOUND)
        throw new StrataError(ErrorCode.NOT_FOUND, `${err.message} (in ${this.where}, ${this.fs.type})`);
      throw err;
    }
  }

  /** Everything under `paths`, each with the relative path it gets in the target (its basename). */
  async walk(paths: readonly string[], signal?: AbortSignal): Promise<PlannedEntry[]> {
    const out: PlannedEntry[] = [];
    const seen = new Set<string>();
    const visit = async (entry: FsEntry, rel: string): Promise<void> => {
      signal?.throwIfAborted();
      out.push({ entry, rel });
      if (entry.kind === "directory")
        for (const child of await this.fs.list(entry.path))
          await visit(child, rel === "" ? child.name : `${rel}/${child.name}`);
    };
    for (const p of paths) {
      const entry = await this.stat(p);
      const rel = entry.path === "/" ? "" : entry.name;
      if (seen.has(rel))
        throw new StrataError(ErrorCode.USAGE, `two paths would both be restored as "${rel || "/"}"`);
      seen.add(rel);
      await visit(entry, rel);
    }
    return out;
  }

  async close(): Promise<void> {
    await this.fs.close();
  }
}

/** One entry to restore and its path relative to the target ("" for the root itself). */
export interface PlannedEntry {
  entry: FsEntry;
  rel: string;
}

export interface RestoreFilesOptions {
  /** Target directory (created if missing). */
  to: string;
  /** Replace files and symlinks that exist in the target. Default: refuse (TARGET_CONFLICT). */
  overwrite?: boolean;
  /** Restore owners; default: when running as root. */
  owners?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface RestoreFilesSummary {
  files: number;
  directories: number;
  symlinks: number;
  /** Device nodes, fifos and sockets: not restored. */
  skipped: number;
  bytes: number;
  durationMs: number;
}

/** What restoreFiles and tarFiles start from: the walk of `paths`, its byte total, a zero summary. */
async function startCopy(
  browser: FileBrowser,
  paths: readonly string[],
  options: { progress?: ProgressSink; signal?: AbortSignal },
) {
  const started = Date.now();
  const progress = options.progress ?? noProgress;
  const plan = await browser.walk(paths, options.signal);
  const total = plan.reduce((n, p) => n + (p.entry.kind === "file" ? p.entry.size : 0), 0);
  const summary: RestoreFilesSummary = {
    files: 0,
    directories: 0,
    symlinks: 0,
    skipped: 0,
    bytes: 0,
    durationMs: 0,
  };
  return { started, progress, plan, total, summary };
}

/** Copies `paths` (files, symlinks, directories recursively) of `browser` into `options.to`. */
export async function restoreFiles(
  browser: FileBrowser,
  paths: readonly string[],
  options: RestoreFilesOptions,
): Promise<RestoreFilesSummary> {
  const owners = options.owners ?? process.getuid?.() === 0;
  const { started, progress, plan, total, summary } = await startCopy(browser, paths, options);
  await mkdirTarget(options.to);
  progress.emit({ type: "start", job: "files", total });
  const dirs: PlannedEntry[] = [];
  for (const item of plan) {
    options.signal?.throwIfAborted();
    const { entry } = item;
    const dest = item.rel === "" ? options.to : join(options.to, item.rel);
    switch (entry.kind) {
      case "directory":
        if (item.rel !== "") await mkdirTarget(dest);
        dirs.push(item);
        summary.directories++;
        break;
      case "file": {
        const fh = await fs.open(dest, options.overwrite ? "w" : "wx", 0o600).catch((err: unknown) => {
          throw targetError(dest, err);
        });
        try {
          // All-zero pieces are skipped and the file is cut to length at the end, so a sparse
          // file (a VM image, a database) comes back sparse.
          let pos = 0;
          for await (const piece of browser.fs.read(entry.path, pieceFor(entry.size))) {
            options.signal?.throwIfAborted();
            if (!isZero(piece)) await fh.write(piece, 0, piece.length, pos);
            pos += piece.length;
            summary.bytes += piece.length;
            progress.emit({ type: "progress", job: "files", done: summary.bytes, total });
          }
          await fh.truncate(pos);
        } catch (err) {
          // Never leave a file with wrong or missing bytes behind.
          await fh.close();
          await fs.rm(dest, { force: true });
          throw err;
        }
        await fh.close();
        if (owners) await fs.chown(dest, entry.uid, entry.gid);
        await fs.chmod(dest, entry.mode);
        await fs.utimes(dest, entry.atime / 1000, entry.mtime / 1000);
        summary.files++;
        break;
      }
      case "symlink":
        if (options.overwrite) await fs.rm(dest, { force: true }).catch(() => {});
        await fs.symlink(entry.target ?? "", dest).catch((err: unknown) => {
          throw targetError(dest, err);
        });
        if (owners) await fs.lchown(dest, entry.uid, entry.gid);
        await fs.lutimes(dest, entry.atime / 1000, entry.mtime / 1000);
        summary.symlinks++;
        break;
      default:
        progress.emit({
          type: "log",
          level: "warn",
          message: `${entry.path}: not a file, directory or symlink; skipped`,
        });
        summary.skipped++;
    }
  }
  // Deepest first, so that setting a directory's times is not undone by writing into it.
  for (const item of dirs.reverse()) {
    const dest = item.rel === "" ? options.to : join(options.to, item.rel);
    if (owners) await fs.chown(dest, item.entry.uid, item.entry.gid);
    await fs.chmod(dest, item.entry.mode);
    await fs.utimes(dest, item.entry.atime / 1000, item.entry.mtime / 1000);
  }
  progress.emit({ type: "end", job: "files" });
  summary.durationMs = Date.now() - started;
  return summary;
}

/** Writes `paths` of `browser` to `out` as a tar stream (paths relative, as with restoreFiles). */
export async function tarFiles(
  browser: FileBrowser,
  paths: readonly string[],
  out: Writable,
  options: { progress?: ProgressSink; signal?: AbortSignal } = {},
): Promise<RestoreFilesSummary> {
  const { started, progress, plan, total, summary } = await startCopy(browser, paths, options);
  const write = async (b: Buffer) => {
    if (!out.write(b)) await once(out, "drain");
  };
  progress.emit({ type: "start", job: "files", total });
  for (const { entry, rel } of plan) {
    options.signal?.throwIfAborted();
    if (rel === "") continue; // the root directory itself has no name in the archive
    const common = { path: rel, mode: entry.mode, uid: entry.uid, gid: entry.gid, mtime: entry.mtime };
    if (entry.kind === "directory") {
      await write(tarHeader({ ...common, kind: "directory", size: 0 }));
      summary.directories++;
    } else if (entry.kind === "symlink") {
      await write(tarHeader({ ...common, kind: "symlink", size: 0, target: entry.target ?? "" }));
      summary.symlinks++;
    } else if (entry.kind === "file") {
      await write(tarHeader({ ...common, kind: "file", size: entry.size }));
      let n = 0;
      for await (const piece of browser.fs.read(entry.path, pieceFor(entry.size))) {
        options.signal?.throwIfAborted();
        await write(piece);
        n += piece.length;
        summary.bytes += piece.length;
        progress.emit({ type: "progress", job: "files", done: summary.bytes, total });
      }
      if (n !== entry.size)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `${entry.path}: read ${n} bytes, its size is ${entry.size}`,
        );
      await write(padding(n));
      summary.files++;
    } else {
      progress.emit({
        type: "log",
        level: "warn",
        message: `${entry.path}: not a file, directory or symlink; skipped`,
      });
      summary.skipped++;
    }
  }
  await write(tarEnd());
  progress.emit({ type: "end", job: "files" });
  summary.durationMs = Date.now() - started;
  return summary;
}

const ZERO = Buffer.alloc(READ_PIECE);

function isZero(b: Buffer): boolean {
  return b.length <= ZERO.length && b.equals(ZERO.subarray(0, b.length));
}

/** Creates a directory of the target, accepting an existing directory (not a symlink to one). */
async function mkdirTarget(dir: string): Promise<void> {
  try {
    await fs.mkdir(dir, { recursive: false, mode: 0o700 });
  } catch (err) {
    if (errnoCode(err) === "ENOENT") {
      await fs.mkdir(dir, { recursive: true, mode: 0o700 }).catch((e: unknown) => {
        throw targetError(dir, e);
      });
      return;
    }
    if (errnoCode(err) !== "EEXIST") throw targetError(dir, err);
    const st = await fs.lstat(dir);
    if (!st.isDirectory())
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${dir} exists and is not a directory: not replacing it`,
      );
  }
}

function targetError(path: string, err: unknown): StrataError {
  if (errnoCode(err) === "EEXIST")
    return new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists: not replacing it (use --overwrite)`);
  return ioError(ErrorCode.TARGET_CONFLICT, `cannot write ${path}`, err);
}
