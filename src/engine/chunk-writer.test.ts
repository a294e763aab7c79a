import assert from "node:assert/strict";
import { test } from "node:test";
import { MAX_CHUNK_SIZE, MIN_CHUNK_SIZE } from "../repo/format.js";
import { RESTORE_INFLIGHT_BYTES, restoreInflight } from "./chunk-writer.js";

test("restoreInflight keeps 24 MiB of 1 MiB chunks in flight, enough to hide cold reads", () => {
  assert.equal(restoreInflight(2, 1024 * 1024), 24);
});

test("restoreInflight stays within its memory budget, feeds every worker, and is capped", () => {
  for (const threads of [1, 2, 8, 64]) {
    for (let size = MIN_CHUNK_SIZE; size <= MAX_CHUNK_SIZE; size *= 2) {
      const n = restoreInflight(threads, size);
      assert.ok(n >= Math.min(64, threads * 2 + 2), `${threads} threads, ${size}: ${n} too few`);
      assert.ok(n <= 64, `${threads} threads, ${size}: ${n} too many`);
      // Past the budget only for the minimum the workers need.
      if (n * size > RESTORE_INFLIGHT_BYTES) assert.equal(n, Math.min(64, threads * 2 + 2));
    }
  }
});
