/**
 * ext2/3/4 through libext2fs compiled to WebAssembly (the `ext2fs` package), in-process.
 *
 * libext2fs reads through a disk object we hand it; ours reads the {@link ByteSource} and lays
 * the blocks of a replayed journal over it ({@link replayJournal}), so a filesystem that was
 * not cleanly unmounted (a crash-consistent restore point) reads as the kernel would see it
 * after recovery, while the restore point itself is never written: writes from libext2fs are
 * refused. Files are opened with O_NOATIME, which keeps libext2fs from updating access times
 * (its only write on a read path).
 *
 * libext2fs runs one operation at a time (the package queues them), so reads of one
 * filesystem are sequential; each `read` asks for a whole piece at once. The package allocates
 * and copies the whole requested length on every read, whatever it returns, so callers size
 * pieces to the file (see `pieceFor` in fs-types.ts): 4 MiB pieces for 3000 small files cost 23 s.
 */
import { constants } from "node:fs";
import { createRequire } from "node:module";
import { checkpoint } from "../util/checkpoint.js";
import { ErrorCode, errnoCode, StrataError } from "../util/errors.js";
import { badName, printable } from "../util/names.js";
import type { ByteSource } from "./byte-source.js";
import { type JournalOverlay, replayJournal } from "./ext-journal.js";
import {
  type FileSystemReader,
  type FsEntry,
  invalidEntry,
  joinPath,
  kindOf,
  normalPath,
  notFound,
  READ_PIECE,
} from "./fs-types.js";

interface ExtStats {
  ino: number;
  mode: number;
  uid: number;
  gid: number;
  size: number;
  atime: Date;
  mtime: Date;
}

interface ExtHandle {
  read(buf: Buffer, offset: number, length: number, position: number): Promise<{ bytesRead: number }>;
  close(): Promise<void>;
}

interface ExtPromises {
  lstat(path: string): Promise<ExtStats>;
  readdir(path: string): Promise<string[]>;
  readlink(path: string): Promise<string>;
  open(path: string, flags: number): Promise<ExtHandle>;
}

interface ExtFs {
  promises: ExtPromises;
}

interface Ext2fsModule {
  mount(disk: unknown, offset: number): Promise<ExtFs>;
  umount(fs: ExtFs): Promise<void>;
}

let loaded: Ext2fsModule | undefined;

/**
 * The `ext2fs` package, loaded on first use (it is a large WebAssembly module). Its Emscripten
 * runtime installs process-wide "uncaughtException" and "unhandledRejection" listeners that
 * rethrow anything: they would turn every stray error of the whole program into a dump of the
 * module's source. Those listeners are removed right after loading.
 */
function ext2fsModule(): Ext2fsModule {
  if (loaded) return loaded;
  const before = {
    uncaught: new Set(process.listeners("uncaughtException")),
    rejection: new Set(process.listeners("unhandledRejection")),
  };
  loaded = createRequire(import.meta.url)("ext2fs") as Ext2fsModule;
  for (const l of process.listeners("uncaughtException")) {
    if (!before.uncaught.has(l)) process.removeListener("uncaughtException", l);
  }
  for (const l of process.listeners("unhandledRejection")) {
    if (!before.rejection.has(l)) process.removeListener("unhandledRejection", l);
  }
  return loaded;
}

/** The disk object libext2fs reads through (the `file-disk` shape). */
class OverlayDisk {
  /** The last read failure, so that libext2fs's bare EIO can be reported with its cause. */
  lastError: unknown;

  constructor(
    private readonly source: ByteSource,
    private readonly overlay: JournalOverlay | undefined,
  ) {}

  async read(buffer: Buffer, bufferOffset: number, length: number, position: number) {
    try {
      const avail = Math.max(0, Math.min(length, this.source.size - position));
      if (avail > 0) (await this.source.read(position, avail)).copy(buffer, bufferOffset);
      if (avail < length) buffer.fill(0, bufferOffset + avail, bufferOffset + length);
      await this.overlay?.apply(buffer.subarray(bufferOffset, bufferOffset + length), position);
      return { bytesRead: length, buffer };
    } catch (err) {
      this.lastError = err;
      throw err;
    }
  }

  async write(): Promise<never> {
    throw new StrataError(ErrorCode.INTERNAL, "the filesystem reader is read-only");
  }

  async flush(): Promise<void> {}

  async discard(): Promise<void> {}
}

/** An ext2/3/4 filesystem, read-only. */
export class ExtReader implements FileSystemReader {
  private closed = false;

  private constructor(
    readonly type: string,
    private readonly fs: ExtFs,
    private readonly disk: OverlayDisk,
    /** Journal blocks laid over the filesystem (0 when it was clean). */
    readonly replayedBlocks: number,
  ) {}

