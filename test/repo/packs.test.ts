// Format v2: chunks in packs. Packs and their directories agree with the pack index; a whole
// backup/forget/gc/verify/restore cycle needs nothing but object-store operations; gc condemns a
// pack first and deletes it a run later, never while a backup that may reuse it runs, and brings
// it back when such a backup committed; repacking keeps exactly the needed chunks; packs that no
// index names are removed once old; a damaged pack index stops gc before it deletes anything.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup, type DiskSource } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { decodeChunk } from "../../src/repo/codec.js";
import { FsStore } from "../../src/repo/fs-store.js";
import type { PackLayout } from "../../src/repo/layout.js";
import { listLocks } from "../../src/repo/locks.js";
import { decodeDirectory, PACK_HEADER_SIZE, PackWriter, parseTrailer } from "../../src/repo/pack.js";
import { forgetIds, gc } from "../../src/repo/prune.js";
import { Repository } from "../../src/repo/repository.js";
import type { Store } from "../../src/repo/store.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { AlignedSlots } from "../../src/util/aligned.js";
import { tempDir } from "../helpers/cli.js";
import { heldBackup, memoryDisk } from "../helpers/disks.js";
import { ObjectStoreOnly } from "../helpers/object-store-only.js";
import { chunkRegion, flipChunkByte, storedFiles } from "../helpers/stored.js";

const CHUNK = 64 * 1024;
/** Four stored chunks of random data fill a pack. */
const PACK = 4 * CHUNK;
const CHUNKS = 32;
const KDF = { N: 1024, r: 8, p: 1 };

function image(seed: string): Buffer {
  const b = Buffer.alloc(CHUNK * CHUNKS);
  fillContent(b, "random", new Prng(seed));
  return b;
}

async function openRepo(t: { after: (fn: () => Promise<void>) => void }, store: Store, password?: string) {
  await Repository.init(store, { chunkSize: CHUNK, ...(password ? { password, kdfCost: KDF } : {}) });
  const repo = await Repository.open(store, {
    threads: 1,
    packTarget: PACK,
    ...(password ? { password } : {}),
  });
  t.after(() => repo.close());
  return repo;
}

const take = (repo: Repository, vm: string, disk: DiskSource) =>
  backup(repo, { vm, disks: [disk], mode: "file", consistency: "crash-consistent" });

async function restored(repo: Repository, id: string, dir: string): Promise<Buffer> {
  const out = join(dir, `out-${id.replace(/[/:]/g, "_")}.raw`);
  await restoreDiskToFile(repo, await repo.findSnapshot(id), "disk", out);
  const bytes = await fs.readFile(out);
  await fs.rm(out);
  return bytes;
}

const packsIn = (root: string) => storedFiles(root).filter((f) => f.includes("/packs/"));

for (const password of [undefined, "pw"]) {
  test(`packs, their directories and the pack index agree (${password ? "encrypted" : "plain"})`, async (t) => {
    const dir = tempDir(t);
    const root = join(dir, "repo");
    const repo = await openRepo(t, new FsStore(root), password);
    const data = Buffer.concat([image("a"), Buffer.alloc(8 * CHUNK)]);
    const s = await take(repo, "vm", memoryDisk(data));
    assert.equal(s.manifest.disks[0]!.chunksNew, CHUNKS);
    assert.deepEqual(readdirSync(join(root, "index")).length, 1, "one index object per backup");
    const packs = packsIn(root);
    assert.equal(packs.length, CHUNKS / 4, "packs sealed at the target size");
    const index = await (repo.layout as PackLayout).packIndex(true);
    let entries = 0;
    for (const path of packs) {
      const bytes = await fs.readFile(path);
      const id = path.slice(path.lastIndexOf("/") + 1);
      const where = parseTrailer(bytes.subarray(bytes.length - 48), bytes.length, id);
      const plain = decodeChunk(
        bytes.subarray(where.offset, where.offset + where.length),
        where.digest,
        repo.keys,
        `directory of ${id}`,
        undefined,
        repo.digestKind,
      );
      const dirEntries = decodeDirectory(plain, where.offset, id);
      assert.deepEqual(dirEntries, index.packs.get(id)!.entries, `pack ${id}: directory = index`);
      assert.ok(dirEntries.every((e) => e.offset >= PACK_HEADER_SIZE));
      entries += dirEntries.length;
    }
    assert.equal(entries, CHUNKS);
    assert.deepEqual(await restored(repo, s.id, dir), data);
    assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  });
}

