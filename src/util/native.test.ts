import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { test } from "node:test";
import { AlignedSlots } from "./aligned.js";
import { NATIVE_ADDON_PATH, nativeAddon } from "./native.js";

const MiB = 1024 * 1024;

/** Sizes (bytes) of this process's mappings whose flags include `flag` (/proc/self/smaps). */
function mappingsWith(flag: string): number[] {
  const sizes: number[] = [];
  let size = 0;
  for (const line of readFileSync("/proc/self/smaps", "utf8").split("\n")) {
    const m = /^([0-9a-f]+)-([0-9a-f]+) /.exec(line);
    if (m) size = Number.parseInt(m[2]!, 16) - Number.parseInt(m[1]!, 16);
    else if (line.startsWith("VmFlags:") && line.split(/\s+/).includes(flag)) sizes.push(size);
  }
  return sizes;
}

test("large aligned slots ask for huge pages over their whole 2 MiB pages; small ones don't", () => {
  assert.ok(nativeAddon(), `${NATIVE_ADDON_PATH} loads (npm run build makes it)`);
  const before = mappingsWith("hg").length;
  const big = new AlignedSlots(4, 3 * MiB);
  // 12 MiB from a 64 KiB boundary: at least 10 MiB of it lies in whole 2 MiB pages.
  assert.ok(big.hugeBytes >= 10 * MiB && big.hugeBytes <= 12 * MiB, `advised ${big.hugeBytes}`);
  assert.equal(big.hugeBytes % (2 * MiB), 0);
  // The kernel marked the range: a mapping of at least that size now carries "hg".
  const after = mappingsWith("hg");
  assert.ok(after.length > before, "a mapping was advised");
  assert.ok(
    after.some((s) => s >= big.hugeBytes),
    `an advised mapping holds ${big.hugeBytes} bytes: ${after}`,
  );
  // Still ordinary memory to use.
  big.view(3).fill(7);
  assert.equal(big.view(3)[3 * MiB - 1], 7);
  assert.equal(new AlignedSlots(2, MiB).hugeBytes, 0);
  assert.throws(() => nativeAddon()!.adviseHuge(new Uint16Array(4) as unknown as Uint8Array), TypeError);
});
