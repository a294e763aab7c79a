import assert from "node:assert/strict";
import { test } from "node:test";
import { mirrorBufferBytes } from "./adapter.js";

test("a limited mirror's buffer holds about a quarter second of its rate, 256 KiB to 16 MiB", () => {
  assert.equal(mirrorBufferBytes(4 << 20), 1 << 20);
  assert.equal(mirrorBufferBytes(1 << 20), 256 << 10);
  assert.equal(mirrorBufferBytes(1000), 256 << 10);
  assert.equal(mirrorBufferBytes(100 << 20), 16 << 20);
  assert.equal(mirrorBufferBytes(10 * 2 ** 30), 16 << 20);
  // Powers of two: QEMU rounds the buffer up to its granularity.
  assert.equal(mirrorBufferBytes(50 << 20), 8 << 20);
});
