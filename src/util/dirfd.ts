/**
 * Directories held open, and everything created in them relative to the open directory: what
 * writing untrusted trees (a guest's files) under a target directory needs, so that nothing is
 * ever created, written, changed or removed outside it.
 *
 * Node has no openat(2). On Linux, `/proc/self/fd/N` names the file open as descriptor N itself:
 * it is a "magic link", the kernel jumps to the open directory and does not resolve again the
 * path it was opened by. So `/proc/self/fd/N/NAME` finds NAME inside that directory and nowhere
 * else, as openat(N, NAME) would, as long as NAME is one component (checked: no "/", not "." or
 * "..", no NUL). Then the final component is never followed: mkdir, symlink, rename, unlink,
 * lchown and lutimes do not follow a final symlink; files are created O_CREAT|O_EXCL|O_NOFOLLOW
 * (a symlink planted where a file goes is EEXIST, never written through); directories are opened
 * O_DIRECTORY|O_NOFOLLOW and the device and inode of the open directory compared with the lstat
 * that found it, so one swapped for a symlink, or for another directory, in between is refused.
 * Metadata is set on open handles (fchmod, fchown, futimes).
 *
 * The target directory itself (see {@link openTargetDir}) is opened through its parent in the
 * same way, and refused when another user could write it or its parent and so swap it.
 */
import { randomBytes } from "node:crypto";
import { type BigIntStats, constants, existsSync, promises as fs } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { basename, dirname, join, resolve } from "node:path";
import { ErrorCode, errnoCode, ioError, StrataError } from "./errors.js";
import { badName, printable } from "./names.js";

const { O_RDONLY, O_WRONLY, O_CREAT, O_EXCL, O_DIRECTORY, O_NOFOLLOW } = constants;
const PROC_FD = "/proc/self/fd";

/** A directory open for fd-relative work. Names passed to its methods are single components. */
export class DirHandle {
  private constructor(
    /** The path it had when opened, for messages only (never used to reach it again). */
    readonly path: string,
    private readonly handle: FileHandle,
    readonly stats: BigIntStats,
  ) {}

  /** Opens the directory at `path` (symlinks in the path followed: the caller named it). */
  static async open(path: string): Promise<DirHandle> {
    if (!existsSync(PROC_FD))
      throw new StrataError(ErrorCode.INTERNAL, `${PROC_FD} is missing: writing files safely needs /proc`);
    const handle = await fs.open(path, O_RDONLY | O_DIRECTORY).catch((err: unknown) => {
      throw ioError(ErrorCode.TARGET_CONFLICT, `cannot open directory ${path}`, err);
    });
    return new DirHandle(path, handle, await handle.stat({ bigint: true }));
  }

  /** The path of `name` in this directory for messages. */
  child(name: string): string {
    return join(this.path, name);
  }

  /** A path that reaches `name` in this very directory, whatever happens to its path. */
  private at(name: string): string {
    const why = badName(name);
    if (why) throw new StrataError(ErrorCode.INTERNAL, `refusing to create ${why} in ${this.path}`);
    return `${PROC_FD}/${this.handle.fd}/${name}`;
  }

  /** What `name` is (not following a symlink), or undefined when there is nothing. */
  async lstat(name: string): Promise<BigIntStats | undefined> {
    try {
      return await fs.lstat(this.at(name), { bigint: true });
    } catch (err) {
      if (errnoCode(err) === "ENOENT") return undefined;
      throw this.error(name, "cannot look at", err);
    }
  }

  /** Creates the directory `name` (EEXIST is a TARGET_CONFLICT). */
  async mkdir(name: string, mode = 0o700): Promise<void> {
    await fs.mkdir(this.at(name), { mode }).catch((err: unknown) => {
      throw this.error(name, "cannot create directory", err);
    });
  }