for (const password of [undefined, "pw"]) {
  test(`every chunk's payload starts on a multiple of 8 in its pack, zero bytes before it (${password ? "encrypted" : "plain"})`, async (t) => {
    const dir = tempDir(t);
    const root = join(dir, "repo");
    const repo = await openRepo(t, new FsStore(root), password);
    // Compressible chunks of many lengths, so that chunks start at every offset modulo 8.
    const data = Buffer.alloc(CHUNK * CHUNKS);
    const rng = new Prng("lengths");
    for (let i = 0; i < CHUNKS; i++) {
      const chunk = data.subarray(i * CHUNK, (i + 1) * CHUNK);
      const cut = 1 + rng.below(CHUNK - 1);
      fillContent(chunk.subarray(0, cut), "text", rng);
      fillContent(chunk.subarray(cut), "random", rng);
    }
    const s = await take(repo, "vm", memoryDisk(data));
    assert.equal(s.manifest.disks[0]!.chunksNew, CHUNKS);
    const index = await (repo.layout as PackLayout).packIndex(true);
    const before = password ? 16 + 28 : 16;
    const starts = new Set<number>();
    for (const path of packsIn(root)) {
      const bytes = await fs.readFile(path);
      const id = path.slice(path.lastIndexOf("/") + 1);
      let end = PACK_HEADER_SIZE;
      for (const e of [...index.packs.get(id)!.entries].sort((a, b) => a.offset - b.offset)) {
        assert.equal((e.offset + before) % 8, 0, `pack ${id}: payload at ${e.offset + before}`);
        assert.ok(
          e.offset - end >= 0 && e.offset - end < 8,
          `pack ${id}: ${e.offset - end} bytes before a chunk`,
        );
        assert.ok(
          bytes.subarray(end, e.offset).every((b) => b === 0),
          "the bytes before a chunk are zero",
        );
        starts.add(end % 8);
        end = e.offset + e.length;
      }
    }
    assert.ok(starts.size > 2, "chunks ended at several offsets modulo 8");
    assert.deepEqual(await restored(repo, s.id, dir), data);
    assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  });
}

test("backup, incremental, forget, gc, verify and restore use only object-store operations", async (t) => {
  const dir = tempDir(t);
  const store = new ObjectStoreOnly(new FsStore(join(dir, "repo")));
  const repo = await openRepo(t, store);
  const day0 = image("day0");
  const day1 = Buffer.from(day0);
  fillContent(day1.subarray(5 * CHUNK, 9 * CHUNK), "random", new Prng("day1"));
  const s0 = await take(repo, "vm", memoryDisk(day0));
  const s1 = await take(repo, "vm", memoryDisk(day1));
  assert.equal(s1.manifest.disks[0]!.chunksNew, 4);
  await forgetIds(repo, [s0.id]);
  const first = await gc(repo, { graceMs: 0 });
  const second = await gc(repo, { graceMs: 0 });
  assert.ok((first.packsCondemned ?? 0) + (first.packsRepacked ?? 0) > 0, JSON.stringify(first));
  assert.ok((second.packsDeleted ?? 0) > 0, JSON.stringify(second));
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  assert.deepEqual(await restored(repo, s1.id, dir), day1);
  assert.ok((store.calls.get("getRange") ?? 0) > 0, "chunks are read as ranges of packs");
});

