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
 * anything else (LVM, LUKS, swap, unknown) is named in a clear error.
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
import { detectFilesystem, type FsType } from "../image/fs-detect.js";
import { openFileSystem } from "../image/fs-open.js";
import type { FileSystemReader, FsEntry } from "../image/fs-types.js";
import { normalPath, pieceFor, READ_PIECE } from "../image/fs-types.js";
import { readPartitionTable } from "../image/partitions.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, errnoCode, ioError, StrataError } from "../util/errors.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { formatBytes } from "../util/sizes.js";
import { padding, tarEnd, tarHeader } from "../util/tar.js";
import { GUESTFS_TYPES, GuestfishReader, haveGuestfish } from "./files-guestfs.js";
import { RestorePointSource, type ServeSourceOptions } from "./serve.js";

/**
 * Chunk cache per disk for file restores. Reads are mostly sequential, so a small cache (which
 * still leaves room for read-ahead) does as well as serve's 256 MiB.
 */
export const FILES_CACHE_BYTES = 64 * 1024 * 1024;

/** Which filesystem: a disk of the restore point and a partition of it (both optional). */
export interface FsSelection {
  disk?: string;
  /** Partition number; 0 means the whole disk (no partition table). */
  partition?: number;
}

/** Parses `DISK`, `DISK:PART` or `:PART`. */
export function parseSelection(spec: string): FsSelection {
  const m = /^([^:]*)(?::(\d+))?$/.exec(spec);
  if (!m || (m[1] === "" && m[2] === undefined))
    throw new StrataError(ErrorCode.USAGE, `"${spec}" is not DISK, DISK:PARTITION or :PARTITION`);
  return {
    ...(m[1] ? { disk: m[1] } : {}),
    ...(m[2] !== undefined ? { partition: Number(m[2]) } : {}),
  };
}

/** A partition (or the whole disk) and the filesystem found in it. */
export interface PartitionInfo {
  /** 0 for the whole disk of a disk without a partition table. */
  number: number;
  start: number;
  size: number;
  type: string;
  typeName: string;
  label?: string;
  /** What the magic numbers say, or null. */
  filesystem: FsType | null;
}

export interface DiskLayout {
  disk: string;
  size: number;
  scheme: "mbr" | "gpt" | "none";
  partitions: PartitionInfo[];
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

/** One filesystem of a restore point, open for browsing and copying. */
export class FileBrowser {
  private constructor(
    readonly snap: SnapshotRef,
    readonly disk: string,
    readonly partition: PartitionInfo,
    readonly fs: FileSystemReader,
    readonly source: RestorePointSource,
    /** "web1/2026-…Z disk root partition 2", for messages. */
    readonly where: string,
  ) {}

  /**
   * Opens the filesystem `sel` points at. Without a disk, the restore point must have one disk;
   * without a partition, the disk must have one partition (or none); otherwise the error lists
   * the choices.
   */
  static async open(
    repo: Repository,
    snap: SnapshotRef,
    sel: FsSelection,
    options: ServeSourceOptions = { cacheBytes: FILES_CACHE_BYTES },
  ): Promise<FileBrowser> {
    const id = `${snap.vm}/${snap.time}`;
    const disks = snap.manifest.disks.map((d) => d.name);
    let disk = sel.disk;
    if (disk === undefined) {
      if (disks.length !== 1)
        throw new StrataError(
          ErrorCode.USAGE,
          `restore point ${id} has ${disks.length} disks (${disks.join(", ")}): say which, as DISK or DISK:PARTITION`,
        );
      disk = disks[0]!;
    }
    const source = await openDisk(repo, snap, disk, options);
    const layout = await diskLayout(disk, source);
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
      throw new StrataError(
        ErrorCode.USAGE,
        layout.partitions.length === 0
          ? `disk ${disk} of ${id} has an empty ${layout.scheme} partition table`
          : `disk ${disk} of ${id} has ${layout.partitions.length} partitions, say which: ${layout.partitions.map(choice).join(", ")}`,
      );
    }
    const where = `${id} disk ${disk}${part.number === 0 ? "" : ` partition ${part.number}`}`;
    const fsys =
      part.filesystem !== null && GUESTFS_TYPES.has(part.filesystem) && haveGuestfish()
        ? await GuestfishReader.open(repo, snap, disk, part.number, part.filesystem)
        : await openFileSystem(slice(source, part.start, part.size), where);
    return new FileBrowser(snap, disk, part, fsys, source, where);
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
