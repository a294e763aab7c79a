// In-process client ↔ server over a unix socket in a temp dir.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { NbdClient, type NbdClientOptions } from "./client.js";
import { MemorySource } from "./memory-source.js";
import {
  BASE_ALLOCATION,
  Cmd,
  type Extent,
  encodeOption,
  encodeRequest,
  NbdErrno,
  Opt,
  StateFlag,
} from "./protocol.js";
import { type BlockSource, type NbdExport, NbdServer, type NbdServerOptions } from "./server.js";

const MiB = 1024 * 1024;

async function serve(t: TestContext, exports: Record<string, NbdExport>, opts: NbdServerOptions = {}) {
  const dir = mkdtempSync(join(tmpdir(), "strata-nbd-"));
  const server = new NbdServer({ exports, ...opts });
  const path = join(dir, "nbd.sock");
  await server.listen({ path });
  t.after(async () => {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  });
  return { server, address: { path } };
}

async function open(t: TestContext, address: { path: string }, opts: NbdClientOptions = {}) {
  const c = await NbdClient.connect(address, opts);
  t.after(() => c.close());
  return c;
}

test("read, write, zero, trim, flush and block status round-trip", async (t) => {
  const src = new MemorySource(4 * MiB, 64 * 1024);
  const { address } = await serve(t, { disk: { source: src, description: "a test disk" } });
  const c = await open(t, address, { exportName: "disk", metaContexts: [BASE_ALLOCATION] });
  assert.equal(c.size, 4 * MiB);
  assert.equal(c.structuredReplies, true);
  assert.deepEqual(c.metaContexts, [BASE_ALLOCATION]);
  assert.equal(c.readOnly, false);

  assert.deepEqual(await c.blockStatus(0, c.size), [
    { offset: 0, length: 4 * MiB, flags: StateFlag.HOLE | StateFlag.ZERO },
  ]);
  const data = randomBytes(3 * 64 * 1024);
  await c.write(64 * 1024, data, { fua: true });
  assert.deepEqual(await c.read(64 * 1024, data.length), data);
  assert.deepEqual(src.data.subarray(64 * 1024, 64 * 1024 + data.length), data);
  assert.deepEqual(await c.blockStatus(0, c.size), [
    { offset: 0, length: 64 * 1024, flags: 3 },
    { offset: 64 * 1024, length: 3 * 64 * 1024, flags: 0 },
    { offset: 4 * 64 * 1024, length: 4 * MiB - 4 * 64 * 1024, flags: 3 },
  ]);
  await c.writeZeroes(2 * 64 * 1024, 64 * 1024);
  await c.trim(3 * 64 * 1024, 64 * 1024);
  await c.flush();
  const back = await c.read(0, 5 * 64 * 1024);
  assert.ok(back.subarray(0, 64 * 1024).equals(Buffer.alloc(64 * 1024)));
  assert.ok(back.subarray(64 * 1024, 128 * 1024).equals(data.subarray(0, 64 * 1024)));
  assert.ok(back.subarray(128 * 1024).equals(Buffer.alloc(3 * 64 * 1024)));
  assert.deepEqual(await c.blockStatus(0, 5 * 64 * 1024), [
    { offset: 0, length: 64 * 1024, flags: 3 },
    { offset: 64 * 1024, length: 64 * 1024, flags: 0 },
    { offset: 128 * 1024, length: 3 * 64 * 1024, flags: 3 },
  ]);
  assert.deepEqual(await c.read(100, 0), Buffer.alloc(0));
  await assert.rejects(c.read(c.size - 1, 2), (e) => isStrataError(e, ErrorCode.USAGE));
});