test("gc condemns, waits for a backup that may reuse the pack, brings it back when one did, deletes it later", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const data = image("race");
  const s1 = await take(repo, "a", memoryDisk(data));
  const packs = packsIn(root).length;

  // A backup of the same data, held half-way: it read the index while s1's packs were live.
  const g = heldBackup(repo, "b", data, (CHUNKS / 2) * CHUNK);
  const running = g.running;
  await g.atGate;
  await forgetIds(repo, [s1.id]);
  const r1 = await gc(repo, { graceMs: 0 });
  assert.equal(r1.packsCondemned, packs, "nothing complete needs them: condemned");
  assert.equal(r1.packsDeleted, 0);
  const r2 = await gc(repo, { graceMs: 0 });
  assert.equal(r2.packsWaiting, packs, "the backup that read the index first still runs: kept");
  assert.equal(r2.packsDeleted, 0);
  assert.equal(packsIn(root).length, packs);

  g.open();
  const s2 = await running;
  assert.equal(s2.manifest.disks[0]!.chunksNew, 0, "it reused every chunk it had seen live");
  const r3 = await gc(repo, { graceMs: 0 });
  assert.equal(r3.packsResurrected, packs, "a complete restore point needs them again");
  assert.equal(r3.packsDeleted, 0);
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  assert.deepEqual(await restored(repo, s2.id, dir), data);

  // A backup that starts after the condemnation stores the chunks anew instead of reusing them.
  await forgetIds(repo, [s2.id]);
  await gc(repo, { graceMs: 0 });
  const s3 = await take(repo, "c", memoryDisk(data));
  assert.equal(s3.manifest.disks[0]!.chunksNew, CHUNKS);
  const r5 = await gc(repo, { graceMs: 0 });
  assert.equal(r5.packsDeleted, packs, "the condemned packs go one run later");
  assert.equal(packsIn(root).length, packs);
  assert.deepEqual(await restored(repo, s3.id, dir), data);
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
});

test("gc repacks mostly unused packs: needed chunks copied, the old packs deleted a run later", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const x = image("x");
  const y = Buffer.from(x);
  // Three chunks of every four change: each old pack keeps one needed chunk of four.
  for (let i = 0; i < CHUNKS; i++)
    if (i % 4 !== 0) fillContent(y.subarray(i * CHUNK, (i + 1) * CHUNK), "random", new Prng(`y${i}`));
  const s1 = await take(repo, "vm", memoryDisk(x));
  const oldPacks = new Set(packsIn(root));
  const s2 = await take(repo, "vm", memoryDisk(y));
  // This repository object has read the index: after gc moved the chunks it must find them again.
  assert.deepEqual(await restored(repo, s2.id, dir), y);
  await forgetIds(repo, [s1.id]);
  const r1 = await gc(repo, { graceMs: 0 });
  assert.ok((r1.packsRepacked ?? 0) >= CHUNKS / 4 - 1, JSON.stringify(r1));
  const r2 = await gc(repo, { graceMs: 0 });
  assert.equal(r2.packsDeleted, r1.packsRepacked);
  assert.deepEqual(await restored(repo, s2.id, dir), y, "read through an index from before the gc");
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  const index = await (repo.layout as PackLayout).packIndex(true);
  let stored = 0;
  for (const p of index.packs.values()) stored += p.entries.length;
  assert.equal(stored, CHUNKS, "exactly the chunks s2 needs are left");
  assert.deepEqual(
    packsIn(root).filter((p) => oldPacks.has(p)),
    [],
    "every pack of the first backup was repacked and is gone",
  );
  assert.deepEqual(await restored(repo, s2.id, dir), y);
});

test("packs no index names are removed once older than the cutoff, kept within the grace", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const s = await take(repo, "vm", memoryDisk(image("kept")));
  // What a backup killed before its index was stored leaves behind.
  const w = new PackWriter(repo.store, repo.codec(), CHUNK, PACK);
  const orphan = image("orphan").subarray(0, CHUNK);
  await w.add("ab".repeat(32), orphan);
  const [record] = await w.finish();
  const before = packsIn(root).length;
  // Stored just now: kept even without a grace, since a stored time may lie a little early.
  const fresh = await gc(repo, { graceMs: 0 });
  assert.equal(fresh.orphansDeleted, 0);
  // Stored two hours ago: kept within a three hours' grace, removed without one.
  const file = packsIn(root).find((p) => p.endsWith(record!.id))!;
  const old = new Date(Date.now() - 2 * 3_600_000);
  await fs.utimes(file, old, old);
  const kept = await gc(repo, { graceMs: 3 * 3_600_000 });
  assert.equal(kept.orphansDeleted, 0);
  assert.equal(packsIn(root).length, before);
  const swept = await gc(repo, { graceMs: 0 });
  assert.equal(swept.orphansDeleted, 1);
  assert.ok(!packsIn(root).some((p) => p.endsWith(record!.id)));
  assert.deepEqual(await restored(repo, s.id, dir), image("kept"));
});

