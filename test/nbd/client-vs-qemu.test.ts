// Strata's NBD client against QEMU's NBD servers (qemu-nbd, qemu-storage-daemon).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { BASE_ALLOCATION, DIRTY, NbdClient } from "../../src/nbd/index.js";
import { merge, nbdinfoMap, qemuImgMap, run, startDaemon, stopDaemon, tempDir } from "./helpers.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** A 32 MiB qcow2 with data in a few places, and the same bytes as raw (via qemu-img). */
async function makeImages(dir: string): Promise<{ qcow2: string; raw: string; bytes: Buffer }> {
  const qcow2 = join(dir, "disk.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, "32M"]);
  await run("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -P 0xab 0 64k",
    "-c",
    "write -P 0xcd 1M 192k",
    "-c",
    "write -z 2M 64k",
    "-c",
    "write -P 0x17 31M 1M",
    qcow2,
  ]);
  // Random bytes too, so a misplaced read cannot match by accident.
  const rnd = join(dir, "rnd.bin");
  writeFileSync(rnd, randomBytes(3 * MiB));
  await run("qemu-img", ["dd", "-f", "raw", "-O", "qcow2", `if=${rnd}`, `of=${join(dir, "rnd.qcow2")}`]);
  await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x42 8M 4k", qcow2]);
  const raw = join(dir, "disk.raw");
  await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, raw]);
  return { qcow2, raw, bytes: readFileSync(raw) };
}

async function qemuNbd(t: TestContext, dir: string, file: string, format: string, extra: string[] = []) {
  const sock = join(dir, `qemu-nbd-${Math.random().toString(36).slice(2)}.sock`);
  const child = await startDaemon(
    t,
    "qemu-nbd",
    ["-f", format, "--persistent", "--shared=8", "-k", sock, "-x", "disk", ...extra, file],
    sock,
  );
  return { address: { path: sock }, child, uri: `nbd+unix:///disk?socket=${sock}` };
}

test("qemu-nbd qcow2: reads equal qemu-img convert output, block status equals qemu-img map", async (t) => {
  const dir = tempDir(t);
  const { qcow2, bytes } = await makeImages(dir);
  const { address } = await qemuNbd(t, dir, qcow2, "qcow2", ["-r"]);
  const c = await NbdClient.connect(address, { exportName: "disk", metaContexts: [BASE_ALLOCATION] });
  t.after(() => c.close());
  assert.equal(c.size, 32 * MiB);
  assert.equal(c.readOnly, true);
  assert.equal(c.structuredReplies, true);
  assert.ok(c.maxBlockSize >= 64 * KiB);
  // Whole disk in one call (split by the client), and odd unaligned pieces concurrently.
  assert.ok((await c.read(0, c.size)).equals(bytes));
  const pieces = Array.from({ length: 64 }, (_, i) => ({
    o: (i * 524_287) % (c.size - 70_001),
    n: 1 + i * 1093,
  }));
  const got = await Promise.all(pieces.map((p) => c.read(p.o, p.n)));
  pieces.forEach((p, i) => {
    assert.ok(got[i]!.equals(bytes.subarray(p.o, p.o + p.n)), `piece ${p.o}+${p.n}`);
  });
  const expected = await qemuImgMap(["-f", "qcow2", qcow2]);
  assert.deepEqual(await c.blockStatus(0, c.size), expected);
  assert.ok(expected.some((e) => e.flags === 3) && expected.some((e) => e.flags === 0));
  // A sub-range starting mid-extent.
  const sub = await c.blockStatus(MiB + 4096, 3 * MiB);
  assert.equal(sub[0]!.offset, MiB + 4096);
  assert.equal(
    sub.reduce((s, e) => s + e.length, 0),
    3 * MiB,
  );
});

test("qemu-nbd raw: simple replies and structured replies read the same bytes", async (t) => {
  const dir = tempDir(t);
  const { raw, bytes } = await makeImages(dir);
  const { address } = await qemuNbd(t, dir, raw, "raw", ["-r"]);
  const structured = await NbdClient.connect(address, {
    exportName: "disk",
    metaContexts: [BASE_ALLOCATION],
  });
  t.after(() => structured.close());
  const simple = await NbdClient.connect(address, { exportName: "disk", structuredReplies: false });
  t.after(() => simple.close());
  assert.equal(simple.structuredReplies, false);
  assert.ok((await structured.read(0, structured.size)).equals(bytes));
  assert.ok((await simple.read(0, simple.size)).equals(bytes));
  assert.deepEqual(await structured.blockStatus(0, structured.size), await qemuImgMap(["-f", "raw", raw]));
});

test("writes through our client to a writable qemu-nbd export land in the file", async (t) => {
  const dir = tempDir(t);
  const { qcow2, bytes } = await makeImages(dir);
  const { address, child } = await qemuNbd(t, dir, qcow2, "qcow2");
  const c = await NbdClient.connect(address, { exportName: "disk" });
  assert.equal(c.readOnly, false);
  const a = randomBytes(200 * KiB + 13);
  const b = randomBytes(5 * MiB);
  await Promise.all([c.write(3 * MiB + 7, a, { fua: true }), c.write(20 * MiB, b)]);
  await c.writeZeroes(0, 32 * KiB);
  await c.trim(31 * MiB, 512 * KiB);
  await c.flush();
  await c.close();
  await stopDaemon(child);
  const expected = Buffer.from(bytes);
  a.copy(expected, 3 * MiB + 7);
  b.copy(expected, 20 * MiB);
  expected.fill(0, 0, 32 * KiB);
  const out = join(dir, "after.raw");
  await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, out]);
  const after = readFileSync(out);
  // Trim may or may not zero; everything else must match exactly.
  assert.ok(after.subarray(0, 31 * MiB).equals(expected.subarray(0, 31 * MiB)));
  assert.ok(after.subarray(31 * MiB + 512 * KiB).equals(expected.subarray(31 * MiB + 512 * KiB)));
  await run("qemu-img", ["check", "-q", "-f", "qcow2", qcow2]);
});