test("list, info, list meta contexts, unknown export", async (t) => {
  const src = MemorySource.from(Buffer.alloc(8192, 7));
  const bitmapped: BlockSource = {
    size: 8192,
    read: (o, l) => src.read(o, l),
    metaContexts: () => ["qemu:dirty-bitmap:b0", "qemu:dirty-bitmap:b1"],
    blockStatus: async (ctx, o, l): Promise<Extent[]> => [
      { offset: o, length: l, flags: ctx.endsWith("b1") ? 1 : 0 },
    ],
  };
  const { address } = await serve(t, { a: { source: src, description: "first" }, b: { source: bitmapped } });
  assert.deepEqual(await NbdClient.listExports(address), [
    { name: "a", description: "first" },
    { name: "b", description: "" },
  ]);
  const info = await NbdClient.info(address, "a");
  assert.equal(info.size, 8192);
  assert.equal(info.description, "first");
  assert.equal(info.maxBlockSize, 32 * MiB);
  assert.deepEqual(await NbdClient.listMetaContexts(address, "b"), [
    BASE_ALLOCATION,
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1",
  ]);
  assert.deepEqual(await NbdClient.listMetaContexts(address, "b", ["qemu:dirty-bitmap:"]), [
    "qemu:dirty-bitmap:b0",
    "qemu:dirty-bitmap:b1",
  ]);
  await assert.rejects(NbdClient.info(address, "nope"), (e) => isStrataError(e, ErrorCode.NOT_FOUND));
  await assert.rejects(NbdClient.connect(address, { exportName: "nope" }), (e) =>
    isStrataError(e, ErrorCode.NOT_FOUND),
  );

  const c = await open(t, address, {
    exportName: "b",
    metaContexts: [BASE_ALLOCATION, "qemu:dirty-bitmap:b1", "qemu:dirty-bitmap:absent"],
  });
  assert.equal(c.readOnly, true);
  assert.deepEqual([...c.metaContexts].sort(), [BASE_ALLOCATION, "qemu:dirty-bitmap:b1"]);
  assert.deepEqual(await c.blockStatus(0, 8192, "qemu:dirty-bitmap:b1"), [
    { offset: 0, length: 8192, flags: 1 },
  ]);
  const all = await c.blockStatusAll(4096, 4096);
  assert.deepEqual(all.get(BASE_ALLOCATION), [{ offset: 4096, length: 4096, flags: 0 }]);
  await assert.rejects(c.blockStatus(0, 10, "qemu:dirty-bitmap:absent"), (e) =>
    isStrataError(e, ErrorCode.USAGE),
  );
});

test("read-only exports refuse writes with EPERM and stay usable", async (t) => {
  const src = MemorySource.from(randomBytes(65536));
  const { address } = await serve(t, { ro: { source: src, readOnly: true } });
  const c = await open(t, address, { exportName: "ro" });
  assert.equal(c.readOnly, true);
  await assert.rejects(c.write(0, Buffer.alloc(512)), (e: unknown) => {
    assert.ok(isStrataError(e, ErrorCode.EXTERNAL));
    assert.equal((e as { errno?: number }).errno, NbdErrno.EPERM);
    return true;
  });
  assert.deepEqual(await c.read(0, 65536), src.data);
});

test("simple replies when structured replies are not asked for", async (t) => {
  const src = MemorySource.from(randomBytes(256 * 1024));
  const { address } = await serve(t, { "": { source: src } });
  const c = await open(t, address, { structuredReplies: false });
  assert.equal(c.structuredReplies, false);
  assert.deepEqual(await c.read(1000, 100_000), src.data.subarray(1000, 101_000));
  await c.write(0, Buffer.alloc(10, 1));
  assert.deepEqual(src.data.subarray(0, 10), Buffer.alloc(10, 1));
  await assert.rejects(
    c.read(0, 0).then(() => c.blockStatus(0, 10)),
    (e) => isStrataError(e, ErrorCode.USAGE),
  );
});

test("requests above the server's max block size are split", async (t) => {
  const src = MemorySource.from(randomBytes(2 * MiB));
  let biggest = 0;
  const spy: BlockSource = {
    size: src.size,
    read: (o, l) => {
      biggest = Math.max(biggest, l);
      return src.read(o, l);
    },
    write: (o, d) => {
      biggest = Math.max(biggest, d.length);
      return src.write(o, d);
    },
  };
  const { address } = await serve(t, { "": { source: spy } }, { maxPayload: 64 * 1024 });
  const c = await open(t, address);
  assert.equal(c.maxBlockSize, 64 * 1024);
  assert.deepEqual(await c.read(1, 2 * MiB - 1), src.data.subarray(1));
  const d = randomBytes(MiB + 3);
  await c.write(5, d);
  assert.deepEqual(src.data.subarray(5, 5 + d.length), d);
  assert.equal(biggest, 64 * 1024);
});

