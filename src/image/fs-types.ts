/**
 * What single-file restore needs from a filesystem, whatever its type: look a path up, list a
 * directory, read a file. Readers are read-only and never write to their source.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import { printable } from "../util/names.js";

export type EntryKind = "file" | "directory" | "symlink" | "other";

/** The kind of an entry from its POSIX mode bits (S_IFMT). */
export function kindOf(mode: number): EntryKind {
  switch (mode & 0o170000) {
    case 0o100000:
      return "file";
    case 0o040000:
      return "directory";
    case 0o120000:
      return "symlink";
    default:
      return "other";
  }
}

/** One directory entry, with what `lstat` would say of it. */
export interface FsEntry {
  /** The entry's name in its directory ("" for the root). */
  name: string;
  /** Absolute path inside the filesystem, "/"-separated. */
  path: string;
  kind: EntryKind;
  /** Permission bits (0o7777). */
  mode: number;
  uid: number;
  gid: number;
  /** Bytes (files), link length (symlinks), 0 otherwise. */
  size: number;
  /** Milliseconds since the epoch. */
  mtime: number;
  atime: number;
  /** Symlink target. */
  target?: string;
  /**
   * The entry's identity in its filesystem when the reader knows it (an inode number; on FAT a
   * directory's first cluster): two directories with the same id are one, so a walk that meets
   * one again has found a loop.
   */
  id?: number;
  /**
   * Why this entry cannot be read or restored, when it cannot: a name no host file can have
   * (see `badName`), a name that is not valid for its filesystem, an unreadable inode. It is
   * listed, and skipped by copies with a warning, so one bad entry leaves its directory readable.
   */
  invalid?: string;
}

/** An entry that is listed but cannot be read or restored (see {@link FsEntry.invalid}). */
export function invalidEntry(dir: string, name: string, why: string): FsEntry {
  return {
    name,
    path: joinPath(dir, name),
    kind: "other",
    mode: 0,
    uid: 0,
    gid: 0,
    size: 0,
    mtime: 0,
    atime: 0,
    invalid: why,
  };
}

export interface FileSystemReader {
  /** "ext4", "ext3", "ext2", "vfat". */
  readonly type: string;
  /** The entry at `path` (symlinks are not followed). NOT_FOUND when there is none. */
  stat(path: string): Promise<FsEntry>;
  /**
   * The entries of the directory at `path`, without "." and "..", sorted by name. Stops with the
   * signal's reason when it aborts (a directory may hold many thousands of entries).
   */
  list(path: string, signal?: AbortSignal): Promise<FsEntry[]>;
  /** The bytes of the file at `path`, in order, in pieces of at most `pieceSize`. */
  read(path: string, pieceSize?: number): AsyncIterable<Buffer>;
  /** Releases the reader (further calls fail). */
  close(): Promise<void>;
}

/** Default piece size of {@link FileSystemReader.read}. */
export const READ_PIECE = 4 * 1024 * 1024;

/** A read piece size for a file of `size` bytes: the file in one piece up to {@link READ_PIECE}. */
export function pieceFor(size: number): number {
  return Math.max(4096, Math.min(READ_PIECE, Math.ceil(size / 4096) * 4096));
}

/** Splits an absolute path into its names, rejecting "." and ".." games. */
export function pathParts(path: string): string[] {
  if (!path.startsWith("/"))
    throw new StrataError(ErrorCode.USAGE, `"${path}" is not an absolute path inside the filesystem`);
  const parts = path.split("/").filter((p) => p !== "" && p !== ".");
  if (parts.includes("..")) throw new StrataError(ErrorCode.USAGE, `"${path}": ".." is not allowed in paths`);
  return parts;
}

/** The normal form of an absolute path: "/a/b". */
export function normalPath(path: string): string {
  return `/${pathParts(path).join("/")}`;
}

export function joinPath(dir: string, name: string): string {
  return dir === "/" ? `/${name}` : `${dir}/${name}`;
}

export function notFound(path: string, why = "no such file or directory"): StrataError {
  return new StrataError(ErrorCode.NOT_FOUND, `${printable(path)}: ${why}`);
}