test("a pack's buffer is free once the store has its bytes: the next packs fill while earlier puts still sync", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  // A store whose pack puts write at once but return only when let go (a slow sync).
  let letGo!: () => void;
  const gate = new Promise<void>((r) => {
    letGo = r;
  });
  const inner = repo.store;
  const slow: Store = Object.create(inner);
  slow.put = async (key, data, options) => {
    await inner.put(key, data, options);
    if (key.startsWith("packs/")) await gate;
  };
  // Two pack buffers; four packs' worth of chunks. Had a buffer waited for its whole put, the
  // third pack could not open.
  const w = new PackWriter(slow, repo.codec(), CHUNK, PACK);
  const chunks = Array.from({ length: 16 }, (_, i) => image(`buffer-${i}`).subarray(0, CHUNK));
  const added = (async () => {
    for (const [i, c] of chunks.entries()) await w.add(i.toString(16).padStart(64, "0"), c);
  })();
  const stuck = new Promise<string>((r) => setTimeout(() => r("stuck"), 10_000).unref());
  assert.notEqual(
    await Promise.race([added.then(() => "added"), stuck]),
    "stuck",
    "every chunk found a buffer",
  );
  letGo();
  const records = await w.finish();
  assert.equal(records.length, 4);
  // Each pack holds the chunks added to it, untouched by the packs filled after it.
  for (const r of records) {
    const bytes = await inner.get(`packs/${r.id.slice(0, 2)}/${r.id}`);
    for (const e of r.entries)
      assert.ok(bytes.subarray(e.offset, e.offset + e.length).equals(chunks[Number.parseInt(e.digest, 16)]!));
  }
});

test("putData stores a chunk repeated at once only once, with a parent (digest first) and without (one call)", async (t) => {
  const dir = tempDir(t);
  const repo = await openRepo(t, new FsStore(join(dir, "repo")), "pw");
  const a = image("repeated").subarray(0, CHUNK);
  const b = image("other").subarray(0, CHUNK);
  for (const incremental of [false, true]) {
    const w = await repo.startBackup(`vm-${incremental}`, "test", incremental);
    const rs = await Promise.all([a, a, b, a].map((c) => w.putData(Buffer.from(c))));
    // The first writer is aborted: its packs are not indexed, the second stores them again.
    assert.deepEqual(
      rs.map((r) => r.state),
      ["new", "reused", "new", "reused"],
    );
    const digest = (await repo.codec().hash(Buffer.from(a))).digest;
    assert.ok(rs[0]!.digest.equals(digest) && rs[3]!.digest.equals(digest));
    assert.ok(!rs[2]!.digest.equals(digest));
    // The memory comes back whole.
    assert.ok(rs.every((r, i) => r.data.equals([a, a, b, a][i]!)));
    await w.abort();
  }
});

