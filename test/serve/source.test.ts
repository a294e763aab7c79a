// RestorePointSource in-process over a repository the CLI wrote: exact bytes for any range, one
// fetch shared by concurrent readers, an LRU bounded in bytes, read-ahead, allocation extents.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { type TestContext, test } from "node:test";
import { RestorePointSource, type ServeSourceOptions } from "../../src/engine/serve.js";
import { Prng } from "../../src/image/synthetic.js";
import { BASE_ALLOCATION, StateFlag } from "../../src/nbd/index.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { tempDir } from "../helpers/cli.js";
import { chunkRegion, flipChunkByte } from "../helpers/stored.js";
import { backedUpImage, CHUNK, zeroChunks } from "./helpers.js";

async function open(t: TestContext, seed: string, options: ServeSourceOptions = {}) {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 4 * 1024 * 1024 + 1000, seed, holes: 0.4, runSize: CHUNK });
  const repo = await Repository.open(new FsStore(b.repo));
  t.after(() => repo.close());
  const snap = await repo.findSnapshot(b.id);
  const source = await RestorePointSource.open(repo, snap, "root", options);
  return { source, image: await fs.readFile(b.image), zeros: await zeroChunks(b.image), b };
}

test("any range reads exactly the source's bytes, across chunk boundaries and the short last chunk", async (t) => {
  const { source, image } = await open(t, "source ranges", { cacheBytes: 4 * CHUNK });
  assert.equal(source.size, image.length);
  const rng = new Prng("ranges");
  const ranges: Array<[number, number]> = [
    [0, image.length],
    [image.length - 1000, 1000],
    [image.length - 1, 1],
    [CHUNK - 1, 2],
    [0, 0],
  ];
  for (let i = 0; i < 200; i++) {
    const off = rng.below(image.length);
    ranges.push([off, Math.min(image.length - off, 1 + rng.below(5 * CHUNK))]);
  }
  for (const [off, len] of ranges) {
    const got = await source.read(off, len);
    assert.ok(got.equals(image.subarray(off, off + len)), `read ${off}+${len}`);
  }
  await assert.rejects(source.read(image.length - 10, 11), RangeError);
  assert.ok(source.stats().peakCachedBytes <= 4 * CHUNK);
});

test("concurrent reads of one chunk share one fetch; later reads hit the cache", async (t) => {
  const { source, image, zeros } = await open(t, "source shared", { readAhead: 0 });
  const i = zeros.findIndex((z) => !z);
  const reads = Array.from({ length: 10 }, (_, k) => source.read(i * CHUNK + k * 100, 4096));
  const got = await Promise.all(reads);
  for (const [k, g] of got.entries()) {
    assert.ok(g.equals(image.subarray(i * CHUNK + k * 100, i * CHUNK + k * 100 + 4096)));
  }
  let s = source.stats();
  assert.equal(s.misses, 1);
  assert.equal(s.joined + s.hits, 9);
  await source.read(i * CHUNK, CHUNK);
  s = source.stats();
  assert.equal(s.misses, 1);
  assert.equal(s.cachedBytes, CHUNK);
  // Zero chunks cost nothing.
  const z = zeros.findIndex((x) => x);
  assert.ok((await source.read(z * CHUNK, CHUNK)).equals(Buffer.alloc(CHUNK)));
  assert.equal(source.stats().misses, 1);
  assert.equal(source.stats().zeroChunks, 1);
});

