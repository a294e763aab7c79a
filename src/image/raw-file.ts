/**
 * Raw disk images and block devices read directly with positioned reads. (Image formats other
 * than raw go through qemu-storage-daemon and NBD.)
 */
import { promises as fs } from "node:fs";
import { ErrorCode, ioError, StrataError } from "../util/errors.js";

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
  private constructor(
    readonly path: string,
    readonly size: number,
    private readonly fh: fs.FileHandle,
  ) {}

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
      return new RawFileSource(path, size, fh);
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
    let done = 0;
    try {
      while (done < length) {
        const { bytesRead } = await this.fh.read(buf, done, length - done, offset + done);
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

  close(): Promise<void> {
    return this.fh.close();
  }
}
