// Format v1 (one object per chunk, reuse by touch): gc running in the middle of a backup loses nothing: a backup held at a gate half-way through,
// gc run against it (grace 0), then the backup finishes and every restore point verifies.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup, type DiskSource } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { forgetIds, gc } from "../../src/repo/prune.js";
import { Repository } from "../../src/repo/repository.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { tempDir } from "../helpers/cli.js";
import { heldBackup } from "../helpers/disks.js";

const CHUNK = 64 * 1024;
const CHUNKS = 64;

function image(seed: string): Buffer {
  const b = Buffer.alloc(CHUNK * CHUNKS);
  fillContent(b, "random", new Prng(seed));
  return b;
}

async function setMtimeAll(dir: string, when: Date) {
  for (const d of await fs.readdir(dir)) {
    for (const f of await fs.readdir(join(dir, d))) await fs.utimes(join(dir, d, f), when, when);
  }
}

test("gc beside a backup that reuses old, unreferenced chunks loses nothing", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK, formatVersion: 1 });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const data = image("x");
  const plain = (name: string): DiskSource => ({
    name,
    source: "memory",
    size: data.length,
    read: async (o, l) => Buffer.from(data.subarray(o, o + l)),
  });
  const s1 = await backup(repo, {
    vm: "a",
    disks: [plain("disk")],
    mode: "file",
    consistency: "crash-consistent",
  });
  await setMtimeAll(join(dir, "repo", "chunks"), new Date(Date.now() - 2 * 3600_000));

  // Backup of the same data as another VM, held half-way: it has touched the first half only.
  const g = heldBackup(repo, "b", data, (CHUNKS / 2) * CHUNK);
  const running = g.running;
  await g.atGate;
  await forgetIds(repo, [s1.id]);
  const report = await gc(repo, { graceMs: 0 });
  // The race really happened: gc removed the half the backup had not reached yet.
  assert.equal(report.chunksRemoved, CHUNKS / 2);
  assert.equal(report.chunksKeptRecent, CHUNKS / 2);
  g.open();
  const s2 = await running;
  assert.equal(s2.manifest.disks[0]!.chunksNew, CHUNKS / 2, "the backup stored the swept half again");

  const v = await verifyRepository(repo, { readData: true });
  assert.equal(v.ok, true, JSON.stringify(v));
  const snap = await repo.findSnapshot(s2.id);
  const out = join(dir, "out.raw");
  await restoreDiskToFile(repo, snap, "disk", out);
  assert.deepEqual(await fs.readFile(out), data);
});

test("gc beside a backup keeps the chunks it wrote before its manifest exists", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK, formatVersion: 1 });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const data = image("y");
  const g = heldBackup(repo, "c", data, (CHUNKS / 2) * CHUNK);
  const running = g.running;
  await g.atGate;
  const report = await gc(repo, { graceMs: 0 });
  assert.equal(report.chunksRemoved, 0);
  assert.ok((report.chunksKeptRecent ?? 0) >= CHUNKS / 2 - 1);
  g.open();
  const s = await running;
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  const out = join(dir, "out.raw");
  await restoreDiskToFile(repo, await repo.findSnapshot(s.id), "disk", out);
  assert.deepEqual(await fs.readFile(out), data);
});

test("gc removes unreferenced old chunks, incomplete restore points and temporary files", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "repo");
  const store = new FsStore(root);
  await Repository.init(store, { chunkSize: CHUNK, formatVersion: 1 });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const data = image("z");
  const disk: DiskSource = {
    name: "d",
    source: "m",
    size: data.length,
    read: async (o, l) => Buffer.from(data.subarray(o, o + l)),
  };
  const keep = await backup(repo, { vm: "k", disks: [disk], mode: "file", consistency: "crash-consistent" });
  const other = image("w");
  const gone = await backup(repo, {
    vm: "g",
    disks: [{ ...disk, read: async (o, l) => Buffer.from(other.subarray(o, o + l)) }],
    mode: "file",
    consistency: "crash-consistent",
  });
  await forgetIds(repo, [gone.id]);
  // Leftovers of a crashed writer: a folder with an index but no manifest, and a temp file.
  const crashed = join(root, "vms", "k", "2020-01-01T00:00:00Z");
  await fs.mkdir(crashed, { recursive: true });
  await fs.writeFile(join(crashed, "d.fidx"), "partial");
  const chunkDir = join(root, "chunks", (await fs.readdir(join(root, "chunks")))[0]!);
  await fs.writeFile(join(chunkDir, "00.tmp-abc"), "partial");
  const old = new Date(Date.now() - 2 * 3600_000);
  await setMtimeAll(join(root, "chunks"), old);
  await fs.utimes(join(crashed, "d.fidx"), old, old);

  const dry = await gc(repo, { dryRun: true });
  assert.equal(dry.chunksRemoved, CHUNKS);
  assert.equal((await fs.readdir(join(root, "vms", "k"))).length, 2, "dry run removes nothing");
  const report = await gc(repo);
  assert.equal(report.chunksReferenced, CHUNKS);
  assert.equal(report.chunksRemoved, CHUNKS);
  assert.equal(report.bytesFreed, CHUNKS * (CHUNK + 16));
  assert.equal(report.incompleteRemoved, 1);
  assert.equal(report.tempsRemoved, 1);
  assert.deepEqual(await fs.readdir(join(root, "vms", "k")), [keep.manifest.time]);
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
});
