/**
 * Copying files out of a {@link FileBrowser}: into a directory (`restoreFiles`) or as a tar
 * stream (`tarFiles`).
 */
import { once } from "node:events";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { Writable } from "node:stream";
import { pieceFor, READ_PIECE } from "../../image/fs-types.js";
import { ErrorCode, errnoCode, ioError, StrataError } from "../../util/errors.js";
import { noProgress, type ProgressSink } from "../../util/progress.js";
import { padding, tarEnd, tarHeader } from "../../util/tar.js";
import type { FileBrowser, PlannedEntry } from "./browse.js";

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