test("a first backup turns to digesting first after a few copies (no compression spent on them), and back when chunks are new again", async (t) => {
  const dir = tempDir(t);
  const repo = await openRepo(t, new FsStore(join(dir, "repo")));
  const codec = repo.codec();
  const calls = { fused: 0, digest: 0, encode: 0 };
  const fused = codec.hashEncodeInto.bind(codec);
  const hash = codec.hash.bind(codec);
  const encode = codec.encodeInto.bind(codec);
  // Chunks only: pack directories are digested and encoded too.
  codec.hashEncodeInto = (...a) => {
    calls.fused++;
    return fused(...a);
  };
  codec.hash = (...a) => {
    if (a[0].length === CHUNK) calls.digest++;
    return hash(...a);
  };
  codec.encodeInto = (...a) => {
    calls.encode++;
    return encode(...a);
  };
  t.after(() => {
    Object.assign(codec, { hashEncodeInto: fused, hash, encodeInto: encode });
  });
  const w = await repo.startBackup("vm", "test", false);
  const one = image("copied").subarray(0, CHUNK);
  // New chunks: one call each.
  for (let i = 0; i < 8; i++) await w.putData(randomBytes(CHUNK));
  assert.deepEqual(calls, { fused: 8, digest: 0, encode: 0 });
  // The same chunk over and over: after a few, only digests.
  for (let i = 0; i < 40; i++) await w.putData(Buffer.from(one));
  assert.ok(calls.fused < 8 + 10, `fused calls ${calls.fused}`);
  assert.equal(calls.digest, 8 + 40 - calls.fused);
  assert.equal(calls.encode, 0, "none of the copies was encoded");
  // New chunks again: one call each once copies are rare again.
  const before = calls.fused;
  for (let i = 0; i < 200; i++) await w.putData(randomBytes(CHUNK));
  assert.ok(calls.fused - before > 100, `fused again ${calls.fused - before} of 200`);
  await w.abort();
});

test("a running backup's packs are kept when the store stamped them before the backup started", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const data = image("held");
  const g = heldBackup(repo, "vm", data, (CHUNKS / 2) * CHUNK);
  await g.atGate;
  const [lock] = await listLocks(repo.store, repo.clock);
  // The packs sealed before the gate may still be syncing: a pack's buffer is reused once its
  // bytes are written, so the chunks can reach the gate before the puts end.
  const deadline = Date.now() + 10_000;
  while (packsIn(root).length < 2 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
  const unindexed = packsIn(root);
  assert.ok(unindexed.length >= 2, `packs the held backup stored: ${unindexed.length}`);
  // What a whole-second object store or a file system's coarse clock does: the stored time lies
  // before the backup's start, though the backup wrote the pack after it.
  const early = new Date(lock!.started - 900);
  for (const f of unindexed) await fs.utimes(f, early, early);
  const r = await gc(repo, { graceMs: 0 });
  assert.equal(r.orphansDeleted, 0, JSON.stringify(r));
  g.open();
  const s = await g.running;
  assert.deepEqual(await restored(repo, s.id, dir), data);
});

test("a damaged pack index stops gc before it deletes anything", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const s1 = await take(repo, "a", memoryDisk(image("p")));
  await take(repo, "b", memoryDisk(image("q")));
  await forgetIds(repo, [s1.id]);
  await gc(repo, { graceMs: 0 });
  const names = readdirSync(join(root, "index"));
  const victim = join(root, "index", names[0]!);
  const bytes = await fs.readFile(victim);
  bytes[bytes.length - 1]! ^= 1;
  await fs.writeFile(victim, bytes);
  const files = storedFiles(root);
  await assert.rejects(gc(repo, { graceMs: 0 }), (err: Error & { code?: string }) => {
    assert.equal(err.code, "DATA_CORRUPT", err.message);
    assert.match(err.message, /index/);
    return true;
  });
  assert.deepEqual(storedFiles(root), files, "nothing deleted");
});

test("a format v1 repository (one file per chunk) is still read, written and collected", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const store = new FsStore(root);
  await Repository.init(store, { chunkSize: CHUNK, formatVersion: 1 });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  assert.equal(repo.config.version, 1);
  const day0 = image("v1");
  const day1 = Buffer.from(day0);
  fillContent(day1.subarray(0, CHUNK), "random", new Prng("v1 day1"));
  const s0 = await take(repo, "vm", memoryDisk(day0));
  const s1 = await take(repo, "vm", memoryDisk(day1));
  assert.equal(readdirSync(join(root, "chunks")).length > 0, true);
  assert.equal(packsIn(root).length, 0, "no packs in a v1 repository");
  await forgetIds(repo, [s0.id]);
  // Written just now: kept without a grace too, as a stored time may lie a little early.
  assert.equal((await gc(repo, { graceMs: 0 })).chunksRemoved, 0);
  const old = new Date(Date.now() - 3_600_000);
  for (const f of storedFiles(root).filter((f) => f.includes("/chunks/"))) await fs.utimes(f, old, old);
  const r = await gc(repo, { graceMs: 0 });
  assert.equal(r.chunksRemoved, 1);
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  assert.deepEqual(await restored(repo, s1.id, dir), day1);
});

