// strata serve as QEMU's tools and libnbd see it: exact bytes, zero chunks as holes, many requests
// in flight, EIO (never wrong data) for a damaged chunk, a bounded cache, clean shutdown, clear errors.
import assert from "node:assert/strict";
import { existsSync, promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { NbdClient, NbdErrno, NbdRequestError } from "../../src/nbd/index.js";
import { strata, strataOk, tempDir } from "../helpers/cli.js";
import { chunkRegions, flipChunkByte } from "../helpers/stored.js";
import {
  backedUpImage,
  CHUNK,
  makeTlsFiles,
  offsetOfDigest,
  qemuTlsArgs,
  runTool,
  serveSummary,
  startServe,
  tool,
  zeroChunks,
} from "./helpers.js";

/** Checks that every extent is exactly "all its chunks are zero" (hole) or "none is" (data). */
function checkExtents(
  extents: Array<{ start: number; length: number; hole: boolean }>,
  zeros: boolean[],
  size: number,
): void {
  let pos = 0;
  for (const e of extents) {
    assert.equal(e.start, pos, "extents are contiguous");
    for (let off = e.start; off < e.start + e.length; off += CHUNK) {
      assert.equal(zeros[Math.floor(off / CHUNK)], e.hole, `chunk at ${off} in extent ${JSON.stringify(e)}`);
    }
    pos += e.length;
  }
  assert.equal(pos, size);
  assert.ok(extents.some((e) => e.hole) && extents.some((e) => !e.hole), "both holes and data");
}

test("qemu-img and nbdinfo read a served disk exactly, zero chunks as holes; SIGTERM stops it cleanly", async (t) => {
  const dir = tempDir(t);
  const size = 24 * 1024 * 1024 + 3 * 4096; // a short last chunk
  const b = await backedUpImage(dir, { size, seed: "serve exact" });
  const socket = join(dir, "s.sock");
  const s = await startServe(t, ["--repo", b.repo, b.id, "--socket", socket]);
  assert.equal(s.ready.socket, socket);
  assert.deepEqual(
    s.ready.exports.map((e) => [e.name, e.size]),
    [["root", size]],
  );
  const uri = `nbd+unix:///root?socket=${socket}`;
  assert.equal(s.ready.exports[0]!.uri, uri);
  const want = await sha256File(b.image);

  await tool("qemu-img", ["convert", "-f", "raw", uri, "-O", "raw", join(dir, "out.raw")]);
  assert.equal(await sha256File(join(dir, "out.raw")), want);
  // Many requests in flight, written out of order.
  await tool("qemu-img", ["convert", "-m", "8", "-W", "-f", "raw", uri, "-O", "raw", join(dir, "out8.raw")]);
  assert.equal(await sha256File(join(dir, "out8.raw")), want);

  const zeros = await zeroChunks(b.image);
  const map = JSON.parse(await tool("qemu-img", ["map", "--output=json", "-f", "raw", uri])) as Array<{
    start: number;
    length: number;
    zero: boolean;
    data: boolean;
  }>;
  for (const e of map) assert.equal(e.zero, !e.data, JSON.stringify(e));
  checkExtents(
    map.map((e) => ({ start: e.start, length: e.length, hole: e.zero && !e.data })),
    zeros,
    size,
  );
  const nbdMap = (await tool("nbdinfo", ["--map", uri]))
    .trim()
    .split("\n")
    .map((l) => l.trim().split(/\s+/));
  checkExtents(
    nbdMap.map(([start, length, type]) => {
      assert.ok(type === "0" || type === "3", `type ${type}`);
      return { start: Number(start), length: Number(length), hole: type === "3" };
    }),
    zeros,
    size,
  );

  const r = await s.stop();
  assert.equal(r.code, 0, r.stderr);
  assert.equal(existsSync(socket), false, "socket file removed");
  const stats = serveSummary(r.stdout).exports[0]!;
  assert.equal(stats.name, "root");
  assert.equal(stats.fetchErrors, 0);
  // Each data chunk was fetched once for the first copy; the second copy came from the cache.
  const dataChunks = zeros.filter((z) => !z).length;
  assert.ok(stats.misses! + stats.readAheadFetches! <= dataChunks + 2, JSON.stringify(stats));
  assert.ok(stats.hits! >= dataChunks, JSON.stringify(stats));
});

test("a damaged chunk fails the NBD read with EIO, never wrong data; other reads go on", async (t) => {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 8 * 1024 * 1024, seed: "serve damage", holes: 0.25 });
  const victim = (await chunkRegions(b.repo))[0]!;
  await flipChunkByte(victim, victim.length >> 1, 0x40);
  const bad = await offsetOfDigest(b.image, victim.digest);
  const good = bad === 0 ? (await zeroChunks(b.image)).findIndex((z, i) => !z && i > 0) * CHUNK : 0;

  const socket = join(dir, "s.sock");
  const s = await startServe(t, ["--repo", b.repo, b.id, "--socket", socket, "--read-ahead", "0"]);
  const client = await NbdClient.connect({ path: socket }, { exportName: "root" });
  t.after(() => client.close());
  for (let i = 0; i < 2; i++) {
    await assert.rejects(
      client.read(bad, CHUNK),
      (err: unknown) => err instanceof NbdRequestError && err.errno === NbdErrno.EIO,
    );
    // A read that only touches part of the chunk fails too.
    await assert.rejects(
      client.read(bad + 512, 4096),
      (err: unknown) => err instanceof NbdRequestError && err.errno === NbdErrno.EIO,
    );
  }
  const source = await fs.readFile(b.image);
  assert.ok((await client.read(good, CHUNK)).equals(source.subarray(good, good + CHUNK)));
  await client.close();

  const conv = await runTool("qemu-img", [
    "convert",
    "-f",
    "raw",
    `nbd+unix:///root?socket=${socket}`,
    "-O",
    "raw",
    join(dir, "out.raw"),
  ]);
  assert.notEqual(conv.code, 0, "qemu-img convert must fail");
  assert.match(conv.stderr, /Input\/output error/);

  const r = await s.stop();
  assert.equal(r.code, 0, r.stderr);
  assert.ok(serveSummary(r.stdout).exports[0]!.fetchErrors! >= 4);
});

