import assert from "node:assert/strict";
import { test } from "node:test";
import { FixedIndex } from "../repo/fixed-index.js";
import { MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ZERO_DIGEST } from "../repo/format.js";
import {
  chunkRuns,
  RESTORE_INFLIGHT_BYTES,
  RESTORE_RUN_BYTES,
  restoreInflight,
  restoreRunChunks,
} from "./chunk-writer.js";

test("a restore of 1 MiB chunks keeps 8 runs of 4 chunks (32 MiB) in flight", () => {
  assert.equal(restoreRunChunks(1024 * 1024), 4);
  assert.equal(restoreInflight(2, 1024 * 1024), 8);
});

test("restoreInflight stays within its memory budget, feeds every worker, and is capped", () => {
  for (const threads of [1, 2, 8, 64]) {
    for (let size = MIN_CHUNK_SIZE; size <= MAX_CHUNK_SIZE; size *= 2) {
      const run = restoreRunChunks(size);
      assert.ok(run >= 1 && (run === 1 || run * size <= RESTORE_RUN_BYTES), `${size}: run of ${run}`);
      const chunks = restoreInflight(threads, size) * run;
      const least = Math.min(64, threads * 2 + 2);
      assert.ok(chunks >= least, `${threads} threads, ${size}: ${chunks} chunks too few`);
      assert.ok(chunks < 64 + run, `${threads} threads, ${size}: ${chunks} chunks too many`);
      // Past the budget only for the minimum the workers need (rounded up to whole runs).
      if (chunks * size > RESTORE_INFLIGHT_BYTES) assert.ok(chunks < least + run);
    }
  }
});

test("chunkRuns groups consecutive non-zero chunks, at most `max` per run", () => {
  const chunk = 64 * 1024;
  const index = new FixedIndex(11 * chunk - 100, chunk);
  const data = Buffer.alloc(32, 1);
  // Zero: 2, 3 and 7; the last chunk is short.
  for (let i = 0; i < index.count; i++) index.setDigest(i, [2, 3, 7].includes(i) ? ZERO_DIGEST : data);
  assert.deepEqual(chunkRuns(index, 3), [
    [0, 2],
    [4, 3],
    [8, 3],
  ]);
  assert.deepEqual(chunkRuns(index, 1).length, 8);
});
