import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import fc from "fast-check";
import type { CodecKeys } from "../repo/codec.js";
import { FakeClock } from "../util/clock.js";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { ENTRY_HEADER_SIZE, ENTRY_MAGIC, EntryKind, SEGMENT_HEADER_SIZE, SEGMENT_MAGIC } from "./format.js";
import { META_FILE } from "./meta.js";
import { type JournalEntry, JournalReader, listSegments, replayJournal } from "./reader.js";
import { MemoryOverlay, RawFileTarget } from "./targets.js";
import { JournalWriter, type JournalWriterOptions } from "./writer.js";

const keys = { encKey: randomBytes(32), macKey: randomBytes(32) };
const SIZE = 1024 * 1024;
const disks = [
  { name: "vda", size: SIZE },
  { name: "vdb", size: SIZE / 2 },
];

async function tmp(t: TestContext): Promise<string> {
  const d = await mkdtemp(join(tmpdir(), "strata-journal-"));
  t.after(() => rm(d, { recursive: true, force: true }));
  return d;
}

function opts(dir: string, extra: Partial<JournalWriterOptions> = {}): JournalWriterOptions {
  return { dir, keys: undefined, vm: "web1", repository: "r1", disks, ...extra };
}

async function entries(dir: string, k?: CodecKeys): Promise<JournalEntry[]> {
  const r = await JournalReader.open(dir, k);
  const out: JournalEntry[] = [];
  await r.walk((e) => {
    out.push(e);
    return true;
  });
  return out;
}

async function expectCorrupt(p: Promise<unknown>, re: RegExp): Promise<void> {
  await assert.rejects(p, (err: unknown) => {
    assert.ok(isStrataError(err, ErrorCode.DATA_CORRUPT), String(err));
    assert.match((err as Error).message, re);
    return true;
  });
}

// Frozen: journals on disk depend on them (docs/format.md, "Write journal").
test("journal magic numbers and header sizes are the frozen ones, and docs/format.md states them", async () => {
  assert.equal(SEGMENT_MAGIC.toString("hex"), "872440957c803487");
  assert.equal(ENTRY_MAGIC.toString("hex"), "e7a73f8eda3dbe50");
  assert.equal(SEGMENT_HEADER_SIZE, 128);
  assert.equal(ENTRY_HEADER_SIZE, 112);
  const doc = await fs.readFile(new URL("../../../docs/format.md", import.meta.url), "utf8");
  assert.ok(doc.includes("872440957c803487") && doc.includes("e7a73f8eda3dbe50"));
  assert.match(doc, /segment header of 128 bytes/);
  assert.match(doc, /entry header of 112 bytes/);
});

/** A text a zstd level 1 shrinks well, and noise it can't. */
const text = Buffer.from("all work and no play makes a journal entry\n".repeat(200));

test("round trip: writes, zeroes and trims of two disks come back in order, plain and encrypted", async (t) => {
  for (const k of [undefined, keys]) {
    const dir = await tmp(t);
    const clock = new FakeClock(1_800_000_000_000);
    const w = await JournalWriter.open(opts(dir, { keys: k, clock }));
    const noise = randomBytes(5000);
    await w.write("vda", 4096, text);
    clock.advance(5);
    await w.write("vdb", 0, noise);
    await w.writeZeroes("vda", 65536, 131072);
    await w.trim("vdb", 8192, 4096);
    await w.close();
    const got = await entries(dir, k);
    assert.deepEqual(
      got.map((e) => [e.kind, e.disk, e.offset, e.length, Number(e.seq)]),
      [
        [EntryKind.WRITE, 0, 4096, text.length, 1],
        [EntryKind.WRITE, 1, 0, 5000, 2],
        [EntryKind.ZEROES, 0, 65536, 131072, 3],
        [EntryKind.TRIM, 1, 8192, 4096, 4],
      ],
    );
    assert.deepEqual(got[0]!.data, text);
    assert.deepEqual(got[1]!.data, noise);
    // Times: host clock in ns, strictly increasing even within one millisecond.
    assert.equal(got[0]!.timeNs, 1_800_000_000_000n * 1_000_000n);
    assert.ok(got[1]!.timeNs === 1_800_000_000_005n * 1_000_000n);
    assert.ok(got[2]!.timeNs > got[1]!.timeNs && got[3]!.timeNs > got[2]!.timeNs);
    const r = await JournalReader.open(dir, k);
    const win = await r.window();
    assert.equal(win.fromNs, got[0]!.timeNs);
    assert.equal(win.toNs, got[3]!.timeNs);
    assert.equal(win.entries, 4);
    assert.equal(win.dataBytes, text.length + 5000 + 131072);
    // The text compressed: the journal is smaller than the data it holds.
    assert.ok(
      win.bytes < text.length + 5000 + SEGMENT_HEADER_SIZE + 4 * ENTRY_HEADER_SIZE + 100,
      `${win.bytes}`,
    );
  }
});

