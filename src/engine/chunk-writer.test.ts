import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { mkdtemp, open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { FixedIndex } from "../repo/fixed-index.js";
import { MAX_CHUNK_SIZE, MIN_CHUNK_SIZE } from "../repo/format.js";
import type { Repository } from "../repo/repository.js";
import { ChunkWriter, RESTORE_INFLIGHT_BYTES, restoreInflight } from "./chunk-writer.js";
import { ownDigest } from "./digest.js";

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

test("chunks are read by a digest of 32 bytes of its own, not a view of the whole index", async (t) => {
  // A view goes to the verifying worker thread with all the memory under it: the whole index.
  const dir = await mkdtemp(join(tmpdir(), "strata-chunk-writer-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const chunkSize = 64 * 1024;
  const index = new FixedIndex(1024 * chunkSize, chunkSize);
  for (let i = 0; i < index.count; i++)
    index.setDigest(i, createHash("sha256").update(`chunk ${i}`).digest());
  const asked: Buffer[] = [];
  const repo = {
    readChunk: async (digest: Buffer) => {
      asked.push(digest);
      return Buffer.alloc(chunkSize, 1);
    },
  } as unknown as Repository;
  const path = join(dir, "disk.raw");
  const fh = await open(path, "w");
  try {
    await fh.truncate(index.size);
    const writer = await ChunkWriter.open(fh, path, { chunkSize, inflight: 1, direct: false });
    await writer.chunk(repo, index, 7, "disk");
    await writer.finish();
  } finally {
    await fh.close();
  }
  assert.equal(asked.length, 1);
  assert.deepEqual(asked[0], index.digest(7));
  assert.equal(asked[0]!.buffer.byteLength, 32);
  assert.equal(ownDigest(index, 7).buffer.byteLength, 32);
});
