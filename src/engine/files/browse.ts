/** One filesystem of a restore point, open for browsing: list, stat, read, and walk a tree. */
import { slice } from "../../image/byte-source.js";
import { openFileSystem } from "../../image/fs-open.js";
import type { FileSystemReader, FsEntry } from "../../image/fs-types.js";
import { normalPath } from "../../image/fs-types.js";
import type { Repository, SnapshotRef } from "../../repo/repository.js";
import { checkpoint } from "../../util/checkpoint.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { badName, printable } from "../../util/names.js";
import { formatBytes } from "../../util/sizes.js";
import type { ServeSourceOptions } from "../serve.js";
import {
  type BtrfsSubvolume,
  GUESTFS_TYPES,
  GuestfishReader,
  haveGuestfish,
  NOT_FILESYSTEMS,
} from "./guestfs.js";
import {
  diskLayout,
  FILES_CACHE_BYTES,
  type FsSelection,
  lvContents,
  openDisk,
  type PartitionInfo,
  type ScannedGroup,
  scanRestorePoint,
} from "./locate.js";

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
        ? (await scanRestorePoint(repo, snap, sourceOptions, signal)).groups
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
    if (part.size === 0 || part.start + part.size > source.size)
      throw new StrataError(ErrorCode.DATA_CORRUPT, `${where} is empty or lies beyond the end of the disk`);
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
    const { groups } = await scanRestorePoint(repo, snap, options, signal);
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
  async list(path: string, signal?: AbortSignal): Promise<FsEntry[]> {
    const entry = await this.stat(path);
    return entry.kind === "directory" ? this.fs.list(entry.path, signal) : [entry];
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

  /**
   * Everything under `paths`, each with the relative path it gets in the target (its basename).
   * Entries that cannot be restored safely are kept in the plan with `invalid` set (and not
   * descended into), so copies can skip them with a warning: names no host file can have ("",
   * ".", "..", "/" or NUL in them, longer than 255 bytes) whatever the filesystem reader said,
   * and symlinks whose target is empty, holds NUL or is longer than Linux's PATH_MAX.
   */
  async walk(paths: readonly string[], signal?: AbortSignal): Promise<PlannedEntry[]> {
    const out: PlannedEntry[] = [];
    const seen = new Set<string>();
    // Every directory once: a guest's filesystem can point a directory at one of its ancestors
    // (a loop) or two directories at one (each would be copied again and again).
    const dirs = new Map<number, string>();
    const tick = checkpoint(signal);
    const visit = async (entry: FsEntry, rel: string, depth: number): Promise<void> => {
      await tick();
      out.push({ entry, rel });
      if (entry.kind !== "directory" || entry.invalid !== undefined) return;
      if (entry.id !== undefined) {
        const before = dirs.get(entry.id);
        if (before !== undefined)
          throw new StrataError(
            ErrorCode.DATA_CORRUPT,
            `${printable(entry.path)} is the directory ${printable(before)} again (a directory loop or a ` +
              `shared directory: the ${this.fs.type} filesystem in ${this.where} is damaged)`,
          );
        dirs.set(entry.id, entry.path);
      }
      if (depth >= MAX_DEPTH)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `${printable(entry.path.slice(0, 200))}…: directories nested more than ${MAX_DEPTH} deep (in ${this.where})`,
        );
      for (const child of await this.fs.list(entry.path, signal)) {
        const checked = checkEntry(child);
        await visit(checked, rel === "" ? checked.name : `${rel}/${checked.name}`, depth + 1);
      }
    };
    for (const p of paths) {
      const entry = await this.stat(p);
      const rel = entry.path === "/" ? "" : entry.name;
      if (seen.has(rel))
        throw new StrataError(ErrorCode.USAGE, `two paths would both be restored as "${rel || "/"}"`);
      seen.add(rel);
      await visit(checkEntry(entry, rel === ""), rel, 0);
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

/**
 * How deep a walk goes: a path of PATH_MAX bytes holds at most 2048 names, so no tree a guest
 * made through paths is deeper (a deeper one is made by hand, or by a loop without ids).
 */
const MAX_DEPTH = 2048;

/** Linux's PATH_MAX: the longest symlink target it stores. */
const PATH_MAX = 4096;

/** `entry`, marked invalid when its name (unless it is the root) or symlink target cannot be used. */
function checkEntry(entry: FsEntry, root = false): FsEntry {
  if (entry.invalid !== undefined) return entry;
  const why =
    (root ? undefined : badName(entry.name)) ??
    (entry.kind !== "symlink"
      ? undefined
      : !entry.target
        ? "a symlink without a target"
        : entry.target.includes("\0")
          ? "a symlink whose target holds NUL"
          : Buffer.byteLength(entry.target) >= PATH_MAX
            ? `a symlink whose target is longer than ${PATH_MAX - 1} bytes`
            : undefined);
  return why === undefined ? entry : { ...entry, invalid: why };
}
