// Backups, gc and restores through a store that fails on purpose (src/repo/faulty-store.ts):
// I/O errors, full disks, torn writes and slow calls on chunks, indexes, manifests and locks.
// Whatever fails, nothing a backup reported as saved is lost: with the faults gone, every
// restore point that a backup reported restores bit-exact, no restore point shows that a backup
// did not report, and verify --read-data is clean. A restore that meets a fault fails; it never
// leaves a file that looks whole. STRATA_FAULT_ROUNDS sets the rounds (default 40), STRATA_FAULT_SEED the fault sequence.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { existsSync, promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng, sha256File } from "../../src/image/synthetic.js";
import { type Fault, type FaultRule, type FaultyMethod, FaultyStore } from "../../src/repo/faulty-store.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { gc } from "../../src/repo/prune.js";
import { Repository } from "../../src/repo/repository.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { FakeClock } from "../../src/util/clock.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";

const ROUNDS = Number(process.env.STRATA_FAULT_ROUNDS ?? 40);
const SEED = process.env.STRATA_FAULT_SEED ?? "20261129";
const CHUNK = 64 * 1024;
const SIZE = 64 * CHUNK;

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test(`${ROUNDS} rounds of backup, gc and restore through a faulty store lose nothing reported saved`, async (t) => {
  const dir = tempDir(t);
  const inner = new FsStore(join(dir, "repo"));
  await Repository.init(inner, { chunkSize: CHUNK });
  const faulty = new FaultyStore(inner, Number.parseInt(SEED, 10) || 1);
  const clock = new FakeClock(Date.parse("2026-11-29T00:00:00Z"));
  const repo = await Repository.open(faulty, { threads: 1, clock });
  t.after(() => repo.close());

  const rng = new Prng(`faulty store ${SEED}`);
  const disk = Buffer.alloc(SIZE);
  fillContent(disk, "binary", new Prng("faulty disk"));
  const saved = new Map<string, string>();
  const failures: Record<string, number> = {};
  const methods: FaultyMethod[] = [
    "put",
    "put",
    "put",
    "get",
    "touch",
    "stat",
    "flush",
    "delete",
    "deleteIfUntouched",
  ];
  const faults: Fault[] = ["error", "enospc", "torn", "slow"];
  const prefixes = [undefined, "chunks/", "vms/", "locks/"];

  for (let round = 0; round < ROUNDS; round++) {
    clock.advance(3600_000);
    // New content in a few chunks, so every backup has something to store.
    for (let i = 0; i < 4; i++) {
      const at = (rng.next() % 64) * CHUNK;
      fillContent(disk.subarray(at, at + CHUNK), "random", new Prng(`round ${round} chunk ${i}`));
    }
    const rules: FaultRule[] = [];
    for (let i = 0, n = 1 + (rng.next() % 3); i < n; i++) {
      const fault = faults[rng.next() % faults.length]!;
      const method = fault === "torn" ? "put" : methods[rng.next() % methods.length]!;
      const prefix = prefixes[rng.next() % prefixes.length];
      rules.push({
        method,
        fault,
        probability: fault === "slow" ? 0.3 : 0.02 + (rng.next() % 10) / 100,
        delayMs: 5,
        ...(prefix === undefined ? {} : { prefix }),
      });
    }
    faulty.rules = rules;
    const content = sha(disk);
    try {
      const r = await backup(repo, {
        vm: "vm1",
        disks: [memoryDisk(disk)],
        mode: "file",
        consistency: "crash-consistent",
      });
      saved.set(r.id, content);
    } catch (err) {
      const code = (err as { code?: string }).code ?? "none";
      failures[code] = (failures[code] ?? 0) + 1;
      assert.ok(err instanceof Error && err.message.length > 0, "a failed backup says why");
    }
    if (round % 5 === 4) {
      await gc(repo, { graceMs: 0 }).catch((err: unknown) => {
        failures[`gc ${(err as { code?: string }).code}`] =
          (failures[`gc ${(err as { code?: string }).code}`] ?? 0) + 1;
      });
    }
    if (round % 7 === 6 && saved.size > 0) {
      // A restore meeting faults either finishes bit-exact or leaves no file.
      const [id, hash] = [...saved.entries()].at(-1)!;
      const snap = (await repo.snapshots("vm1", () => {}).catch(() => [])).find(
        (s) => `${s.vm}/${s.time}` === id,
      );
      if (snap) {
        const out = join(dir, `restore-${round}.raw`);
        try {
          await restoreDiskToFile(repo, snap, "disk", out);
          assert.equal(await sha256File(out), hash, `restore of ${id} under faults`);
        } catch {
          assert.equal(existsSync(out), false, `a failed restore of ${id} left ${out}`);
        }
        await fs.rm(out, { force: true });
      }
    }
  }
  t.diagnostic(
    `${saved.size} of ${ROUNDS} backups reported saved; failures by code ${JSON.stringify(failures)}; faults injected ${JSON.stringify(faulty.injected)}`,
  );
  assert.ok(saved.size > 0 && saved.size < ROUNDS, "some backups failed and some succeeded");

  // Faults gone: a fresh look at the repository.
  faulty.rules = [];
  await gc(repo, { graceMs: 0 });
  const clean = await Repository.open(inner, { threads: 1 });
  t.after(() => clean.close());
  const snaps = await clean.snapshots("vm1", () => {});
  const ids = snaps.map((s) => `${s.vm}/${s.time}`);
  for (const id of ids) assert.ok(saved.has(id), `${id} shows, but its backup reported a failure`);
  for (const id of saved.keys()) assert.ok(ids.includes(id), `${id} was reported saved and is gone`);
  const v = await verifyRepository(clean, { readData: true });
  assert.equal(v.ok, true, JSON.stringify(v.damagedChunks.slice(0, 3)));
  for (const snap of snaps) {
    const out = join(dir, `final-${snap.time.replace(/:/g, "")}.raw`);
    await restoreDiskToFile(clean, snap, "disk", out);
    assert.equal(await sha256File(out), saved.get(`${snap.vm}/${snap.time}`));
    await fs.rm(out);
  }
});