test("the chunk cache stays within its bound while a disk many times its size is read", async (t) => {
  const dir = tempDir(t);
  const size = 32 * 1024 * 1024;
  const b = await backedUpImage(dir, { size, seed: "serve cache", holes: 0 });
  const socket = join(dir, "s.sock");
  const s = await startServe(t, ["--repo", b.repo, b.id, "--socket", socket, "--cache-size", "1M"]);
  const uri = `nbd+unix:///root?socket=${socket}`;
  for (let i = 0; i < 3; i++) await tool("nbdcopy", ["--requests=16", uri, "null:"]);
  await tool("qemu-img", ["convert", "-m", "8", "-W", "-f", "raw", uri, "-O", "raw", join(dir, "out.raw")]);
  assert.equal(await sha256File(join(dir, "out.raw")), await sha256File(b.image));
  const status = await fs.readFile(`/proc/${s.child.pid}/status`, "utf8");
  const hwmKiB = Number(/VmHWM:\s+(\d+)/.exec(status)![1]);
  const r = await s.stop();
  assert.equal(r.code, 0, r.stderr);
  const stats = serveSummary(r.stdout).exports[0]!;
  assert.equal(stats.cacheBytes, 1024 * 1024);
  assert.ok(stats.peakCachedBytes! <= 1024 * 1024, JSON.stringify(stats));
  assert.ok(stats.evictions! > 0, JSON.stringify(stats));
  // Four passes over 512 chunks with room for 16: nearly every chunk is fetched every time.
  assert.ok(stats.misses! + stats.readAheadFetches! >= 4 * 400, JSON.stringify(stats));
  // A loose guard against gross leaks only: an idle serve is ~75 MiB, and V8 and malloc keep
  // freed buffers for a while (RSS levels off near 210-270 MiB however much is read; in-process
  // probes with forced GC show live ArrayBuffers staying at 8-60 MiB). The counters above are
  // the real proof that the cache is bounded.
  assert.ok(hwmKiB < 400 * 1024, `peak RSS ${hwmKiB} KiB`);
});

