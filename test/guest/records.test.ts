// The record verifier against records written by the real strata-workload binary, run on the
// host against plain files (the same binary the test guest runs against /dev/vdX).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { copyFile, mkdtemp, open, readFile, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { testGuest } from "../helpers/guest.js";
import { parseLatencySummaries, parseRecord, RECORD_SIZE, verifyRecords } from "../helpers/records.js";

const run = promisify(execFile);
let dir: string;
let workload: string;

async function writeRecords(file: string, ...args: string[]): Promise<string> {
  const { stdout } = await run(workload, ["-r", "0", ...args, file]);
  return stdout;
}

async function overwriteSlot(file: string, slot: number, bytes: Buffer, at = 0): Promise<void> {
  const fh = await open(file, "r+");
  try {
    await fh.write(bytes, 0, bytes.length, slot * RECORD_SIZE + at);
  } finally {
    await fh.close();
  }
}

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-records-test-"));
  workload = (await testGuest()).workload;
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

describe("verifyRecords on strata-workload output", () => {
  test("a run that did not wrap is a gap-free prefix from seq 1", async () => {
    const f = join(dir, "plain.img");
    const out = await writeRecords(f, "-s", "1M", "-n", "100", "-p", "40");
    const scan = await verifyRecords(f);
    assert.equal(scan.count, 100);
    assert.equal(scan.firstSeq, 1);
    assert.equal(scan.lastSeq, 100);
    assert.equal(scan.slots, 256);
    assert.equal(scan.wrapped, false);
    assert.equal(scan.gapFree, true);
    assert.deepEqual(scan.badRecords, []);
    // The same image as a buffer gives the same answer.
    assert.deepEqual(await verifyRecords(await readFile(f)), scan);
    // Summaries every 40 records, then a final one for the rest.
    const sums = parseLatencySummaries(out);
    assert.deepEqual(
      sums.map((s) => [s.final, s.seq, s.n]),
      [
        [false, 40, 40],
        [false, 80, 80 - 40],
        [true, 100, 20],
      ],
    );
    for (const s of sums) assert.ok(s.p50Us <= s.p99Us && s.p99Us <= s.maxUs);
  });

  test("records carry seq, slot, time and the previous write's latency", async () => {
    const f = join(dir, "fields.img");
    await writeRecords(f, "-s", "64K", "-n", "3");
    const buf = await readFile(f);
    const recs = [0, 1, 2].map((i) => parseRecord(buf.subarray(i * RECORD_SIZE, (i + 1) * RECORD_SIZE)));
    const r = recs.map((p) => (p.kind === "record" ? p.record : assert.fail(`slot not a record: ${p.kind}`)));
    assert.deepEqual(
      r.map((x) => [x.seq, x.slot, x.slots]),
      [
        [1, 0, 16],
        [2, 1, 16],
        [3, 2, 16],
      ],
    );
    assert.equal(r[0]!.prevLatencyNs, 0n);
    assert.ok(r[1]!.prevLatencyNs > 0n && r[2]!.prevLatencyNs > 0n);
    assert.ok(r[0]!.timeNs < r[1]!.timeNs && r[1]!.timeNs < r[2]!.timeNs);
    assert.equal(new Set(r.map((x) => x.runId)).size, 1);
  });

  test("a wrapped ring holds the last `slots` seqs", async () => {
    const f = join(dir, "ring.img");
    await writeRecords(f, "-s", "64K", "-n", "40");
    const scan = await verifyRecords(f);
    assert.equal(scan.slots, 16);
    assert.equal(scan.wrapped, true);
    assert.equal(scan.firstSeq, 25);
    assert.equal(scan.lastSeq, 40);
    assert.equal(scan.count, 16);
    assert.equal(scan.gapFree, true);
  });

  test("a cut-off tail is still a valid prefix; a hole in the middle is a gap", async () => {
    const f = join(dir, "cut.img");
    await writeRecords(f, "-s", "1M", "-n", "100");
    // Writes 61..100 never reached the copy: a shorter, still valid prefix.
    const prefix = join(dir, "prefix.img");
    await copyFile(f, prefix);
    for (let slot = 60; slot < 100; slot++) await overwriteSlot(prefix, slot, Buffer.alloc(RECORD_SIZE));
    const p = await verifyRecords(prefix);
    assert.equal(p.lastSeq, 60);
    assert.equal(p.gapFree, true);
    // Seq 8 lost while later ones are present: not a prefix.
    await overwriteSlot(f, 7, Buffer.alloc(RECORD_SIZE));
    const g = await verifyRecords(f);
    assert.equal(g.gapFree, false);
    assert.deepEqual(g.missing, [8]);
    assert.equal(g.count, 99);
  });

  test("a flipped byte is a bad record", async () => {
    const f = join(dir, "bad.img");
    await writeRecords(f, "-s", "1M", "-n", "20");
    await overwriteSlot(f, 5, Buffer.from([0x55]), 1000);
    const scan = await verifyRecords(f);
    assert.equal(scan.gapFree, false);
    assert.equal(scan.badRecords.length, 1);
    assert.equal(scan.badRecords[0]!.slot, 5);
    assert.match(scan.badRecords[0]!.reason, /crc/);
    assert.deepEqual(scan.missing, [6]);
  });

  test("a new run over an old one: slot 0 names the run, the old run's tail is ignored", async () => {
    const f = join(dir, "rerun.img");
    await writeRecords(f, "-s", "1M", "-n", "100");
    const old = await verifyRecords(f);
    await writeRecords(f, "-s", "1M", "-n", "30");
    const scan = await verifyRecords(f);
    assert.notEqual(scan.runId, old.runId);
    assert.equal(scan.lastSeq, 30);
    assert.equal(scan.count, 30);
    assert.equal(scan.gapFree, true);
  });

  test("a region at an offset, and an empty image", async () => {
    const f = join(dir, "offset.img");
    await writeFile(f, Buffer.alloc(256 * 1024));
    await writeRecords(f, "-o", "65536", "-s", "65536", "-n", "10");
    assert.equal((await verifyRecords(f)).runId, null, "nothing at offset 0");
    const scan = await verifyRecords(f, { regionOffset: 65536 });
    assert.equal(scan.lastSeq, 10);
    assert.equal(scan.gapFree, true);
    const empty = await verifyRecords(Buffer.alloc(64 * 1024));
    assert.deepEqual([empty.count, empty.lastSeq, empty.gapFree], [0, 0, true]);
  });

  test("qcow2 images are converted with qemu-img before the scan", async () => {
    const raw = join(dir, "conv.img");
    await writeRecords(raw, "-s", "256K", "-n", "50");
    const qcow = join(dir, "conv.qcow2");
    await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow]);
    const scan = await verifyRecords(qcow, { format: "qcow2" });
    assert.deepEqual([scan.lastSeq, scan.gapFree], [50, true]);
  });

  test("the rate limit holds", async () => {
    const f = join(dir, "rate.img");
    const t0 = performance.now();
    await run(workload, ["-r", "100", "-n", "20", "-s", "64K", f]);
    const ms = performance.now() - t0;
    // 20 records at 100/s: the first goes at once, the last 190 ms later.
    assert.ok(ms >= 180, `20 records at 100/s took only ${ms.toFixed(0)} ms`);
  });
});
