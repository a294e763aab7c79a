/**
 * Raw disk images and block devices read directly with positioned reads. (Image formats other
 * than raw go through qemu-storage-daemon and NBD.)
 *
 * Reads into page-aligned shared memory (the backup's chunk slots) go around the page cache
 * (O_DIRECT) where the file allows it: a VM's disk is rarely in the host's page cache, and
 * reading hundreds of GiB through it would both evict what the host's VMs need and cost a
 * kernel copy per byte (measured: ~4 s of system time per 2.4 GiB read cold). Other reads, reads
 * not in whole 4 KiB blocks, and files that refuse O_DIRECT use the page cache.
 */
import { constants, promises as fs } from "node:fs";
import { DIRECT_IO_ALIGN } from "../util/aligned.js";
import { ErrorCode, errnoCode, ioError, StrataError } from "../util/errors.js";

/** Size of a block device from sysfs (fstat reports 0 for one). */
async function blockDeviceSize(rdev: number, path: string): Promise<number> {
  const major = Math.floor(rdev / 256) & 0xfff;
  const minor = (rdev & 0xff) | ((rdev >> 12) & 0xfff00);
  try {
    const sectors = (await fs.readFile(`/sys/dev/block/${major}:${minor}/size`, "utf8")).trim();
    return Number(sectors) * 512;
  } catch (err) {
    throw ioError(ErrorCode.SOURCE_UNREADABLE, `cannot find the size of block device ${path}`, err);
  }
}

export class RawFileSource {
  /** Reads with O_DIRECT go here while it is set (the handle itself is closed in close()). */
  private direct: fs.FileHandle | undefined;

  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly fh: fs.FileHandle,
    private readonly directHandle: fs.FileHandle | undefined,
  ) {
    this.direct = directHandle;
  }

  static async open(path: string): Promise<RawFileSource> {
    let fh: fs.FileHandle;
    try {
      fh = await fs.open(path, "r");
    } catch (err) {
      throw ioError(ErrorCode.SOURCE_UNREADABLE, `cannot open source ${path}`, err);
    }
    try {
      const st = await fh.stat();
      let size: number;
      if (st.isFile()) size = st.size;
      else if (st.isBlockDevice()) size = await blockDeviceSize(st.rdev, path);
      else
        throw new StrataError(
          ErrorCode.SOURCE_UNREADABLE,
          `source ${path} is neither a file nor a block device`,
        );
      const direct = await fs.open(path, constants.O_RDONLY | constants.O_DIRECT).catch(() => undefined);
      return new RawFileSource(path, size, fh, direct);
    } catch (err) {
      await fh.close();
      throw err;
    }
  }

  /**
   * Reads exactly `length` bytes at `offset`, into `into` when given (a view of it is returned),
   * else into a new buffer that owns its memory (so it can be moved to a worker).
   */
  async read(offset: number, length: number, into?: Buffer): Promise<Buffer> {
    const buf = into && into.length >= length ? into.subarray(0, length) : Buffer.allocUnsafeSlow(length);
    let fh = this.fh;
    if (
      this.direct &&
      buf.buffer instanceof SharedArrayBuffer &&
      buf.byteOffset % DIRECT_IO_ALIGN === 0 &&
      offset % DIRECT_IO_ALIGN === 0 &&
      length % DIRECT_IO_ALIGN === 0
    ) {
      fh = this.direct;
    }
    let done = 0;
    try {
      while (done < length) {
        let bytesRead: number;
        try {
          ({ bytesRead } = await fh.read(buf, done, length - done, offset + done));
        } catch (err) {
          if (fh === this.fh || errnoCode(err) !== "EINVAL") throw err;
          // Opened with O_DIRECT but refuses this read: the page cache from here on.
          this.direct = undefined;
          fh = this.fh;
          continue;
        }
        if (bytesRead === 0) {
          throw new StrataError(
            ErrorCode.SOURCE_UNREADABLE,
            `source ${this.path} ended at ${offset + done} bytes, expected ${this.size} (did it shrink during the backup?)`,
          );
        }
        done += bytesRead;
      }
    } catch (err) {
      if (err instanceof StrataError) throw err;
      throw ioError(
        ErrorCode.SOURCE_UNREADABLE,
        `cannot read source ${this.path} at offset ${offset + done}`,
        err,
      );
    }
    return buf;
  }

  async close(): Promise<void> {
    this.direct = undefined;
    await this.directHandle?.close().catch(() => {});
    await this.fh.close();
  }
}
