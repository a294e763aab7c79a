import assert from "node:assert/strict";
import { test } from "node:test";
import { chunksWithData } from "./backup.js";

test("chunksWithData marks exactly the chunks an allocated extent touches", () => {
  const K = 1024;
  const map = [
    { offset: 0, length: 8 * K, zero: true },
    { offset: 8 * K, length: 1, zero: false }, // one byte in chunk 2 (4 KiB chunks)
    { offset: 8 * K + 1, length: 12 * K - 1, zero: true },
    { offset: 20 * K, length: 5 * K, zero: false }, // chunks 5 and 6
    { offset: 25 * K, length: 3 * K, zero: true },
  ];
  assert.deepEqual([...chunksWithData(map, 28 * K, 4 * K)], [0, 0, 1, 0, 0, 1, 1]);
});

test("chunksWithData treats what the map does not cover as data, and refuses gaps", () => {
  assert.deepEqual([...chunksWithData([{ offset: 0, length: 4096, zero: true }], 3 * 4096, 4096)], [0, 1, 1]);
  assert.throws(() => chunksWithData([{ offset: 4096, length: 4096, zero: false }], 8192, 4096), /gap/);
});
