/**
 * Which zstd level a backup's new chunks get. A first backup stores nearly every chunk it reads,
 * so it compresses at the fast level and runs at disk speed. A backup with a parent stores few
 * chunks (a day's changes) and compresses them at a middle level. Measured on the benchmark's
 * Debian disk, on the 304 chunks of 1 MiB one day changed: level 1 stored 98.8 MiB in 0.39 s of
 * CPU, level 3 93.8 MiB in 0.59 s, level 11 87.4 MiB in 4.5 s. Level 11 held a backup's chunk
 * slots long enough to stall its reads (an incremental took 3.2-3.4 s with 64 MiB at level 11,
 * 2.0-2.5 s without); it is left to `strata gc --recompress`, run when the host is idle.
 */
import { ZSTD_FAST, ZSTD_INCREMENTAL } from "./codec.js";

/** The zstd level for a backup's new chunks; `incremental`: the backup has a parent restore point. */
export function backupLevel(incremental: boolean): number {
  return incremental ? ZSTD_INCREMENTAL : ZSTD_FAST;
}
