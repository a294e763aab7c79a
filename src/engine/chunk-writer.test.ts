import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { FixedIndex } from "../repo/fixed-index.js";
import { MAX_CHUNK_SIZE, MIN_CHUNK_SIZE, ZERO_DIGEST } from "../repo/format.js";
import {
  ChunkWriter,
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

test("early datasyncs run beside direct and buffered writes alike", async (t) => {
  const dir = await fs.mkdtemp(join(tmpdir(), "strata-chunk-writer-"));
  t.after(() => fs.rm(dir, { recursive: true, force: true }));
  const MiB = 1 << 20;
  for (const direct of [true, false]) {
    const path = join(dir, `disk-${direct}`);
    const fh = await fs.open(path, "w+");
    try {
      const writer = await ChunkWriter.open(fh, path, {
        chunkSize: MiB,
        inflight: 1,
        direct,
        zeroWrite: MiB,
        flushEvery: MiB,
      });
      // Sequential, so that each write finds the last datasync done or still running.
      for (let i = 0; i < 8; i++) await writer.zeros(i * MiB, MiB);
      await writer.finish();
      // The test directory is on a file system that takes O_DIRECT (ext4 here).
      assert.deepEqual(
        [writer.stats.directBytes, writer.stats.bufferedBytes],
        direct ? [8 * MiB, 0] : [0, 8 * MiB],
      );
      assert.ok(writer.stats.earlyFlushes >= 1, `early flushes: ${writer.stats.earlyFlushes}`);
    } finally {
      await fh.close();
    }
    assert.equal((await fs.stat(path)).size, 8 * MiB);
  }
});
