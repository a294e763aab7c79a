/**
 * Copying files out of a {@link FileBrowser}: into a directory (`restoreFiles`) or as a tar
 * stream (`tarFiles`).
 *
 * The guest owns every byte of the tree, so the copy into a directory must not be able to
 * leave it, whatever names, symlinks or modes the guest wrote, and whatever already lies in the
 * target. Everything is created relative to open directory handles ({@link DirHandle}): each
 * directory of the tree is created (0700) or found, opened without following a symlink and
 * checked to be what was found; files and symlinks are created in the open parent by one name
 * (checked: no "/", ".", "..", NUL), never through a symlink (O_EXCL|O_NOFOLLOW). A symlink of
 * the guest's is created as a symlink and never followed, also when something is later created
 * "under" it: the walk only descends into real directories, and a symlink met in the target
 * where a directory should be is replaced (--overwrite) or refused, never entered.
 *
 * With --overwrite an existing file or symlink is replaced by writing the new one under a
 * temporary name in the same directory and renaming it over the old one: the old name's link is
 * replaced, never written through (a hard link to a file elsewhere keeps its bytes), and a
 * failed read leaves the old file as it was. A directory is never replaced by a file.
 *
 * Metadata is set on open handles (fchmod, fchown, futimes; lchown and lutimes for symlinks),
 * directories' last, after their contents. By default files belong to whoever runs Strata and
 * setuid/setgid bits are dropped (`sameOwner`, `keepSetuid` restore them). The target
 * directory's own mode, owner and times are left as they are.
 */
import { once } from "node:events";
import type { FileHandle } from "node:fs/promises";
import type { Writable } from "node:stream";
import { type FsEntry, pieceFor, READ_PIECE } from "../../image/fs-types.js";
import { checkpoint } from "../../util/checkpoint.js";
import { type DirHandle, openTargetDir } from "../../util/dirfd.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { badRelativePath, printable } from "../../util/names.js";
import { noProgress, type ProgressSink } from "../../util/progress.js";
import { padding, tarEnd, tarHeader } from "../../util/tar.js";
import type { FileBrowser } from "./browse.js";

export interface RestoreFilesOptions {
  /** Target directory (created, mode 0700, if missing; see `openTargetDir` for what is refused). */
  to: string;
  /** Replace files and symlinks that exist in the target. Default: refuse (TARGET_CONFLICT). */
  overwrite?: boolean;
  /** Give entries the guest's owners (needs root). Default: they belong to whoever runs Strata. */
  sameOwner?: boolean;
  /** Keep setuid and setgid bits. Default: dropped. */
  keepSetuid?: boolean;
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface RestoreFilesSummary {
  files: number;
  directories: number;
  symlinks: number;
  /** Device nodes, fifos and sockets, and entries with names or targets that cannot be used: not restored. */
  skipped: number;
  /** Entries whose setuid or setgid bit was dropped (see {@link RestoreFilesOptions.keepSetuid}). */
  setuidDropped: number;
  bytes: number;
  durationMs: number;
}

/** The bits dropped unless asked to keep them. */
const SETID = 0o6000;

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
    setuidDropped: 0,
    bytes: 0,
    durationMs: 0,
  };
  return { started, progress, plan, total, summary };
}

/** Skips `entry` when it cannot be restored, with a warning; true when skipped. */
function skipped(entry: FsEntry, progress: ProgressSink, summary: RestoreFilesSummary): boolean {
  const why = entry.invalid ?? (entry.kind === "other" ? "not a file, directory or symlink" : undefined);
  if (why === undefined) return false;
  progress.emit({ type: "log", level: "warn", message: `${printable(entry.path)}: ${why}; skipped` });
  summary.skipped++;
  return true;
}

/** A directory of the target being filled, and the guest's entry for it (none for the target). */
interface OpenDir {
  rel: string;
  dir: DirHandle;
  entry?: FsEntry;
}