test("serve over TCP exports every disk, or the one asked for; holds a read lock", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const a = join(dir, "a.img");
  const c = join(dir, "c.img");
  await writeSyntheticImage(a, { size: 2 * 1024 * 1024, seed: "a", runSize: 128 * 1024 });
  await writeSyntheticImage(c, { size: 3 * 1024 * 1024, seed: "c", runSize: 128 * 1024 });
  await strataOk(["backup", "--repo", repo, "--vm", "vm2", `file:${a},name=sys`, `file:${c},name=data`]);

  const tls = await makeTlsFiles(dir);
  const s = await startServe(t, ["--repo", repo, "vm2/latest", "--port", "0", ...tls.serverArgs]);
  const port = s.ready.port!;
  assert.ok(port > 0);
  assert.deepEqual(s.ready.exports.map((e) => e.name).sort(), ["data", "sys"]);
  const list = await tool("nbdinfo", [
    "--list",
    "--json",
    `nbds://127.0.0.1:${port}?tls-certificates=${tls.client}`,
  ]);
  const listed = (JSON.parse(list) as { exports: Array<{ "export-name": string; "export-size": number }> })
    .exports;
  assert.deepEqual(listed.map((e) => [e["export-name"], e["export-size"]]).sort(), [
    ["data", 3 * 1024 * 1024],
    ["sys", 2 * 1024 * 1024],
  ]);
  await tool("qemu-img", [
    "convert",
    ...qemuTlsArgs(tls.client, port, "data"),
    "-O",
    "raw",
    join(dir, "d.raw"),
  ]);
  assert.equal(await sha256File(join(dir, "d.raw")), await sha256File(c));
  // gc needs the exclusive lock: it must wait for the serve to end.
  const gc = await strata(["gc", "--repo", repo]);
  assert.equal(gc.code, 11, gc.stderr);
  assert.equal((await s.stop()).code, 0);
  await strataOk(["gc", "--repo", repo]);

  const one = await startServe(t, [
    "--repo",
    repo,
    "vm2/latest",
    "--port",
    "0",
    "--disk",
    "sys",
    ...tls.serverArgs,
  ]);
  assert.deepEqual(
    one.ready.exports.map((e) => e.name),
    ["sys"],
  );
  assert.equal((await one.stop()).code, 0);
});

test("serve refuses clearly: missing restore point or disk, socket in a missing folder, no address", async (t) => {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 1024 * 1024, seed: "serve errors" });
  const sock = join(dir, "s.sock");
  const cases: Array<[string[], number, RegExp]> = [
    [["vm1/2020-01-01T00:00:00Z", "--socket", sock], 1, /no restore point vm1\/2020-01-01T00:00:00Z/],
    [["nosuch/latest", "--socket", sock], 1, /no restore points of VM "nosuch"/],
    [[b.id, "--disk", "nope", "--socket", sock], 1, /has no disk "nope"/],
    [[b.id, "--socket", join(dir, "missing", "s.sock")], 2, /socket directory .*missing does not exist/],
    [[b.id, "--socket", sock, "--port", "1"], 2, /one of --socket PATH or --port N, not both/],
  ];
  for (const [args, code, message] of cases) {
    const r = await strata(["serve", "--repo", b.repo, ...args]);
    assert.equal(r.code, code, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
    assert.equal(existsSync(sock), false);
  }
  // A regular file where the socket should go is never replaced.
  await fs.writeFile(sock, "keep me");
  const r = await strata(["serve", "--repo", b.repo, b.id, "--socket", sock]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /exists and is not a socket/);
  assert.equal(await fs.readFile(sock, "utf8"), "keep me");
});