test("many requests in flight complete out of order, each with its own data", async (t) => {
  const src = MemorySource.from(randomBytes(MiB));
  let active = 0;
  let peak = 0;
  const finished: number[] = [];
  const slow: BlockSource = {
    size: src.size,
    read: async (o, l) => {
      active++;
      peak = Math.max(peak, active);
      await new Promise((r) => setTimeout(r, Math.floor(Math.random() * 20)));
      active--;
      finished.push(o);
      return src.read(o, l);
    },
  };
  const { address } = await serve(t, { "": { source: slow } }, { maxInFlight: 32 });
  const c = await open(t, address, { maxInFlight: 32 });
  const offsets = Array.from({ length: 400 }, (_, i) => (i * 4096 * 7) % (MiB - 4096));
  const got = await Promise.all(offsets.map((o) => c.read(o, 4096)));
  got.forEach((b, i) => {
    assert.deepEqual(b, src.data.subarray(offsets[i]!, offsets[i]! + 4096));
  });
  assert.ok(peak > 8, `peak concurrency ${peak}`);
  assert.ok(peak <= 32, `peak concurrency ${peak} above the limit`);
  assert.notDeepEqual(
    finished,
    [...finished].sort((a, b) => offsets.indexOf(a) - offsets.indexOf(b)),
  );
});

test("client backpressure: callers wait for a slot, never more than maxInFlight on the wire", async (t) => {
  let active = 0;
  let peak = 0;
  const slow: BlockSource = {
    size: MiB,
    read: async (_o, l) => {
      active++;
      peak = Math.max(peak, active);
      await new Promise((r) => setTimeout(r, 2));
      active--;
      return Buffer.alloc(l);
    },
  };
  const { address } = await serve(t, { "": { source: slow } }, { maxInFlight: 64 });
  const c = await open(t, address, { maxInFlight: 4 });
  await Promise.all(Array.from({ length: 200 }, (_, i) => c.read((i * 512) % MiB, 512)));
  assert.equal(peak, 4);
});

test("a request the server never answers times out with TIMEOUT", async (t) => {
  const stuck: BlockSource = { size: 4096, read: () => new Promise<Buffer>(() => {}) };
  const { address } = await serve(t, { "": { source: stuck } });
  const c = await open(t, address, { requestTimeoutMs: 200, maxInFlight: 1 });
  const started = Date.now();
  const results = await Promise.allSettled([c.read(0, 10), c.read(0, 10)]);
  for (const r of results) {
    assert.equal(r.status, "rejected");
    assert.ok(isStrataError(r.reason, ErrorCode.TIMEOUT), String(r.status === "rejected" && r.reason));
  }
  assert.ok(Date.now() - started < 2000);
});

test("server backpressure: a client that never reads replies holds only maxInFlight reads", async (t) => {
  const src = MemorySource.from(Buffer.alloc(8 * MiB, 1));
  let reads = 0;
  const counting: BlockSource = {
    size: src.size,
    read: (o, l) => {
      reads++;
      return src.read(o, l);
    },
  };
  const maxInFlight = 4;
  const { address } = await serve(t, { x: { source: counting } }, { maxInFlight });
  // A raw client: handshake with EXPORT_NAME, then pipeline 200 × 1 MiB reads, never reading.
  const sock = connect(address.path);
  t.after(() => sock.destroy());
  await new Promise<void>((r) => sock.once("connect", () => r()));
  sock.on("error", () => {});
  const flags = Buffer.alloc(4);
  flags.writeUInt32BE(3);
  sock.write(flags);
  sock.write(encodeOption(Opt.EXPORT_NAME, Buffer.from("x")));
  sock.pause(); // the slow consumer: nothing is read from now on
  let queued = 0;
  for (let i = 0; i < 200; i++) {
    sock.write(
      encodeRequest({ flags: 0, type: Cmd.READ, cookie: BigInt(i + 1), offset: (i % 8) * MiB, length: MiB }),
    );
    queued++;
  }
  await new Promise((r) => setTimeout(r, 500));
  assert.equal(queued, 200);
  // Each handler keeps its slot until its reply drains: at most maxInFlight reads (plus the
  // ones whose replies fit in the socket buffers, well under 1 MiB each here).
  assert.ok(reads <= maxInFlight + 1, `${reads} reads started`);
  const rss = process.memoryUsage().rss;
  assert.ok(rss < 1024 * MiB, `rss ${rss}`);
});