/** Copies `paths` (files, symlinks, directories recursively) of `browser` into `options.to`. */
export async function restoreFiles(
  browser: FileBrowser,
  paths: readonly string[],
  options: RestoreFilesOptions,
): Promise<RestoreFilesSummary> {
  if (options.sameOwner && process.getuid?.() !== 0)
    throw new StrataError(ErrorCode.USAGE, "giving files the guest's owners needs root");
  const { started, progress, plan, total, summary } = await startCopy(browser, paths, options);
  const overwrite = options.overwrite === true;
  const mode = (entry: FsEntry) => {
    if (options.keepSetuid || (entry.mode & SETID) === 0) return entry.mode & 0o7777;
    summary.setuidDropped++;
    return entry.mode & 0o7777 & ~SETID;
  };
  const tick = checkpoint(options.signal);
  const { dir: root } = await openTargetDir(options.to);
  // The open directories from the target down to the current one (a depth-first plan).
  const stack: OpenDir[] = [{ rel: "", dir: root }];
  /** Sets a finished directory's metadata on its handle and closes it. */
  const finish = async (d: OpenDir) => {
    try {
      if (d.entry) {
        if (options.sameOwner) await d.dir.fh.chown(d.entry.uid, d.entry.gid);
        await d.dir.fh.chmod(mode(d.entry));
        await d.dir.fh.utimes(d.entry.atime / 1000, d.entry.mtime / 1000);
      }
    } finally {
      await d.dir.close();
    }
  };
  try {
    progress.emit({ type: "start", job: "files", total });
    for (const item of plan) {
      await tick();
      const { entry, rel } = item;
      if (skipped(entry, progress, summary)) continue;
      if (rel === "") {
        summary.directories++; // the target itself: its contents follow
        continue;
      }
      // walk() checked every name; this is the last line of defence before a path is built.
      const bad = badRelativePath(rel);
      if (bad) throw new StrataError(ErrorCode.INTERNAL, `refusing to restore ${printable(rel)}: ${bad}`);
      const slash = rel.lastIndexOf("/");
      const parentRel = slash < 0 ? "" : rel.slice(0, slash);
      const name = rel.slice(slash + 1);
      while (stack.at(-1)!.rel !== parentRel) {
        if (stack.length === 1)
          throw new StrataError(ErrorCode.INTERNAL, `${printable(rel)} comes before its directory`);
        await finish(stack.pop()!);
      }
      const parent = stack.at(-1)!.dir;
      switch (entry.kind) {
        case "directory":
          stack.push({ rel, dir: await makeDir(parent, name, overwrite), entry });
          summary.directories++;
          break;
        case "file":
          await writeFile(parent, name, overwrite, async (fh) => {
            // All-zero pieces are skipped and the file is cut to length at the end, so a sparse
            // file (a VM image, a database) comes back sparse.
            let pos = 0;
            for await (const piece of browser.fs.read(entry.path, pieceFor(entry.size))) {
              await tick();
              if (!isZero(piece)) await fh.write(piece, 0, piece.length, pos);
              pos += piece.length;
              summary.bytes += piece.length;
              progress.emit({ type: "progress", job: "files", done: summary.bytes, total });
            }
            await fh.truncate(pos);
            // chown first: it clears setuid/setgid bits that chmod then sets.
            if (options.sameOwner) await fh.chown(entry.uid, entry.gid);
            await fh.chmod(mode(entry));
            await fh.utimes(entry.atime / 1000, entry.mtime / 1000);
          });
          summary.files++;
          break;
        case "symlink":
          await replaceable(parent, name, overwrite, async (tmp, created) => {
            await parent.symlink(entry.target!, tmp);
            created();
            if (options.sameOwner) await parent.lchown(tmp, entry.uid, entry.gid);
            await parent.lutimes(tmp, entry.atime / 1000, entry.mtime / 1000);
          });
          summary.symlinks++;
          break;
      }
    }
    // Deepest first, so that setting a directory's times is not undone by writing into it.
    while (stack.length > 1) await finish(stack.pop()!);
  } finally {
    for (const d of stack.reverse()) await d.dir.close();
  }
  progress.emit({ type: "end", job: "files" });
  summary.durationMs = Date.now() - started;
  return summary;
}