test("the cache evicts least recently used chunks to stay within its byte bound", async (t) => {
  const { source, zeros } = await open(t, "source lru", { cacheBytes: 3 * CHUNK, readAhead: 0 });
  // Data chunks with distinct contents (equal chunks share one cache entry).
  const seen = new Set<string>();
  const data = zeros.flatMap((z, i) => {
    const hex = source.index.digest(i).toString("hex");
    if (z || seen.has(hex)) return [];
    seen.add(hex);
    return [i];
  });
  const [a, b, c, d] = data as [number, number, number, number];
  for (const i of [a, b, c]) await source.read(i * CHUNK, 1);
  await source.read(a * CHUNK, 1); // a is now the most recent; b the least
  await source.read(d * CHUNK, 1); // evicts b
  const s0 = source.stats();
  assert.equal(s0.evictions, 1);
  assert.equal(s0.cachedBytes, 3 * CHUNK);
  await source.read(a * CHUNK, 1);
  await source.read(c * CHUNK, 1);
  assert.equal(source.stats().misses, s0.misses, "a and c still cached");
  await source.read(b * CHUNK, 1);
  assert.equal(source.stats().misses, s0.misses + 1, "b was evicted");
  for (const i of data) await source.read(i * CHUNK, Math.min(CHUNK, source.size - i * CHUNK));
  const s = source.stats();
  assert.ok(s.peakCachedBytes <= 3 * CHUNK);
  assert.ok(s.evictions >= data.length - 3);
});

test("sequential reads fetch ahead into free slots; random reads do not", async (t) => {
  const { source, zeros } = await open(t, "source ahead", { readAhead: 4, cacheBytes: 64 * CHUNK });
  for (let off = 0; off < source.size; off += 16384)
    await source.read(off, Math.min(16384, source.size - off));
  const s = source.stats();
  // Chunks with the same content are one cache entry, fetched once.
  const digests = new Set<string>();
  for (const [i, z] of zeros.entries()) if (!z) digests.add(source.index.digest(i).toString("hex"));
  const dataChunks = digests.size;
  assert.ok(s.readAheadFetches > dataChunks / 2, JSON.stringify(s));
  // Every distinct data chunk fetched exactly once, by read-ahead or on demand.
  assert.equal(s.misses + s.readAheadFetches, dataChunks, JSON.stringify(s));

  const other = await open(t, "source random", { readAhead: 4, cacheBytes: 64 * CHUNK });
  // Every other data chunk, backwards: never "the chunk before is cached".
  const data = other.zeros.flatMap((z, i) => (z || other.zeros[i - 1] !== false ? [] : [i]));
  for (const i of data.filter((_, k) => k % 2 === 0).reverse()) await other.source.read(i * CHUNK + 10, 10);
  assert.equal(other.source.stats().readAheadFetches, 0);
});

test("base:allocation reports zero chunks as holes, chunk by chunk, merged", async (t) => {
  const { source, zeros } = await open(t, "source extents");
  const extents = await source.blockStatus(BASE_ALLOCATION, 0, source.size);
  let pos = 0;
  for (const e of extents) {
    assert.equal(e.offset, pos);
    const hole = e.flags === (StateFlag.HOLE | StateFlag.ZERO);
    assert.ok(hole || e.flags === 0);
    for (let off = e.offset; off < e.offset + e.length; off += CHUNK) assert.equal(zeros[off / CHUNK], hole);
    pos += e.length;
  }
  assert.equal(pos, source.size);
  for (let k = 1; k < extents.length; k++)
    assert.notEqual(extents[k]!.flags, extents[k - 1]!.flags, "merged");
  // A range starting inside a chunk starts exactly there.
  const part = await source.blockStatus(BASE_ALLOCATION, CHUNK + 7, 100);
  assert.deepEqual(part[0]!.offset, CHUNK + 7);
  assert.equal(
    part.reduce((n, e) => n + e.length, 0),
    100,
  );
  await assert.rejects(source.blockStatus("qemu:dirty-bitmap:x", 0, 10), RangeError);
});

test("a damaged chunk rejects every read of it and is never cached", async (t) => {
  const { source, b, zeros } = await open(t, "source damage", { readAhead: 0 });
  const i = zeros.findIndex((z) => !z);
  const digest = source.index.digest(i).toString("hex");
  await flipChunkByte(await chunkRegion(b.repo, digest), 20);
  for (let k = 0; k < 3; k++) await assert.rejects(source.read(i * CHUNK, 10), { code: "DATA_CORRUPT" });
  const s = source.stats();
  assert.equal(s.fetchErrors, 3);
  assert.equal(s.cachedBytes, 0);
});
