import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import { isStrataError } from "../util/errors.js";
import {
  chunkDigest,
  decodeChunk,
  encodeChunk,
  encodeChunkInto,
  storedSizeBound,
  ZSTD_BULK,
  ZSTD_FAST,
  ZSTD_INCREMENTAL,
  ZSTD_STRONG,
} from "./codec.js";
import { CHUNK_FLAG_ENCRYPTED, CHUNK_FLAG_ZSTD, CHUNK_HEADER_SIZE } from "./format.js";

const keys = { encKey: randomBytes(32), macKey: randomBytes(32) };
const text = Buffer.from("the quick brown fox jumps over the lazy dog\n".repeat(5000));
const random = randomBytes(100_000);

test("round trip, plain and encrypted, compressible and not", () => {
  for (const k of [undefined, keys]) {
    for (const data of [text, random, Buffer.from([1])]) {
      const stored = encodeChunk(data, k);
      assert.deepEqual(decodeChunk(stored, chunkDigest(data, k), k, "t"), data);
    }
  }
});

test("every level a backup or gc uses round-trips, the bulk level's tuned context among them", () => {
  // Mixed content: text, random bytes, and text again (a chunk a disk might hold).
  const mixed = Buffer.concat([
    text.subarray(0, 50_000),
    random.subarray(0, 30_000),
    text.subarray(7, 60_007),
  ]);
  for (const k of [undefined, keys]) {
    for (const level of [ZSTD_BULK, ZSTD_FAST, ZSTD_INCREMENTAL, ZSTD_STRONG, ZSTD_BULK]) {
      for (const data of [mixed, random, text]) {
        const stored = encodeChunk(data, k, level);
        assert.deepEqual(decodeChunk(stored, chunkDigest(data, k), k, "t"), data, `level ${level}`);
      }
      // After a chunk that did not shrink (its compression failed for want of room), the next is compressed.
      assert.ok(encodeChunk(text, k, level).length < text.length / 10, `level ${level}`);
    }
  }
});

test("compressible data is compressed; incompressible is kept raw", () => {
  const a = encodeChunk(text);
  assert.ok(a.length < text.length / 10);
  assert.equal(a[8]! & CHUNK_FLAG_ZSTD, CHUNK_FLAG_ZSTD);
  const b = encodeChunk(random);
  assert.equal(b[8]! & CHUNK_FLAG_ZSTD, 0);
  assert.equal(b.length, random.length + CHUNK_HEADER_SIZE);
});

test("encrypted chunks reveal no plaintext and digests are keyed", () => {
  const stored = encodeChunk(text, keys);
  assert.equal(stored[8]! & CHUNK_FLAG_ENCRYPTED, CHUNK_FLAG_ENCRYPTED);
  assert.equal(stored.includes(Buffer.from("quick brown fox")), false);
  assert.notDeepEqual(chunkDigest(text, keys), chunkDigest(text));
  // Random nonces: the same plaintext is stored differently each time.
  assert.notDeepEqual(encodeChunk(text, keys), stored);
});

test("every flipped byte is detected", () => {
  for (const k of [undefined, keys]) {
    const data = Buffer.concat([text.subarray(0, 3000), random.subarray(0, 3000)]);
    const stored = encodeChunk(data, k);
    const digest = chunkDigest(data, k);
    for (let i = 0; i < stored.length; i += 7) {
      const bad = Buffer.from(stored);
      bad[i]! ^= 0x10;
      assert.throws(
        () => decodeChunk(bad, digest, k, "x"),
        (e) => isStrataError(e, "DATA_CORRUPT"),
        `byte ${i}`,
      );
    }
  }
});

test("a chunk under the wrong name, or with the wrong key, is refused", () => {
  const stored = encodeChunk(text);
  assert.throws(() => decodeChunk(stored, chunkDigest(random), undefined, "x"), /digest mismatch/);
  const enc = encodeChunk(text, keys);
  const other = { encKey: randomBytes(32), macKey: keys.macKey };
  assert.throws(() => decodeChunk(enc, chunkDigest(text, keys), other, "x"), /authentication failed/);
  assert.throws(() => decodeChunk(stored, chunkDigest(text, keys), keys, "x"), /unencrypted chunk/);
});