/**
 * Finds or creates the directory `name` in `parent` and opens it. Something else there (a file,
 * a symlink) is replaced with --overwrite, refused without; a symlink is never followed.
 */
async function makeDir(parent: DirHandle, name: string, overwrite: boolean): Promise<DirHandle> {
  const st = await parent.lstat(name);
  if (st && !st.isDirectory()) {
    if (!overwrite)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${printable(parent.child(name))} exists and is not a directory: not replacing it (use --overwrite)`,
      );
    await parent.unlink(name);
  }
  if (!st?.isDirectory()) await parent.mkdir(name, 0o700);
  return parent.openDir(name);
}

/**
 * Creates the file or symlink `name` in `parent` with `create` (given the name to create it
 * under): directly when nothing is there; with --overwrite, under a temporary name renamed over
 * the old file or symlink afterwards. Whatever `create` made is removed when it fails.
 */
async function replaceable(
  parent: DirHandle,
  name: string,
  overwrite: boolean,
  create: (name: string, created: () => void) => Promise<void>,
): Promise<void> {
  const existing = await parent.lstat(name);
  if (existing && !overwrite)
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `${printable(parent.child(name))} exists: not replacing it (use --overwrite)`,
    );
  if (existing?.isDirectory())
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `${printable(parent.child(name))} is a directory: not replacing it with a file or symlink`,
    );
  const tmp = existing ? parent.tempName() : name;
  let made = false;
  try {
    await create(tmp, () => {
      made = true;
    });
    if (tmp !== name) await parent.rename(tmp, name);
  } catch (err) {
    // Never leave a file with wrong or missing bytes behind (only what this call created).
    if (made) await parent.unlink(tmp).catch(() => {});
    throw err;
  }
}

/** Writes a new file `name` in `parent` with `fill`, as {@link replaceable} says. */
async function writeFile(
  parent: DirHandle,
  name: string,
  overwrite: boolean,
  fill: (fh: FileHandle) => Promise<void>,
): Promise<void> {
  await replaceable(parent, name, overwrite, async (tmp, created) => {
    const fh = await parent.createFile(tmp, 0o600);
    created();
    try {
      await fill(fh);
    } finally {
      await fh.close();
    }
  });
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
  const tick = checkpoint(options.signal);
  progress.emit({ type: "start", job: "files", total });
  for (const { entry, rel } of plan) {
    await tick();
    if (skipped(entry, progress, summary)) continue;
    if (rel === "") continue; // the root directory itself has no name in the archive
    // Member names are relative, without "." or ".." (walk() checked every name).
    const bad = badRelativePath(rel);
    if (bad) throw new StrataError(ErrorCode.INTERNAL, `refusing to archive ${printable(rel)}: ${bad}`);
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
        await tick();
        await write(piece);
        n += piece.length;
        summary.bytes += piece.length;
        progress.emit({ type: "progress", job: "files", done: summary.bytes, total });
      }
      if (n !== entry.size)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `${printable(entry.path)}: read ${n} bytes, its size is ${entry.size}`,
        );
      await write(padding(n));
      summary.files++;
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

/**
 * Writes one regular file of `browser` to `out`, with backpressure (a download); its size was
 * `entry.size` and exactly that many bytes are written, else the read fails.
 */
export async function streamFile(
  browser: FileBrowser,
  entry: FsEntry,
  out: Writable,
  signal?: AbortSignal,
): Promise<number> {
  if (entry.kind !== "file")
    throw new StrataError(ErrorCode.USAGE, `${printable(entry.path)} is a ${entry.kind}, not a regular file`);
  const tick = checkpoint(signal);
  let n = 0;
  for await (const piece of browser.fs.read(entry.path, pieceFor(entry.size))) {
    await tick();
    if (!out.write(piece)) await once(out, "drain");
    n += piece.length;
  }
  if (n !== entry.size)
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${printable(entry.path)}: read ${n} bytes, its size is ${entry.size}`,
    );
  return n;
}
