import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { ChunkPool, INLINE_MAX } from "./chunk-pool.js";
import { chunkDigest } from "./codec.js";

const keys = { encKey: randomBytes(32), macKey: randomBytes(32) };

test("small objects are done on the calling thread: they don't wait behind the chunks queued on the workers", async (t) => {
  const pool = new ChunkPool(keys, 1, "blake3");
  t.after(() => pool.close());
  // Enough chunk work queued on the one worker to take a while: text compressed at level 9.
  const words = ["disk", "block", "guest", "volume", "snapshot", "restore", "index", "pack"];
  const text = (seed: Buffer) => Buffer.from(Array.from(seed, (b) => words[b % words.length]).join(" "));
  const inputs = Array.from({ length: 8 }, () => text(randomBytes(512 * 1024)));
  let chunksDone = false;
  const chunks = Promise.all(inputs.map((b) => pool.encode(b, 9))).then(() => {
    chunksDone = true;
  });
  const small = randomBytes(INLINE_MAX);
  const { digest } = await pool.hash(Buffer.from(small));
  const { blob } = await pool.encode(Buffer.from(small));
  const back = await pool.decode(blob, digest, "small");
  assert.equal(chunksDone, false, "the small object was done before the chunks queued ahead of it");
  assert.ok(digest.equals(chunkDigest(small, keys, "blake3")));
  assert.ok(back.equals(small));
  await chunks;
  // One byte more goes to the workers, and gives the same digest there.
  const big = randomBytes(INLINE_MAX + 1);
  assert.ok((await pool.hash(Buffer.from(big))).digest.equals(chunkDigest(big, keys, "blake3")));
});
