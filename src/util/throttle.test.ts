import assert from "node:assert/strict";
import { test } from "node:test";
import { allLimits, MiB, TokenBucket, takeWith } from "./throttle.js";

test("a token bucket holds its rate over overlapping takes, after its burst", async () => {
  const rate = 8 * MiB;
  const bucket = new TokenBucket(rate);
  const t0 = performance.now();
  // 4 MiB in 64 KiB pieces, eight at a time (as read-ahead asks).
  for (let i = 0; i < 8; i++) await Promise.all(Array.from({ length: 8 }, () => bucket.take(64 * 1024)));
  const s = (performance.now() - t0) / 1000;
  const expected = (4 * MiB - bucket.burst) / rate;
  assert.ok(s >= expected * 0.95 && s <= expected * 1.25, `${s.toFixed(3)} s for ${expected.toFixed(3)} s`);
});

test("a take is cancelled by its signal; a zero or negative rate is refused", async () => {
  const bucket = new TokenBucket(MiB);
  const ac = new AbortController();
  const pending = bucket.take(10 * MiB, ac.signal);
  ac.abort(new Error("stop"));
  await assert.rejects(pending, /stop/);
  assert.throws(() => new TokenBucket(0), /above 0/);
  assert.equal(allLimits([undefined, undefined]), undefined);
});

test("many waits in flight on one job's signal are no listener-leak warning", async () => {
  const warnings: string[] = [];
  const onWarning = (w: Error) => warnings.push(w.name);
  process.on("warning", onWarning);
  try {
    const bucket = new TokenBucket(256 * MiB);
    const ac = new AbortController();
    const take = takeWith(bucket, ac.signal);
    // 32 reads in flight, each waiting past the burst with the same signal.
    await Promise.all(Array.from({ length: 32 }, () => take(4 * MiB)));
    await new Promise((r) => setImmediate(r));
    assert.deepEqual(
      warnings.filter((w) => w === "MaxListenersExceededWarning"),
      [],
    );
  } finally {
    process.off("warning", onWarning);
  }
});