test("a reopened journal continues the entry numbers in a new segment; other disks or VMs are refused", async (t) => {
  const dir = await tmp(t);
  let w = await JournalWriter.open(opts(dir));
  await w.write("vda", 0, text);
  await w.close();
  w = await JournalWriter.open(opts(dir));
  await w.write("vdb", 0, text);
  await w.close();
  assert.equal((await listSegments(dir)).length, 2);
  assert.deepEqual(
    (await entries(dir)).map((e) => Number(e.seq)),
    [1, 2],
  );
  await assert.rejects(
    JournalWriter.open(opts(dir, { disks: [{ name: "vda", size: SIZE }] })),
    /belongs to VM web1 \(disks vda:1048576, vdb:524288/,
  );
  await assert.rejects(JournalWriter.open(opts(dir, { vm: "db1" })), /not to VM db1/);
});

test("segments rotate by size and by age; the reader follows them in order", async (t) => {
  const dir = await tmp(t);
  const clock = new FakeClock(1_800_000_000_000);
  const w = await JournalWriter.open(opts(dir, { clock, maxSegmentBytes: 20_000, maxSegmentAgeMs: 60_000 }));
  for (let i = 0; i < 20; i++) await w.write("vda", i * 4096, randomBytes(4096));
  const bySize = (await listSegments(dir)).length;
  assert.ok(bySize >= 4, `${bySize} segments`);
  clock.advance(61_000);
  await w.write("vda", 0, randomBytes(10));
  await w.close();
  assert.equal((await listSegments(dir)).length, bySize + 1);
  assert.equal((await entries(dir)).length, 21);
});

test("group commit: appends are acknowledged when written; fdatasync follows within the interval, sync() at once", async (t) => {
  const dir = await tmp(t);
  const w = await JournalWriter.open(opts(dir, { syncIntervalMs: 50 }));
  await w.write("vda", 0, text);
  let s = w.stats();
  assert.equal(s.writtenSeq, 1n);
  const t0 = Date.now();
  while (w.stats().durableSeq < 1n) await new Promise((r) => setTimeout(r, 5));
  assert.ok(Date.now() - t0 < 1000, "synced by the timer");
  await w.write("vda", 0, text);
  const t1 = Date.now();
  await w.sync();
  s = w.stats();
  assert.equal(s.durableSeq, 2n);
  assert.ok(Date.now() - t1 < 45, "sync() did not wait for the timer");
  assert.equal(s.oldestUnsyncedAt, 0);
  await w.close();
});

test("a torn final entry (crash mid-append) is ignored, and truncated when the journal is reopened", async (t) => {
  for (const cut of [1, ENTRY_HEADER_SIZE - 1, ENTRY_HEADER_SIZE + 3, "zeros" as const, "payload" as const]) {
    for (const k of [undefined, keys]) {
      const dir = await tmp(t);
      const w = await JournalWriter.open(opts(dir, { keys: k }));
      for (let i = 0; i < 3; i++) await w.write("vda", i * 4096, randomBytes(4096));
      await w.close();
      const [seg] = await listSegments(dir);
      const size = (await fs.stat(seg!.path)).size;
      const last = size - (size - SEGMENT_HEADER_SIZE) / 3;
      if (cut === "zeros") {
        await fs.truncate(seg!.path, last);
        await fs.appendFile(seg!.path, Buffer.alloc(5000));
      } else if (cut === "payload") {
        // The final entry whole in length, its payload not what was written (the last block lost).
        const fh = await fs.open(seg!.path, "r+");
        await fh.write(Buffer.alloc(512), 0, 512, size - 512);
        await fh.close();
      } else {
        await fs.truncate(seg!.path, last + cut);
      }
      assert.equal((await entries(dir, k)).length, 2, `cut ${cut}`);
      const r = await JournalReader.open(dir, k);
      // window() reads headers only: a payload that does not verify shows when it is replayed.
      if (cut !== "payload") assert.ok((await r.window()).tornBytes > 0);
      // Reopening truncates the torn entry and goes on with entry 3.
      const w2 = await JournalWriter.open(opts(dir, { keys: k }));
      await w2.write("vdb", 0, text);
      await w2.close();
      assert.deepEqual(
        (await entries(dir, k)).map((e) => Number(e.seq)),
        [1, 2, 3],
      );
      assert.equal((await fs.stat(seg!.path)).size, last);
    }
  }
});

test("damage anywhere but the torn tail is an error naming the segment and the byte offset", async (t) => {
  const dir = await tmp(t);
  const w = await JournalWriter.open(opts(dir, { maxSegmentBytes: 3 * (4096 + 200) }));
  for (let i = 0; i < 9; i++) await w.write("vda", i * 4096, randomBytes(4096));
  await w.close();
  const segs = await listSegments(dir);
  assert.ok(segs.length >= 3);
  const first = segs[0]!.path;
  const orig = await fs.readFile(first);
  const at = SEGMENT_HEADER_SIZE; // the first entry
  const flip = async (pos: number) => {
    const b = Buffer.from(orig);
    b[pos]! ^= 0x40;
    await fs.writeFile(first, b);
  };
  await flip(at + 33); // the offset field
  await expectCorrupt(entries(dir), new RegExp(`${first}.* at byte ${at}: entry checksum does not match`));
  await flip(at + ENTRY_HEADER_SIZE + 200); // the payload
  await expectCorrupt(entries(dir), new RegExp(`${first}.* at byte ${at}: .*digest mismatch`));
  await flip(20); // the segment header
  await expectCorrupt(entries(dir), new RegExp(`${first}.* at byte 0: header checksum`));
  // The final entry of an older segment is not a torn tail: a crash only cuts the newest one.
  await fs.writeFile(first, orig.subarray(0, orig.length - 10));
  await expectCorrupt(entries(dir), /runs 10 bytes past the end of the segment/);
  await fs.writeFile(first, orig);
  // A segment gone from the middle: entries are missing.
  await fs.rename(segs[1]!.path, join(dir, "moved-away"));
  await expectCorrupt(entries(dir), /entries are missing/);
  await fs.rename(join(dir, "moved-away"), segs[1]!.path);
  assert.equal((await entries(dir)).length, 9);
  // journal.json changed by hand.
  const meta = await fs.readFile(join(dir, META_FILE), "utf8");
  await fs.writeFile(join(dir, META_FILE), meta.replace('"vdb"', '"vdc"'));
  await expectCorrupt(JournalReader.open(dir, undefined), /journal.json is damaged: checksum mismatch/);
});

test("encrypted journals hold no plaintext, and need the key", async (t) => {
  const dir = await tmp(t);
  const w = await JournalWriter.open(opts(dir, { keys }));
  await w.write("vda", 0, text);
  await w.close();
  const [seg] = await listSegments(dir);
  const bytes = await fs.readFile(seg!.path);
  assert.equal(bytes.indexOf("all work and no play"), -1);
  assert.equal((await fs.readFile(join(dir, META_FILE), "utf8")).includes("hmac-sha256:"), true);
  await assert.rejects(
    JournalReader.open(dir, undefined),
    /is encrypted: open it with its repository's password/,
  );
  const other = { encKey: randomBytes(32), macKey: randomBytes(32) };
  await expectCorrupt(JournalReader.open(dir, other), /journal.json is damaged/);
  // A segment moved into another journal with the same key is refused by its journal id.
  const dir2 = await tmp(t);
  const w2 = await JournalWriter.open(opts(dir2, { keys }));
  await w2.close();
  await fs.copyFile(seg!.path, join(dir2, "seg-00000000000000aa.sjl"));
  await expectCorrupt(entries(dir2, keys), /belongs to another journal/);
});

test("replay up to T: everything at or before T in order, nothing after; raw files and the overlay agree", async (t) => {
  const dir = await tmp(t);
  const clock = new FakeClock(1_800_000_000_000);
  const w = await JournalWriter.open(opts(dir, { clock }));
  const times: bigint[] = [];
  for (let i = 0; i < 10; i++) {
    clock.advance(100);
    await w.write("vda", 0, Buffer.alloc(4096, i + 1));
    await w.write("vdb", 4096, Buffer.alloc(4096, i + 1));
    times.push(BigInt(clock.now()) * 1_000_000n);
  }
  await w.close();
  const r = await JournalReader.open(dir, undefined);
  for (const [i, T] of times.entries()) {
    const o = new MemoryOverlay();
    const res = await replayJournal(r, o, { untilNs: T + 1000n });
    assert.equal(res.entries, 2 * (i + 1));
    assert.deepEqual(await o.read("vda", 0, 4096), Buffer.alloc(4096, i + 1));
    assert.deepEqual(await o.read("vdb", 4096, 4096), Buffer.alloc(4096, i + 1));
  }
  // Just before the first write: nothing.
  assert.equal((await replayJournal(r, new MemoryOverlay(), { untilNs: times[0]! - 1n })).entries, 0);
  // Raw files.
  const a = join(dir, "a.raw");
  const b = join(dir, "b.raw");
  await fs.writeFile(a, Buffer.alloc(SIZE));
  await fs.writeFile(b, Buffer.alloc(SIZE / 2));
  const target = await RawFileTarget.open(
    new Map([
      ["vda", a],
      ["vdb", b],
    ]),
  );
  await replayJournal(r, target, { untilNs: times[4]! + 1n });
  await target.close();
  assert.deepEqual((await fs.readFile(a)).subarray(0, 4096), Buffer.alloc(4096, 5));
  assert.deepEqual((await fs.readFile(b)).subarray(4096, 8192), Buffer.alloc(4096, 5));
});

type Op = { disk: 0 | 1; zero: boolean; offset: number; length: number; fill: number };
const DISK = 64 * 1024;
const opArb: fc.Arbitrary<Op> = fc
  .record({
    disk: fc.constantFrom(0 as const, 1 as const),
    zero: fc.boolean(),
    offset: fc.integer({ min: 0, max: DISK - 1 }),
    length: fc.integer({ min: 1, max: 9000 }),
    fill: fc.integer({ min: 1, max: 255 }),
  })
  .map((o) => ({ ...o, length: Math.min(o.length, DISK - o.offset) }));

function apply(state: Buffer[], op: Op): void {
  state[op.disk]!.fill(op.zero ? 0 : op.fill, op.offset, op.offset + op.length);
}

test("replaying writes the base already holds is harmless when order is kept (property)", async (t) => {
  const root = await tmp(t);
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(opArb, { minLength: 1, maxLength: 40 }),
      fc.nat(),
      fc.nat(),
      async (ops, kRaw, mRaw) => {
        // The base holds ops[0..k) (cut after capture started); restore at the instant of ops[m-1].
        const k = kRaw % (ops.length + 1);
        const m = k + (mRaw % (ops.length - k + 1));
        const dir = join(root, String(run++));
        const clock = new FakeClock(1_800_000_000_000);
        const w = await JournalWriter.open({
          dir,
          keys: undefined,
          vm: "p",
          repository: "r",
          clock,
          disks: [
            { name: "d0", size: DISK },
            { name: "d1", size: DISK },
          ],
        });
        const at: bigint[] = [];
        const base = [Buffer.alloc(DISK), Buffer.alloc(DISK)];
        const expected = [Buffer.alloc(DISK), Buffer.alloc(DISK)];
        for (const [i, op] of ops.entries()) {
          clock.advance(1);
          const name = `d${op.disk}`;
          if (op.zero) await w.writeZeroes(name, op.offset, op.length);
          else await w.write(name, op.offset, Buffer.alloc(op.length, op.fill));
          at.push(w.window.lastNs);
          if (i < k) apply(base, op);
          if (i < m) apply(expected, op);
        }
        await w.close();
        const overlay = new MemoryOverlay(async (disk, offset, length) =>
          base[disk === "d0" ? 0 : 1]!.subarray(offset, offset + length),
        );
        const r = await JournalReader.open(dir, undefined);
        await replayJournal(r, overlay, { untilNs: m === 0 ? 0n : at[m - 1]! });
        for (const d of [0, 1]) assert.deepEqual(await overlay.read(`d${d}`, 0, DISK), expected[d]);
        await rm(dir, { recursive: true, force: true });
      },
    ),
    { numRuns: Number(process.env.STRATA_FUZZ_RUNS ?? 60) },
  );
});