  /** Mounts the filesystem in `source` (which starts at the superblock's partition). */
  static async open(source: ByteSource, type: string): Promise<ExtReader> {
    const overlay = await replayJournal(source);
    const disk = new OverlayDisk(source, overlay);
    let fs: ExtFs;
    try {
      fs = await ext2fsModule().mount(disk, 0);
    } catch (err) {
      if (disk.lastError !== undefined) throw disk.lastError;
      throw new StrataError(ErrorCode.DATA_CORRUPT, `cannot open the ${type} filesystem: ${describe(err)}`, {
        cause: err,
      });
    }
    return new ExtReader(type, fs, disk, overlay?.blocks ?? 0);
  }

  async stat(path: string): Promise<FsEntry> {
    const p = normalPath(path);
    const st = await this.call(p, () => this.fs.promises.lstat(p));
    const kind = kindOf(st.mode);
    const entry: FsEntry = {
      name: p === "/" ? "" : p.slice(p.lastIndexOf("/") + 1),
      path: p,
      kind,
      mode: st.mode & 0o7777,
      uid: st.uid,
      gid: st.gid,
      size: kind === "directory" ? 0 : st.size,
      mtime: st.mtime.getTime(),
      atime: st.atime.getTime(),
      id: st.ino,
    };
    if (kind === "symlink") entry.target = await this.call(p, () => this.fs.promises.readlink(p));
    return entry;
  }

  async list(path: string, signal?: AbortSignal): Promise<FsEntry[]> {
    const p = normalPath(path);
    // The package decodes names as UTF-8 whatever is asked (invalid bytes become U+FFFD).
    const names = await this.call(p, () => this.fs.promises.readdir(p));
    const out: FsEntry[] = [];
    const tick = checkpoint(signal);
    for (const name of names.sort()) {
      await tick();
      if (name === "." || name === "..") continue;
      // A guest can write any bytes but "/" and NUL into an ext name, and a damaged or crafted
      // directory holds worse: such an entry is listed as invalid, and its directory stays readable.
      const why = badName(name);
      if (why) {
        out.push(invalidEntry(p, name, why));
        continue;
      }
      try {
        out.push(await this.stat(joinPath(p, name)));
      } catch (err) {
        // A failed read of the restore point (a damaged chunk) fails the listing, as any read does.
        if (this.disk.lastError !== undefined || !(err instanceof StrataError)) throw err;
        if (err.code === ErrorCode.INTERNAL) throw err;
        const lossy = name.includes("\uFFFD") && err.code === ErrorCode.NOT_FOUND;
        out.push(
          invalidEntry(p, name, lossy ? "a name that is not valid UTF-8" : `unreadable: ${err.message}`),
        );
      }
    }
    return out;
  }

  async *read(path: string, pieceSize = READ_PIECE): AsyncIterable<Buffer> {
    const p = normalPath(path);
    const handle = await this.call(p, () =>
      this.fs.promises.open(p, constants.O_RDONLY | constants.O_NOATIME),
    );
    try {
      for (let pos = 0; ; ) {
        const buf = Buffer.allocUnsafe(pieceSize);
        const { bytesRead } = await this.call(p, () => handle.read(buf, 0, pieceSize, pos));
        if (bytesRead === 0) return;
        pos += bytesRead;
        yield buf.subarray(0, bytesRead);
        // libext2fs reads up to the end of the file: a short read is the end.
        if (bytesRead < pieceSize) return;
      }
    } finally {
      try {
        await handle.close();
      } catch {
        // Closing a read-only handle has nothing to lose.
      }
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await ext2fsModule().umount(this.fs);
  }

  /** Runs a libext2fs call, turning its errno errors into Strata's. */
  private async call<T>(path: string, fn: () => Promise<T>): Promise<T> {
    if (this.closed) throw new StrataError(ErrorCode.INTERNAL, "the filesystem reader is closed");
    this.disk.lastError = undefined;
    try {
      return await fn();
    } catch (err) {
      if (this.disk.lastError !== undefined) throw this.disk.lastError;
      switch (errnoCode(err)) {
        case "ENOENT":
          throw notFound(path);
        case "ENOTDIR":
          throw notFound(path, "not a directory");
        case "EISDIR":
          throw new StrataError(ErrorCode.USAGE, `${printable(path)}: is a directory`);
        default:
          throw new StrataError(ErrorCode.DATA_CORRUPT, `${printable(path)}: ${describe(err)}`, {
            cause: err,
          });
      }
    }
  }
}

function describe(err: unknown): string {
  const code = errnoCode(err);
  return code ? `libext2fs reported ${code}` : String((err as Error)?.message ?? err);
}
