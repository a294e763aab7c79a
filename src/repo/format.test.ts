import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { encodeChunk } from "./codec.js";
import { FixedIndex } from "./fixed-index.js";
import {
  CHUNK_CRYPTO_SIZE,
  CHUNK_HEADER_SIZE,
  CHUNK_MAGIC,
  DIGEST_SIZE,
  FIXED_INDEX_HEADER_SIZE,
  FIXED_INDEX_MAGIC,
  formatTime,
  PACK_DIRECTORY_MAGIC,
  PACK_ENTRY_SIZE,
  PACK_INDEX_MAGIC,
  PACK_MAGIC,
  PACK_TRAILER_SIZE,
} from "./format.js";

// These values are frozen: repositories on disk depend on them. Changing one is a new format version.
test("magic numbers are the frozen ones", () => {
  assert.equal(CHUNK_MAGIC.toString("hex"), "8c752bc67fd208cc");
  assert.equal(FIXED_INDEX_MAGIC.toString("hex"), "5614ca395dc7acc0");
  assert.equal(PACK_MAGIC.toString("hex"), "8ba74d243d97d9ee");
  assert.equal(PACK_DIRECTORY_MAGIC.toString("hex"), "9706fbddd8e9b88f");
  assert.equal(PACK_INDEX_MAGIC.toString("hex"), "0735c2806e0b0813");
  assert.equal(PACK_TRAILER_SIZE, 48);
  assert.equal(PACK_ENTRY_SIZE, 40);
});

test("header sizes are the frozen ones", () => {
  assert.equal(CHUNK_HEADER_SIZE, 16);
  assert.equal(CHUNK_CRYPTO_SIZE, 28);
  assert.equal(FIXED_INDEX_HEADER_SIZE, 64);
  assert.equal(DIGEST_SIZE, 32);
  const plain = encodeChunk(Buffer.alloc(0));
  assert.equal(plain.length, CHUNK_HEADER_SIZE);
  const keys = { encKey: Buffer.alloc(32, 1), macKey: Buffer.alloc(32, 2) };
  assert.equal(encodeChunk(Buffer.alloc(0), keys).length, CHUNK_HEADER_SIZE + CHUNK_CRYPTO_SIZE);
  const idx = new FixedIndex(3 * 65536 + 1, 65536).encode();
  assert.equal(idx.length, FIXED_INDEX_HEADER_SIZE + 4 * DIGEST_SIZE);
});

test("docs/format.md states the same magic numbers and sizes", () => {
  const doc = readFileSync(new URL("../../../docs/format.md", import.meta.url), "utf8");
  for (const m of [CHUNK_MAGIC, FIXED_INDEX_MAGIC, PACK_MAGIC, PACK_DIRECTORY_MAGIC, PACK_INDEX_MAGIC])
    assert.ok(doc.includes(m.toString("hex")), `format.md lacks ${m.toString("hex")}`);
  assert.match(doc, /header of 16 bytes/);
  assert.match(doc, /header of 64 bytes/);
});

test("restore point times are UTC to the second", () => {
  assert.equal(formatTime(Date.UTC(2026, 10, 22, 1, 2, 3, 999)), "2026-11-22T01:02:03Z");
});

test("docs/format.md states the key file's config-seal additional data", async () => {
  const { CONFIG_SEAL_AAD } = await import("./keys.js");
  const doc = readFileSync(new URL("../../../docs/format.md", import.meta.url), "utf8");
  assert.ok(doc.includes(`${Buffer.byteLength(CONFIG_SEAL_AAD)} ASCII`));
  assert.ok(doc.includes(`\`${CONFIG_SEAL_AAD}\``));
});
