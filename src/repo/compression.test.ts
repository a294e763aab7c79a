import assert from "node:assert/strict";
import { test } from "node:test";
import { ZSTD_BULK, ZSTD_FAST, ZSTD_INCREMENTAL } from "./codec.js";
import { backupLevel } from "./compression.js";

test("a first backup compresses at the fast level, at the bulk level while its threads are saturated", () => {
  assert.equal(backupLevel(false), ZSTD_FAST);
  assert.equal(backupLevel(false, true), ZSTD_BULK);
  assert.ok(ZSTD_BULK < ZSTD_FAST);
});

test("an incremental compresses at the middle level whatever the load", () => {
  assert.equal(backupLevel(true), ZSTD_INCREMENTAL);
  assert.equal(backupLevel(true, true), ZSTD_INCREMENTAL);
  assert.ok(ZSTD_INCREMENTAL > ZSTD_FAST);
});
