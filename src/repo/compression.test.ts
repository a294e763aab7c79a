import assert from "node:assert/strict";
import { test } from "node:test";
import { ZSTD_FAST, ZSTD_INCREMENTAL } from "./codec.js";
import { backupLevel } from "./compression.js";

test("a first backup compresses at the fast level, an incremental at the middle one", () => {
  assert.equal(backupLevel(false), ZSTD_FAST);
  assert.equal(backupLevel(true), ZSTD_INCREMENTAL);
  assert.ok(ZSTD_INCREMENTAL > ZSTD_FAST);
});