test("decoding into given memory: exact bytes, and a chunk longer than its place is damaged", () => {
  for (const k of [undefined, keys]) {
    for (const data of [text, random]) {
      const stored = encodeChunk(data, k);
      const into = new Uint8Array(new SharedArrayBuffer(data.length + 100));
      const plain = decodeChunk(stored, chunkDigest(data, k), k, "t", into);
      assert.equal(plain.buffer, into.buffer);
      assert.deepEqual(Buffer.from(plain), data);
      assert.throws(
        () => decodeChunk(stored, chunkDigest(data, k), k, "t", into.subarray(0, data.length - 1)),
        (e) => isStrataError(e, "DATA_CORRUPT") && /longer than its place/.test(String(e)),
      );
    }
  }
});

test("decoding leaves the stored bytes as they were: a chunk read once decodes twice", () => {
  for (const k of [undefined, keys]) {
    for (const data of [text, random]) {
      const stored = encodeChunk(data, k);
      const copy = Buffer.from(stored);
      const into = new Uint8Array(new SharedArrayBuffer(data.length));
      assert.deepEqual(decodeChunk(stored, chunkDigest(data, k), k, "t", into), data);
      assert.deepEqual(decodeChunk(stored, chunkDigest(data, k), k, "t"), data);
      assert.deepEqual(stored, copy);
    }
  }
});

test("encodeChunkInto writes the same stored form into given memory and asks for room enough", () => {
  const out = new Uint8Array(new SharedArrayBuffer(storedSizeBound(text.length)));
  const n = encodeChunkInto(text, out, undefined, 1);
  assert.deepEqual(Buffer.from(out.subarray(0, n)), encodeChunk(text, undefined, 1));
  assert.throws(() => encodeChunkInto(text, out.subarray(0, text.length), undefined, 1), /too small/);
});

test("a digest goes to the worker as 32 bytes of its own, not as a view of a whole index", async () => {
  const { FixedIndex } = await import("./fixed-index.js");
  const { ownBytes } = await import("./chunk-pool.js");
  const index = new FixedIndex(1024 * 65536, 65536);
  index.setDigest(7, Buffer.alloc(32, 7));
  const view = index.digest(7);
  assert.equal(view.buffer.byteLength, 1024 * 32, "FixedIndex.digest() is a view");
  const own = ownBytes(view);
  assert.deepEqual(own, view);
  assert.equal(own.buffer.byteLength, 32);
  assert.equal(ownBytes(own), own, "a buffer that owns its memory is passed as it is");
});

test("format v2 names chunks with BLAKE3 (keyed under the MAC key when encrypted): the published test vectors", async () => {
  const { chunkDigest, decodeChunk, encodeChunk } = await import("./codec.js");
  assert.equal(
    chunkDigest(Buffer.alloc(0), undefined, "blake3").toString("hex"),
    "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262",
  );
  const key = { encKey: Buffer.alloc(32, 1), macKey: Buffer.from("whats the Elvish word for friend") };
  assert.equal(
    chunkDigest(Buffer.alloc(0), key, "blake3").toString("hex"),
    "92b2b75604ed3c761f9d6f62392c8a9227ad0ea3f09573e783f1498a4ed60d26",
  );
  // A chunk checked against the other kind's digest is refused.
  const plain = Buffer.from("some chunk");
  const stored = encodeChunk(plain, key);
  // Decoding decrypts in place: each decode gets its own copy.
  assert.deepEqual(
    decodeChunk(Buffer.from(stored), chunkDigest(plain, key, "blake3"), key, "c", undefined, "blake3"),
    plain,
  );
  assert.throws(
    () => decodeChunk(Buffer.from(stored), chunkDigest(plain, key, "sha256"), key, "c", undefined, "blake3"),
    /digest/,
  );
});
