/** Targets for replay: raw image files, and an in-memory overlay over any base. */
import { promises as fs } from "node:fs";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ReplayTarget } from "./reader.js";

const ZERO = Buffer.alloc(1024 * 1024);

/** Replays onto raw image files, one per disk name, opened read-write. */
export class RawFileTarget implements ReplayTarget {
  private constructor(private readonly files: Map<string, fs.FileHandle>) {}

  static async open(paths: ReadonlyMap<string, string>): Promise<RawFileTarget> {
    const files = new Map<string, fs.FileHandle>();
    try {
      for (const [disk, path] of paths) files.set(disk, await fs.open(path, "r+"));
    } catch (err) {
      for (const fh of files.values()) await fh.close().catch(() => {});
      throw err;
    }
    return new RawFileTarget(files);
  }

  private fh(disk: string): fs.FileHandle {
    const fh = this.files.get(disk);
    if (!fh) throw new StrataError(ErrorCode.INTERNAL, `replay: no target file for disk ${disk}`);
    return fh;
  }

  async write(disk: string, offset: number, data: Buffer): Promise<void> {
    const fh = this.fh(disk);
    for (let done = 0; done < data.length; ) {
      const { bytesWritten } = await fh.write(data, done, data.length - done, offset + done);
      done += bytesWritten;
    }
  }

  async zero(disk: string, offset: number, length: number): Promise<void> {
    for (let at = 0; at < length; at += ZERO.length)
      await this.write(disk, offset + at, ZERO.subarray(0, Math.min(ZERO.length, length - at)));
  }

  /** Syncs and closes every file. */
  async close(): Promise<void> {
    for (const fh of this.files.values()) {
      await fh.sync();
      await fh.close();
    }
  }
}

const PAGE = 64 * 1024;

/**
 * The disks as a base plus the replayed writes, in memory: 64 KiB pages copied from the base
 * the first time a write touches them. Reads see the overlay where it was written, the base
 * elsewhere. For serving an instant without writing a full image first, and for tests.
 */
export class MemoryOverlay implements ReplayTarget {
  private readonly pages = new Map<string, Map<number, Buffer>>();

  /** `base` reads the disk before replay; absent: the disks start all zero. */
  constructor(private readonly base?: (disk: string, offset: number, length: number) => Promise<Buffer>) {}

  private async page(disk: string, index: number): Promise<Buffer> {
    let m = this.pages.get(disk);
    if (!m) {
      m = new Map();
      this.pages.set(disk, m);
    }
    let p = m.get(index);
    if (!p) {
      p = Buffer.alloc(PAGE);
      if (this.base) (await this.base(disk, index * PAGE, PAGE)).copy(p);
      m.set(index, p);
    }
    return p;
  }

  async write(disk: string, offset: number, data: Buffer): Promise<void> {
    for (let done = 0; done < data.length; ) {
      const at = offset + done;
      const p = await this.page(disk, Math.floor(at / PAGE));
      const n = Math.min(PAGE - (at % PAGE), data.length - done);
      data.copy(p, at % PAGE, done, done + n);
      done += n;
    }
  }

  async zero(disk: string, offset: number, length: number): Promise<void> {
    for (let done = 0; done < length; ) {
      const at = offset + done;
      const p = await this.page(disk, Math.floor(at / PAGE));
      const n = Math.min(PAGE - (at % PAGE), length - done);
      p.fill(0, at % PAGE, (at % PAGE) + n);
      done += n;
    }
  }

  /** `length` bytes of `disk` at `offset`: replayed pages, else the base. */
  async read(disk: string, offset: number, length: number): Promise<Buffer> {
    const out = Buffer.alloc(length);
    const m = this.pages.get(disk);
    for (let done = 0; done < length; ) {
      const at = offset + done;
      const n = Math.min(PAGE - (at % PAGE), length - done);
      const p = m?.get(Math.floor(at / PAGE));
      if (p) p.copy(out, done, at % PAGE, (at % PAGE) + n);
      else if (this.base) (await this.base(disk, at, n)).copy(out, done);
      done += n;
    }
    return out;
  }

  /** Bytes held in memory. */
  get bytes(): number {
    let n = 0;
    for (const m of this.pages.values()) n += m.size * PAGE;
    return n;
  }
}
