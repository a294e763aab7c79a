import assert from "node:assert/strict";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { forEachLimit } from "./pool.js";

test("forEachLimit runs every item with at most `limit` in flight, pulling only when a slot is free", async () => {
  let running = 0;
  let peak = 0;
  let pulled = 0;
  const done: number[] = [];
  function* items() {
    for (let i = 0; i < 50; i++) {
      pulled++;
      // Never more pulled than finished plus the slots.
      assert.ok(pulled <= done.length + 4, `item ${i} pulled with ${done.length} done`);
      yield i;
    }
  }
  await forEachLimit(items(), 4, async (i) => {
    running++;
    peak = Math.max(peak, running);
    await sleep(i % 3);
    running--;
    done.push(i);
  });
  assert.equal(peak, 4);
  assert.deepEqual(
    done.sort((a, b) => a - b),
    Array.from({ length: 50 }, (_, i) => i),
  );
});

test("forEachLimit rejects with the first error once the calls in flight have settled, and stops pulling", async () => {
  let pulled = 0;
  let settled = 0;
  function* items() {
    for (let i = 0; i < 1000; i++) {
      pulled++;
      yield i;
    }
  }
  await assert.rejects(
    forEachLimit(items(), 8, async (i) => {
      await sleep(1);
      settled++;
      if (i === 5) throw new Error("item 5 failed");
      if (i === 6) throw new Error("item 6 failed");
    }),
    /item 5 failed/,
  );
  assert.equal(settled, pulled);
  assert.ok(pulled < 100, `${pulled} items pulled after the failure`);
});