test("gc --recompress rewrites packs once at a stronger level, smaller, restore points unchanged", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const data = Buffer.alloc(CHUNK * CHUNKS);
  fillContent(data, "text", new Prng("words"));
  const s = await take(repo, "vm", memoryDisk(data));
  const before = storedFiles(root).reduce((n, f) => n + statSync(f).size, 0);
  const r1 = await gc(repo, { graceMs: 0, recompress: 19 });
  assert.ok((r1.packsRecompressed ?? 0) > 0, JSON.stringify(r1));
  assert.ok(
    (r1.repackedBytesAfter ?? 0) < (r1.repackedBytesBefore ?? 0) * 0.95,
    `recompressed ${r1.repackedBytesBefore} → ${r1.repackedBytesAfter} bytes`,
  );
  const r2 = await gc(repo, { graceMs: 0, recompress: 19 });
  assert.equal(r2.packsRecompressed, 0, "a recompressed pack is not recompressed again");
  assert.equal(r2.packsDeleted, r1.packsRecompressed, "the old packs go a run later");
  const after = storedFiles(root).reduce((n, f) => n + statSync(f).size, 0);
  assert.ok(after < before, `stored ${before} → ${after} bytes`);
  assert.deepEqual(await restored(repo, s.id, dir), data);
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
});

test("a damaged chunk keeps its pack as it is; gc repacks and frees the rest", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  const x = image("dx");
  const y = Buffer.from(x);
  for (let i = 0; i < CHUNKS; i++)
    if (i % 4 !== 0) fillContent(y.subarray(i * CHUNK, (i + 1) * CHUNK), "random", new Prng(`dy${i}`));
  const s1 = await take(repo, "vm", memoryDisk(x));
  const s2 = await take(repo, "vm", memoryDisk(y));
  await forgetIds(repo, [s1.id]);
  // Damage chunk 0 of s2, which sits in one of s1's packs, all of whose other chunks are unused.
  const digest = (await repo.index(await repo.findSnapshot(s2.id), "disk")).digest(0).toString("hex");
  const victim = await chunkRegion(root, digest);
  await flipChunkByte(victim, 100);
  const r = await gc(repo, { graceMs: 0 });
  assert.equal(r.packsNotRepacked?.length, 1, JSON.stringify(r));
  assert.match(r.packsNotRepacked![0]!, /damaged/);
  assert.equal(r.packsRepacked, CHUNKS / 4 - 1, "the other packs were repacked");
  await gc(repo, { graceMs: 0 });
  const packs = packsIn(root);
  assert.ok(packs.includes(victim.path), "the damaged chunk's pack is kept");
  const v = await verifyRepository(repo, { readData: true });
  assert.deepEqual(
    v.damagedChunks.map((c) => c.digest),
    [digest],
  );
});

test("an index object larger than an index can be is refused before it is read", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const repo = await openRepo(t, new FsStore(root));
  await take(repo, "vm", memoryDisk(image("big")));
  // Sparse: a listing says 80 MiB, nothing of it is read into memory.
  const bogus = join(root, "index", "ee".repeat(32));
  await fs.writeFile(bogus, "");
  await fs.truncate(bogus, 80 * 1024 * 1024);
  await assert.rejects((repo.layout as PackLayout).packIndex(true), (err: Error & { code?: string }) => {
    assert.equal(err.code, "DATA_CORRUPT");
    assert.match(err.message, /larger than an index can be/);
    return true;
  });
});

