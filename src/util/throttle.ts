/**
 * Bandwidth limits: a token bucket that callers ask before moving bytes. The daemon puts one
 * around each job's disk reads (job-bandwidth) and one shared by every job (bandwidth), so that
 * a backup never takes more of the host's disks than its policy allows.
 *
 * The bucket holds up to `burst` bytes and fills at `rate` bytes per second. A caller takes what
 * it is about to move; when that drives the level below zero it waits until the level would be
 * back at zero. Callers that overlap (read-ahead) each add their debt, so the long-run rate is
 * `rate` however many reads are in flight, and a read larger than the burst is allowed too (its
 * wait is longer).
 */
import { setMaxListeners } from "node:events";
import { setTimeout as sleep } from "node:timers/promises";

export interface Limiter {
  /** Resolves when `bytes` may be moved; rejects with the signal's reason when aborted. */
  take(bytes: number, signal?: AbortSignal): Promise<void>;
}

export const MiB = 1 << 20;

export class TokenBucket implements Limiter {
  private level: number;
  private last: number;

  /**
   * `rate` in bytes per second; `burst` in bytes (default a tenth of a second's worth, at least
   * 64 KiB). `now` in milliseconds (a monotonic clock by default).
   */
  constructor(
    readonly rate: number,
    readonly burst = Math.max(rate / 10, 64 * 1024),
    private readonly now: () => number = () => performance.now(),
  ) {
    if (!(rate > 0)) throw new RangeError(`a bandwidth limit must be above 0 bytes/s, not ${rate}`);
    this.level = burst;
    this.last = now();
  }

  async take(bytes: number, signal?: AbortSignal): Promise<void> {
    const t = this.now();
    this.level = Math.min(this.burst, this.level + ((t - this.last) / 1000) * this.rate);
    this.last = t;
    this.level -= bytes;
    if (this.level >= 0) return;
    try {
      await sleep((-this.level / this.rate) * 1000, undefined, signal ? { signal } : {});
    } catch (err) {
      // The caller's own reason (a cancelled run's), not Node's generic AbortError.
      if (signal?.aborted) throw signal.reason;
      throw err;
    }
  }
}

/** Takes from every limiter in turn (a job's own and the host's). */
export function allLimits(limiters: ReadonlyArray<Limiter | undefined>): Limiter | undefined {
  const list = limiters.filter((l): l is Limiter => l !== undefined);
  if (list.length === 0) return undefined;
  if (list.length === 1) return list[0];
  return {
    async take(bytes, signal) {
      for (const l of list) await l.take(bytes, signal);
    },
  };
}

/**
 * `limiter.take` bound to one job's signal. Every read or upload in flight waits with it, one
 * abort listener each (removed when its wait ends): more than Node's default of 10 is expected
 * there, not a leak, so the signal's limit is raised instead of warning.
 */
export function takeWith(limiter: Limiter, signal?: AbortSignal): (bytes: number) => Promise<void> {
  if (signal) setMaxListeners(1024, signal);
  return (bytes) => limiter.take(bytes, signal);
}
