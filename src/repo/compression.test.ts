import assert from "node:assert/strict";
import { test } from "node:test";
import { ZSTD_FAST, ZSTD_STRONG } from "./codec.js";
import { CompressionPolicy, STRONG_FLOOR } from "./compression.js";

const MiB = 1024 * 1024;

test("a first backup compresses everything at the fast level", () => {
  const p = new CompressionPolicy(false);
  p.examined(MiB);
  assert.equal(p.levelFor(MiB), ZSTD_FAST);
});

test("an incremental compresses hard within max(64 MiB, 2 % of what it examined), then fast", () => {
  const p = new CompressionPolicy(true);
  for (let i = 0; i < 64; i++) {
    p.examined(MiB);
    assert.equal(p.levelFor(MiB), ZSTD_STRONG, `new MiB ${i + 1}`);
  }
  p.examined(MiB);
  assert.equal(p.levelFor(MiB), ZSTD_FAST, "the 65th new MiB, with 65 MiB examined");
  // A large disk with few changes: 2 % of 10 GiB examined raises the budget past the floor.
  const q = new CompressionPolicy(true);
  q.examined(10 * 1024 * MiB);
  assert.equal(q.levelFor(STRONG_FLOOR + 100 * MiB), ZSTD_STRONG);
  assert.equal(q.levelFor(110 * MiB), ZSTD_FAST);
});