test("chunks close together in a pack are read with one range read; a damaged one among them is named", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const store = new ObjectStoreOnly(new FsStore(root));
  const repo = await openRepo(t, store);
  const day0 = image("adjacent");
  const s0 = await take(repo, "vm", memoryDisk(day0));
  const index = await repo.index(await repo.findSnapshot(s0.id), "disk");
  const stride = CHUNK + 3 * 4096;
  const plain = new AlignedSlots(1, 4 * CHUNK);
  const scratch = new AlignedSlots(1, 4 * stride);
  const read = async (chunks: number[]) => {
    const before = store.calls.get("getRange") ?? 0;
    const lengths = await repo.readChunksInto(
      chunks.map((i) => index.digest(i)),
      chunks.map((_, k) => ({ memory: plain.memory, offset: k * CHUNK, capacity: CHUNK })),
      { memory: scratch.memory, offset: 0, capacity: scratch.slotSize },
      stride,
    );
    chunks.forEach((i, k) => {
      assert.equal(lengths[k], CHUNK);
      assert.ok(
        Buffer.from(plain.view(0, 4 * CHUNK).subarray(k * CHUNK, (k + 1) * CHUNK)).equals(
          day0.subarray(i * CHUNK, (i + 1) * CHUNK),
        ),
        `chunk ${i}`,
      );
    });
    return (store.calls.get("getRange") ?? 0) - before;
  };
  // A pack holds four chunks, in the order the backup read them.
  assert.equal(await read([0, 1, 2, 3]), 1, "one pack, one read");
  assert.equal(await read([3, 4]), 2, "two packs, a read each");
  assert.equal(await read([5, 7]), 1, "one chunk between them, read and ignored: one read");
  await flipChunkByte(await chunkRegion(root, index.digest(2).toString("hex")), 100);
  await assert.rejects(read([0, 1, 2, 3]), (err: Error) => {
    assert.match(err.message, new RegExp(`chunk ${index.digest(2).toString("hex")} is damaged`));
    return true;
  });
});

for (const password of [undefined, "pw"]) {
  test(`a restore run is read with one read per pack when its chunks lie close, one per chunk when far, once when repeated (${password ? "encrypted" : "plain"})`, async (t) => {
    const dir = tempDir(t);
    const store = new ObjectStoreOnly(new FsStore(join(dir, "repo")));
    await Repository.init(store, { chunkSize: CHUNK, ...(password ? { password, kdfCost: KDF } : {}) });
    const repo = await Repository.open(store, {
      threads: 1,
      packTarget: 64 * CHUNK,
      ...(password ? { password } : {}),
    });
    t.after(() => repo.close());
    const data = image("run");
    const s = await take(repo, "vm", memoryDisk(data));
    const index = await repo.index(await repo.findSnapshot(s.id), "disk");
    const layout = repo.layout as PackLayout;
    const slots = new AlignedSlots(1, 8 * (CHUNK + 2 * 4096) + 64 * 1024);
    const scratch = { memory: slots.memory, offset: 0, capacity: slots.slotSize };
    const hex = (i: number) => index.digest(i).toString("hex");
    const check = async (order: number[], reads: number | undefined) => {
      const before = store.calls.get("getRange") ?? 0;
      const got = await layout.readRun!(order.map(hex), scratch);
      const ranges = (store.calls.get("getRange") ?? 0) - before;
      if (reads === undefined) {
        assert.equal(got, undefined, `chunks ${order}`);
        return;
      }
      assert.ok(got, `chunks ${order} read as a run`);
      assert.equal(ranges, reads, `chunks ${order}: ${ranges} reads`);
      for (const [k, i] of order.entries()) {
        const plain = decodeChunk(got[k]!, index.digest(i), repo.keys, hex(i), undefined, repo.digestKind);
        assert.deepEqual(plain, data.subarray(i * CHUNK, (i + 1) * CHUNK), `chunk ${i}`);
      }
    };
    await check([3, 1, 2, 0], 1); // out of order, close together: one read
    await check([4, 5, 6, 7], 1);
    await check([0, 20], 2); // far apart in the pack: one read each
    // A chunk twice: read once, and both decode from the same bytes (decoding leaves them intact).
    await check([8, 9, 9], 1);
  });
}