  /**
   * Opens the directory `name`, which must be a directory and not a symlink, and checks that
   * what was opened is what lstat found.
   */
  async openDir(name: string): Promise<DirHandle> {
    const path = this.child(name);
    const before = await this.lstat(name);
    if (!before?.isDirectory())
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${printable(path)} is ${before ? describeKind(before) : "gone"}, not a directory: not following it`,
      );
    const handle = await fs.open(this.at(name), O_RDONLY | O_DIRECTORY | O_NOFOLLOW).catch((err: unknown) => {
      throw this.error(name, "cannot open directory", err);
    });
    const stats = await handle.stat({ bigint: true });
    if (stats.dev !== before.dev || stats.ino !== before.ino) {
      await handle.close();
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${printable(path)} was replaced while being opened: someone else is changing the target`,
      );
    }
    return new DirHandle(path, handle, stats);
  }

  /** Creates the file `name`, which must not exist in any form (a symlink there is EEXIST). */
  async createFile(name: string, mode = 0o600): Promise<FileHandle> {
    return fs.open(this.at(name), O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW, mode).catch((err: unknown) => {
      throw this.error(name, "cannot create", err);
    });
  }

  /** Creates a symlink `name` pointing at `target` (which is only stored, never followed). */
  async symlink(target: string, name: string): Promise<void> {
    await fs.symlink(target, this.at(name)).catch((err: unknown) => {
      throw this.error(name, "cannot create symlink", err);
    });
  }

  /** Renames `from` to `to` in this directory, replacing a file or symlink at `to` (not following it). */
  async rename(from: string, to: string): Promise<void> {
    await fs.rename(this.at(from), this.at(to)).catch((err: unknown) => {
      throw this.error(to, "cannot replace", err);
    });
  }

  /** Removes the file or symlink `name` (a symlink itself, never what it points at). */
  async unlink(name: string): Promise<void> {
    await fs.unlink(this.at(name)).catch((err: unknown) => {
      throw this.error(name, "cannot remove", err);
    });
  }

  /** Sets the owner of the symlink (or file) `name` itself. */
  async lchown(name: string, uid: number, gid: number): Promise<void> {
    await fs.lchown(this.at(name), uid, gid).catch((err: unknown) => {
      throw this.error(name, "cannot set the owner of", err);
    });
  }

  /** Sets the times of the symlink (or file) `name` itself; seconds since the epoch. */
  async lutimes(name: string, atime: number, mtime: number): Promise<void> {
    await fs.lutimes(this.at(name), atime, mtime).catch((err: unknown) => {
      throw this.error(name, "cannot set the times of", err);
    });
  }

  /** A name for a temporary entry in this directory, unlikely to meet any other. */
  tempName(): string {
    return `.strata-${process.pid}-${randomBytes(6).toString("hex")}`;
  }

  /** The directory's own handle, to set its metadata. */
  get fh(): FileHandle {
    return this.handle;
  }

  async close(): Promise<void> {
    await this.handle.close().catch(() => {
      // Closing a directory handle has nothing to lose.
    });
  }

  private error(name: string, what: string, err: unknown): StrataError {
    const path = printable(this.child(name));
    if (errnoCode(err) === "EEXIST")
      return new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists: not replacing it (use --overwrite)`);
    return ioError(ErrorCode.TARGET_CONFLICT, `${what} ${path}`, err);
  }
}

function describeKind(st: BigIntStats): string {
  if (st.isSymbolicLink()) return "a symlink";
  if (st.isFile()) return "a file";
  return "not a directory";
}

/** Why another user (not root) could change what is in `st`, a directory; or undefined. */
function othersCanWrite(st: BigIntStats, me: number): string | undefined {
  const uid = Number(st.uid);
  if (uid !== me && uid !== 0) return `belongs to uid ${uid}`;
  if (Number(st.mode) & 0o002) return "is writable by every user";
  if (Number(st.mode) & 0o020) return `is writable by group ${st.gid}`;
  return undefined;
}

/**
 * Why another user could swap a directory on the way to `dir` (as written, and as resolved)
 * for a symlink before it is opened: a directory above it they own or may write, unless it is
 * sticky and root's (as /tmp) and the next name on the way is ours or root's. Undefined when none.
 */
async function unsafeAncestor(dir: string, me: number): Promise<string | undefined> {
  const check = async (path: string): Promise<string | undefined> => {
    const parts = path.split("/").filter((p) => p !== "");
    for (let k = 0; k < parts.length; k++) {
      const above = `/${parts.slice(0, k).join("/")}`;
      const st = await fs.stat(above, { bigint: true });
      const why = othersCanWrite(st, me);
      if (!why) continue;
      const next = await fs.lstat(join(above, parts[k]!), { bigint: true }).catch(() => undefined);
      if (next === undefined) return `${printable(above)} ${why}`; // what we would create there could be swapped
      const nextOwner = Number(next.uid);
      const sticky = (Number(st.mode) & 0o1000) !== 0 && Number(st.uid) === 0;
      if (!sticky || (nextOwner !== me && nextOwner !== 0)) return `${printable(above)} ${why}`;
    }
    return undefined;
  };
  // Directories still to be made will be ours: the way is checked down to the deepest that
  // exists and the first name to be made in it.
  let existing = dir;
  let tail = "";
  while (existing !== "/" && !(await fs.stat(existing).catch(() => undefined))?.isDirectory()) {
    tail = basename(existing);
    existing = dirname(existing);
  }
  return (await check(join(existing, tail))) ?? (await check(join(await fs.realpath(existing), tail)));
}

/**
 * Opens (creating it, mode 0700, when missing) the directory a restore writes into. Refused:
 * a symlink or non-directory at `path` (a symlink could be swapped under the restore); a target
 * another user could write or owns; a parent another user could write without the sticky bit
 * (that user could rename the target away and put a symlink in its place), and the same for
 * every directory further up, as written and as resolved. A sticky, world-writable directory
 * such as /tmp is fine: there, only the owner of a name may rename it. The target's own mode,
 * owner and times are never changed.
 */
export async function openTargetDir(path: string): Promise<{ dir: DirHandle; created: boolean }> {
  const abs = resolve(path);
  const me = process.getuid?.() ?? 0;
  const refuse = (why: string) =>
    new StrataError(ErrorCode.TARGET_CONFLICT, `target ${printable(abs)} ${why}: not restoring into it`);
  if (abs === "/") {
    const dir = await DirHandle.open(abs);
    return { dir, created: false };
  }
  const parentPath = dirname(abs);
  const above = await unsafeAncestor(parentPath, me);
  if (above) throw refuse(`is reached through ${above}: the way to it could be swapped for a symlink`);
  await fs.mkdir(parentPath, { recursive: true, mode: 0o700 }).catch((err: unknown) => {
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot create ${printable(parentPath)}`, err);
  });
  const parent = await DirHandle.open(parentPath);
  try {
    const name = basename(abs);
    const pWhy = othersCanWrite(parent.stats, me);
    const pOwner = Number(parent.stats.uid);
    const sticky = (Number(parent.stats.mode) & 0o1000) !== 0;
    if (pWhy && (!sticky || (pOwner !== me && pOwner !== 0)))
      throw refuse(
        `is in ${printable(parentPath)}, which ${pWhy}: the target could be swapped for a symlink`,
      );
    const existing = await parent.lstat(name);
    let created = false;
    if (existing === undefined) {
      await parent.mkdir(name, 0o700);
      created = true;
    } else if (existing.isSymbolicLink()) {
      throw refuse(
        `is a symlink (give the directory it points to, ${printable(await fs.realpath(abs).catch(() => "?"))})`,
      );
    } else if (!existing.isDirectory()) {
      throw refuse("exists and is not a directory");
    }
    const dir = await parent.openDir(name);
    const why = othersCanWrite(dir.stats, me);
    if (why) {
      await dir.close();
      throw refuse(why);
    }
    // A directory we just made 0700 may have lost bits to the umask, never gained any.
    return { dir, created };
  } finally {
    await parent.close();
  }
}