test("the same entries replayed out of order give a different disk (why order is kept)", async () => {
  const first = { disk: 0 as const, zero: false, offset: 0, length: 4096, fill: 1 };
  const second = { ...first, fill: 2 };
  const inOrder = [Buffer.alloc(DISK), Buffer.alloc(DISK)];
  const swapped = [Buffer.alloc(DISK), Buffer.alloc(DISK)];
  for (const op of [first, second]) apply(inOrder, op);
  for (const op of [second, first]) apply(swapped, op);
  assert.notDeepEqual(inOrder[0], swapped[0]);
});

test("dropping old segments keeps the rest readable and forgets the bases that needed them", async (t) => {
  const dir = await tmp(t);
  const clock = new FakeClock(1_800_000_000_000);
  const w = await JournalWriter.open(opts(dir, { clock, maxSegmentAgeMs: 1000 }));
  const ns = () => BigInt(clock.now()) * 1_000_000n;
  await w.write("vda", 0, text);
  await w.addBase("web1/2027-01-15T08:00:00Z", ns(), ns() + 1n);
  clock.advance(2000);
  await w.write("vda", 0, text); // a new segment
  const secondStart = ns();
  await w.addBase("web1/2027-01-15T08:00:02Z", secondStart, secondStart + 1n);
  clock.advance(2000);
  await w.write("vda", 0, text); // and another
  assert.equal((await listSegments(dir)).length, 3);
  assert.equal(await w.dropBefore(secondStart), 1);
  assert.deepEqual(
    w.bases.map((b) => b.snapshot),
    ["web1/2027-01-15T08:00:02Z"],
  );
  await w.close();
  const r = await JournalReader.open(dir, undefined);
  assert.deepEqual(
    (await entries(dir)).map((e) => Number(e.seq)),
    [2, 3],
  );
  assert.ok(BigInt(r.meta.droppedBeforeNs!) <= secondStart);
});

