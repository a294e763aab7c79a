// JournalView: the disks at an instant read straight from the journal's indexed extents over a
// base equal, byte for byte, what the base plus every entry up to T gives (any writes, zeroes,
// overlaps, encrypted or not, any read range); a segment gone fails the read, never returns
// other bytes.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import fc from "fast-check";
import { FakeClock } from "../util/clock.js";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { ExtentMap, JournalView } from "./overlay.js";
import { JournalReader, listSegments } from "./reader.js";
import { JournalWriter } from "./writer.js";

const DISK = 64 * 1024;
type Op = { disk: 0 | 1; zero: boolean; offset: number; length: number; fill: number };
const opArb: fc.Arbitrary<Op> = fc
  .record({
    disk: fc.constantFrom(0 as const, 1 as const),
    zero: fc.boolean(),
    offset: fc.integer({ min: 0, max: DISK - 1 }),
    length: fc.integer({ min: 1, max: 9000 }),
    fill: fc.integer({ min: 1, max: 255 }),
  })
  .map((o) => ({ ...o, length: Math.min(o.length, DISK - o.offset) }));

test("the view at T reads what base + entries up to T give, for any read range (property)", async (t) => {
  const root = await mkdtemp(join(tmpdir(), "strata-overlay-"));
  t.after(() => rm(root, { recursive: true, force: true }));
  let run = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(opArb, { minLength: 1, maxLength: 40 }),
      fc.nat(),
      fc.nat(),
      fc.boolean(),
      fc.array(fc.tuple(fc.nat(DISK - 1), fc.nat(DISK)), { minLength: 1, maxLength: 8 }),
      async (ops, kRaw, mRaw, encrypted, reads) => {
        // The base holds ops[0..k); the view starts at entry k and ends at the instant of ops[m-1].
        const k = kRaw % (ops.length + 1);
        const m = k + (mRaw % (ops.length - k + 1));
        const keys = encrypted ? { encKey: randomBytes(32), macKey: randomBytes(32) } : undefined;
        const dir = join(root, String(run++));
        const clock = new FakeClock(1_800_000_000_000);
        const w = await JournalWriter.open({
          dir,
          keys,
          vm: "p",
          repository: "r",
          clock,
          maxSegmentBytes: 30_000,
          disks: [
            { name: "d0", size: DISK },
            { name: "d1", size: DISK },
          ],
        });
        const at: bigint[] = [];
        // Base bytes: something of its own, then the ops before k.
        const base = [Buffer.alloc(DISK, 0xee), Buffer.alloc(DISK, 0xdd)];
        const expected = [Buffer.from(base[0]!), Buffer.from(base[1]!)];
        for (const [i, op] of ops.entries()) {
          clock.advance(1);
          const name = `d${op.disk}`;
          // Each entry's bytes differ from every other's (the fill, then the entry number).
          const data = Buffer.alloc(op.length, op.fill);
          data.write(String(i), "latin1");
          const bytes = op.zero ? Buffer.alloc(op.length) : data;
          if (op.zero) await w.writeZeroes(name, op.offset, op.length);
          else await w.write(name, op.offset, data);
          at.push(w.window.lastNs);
          if (i < k) bytes.copy(base[op.disk]!, op.offset);
          if (i < m) bytes.copy(expected[op.disk]!, op.offset);
        }
        await w.close();
        const r = await JournalReader.open(dir, keys);
        const view = await JournalView.open(r, keys, {
          untilNs: m === 0 ? 0n : at[m - 1]!,
          ...(k > 0 ? { fromNs: at[k - 1]! + 1n } : {}),
          cacheBytes: 10_000,
        });
        try {
          assert.equal(view.entries, m - k);
          for (const d of [0, 1] as const) {
            const b = base[d]!;
            const disk = view.disk(`d${d}`, { size: DISK, read: async (o, l) => b.subarray(o, o + l) });
            assert.deepEqual(await disk.read(0, DISK), expected[d], `d${d} whole`);
            for (const [o, lRaw] of reads) {
              const l = Math.min(lRaw, DISK - o);
              assert.deepEqual(await disk.read(o, l), expected[d]!.subarray(o, o + l), `d${d} ${o}+${l}`);
            }
          }
        } finally {
          await view.close();
          await rm(dir, { recursive: true, force: true });
        }
      },
    ),
    { numRuns: Number(process.env.STRATA_FUZZ_RUNS ?? 60) },
  );
});

test("extent map: a write cuts what it covers and keeps the rest in order", () => {
  const m = new ExtentMap();
  const ref = (n: number) => ({
    file: "f",
    at: n,
    seq: BigInt(n),
    offset: 0,
    length: 100,
    storedLength: 0,
    digest: Buffer.alloc(32),
    zero: true,
  });
  m.set(0, 100, ref(1));
  m.set(20, 30, ref(2));
  m.set(25, 60, ref(3));
  m.set(90, 120, ref(4));
  assert.deepEqual(
    m.extents.map((e) => [e.start, e.end, Number(e.ref.seq)]),
    [
      [0, 20, 1],
      [20, 25, 2],
      [25, 60, 3],
      [60, 90, 1],
      [90, 120, 4],
    ],
  );
  assert.deepEqual(
    m.overlapping(22, 61).map((e) => Number(e.ref.seq)),
    [2, 3, 1],
  );
});

test("a segment gone while the view is open fails the read (DATA_MISSING), never other bytes", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "strata-overlay-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const clock = new FakeClock(1_800_000_000_000);
  const w = await JournalWriter.open({
    dir,
    keys: undefined,
    vm: "p",
    repository: "r",
    clock,
    disks: [{ name: "d0", size: DISK }],
  });
  await w.write("d0", 4096, Buffer.alloc(4096, 7));
  await w.close();
  const view = await JournalView.open(await JournalReader.open(dir, undefined), undefined, {
    untilNs: BigInt(clock.now() + 1) * 1_000_000n,
  });
  t.after(() => view.close());
  for (const s of await listSegments(dir)) await rm(s.path);
  await assert.rejects(view.disk("d0").read(4096, 10), (err) => {
    assert.ok(isStrataError(err) && err.code === ErrorCode.DATA_MISSING, String(err));
    return true;
  });
  // Where the journal wrote nothing, a disk without a base reads zeros.
  assert.deepEqual(await view.disk("d0").read(0, 4096), Buffer.alloc(4096));
});
