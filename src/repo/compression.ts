/**
 * Which zstd level a new chunk gets. A first backup stores nearly every chunk it reads, so all of
 * it is compressed at the fast level and the backup runs at disk speed. A backup with a parent
 * stores few chunks (a day's changes), so those are compressed hard: on the benchmark's next-day
 * images that stores 8-16 % fewer bytes for about 1 s of extra CPU. In case a guest rewrote its
 * disk, the strong level is kept only while this backup's new bytes stay within
 * max(64 MiB, 2 % of the bytes it has examined); past that, the fast level again.
 */
import { ZSTD_FAST, ZSTD_STRONG } from "./codec.js";

/** New bytes an incremental may always compress at the strong level. */
export const STRONG_FLOOR = 64 * 1024 * 1024;
/** …and beyond that floor, this share of the bytes examined. */
export const STRONG_SHARE = 0.02;

export class CompressionPolicy {
  private examinedBytes = 0;
  private newBytes = 0;

  /** `incremental`: the backup has a parent restore point. */
  constructor(readonly incremental: boolean) {}

  /** Bytes read and digested (whether new or not). */
  examined(length: number): void {
    this.examinedBytes += length;
  }

  /** The level for a new chunk of `length` bytes, which is counted as new. */
  levelFor(length: number): number {
    this.newBytes += length;
    if (!this.incremental) return ZSTD_FAST;
    const budget = Math.max(STRONG_FLOOR, this.examinedBytes * STRONG_SHARE);
    return this.newBytes <= budget ? ZSTD_STRONG : ZSTD_FAST;
  }
}
