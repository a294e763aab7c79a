// QEMU's NBD clients (qemu-img, qemu-io) and libnbd's nbdinfo against Strata's NBD server.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { BASE_ALLOCATION, type BlockSource, MemorySource, NbdServer } from "../../src/nbd/index.js";
import { merge, nbdinfoMap, qemuImgMap, run, tempDir } from "./helpers.js";

const KiB = 1024;
const MiB = 1024 * KiB;

/** A 24 MiB source with data in some 64 KiB blocks and holes elsewhere. */
async function sparseSource(): Promise<MemorySource> {
  const m = new MemorySource(24 * MiB, 64 * KiB);
  await m.write(0, randomBytes(MiB));
  await m.write(5 * MiB + 100, randomBytes(300 * KiB));
  await m.write(12 * MiB, Buffer.alloc(64 * KiB, 0x33));
  await m.write(24 * MiB - 64 * KiB, randomBytes(64 * KiB));
  return m;
}

/** Wraps a source, counting reads in progress (with a small delay so they overlap). */
function concurrencyProbe(src: BlockSource): BlockSource & { peak: number } {
  let active = 0;
  const probe = {
    peak: 0,
    size: src.size,
    read: async (o: number, l: number) => {
      active++;
      probe.peak = Math.max(probe.peak, active);
      await new Promise((r) => setTimeout(r, 1));
      try {
        return await src.read(o, l);
      } finally {
        active--;
      }
    },
    blockStatus: (ctx: string, o: number, l: number) => src.blockStatus!(ctx, o, l),
  };
  return probe;
}

async function serve(t: TestContext, exports: ConstructorParameters<typeof NbdServer>[0]) {
  const dir = tempDir(t);
  const server = new NbdServer(exports);
  const sock = join(dir, "strata.sock");
  await server.listen({ path: sock });
  t.after(() => server.close());
  return { dir, sock, uri: (name: string) => `nbd+unix:///${name}?socket=${sock}` };
}

test("qemu-img info, convert (8 requests in flight) and map against our server", async (t) => {
  const src = await sparseSource();
  const dense = MemorySource.from(randomBytes(24 * MiB));
  const probe = concurrencyProbe(dense);
  const { dir, uri } = await serve(t, {
    exports: { disk: { source: src, readOnly: true }, dense: { source: probe, readOnly: true } },
  });
  const info = JSON.parse(await run("qemu-img", ["info", "--output=json", "-f", "raw", uri("disk")])) as {
    "virtual-size": number;
  };
  assert.equal(info["virtual-size"], 24 * MiB);
  const out = join(dir, "out.raw");
  await run("qemu-img", ["convert", "-m", "8", "-W", "-f", "raw", uri("disk"), "-O", "raw", out]);
  assert.ok(readFileSync(out).equals(src.data), "qemu-img convert reproduces the sparse source");
  await run("qemu-img", ["convert", "-m", "8", "-W", "-f", "raw", uri("dense"), "-O", "raw", out]);
  assert.ok(readFileSync(out).equals(dense.data), "qemu-img convert reproduces the dense source");
  assert.ok(probe.peak > 1, `qemu-img kept ${probe.peak} reads in flight`);
  t.diagnostic(`qemu-img convert -m 8 -W kept up to ${probe.peak} reads in flight`);
  const ours = merge(await src.blockStatus(BASE_ALLOCATION, 0, src.size));
  assert.ok(ours.length >= 7, "the source is sparse");
  assert.deepEqual(await qemuImgMap(["-f", "raw", uri("disk")]), ours);
  assert.deepEqual(await nbdinfoMap(uri("disk")), ours);
  const size = await run("nbdinfo", ["--size", uri("disk")]);
  assert.equal(Number(size.trim()), 24 * MiB);
});