test("cover bitmaps and gaps are kept in journal.json (sealed), concurrent changes all land, and a reopened writer sees them", async (t) => {
  const dir = await tmp(t);
  const w = await JournalWriter.open({ ...opts(dir), keys });
  await w.write("vda", 0, Buffer.alloc(4096, 1));
  // Changes made at once are applied one after the other, none lost.
  await Promise.all([
    w.setCover(["strata-cdp-1", "strata-cdp-2"], 2),
    w.openGap(w.window.lastNs + 1n),
    w.addBase("web1/2026-11-29T08:00:00.000Z", 5n, 6n),
    w.markSynced(7n),
  ]);
  const from = w.window.lastNs + 1n;
  await w.closeGap(from + 1000n);
  await w.close();
  const r = await JournalReader.open(dir, keys);
  assert.deepEqual(r.meta.cover, { bitmaps: ["strata-cdp-1", "strata-cdp-2"], seq: 2 });
  assert.deepEqual(r.meta.gaps, [{ fromNs: from.toString(), toNs: (from + 1000n).toString() }]);
  assert.equal(r.meta.bases.length, 1);
  assert.equal(r.meta.syncedNs, "7");
  const again = await JournalWriter.open({ ...opts(dir), keys });
  assert.deepEqual(again.cover?.bitmaps, ["strata-cdp-1", "strata-cdp-2"]);
  assert.equal(again.gaps.length, 1);
  await again.close();
  // Anything but a capture bitmap's name is refused as damage.
  const raw = (await fs.readFile(join(dir, META_FILE), "utf8")).replace("strata-cdp-1", "other-bitmap");
  await fs.writeFile(join(dir, META_FILE), raw);
  await expectCorrupt(JournalReader.open(dir, keys), /journal\.json/);
});