test("qemu-storage-daemon: qemu:dirty-bitmap reports exactly the dirtied ranges", async (t) => {
  const dir = tempDir(t);
  const qcow2 = join(dir, "bm.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", qcow2, "64M"]);
  await run("qemu-io", ["-f", "qcow2", "-c", "write -P 1 0 4M", "-c", "write -P 2 40M 1M", qcow2]);
  await run("qemu-img", ["bitmap", "--add", "-g", "65536", qcow2, "b0"]);
  // Writes after the bitmap was added: these, and only these, are dirty (64 KiB granularity).
  await run("qemu-io", [
    "-f",
    "qcow2",
    "-c",
    "write -P 3 1M 4k",
    "-c",
    "write -P 4 10M 100k",
    "-c",
    "write -P 5 63M 1M",
    "-c",
    "write -z 20M 64k",
    qcow2,
  ]);
  await run("qemu-img", ["bitmap", "--disable", qcow2, "b0"]); // read-only export needs a disabled bitmap
  const sock = join(dir, "qsd.sock");
  await startDaemon(
    t,
    "qemu-storage-daemon",
    [
      "--blockdev",
      `driver=file,filename=${qcow2},node-name=f0,read-only=on`,
      "--blockdev",
      "driver=qcow2,file=f0,node-name=d0,read-only=on",
      "--nbd-server",
      `addr.type=unix,addr.path=${sock}`,
      "--export",
      "type=nbd,id=e0,node-name=d0,name=vda,bitmaps.0=b0",
    ],
    sock,
  );
  const address = { path: sock };
  assert.deepEqual(await NbdClient.listExports(address), [{ name: "vda", description: "" }]);
  assert.deepEqual((await NbdClient.listMetaContexts(address, "vda")).sort(), [
    BASE_ALLOCATION,
    "qemu:dirty-bitmap:b0",
  ]);
  const ctx = "qemu:dirty-bitmap:b0";
  const c = await NbdClient.connect(address, { exportName: "vda", metaContexts: [BASE_ALLOCATION, ctx] });
  t.after(() => c.close());
  const dirty = (await c.blockStatus(0, c.size, ctx)).filter((e) => e.flags & DIRTY);
  const K64 = 64 * KiB;
  assert.deepEqual(
    dirty.map((e) => [e.offset, e.length]),
    [
      [MiB, K64],
      [10 * MiB, 2 * K64], // 100 KiB from 10 MiB touches two 64 KiB blocks
      [20 * MiB, K64],
      [63 * MiB, MiB],
    ],
  );
  // The independent client agrees.
  const uri = `nbd+unix:///vda?socket=${sock}`;
  assert.deepEqual(merge(await c.blockStatus(0, c.size, ctx)), await nbdinfoMap(uri, ctx));
  assert.deepEqual(await c.blockStatus(0, c.size), await qemuImgMap(["-f", "qcow2", qcow2]));
  // Reading the dirty extents gives what qemu-io wrote.
  assert.ok((await c.read(10 * MiB, 100 * KiB)).equals(Buffer.alloc(100 * KiB, 4)));
  assert.ok((await c.read(20 * MiB, K64)).equals(Buffer.alloc(K64)));
});

test("throughput: our client reading a qemu-nbd export vs qemu-img convert from it", async (t) => {
  const dir = tempDir(t);
  const raw = join(dir, "big.raw");
  const size = 128 * MiB;
  writeFileSync(raw, randomBytes(size));
  const { address, uri } = await qemuNbd(t, dir, raw, "raw", ["-r"]);
  const c = await NbdClient.connect(address, { exportName: "disk", maxInFlight: 16 });
  t.after(() => c.close());
  const chunk = 4 * MiB;
  let t0 = performance.now();
  let total = 0;
  const offsets = Array.from({ length: size / chunk }, (_, i) => i * chunk);
  await Promise.all(
    offsets.map(async (o) => {
      const n = (await c.read(o, chunk)).length;
      total += n;
    }),
  );
  const ours = size / MiB / ((performance.now() - t0) / 1000);
  assert.equal(total, size);
  t0 = performance.now();
  // Both sides discard the data: qemu-img writes to a null-co target.
  const nullTarget = `driver=null-co,size=${size}`;
  await run("qemu-img", [
    "convert",
    "-m",
    "8",
    "-W",
    "-n",
    "-f",
    "raw",
    uri,
    "--target-image-opts",
    nullTarget,
  ]);
  const theirs = size / MiB / ((performance.now() - t0) / 1000);
  t.diagnostic(
    `read 128 MiB from qemu-nbd: strata client ${ours.toFixed(0)} MiB/s, qemu-img convert ${theirs.toFixed(0)} MiB/s`,
  );
  assert.ok(ours > 20, `client throughput ${ours} MiB/s`);
});