test("qemu-io writes, zeroes, discards and aio reads through a writable export", async (t) => {
  const src = await sparseSource();
  const { uri } = await serve(t, { exports: { rw: { source: src } } });
  const io = (...cmds: string[]) =>
    run("qemu-io", ["-f", "raw", ...cmds.flatMap((c) => ["-c", c]), uri("rw")]);
  await io("write -P 0x5a 2M 192k", "write -P 0x6b -f 3M 4k", "write -z 0 64k", "discard 12M 64k", "flush");
  assert.ok(src.data.subarray(2 * MiB, 2 * MiB + 192 * KiB).equals(Buffer.alloc(192 * KiB, 0x5a)));
  assert.ok(src.data.subarray(3 * MiB, 3 * MiB + 4 * KiB).equals(Buffer.alloc(4 * KiB, 0x6b)));
  assert.ok(src.data.subarray(0, 64 * KiB).equals(Buffer.alloc(64 * KiB)));
  assert.ok(src.data.subarray(12 * MiB, 12 * MiB + 64 * KiB).equals(Buffer.alloc(64 * KiB)));
  // 16 asynchronous reads in flight at once, each checking its pattern.
  const aio = Array.from({ length: 16 }, (_, i) => `aio_read -P 0x5a ${2 * MiB + i * 12 * KiB} 12k`);
  const out = await io(...aio, "aio_flush", "read -P 0x6b 3M 4k", "read -P 0 0 64k");
  assert.equal((out.match(/^read /gm) ?? []).length, 18, out);
  assert.doesNotMatch(out, /Pattern verification failed|error/i);
  // A wrong pattern must fail, so the checks above mean something.
  const bad = await io("read -P 0x11 2M 4k").then(
    (o) => o,
    (err: Error) => err.message,
  );
  assert.match(bad, /Pattern verification failed/);
  // Allocation seen by QEMU follows the writes.
  assert.deepEqual(
    await qemuImgMap(["-f", "raw", uri("rw")]),
    merge(await src.blockStatus(BASE_ALLOCATION, 0, src.size)),
  );
});

test("QEMU sees a read-only export as read-only and cannot write it", async (t) => {
  const src = await sparseSource();
  const before = Buffer.from(src.data);
  const { uri } = await serve(t, { exports: { ro: { source: src, readOnly: true } } });
  const result = await run("qemu-io", ["-f", "raw", "-c", "write -P 1 0 4k", uri("ro")]).then(
    (out) => out,
    (err: Error) => err.message,
  );
  assert.match(result, /read-only|Operation not permitted|Permission denied/i);
  assert.ok(src.data.equals(before));
  assert.match(await run("nbdinfo", [uri("ro")]), /is_read_only: true/);
});

test("nbdinfo lists our exports and meta contexts", async (t) => {
  const src = await sparseSource();
  const { sock } = await serve(t, {
    exports: { a: { source: src, description: "disk a" }, b: { source: src, readOnly: true } },
  });
  const list = await run("nbdinfo", ["--list", "--json", `nbd+unix:///?socket=${sock}`]);
  const parsed = JSON.parse(list) as {
    exports: Array<{ "export-name": string; description?: string; contexts?: string[] }>;
  };
  assert.deepEqual(
    parsed.exports.map((e) => e["export-name"]),
    ["a", "b"],
  );
  assert.equal(parsed.exports[0]!.description, "disk a");
  assert.deepEqual(parsed.exports[0]!.contexts, [BASE_ALLOCATION]);
});

test("qemu-img convert writes an image into our export (WRITE and WRITE_ZEROES, as a mirror target)", async (t) => {
  const target = MemorySource.from(Buffer.alloc(8 * MiB, 0xee)); // stale bytes everywhere
  const { dir, uri } = await serve(t, { exports: { target: { source: target } } });
  const img = join(dir, "img.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", img, "8M"]);
  await run("qemu-io", ["-f", "qcow2", "-c", "write -P 0x21 64k 1M", "-c", "write -P 0x42 7M 4k", img]);
  await run("qemu-img", ["convert", "-n", "-m", "4", "-W", "-f", "qcow2", img, "-O", "raw", uri("target")]);
  const expected = Buffer.alloc(8 * MiB);
  expected.fill(0x21, 64 * KiB, 64 * KiB + MiB);
  expected.fill(0x42, 7 * MiB, 7 * MiB + 4 * KiB);
  assert.ok(target.data.equals(expected), "unallocated parts were zeroed, data parts written");
});
