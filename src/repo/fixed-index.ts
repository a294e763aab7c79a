/**
 * The fixed index of one disk in one restore point: the digest of every chunk-size piece of the
 * disk, in order. All-zero pieces have the all-zero digest and no stored chunk.
 *
 *   0   8  magic FIXED_INDEX_MAGIC
 *   8   8  disk size in bytes, u64 LE
 *  16   4  chunk size in bytes, u32 LE
 *  20   4  reserved, zero
 *  24  32  SHA-256 of the digest array
 *  56   8  reserved, zero
 *  64  32 × ceil(size / chunk size) digests
 */
import { createHash } from "node:crypto";
import { ErrorCode, StrataError } from "../util/errors.js";
import { DIGEST_SIZE, FIXED_INDEX_HEADER_SIZE, FIXED_INDEX_MAGIC, ZERO_DIGEST } from "./format.js";

export class FixedIndex {
  /** Digests laid end to end, 32 bytes each. */
  readonly digests: Buffer;

  constructor(
    readonly size: number,
    readonly chunkSize: number,
    digests?: Buffer,
  ) {
    const n = Math.ceil(size / chunkSize);
    this.digests = digests ?? Buffer.alloc(n * DIGEST_SIZE);
    if (this.digests.length !== n * DIGEST_SIZE)
      throw new StrataError(ErrorCode.INTERNAL, "index digest array of the wrong size");
  }

  get count(): number {
    return this.digests.length / DIGEST_SIZE;
  }

  digest(i: number): Buffer {
    return this.digests.subarray(i * DIGEST_SIZE, (i + 1) * DIGEST_SIZE);
  }

  setDigest(i: number, d: Uint8Array): void {
    this.digests.set(d, i * DIGEST_SIZE);
  }

  isZero(i: number): boolean {
    return this.digest(i).equals(ZERO_DIGEST);
  }

  /** Byte length of chunk i (the last one may be short). */
  chunkLength(i: number): number {
    return Math.min(this.chunkSize, this.size - i * this.chunkSize);
  }

  /** SHA-256 of the digest array, hex: what the manifest records. */
  checksum(): string {
    return createHash("sha256").update(this.digests).digest("hex");
  }

  encode(): Buffer {
    const header = Buffer.alloc(FIXED_INDEX_HEADER_SIZE);
    FIXED_INDEX_MAGIC.copy(header, 0);
    header.writeBigUInt64LE(BigInt(this.size), 8);
    header.writeUInt32LE(this.chunkSize, 16);
    Buffer.from(this.checksum(), "hex").copy(header, 24);
    return Buffer.concat([header, this.digests]);
  }

  /** Parses and checks an index; `what` names it in errors. */
  static decode(bytes: Buffer, what: string): FixedIndex {
    const bad = (why: string) => new StrataError(ErrorCode.DATA_CORRUPT, `index ${what} is damaged: ${why}`);
    if (bytes.length < FIXED_INDEX_HEADER_SIZE || !bytes.subarray(0, 8).equals(FIXED_INDEX_MAGIC))
      throw bad("bad magic");
    const size = bytes.readBigUInt64LE(8);
    const chunkSize = bytes.readUInt32LE(16);
    if (size > BigInt(Number.MAX_SAFE_INTEGER) || chunkSize === 0 || (chunkSize & (chunkSize - 1)) !== 0) {
      throw bad("bad size fields");
    }
    if (bytes.readUInt32LE(20) !== 0 || bytes.readBigUInt64LE(56) !== 0n) throw bad("reserved bytes set");
    const n = Math.ceil(Number(size) / chunkSize);
    if (bytes.length !== FIXED_INDEX_HEADER_SIZE + n * DIGEST_SIZE)
      throw bad("length does not match the disk size");
    const index = new FixedIndex(
      Number(size),
      chunkSize,
      Buffer.from(bytes.subarray(FIXED_INDEX_HEADER_SIZE)),
    );
    if (index.checksum() !== bytes.subarray(24, 56).toString("hex"))
      throw bad("digest array checksum mismatch");
    return index;
  }
}
