/** Bounded concurrency helpers for async work with backpressure. */

/**
 * Runs `fn` over the items of `source` with at most `limit` calls in flight. Pulls the next
 * item only when a slot is free, so an unbounded source never piles up in memory. Rejects with
 * the first error after the calls already in flight have settled, and stops pulling.
 */
export async function forEachLimit<T>(
  source: Iterable<T> | AsyncIterable<T>,
  limit: number,
  fn: (item: T, index: number) => Promise<void>,
  signal?: AbortSignal,
): Promise<void> {
  if (limit < 1) throw new RangeError("limit must be at least 1");
  const iterator =
    Symbol.asyncIterator in source
      ? (source as AsyncIterable<T>)[Symbol.asyncIterator]()
      : (source as Iterable<T>)[Symbol.iterator]();
  const running = new Set<Promise<void>>();
  let failure: { error: unknown } | undefined;
  let index = 0;
  // Woken by the call that frees a slot. (Promise.race over the running calls would cost a
  // reaction on each of them per turn: O(limit) per item, and a restore runs thousands of items
  // 24 at a time on the thread that also drives their I/O.)
  let wake: (() => void) | undefined;
  const settled = (p: Promise<void>) => {
    running.delete(p);
    wake?.();
  };
  try {
    while (!failure) {
      signal?.throwIfAborted();
      if (running.size >= limit) {
        await new Promise<void>((resolve) => {
          wake = resolve;
        });
        wake = undefined;
        continue;
      }
      const next = await iterator.next();
      if (next.done) break;
      const p: Promise<void> = fn(next.value, index++).then(
        () => settled(p),
        (error: unknown) => {
          failure ??= { error };
          settled(p);
        },
      );
      running.add(p);
    }
  } catch (error) {
    failure ??= { error };
  }
  await Promise.all(running);
  if (failure) {
    await iterator.return?.();
    throw failure.error;
  }
}

/** A counting semaphore. */
export class Semaphore {
  private waiters: Array<() => void> = [];
  constructor(private available: number) {}

  async acquire(): Promise<void> {
    if (this.available > 0) {
      this.available--;
      return;
    }
    await new Promise<void>((resolve) => this.waiters.push(resolve));
  }

  release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.available++;
  }

  async with<T>(fn: () => Promise<T>): Promise<T> {
    await this.acquire();
    try {
      return await fn();
    } finally {
      this.release();
    }
  }
}
