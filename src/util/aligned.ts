/**
 * Memory aligned for O_DIRECT I/O. Node's Buffers start wherever malloc put them (16-byte
 * aligned at best), which O_DIRECT refuses with EINVAL; the memory of a WebAssembly.Memory is
 * mapped by V8 on a page boundary, and its pages are 64 KiB. `shared` memory is a
 * SharedArrayBuffer, so worker threads can fill a slot in place without any transfer.
 */
import { nativeAddon } from "./native.js";

/** The one piece of the WebAssembly API used here (this project's TypeScript libs don't declare it). */
const Wasm = (
  globalThis as unknown as {
    WebAssembly: {
      Memory: new (d: { initial: number; maximum: number; shared: boolean }) => { buffer: SharedArrayBuffer };
    };
  }
).WebAssembly;

/** WebAssembly memory page. */
const WASM_PAGE = 64 * 1024;

/**
 * What direct I/O (O_DIRECT) wants offsets, lengths and memory to be multiples of: 4 KiB suits
 * devices with 512-byte and with 4K sectors. Every slot is (64 KiB pages on a page-aligned base).
 */
export const DIRECT_IO_ALIGN = 4096;

/**
 * Memory from this size up asks for transparent huge pages (native addon): measured on a restore
 * of the benchmark's Debian disk, 39k page faults became 22k and the restore took 0.35-0.45 s less;
 * a full backup 18k fewer faults and 0.1-0.2 s less.
 */
const HUGE_FROM = 4 * 1024 * 1024;

/** `count` slots of `size` bytes each (rounded up to 64 KiB), taken and given back. */
export class AlignedSlots {
  readonly memory: SharedArrayBuffer;
  readonly slotSize: number;
  /** Bytes of {@link memory} in huge pages, as far as the kernel agreed to (0 without the addon). */
  readonly hugeBytes: number;
  private readonly free: number[] = [];
  private readonly waiting: Array<(slot: number) => void> = [];

  constructor(
    readonly count: number,
    size: number,
  ) {
    this.slotSize = Math.ceil(size / WASM_PAGE) * WASM_PAGE;
    const pages = (count * this.slotSize) / WASM_PAGE;
    this.memory = new Wasm.Memory({ initial: pages, maximum: pages, shared: true }).buffer;
    this.hugeBytes =
      this.memory.byteLength >= HUGE_FROM ? (nativeAddon()?.adviseHuge(new Uint8Array(this.memory)) ?? 0) : 0;
    for (let i = 0; i < count; i++) this.free.push(i);
  }

  /** Byte offset of slot `slot` in {@link memory}. */
  offset(slot: number): number {
    return slot * this.slotSize;
  }

  /** The first `length` bytes of slot `slot`. */
  view(slot: number, length = this.slotSize): Uint8Array {
    return new Uint8Array(this.memory, this.offset(slot), length);
  }

  /** A free slot; waits for one when all are taken. */
  take(): Promise<number> {
    const slot = this.free.pop();
    if (slot !== undefined) return Promise.resolve(slot);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  give(slot: number): void {
    const next = this.waiting.shift();
    if (next) next(slot);
    else this.free.push(slot);
  }
}
