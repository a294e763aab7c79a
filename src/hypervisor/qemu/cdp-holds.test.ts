// The per-range hold of a resume's re-read: a guest write reaching the journal target while its
// range is re-read is appended after the re-read's entry; writes elsewhere are not held.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { JournalReader } from "../../journal/reader.js";
import { JournalWriter } from "../../journal/writer.js";
import { Holds, journalSource } from "./cdp.js";
import type { LiveDisk } from "./live.js";

test("a write overlapping a held range is appended after the re-read entry; others pass", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "strata-holds-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const journal = await JournalWriter.open({
    dir,
    keys: undefined,
    vm: "web1",
    repository: "r1",
    disks: [{ name: "vda", size: 1 << 20 }],
  });
  const disk = { name: "vda", node: "n", size: 1 << 20, format: "raw", bitmaps: [] } as unknown as LiveDisk;
  const broken: string[] = [];
  const holds = new Holds();
  const src = journalSource(journal, disk, 5000, (w) => broken.push(w), holds);
  const unhold = holds.hold("vda", 65536, 65536);
  let heldDone = false;
  // The guest's write into the held range.
  const held = src.write!(65536 + 61440, Buffer.alloc(4096, 2)).then(() => {
    heldDone = true;
  });
  // Zeroes and trims wait the same way.
  const heldZero = src.writeZeroes!(65536, 512);
  // Outside the range: appended and acknowledged at once.
  await src.write!(0, Buffer.alloc(4096, 3));
  await src.write!(131072, Buffer.alloc(4096, 4));
  await new Promise((r) => setTimeout(r, 50));
  assert.equal(heldDone, false, "the overlapping write waits for the re-read");
  // The re-read's entry, then the release.
  await journal.write("vda", 65536, Buffer.alloc(65536, 1));
  unhold();
  await Promise.all([held, heldZero]);
  await journal.close();
  const order: Array<[number, number]> = [];
  const r = await JournalReader.open(dir, undefined);
  await r.walk((e) => {
    order.push([e.offset, e.data?.[0] ?? 0]);
    return true;
  });
  assert.deepEqual(order, [
    [0, 3],
    [131072, 4],
    [65536, 1],
    [65536 + 61440, 2],
    [65536, 0],
  ]);
  assert.deepEqual(broken, []);
});
