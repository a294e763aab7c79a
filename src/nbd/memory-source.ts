/**
 * An in-memory {@link BlockSource} with allocation tracking: the test double that ships with
 * the interface. Writes allocate the blocks they touch; trim and write-zeroes over whole
 * blocks deallocate them, so `base:allocation` answers are meaningful.
 */

import { BASE_ALLOCATION, type Extent, StateFlag } from "./protocol.js";
import type { BlockSource } from "./server.js";

export class MemorySource implements BlockSource {
  readonly data: Buffer;
  private readonly allocated: Uint8Array;

  /**
   * @param size export size in bytes.
   * @param blockSize allocation granularity (power of two).
   */
  constructor(
    readonly size: number,
    readonly blockSize = 64 * 1024,
  ) {
    this.data = Buffer.alloc(size);
    this.allocated = new Uint8Array(Math.ceil(size / blockSize));
  }

  /** A source pre-filled with `content`, all of it allocated. */
  static from(content: Buffer, blockSize = 64 * 1024): MemorySource {
    const m = new MemorySource(content.length, blockSize);
    content.copy(m.data);
    m.allocated.fill(1);
    return m;
  }

  async read(offset: number, length: number): Promise<Buffer> {
    return Buffer.from(this.data.subarray(offset, offset + length));
  }

  async write(offset: number, data: Buffer): Promise<void> {
    data.copy(this.data, offset);
    this.mark(offset, data.length, 1, false);
  }

  async writeZeroes(offset: number, length: number): Promise<void> {
    this.data.fill(0, offset, offset + length);
    this.mark(offset, length, 0, true);
  }

  async trim(offset: number, length: number): Promise<void> {
    await this.writeZeroes(offset, length);
  }

  async blockStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    if (context !== BASE_ALLOCATION) throw new RangeError(`unknown context ${context}`);
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const block = Math.floor(pos / this.blockSize);
      const alloc = this.allocated[block] === 1;
      let stop = Math.min(end, (block + 1) * this.blockSize);
      for (let b = block + 1; stop < end && (this.allocated[b] === 1) === alloc; b++) {
        stop = Math.min(end, (b + 1) * this.blockSize);
      }
      out.push({ offset: pos, length: stop - pos, flags: alloc ? 0 : StateFlag.HOLE | StateFlag.ZERO });
      pos = stop;
    }
    return out;
  }

  /** Marks blocks; `whole` limits the change to blocks entirely inside the range. */
  private mark(offset: number, length: number, value: 0 | 1, whole: boolean): void {
    if (length === 0) return;
    const first = whole ? Math.ceil(offset / this.blockSize) : Math.floor(offset / this.blockSize);
    const endBlock = whole
      ? offset + length === this.size
        ? this.allocated.length
        : Math.floor((offset + length) / this.blockSize)
      : Math.ceil((offset + length) / this.blockSize);
    if (endBlock > first) this.allocated.fill(value, first, endBlock);
  }
}
