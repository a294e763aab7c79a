/**
 * Which zstd level a backup's new chunks get.
 *
 * A first backup stores nearly every chunk it reads. While the disk feeds the workers faster than
 * they compress (every thread busy and more chunks waiting), its chunks get the bulk level, a
 * fast negative one with two parameters tuned (codec.ts), so the backup runs at the speed of its
 * CPUs rather than of level 1; when the threads keep up (more cores than the disk needs, or a slow
 * disk), level 1. Measured on the benchmark's Debian disk, one core: level 1 634 MiB/s storing
 * 33.9 % of the bytes, -1 687 MiB/s 37.2 %, -2 732 MiB/s 39.2 %, -3 766 MiB/s 41.7 %.
 * `strata gc --recompress`, run when the host is idle, brings them to the strong level later
 * (chunk names come from the plaintext: nothing else changes).
 *
 * A backup with a parent stores few chunks (a day's changes) and compresses them at level 2
 * whatever the load. On the 298 chunks of 1 MiB that the Debian disk's second day changed, one
 * core: level 1 stored 97.9 MiB in 0.47 s of CPU, level 2 94.7 MiB in 0.58 s, level 3 92.9 MiB in
 * 0.75 s (its first day, 198 chunks: 67.7, 66.2 and 65.5 MiB in 0.29, 0.35 and 0.47 s). Level 3
 * cost that incremental 0.28 s more CPU in all (2.77 s against 2.49 s user); it reads and hashes
 * the whole disk on two cores, so that CPU is wall time whenever anything else wants the cores.
 * Level 11 held a backup's chunk slots long enough to stall its reads (an incremental took
 * 3.2-3.4 s with 64 MiB at level 11, 2.0-2.5 s without).
 */
import { ZSTD_BULK, ZSTD_FAST, ZSTD_INCREMENTAL } from "./codec.js";

/**
 * The zstd level for a backup's next new chunk. `incremental`: the backup has a parent restore
 * point; `saturated`: the codec threads are all busy with more work queued.
 */
export function backupLevel(incremental: boolean, saturated = false): number {
  if (incremental) return ZSTD_INCREMENTAL;
  return saturated ? ZSTD_BULK : ZSTD_FAST;
}
