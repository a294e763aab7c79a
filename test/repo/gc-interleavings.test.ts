// gc beside backups, 50 interleavings (format v2): each round a backup of a changed disk is held
// at a random chunk while forget and gc run zero to three times against it, then finishes; some
// rounds bring back chunks of older versions, which live in condemned packs by then. After every
// round each remaining restore point restores exactly the disk it was taken of; every ten rounds
// and at the end verify --read-data is clean. STRATA_GC_ROUNDS sets the count, STRATA_GC_SEED
// replays a run.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { forget, gc } from "../../src/repo/prune.js";
import { Repository } from "../../src/repo/repository.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { tempDir } from "../helpers/cli.js";
import { gatedDisk } from "../helpers/disks.js";

const ROUNDS = Number(process.env.STRATA_GC_ROUNDS ?? 50);
const SEED = process.env.STRATA_GC_SEED ?? randomBytes(4).toString("hex");
const CHUNK = 64 * 1024;
const CHUNKS = 24;

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

test(`gc beside backups: ${ROUNDS} interleavings lose nothing`, { timeout: 20 * 60_000 }, async (t) => {
  t.diagnostic(`seed ${SEED} (STRATA_GC_SEED=${SEED} replays it)`);
  const rng = new Prng(`gc interleavings ${SEED}`);
  const pick = (n: number) => rng.next() % n;
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 2, packTarget: 4 * CHUNK });
  t.after(() => repo.close());

  const disk = Buffer.alloc(CHUNK * CHUNKS);
  fillContent(disk, "random", new Prng(`${SEED} v0`));
  /** Every chunk content the disk ever had, to bring old ones back. */
  const history: Buffer[] = [];
  const expected = new Map<string, string>();
  const stats = { gcRuns: 0, condemned: 0, deleted: 0, resurrected: 0, repacked: 0, waiting: 0 };

  for (let round = 1; round <= ROUNDS; round++) {
    for (let n = 1 + pick(6); n > 0; n--) {
      const at = pick(CHUNKS) * CHUNK;
      const piece = disk.subarray(at, at + CHUNK);
      if (history.length > 0 && pick(3) === 0) piece.set(history[pick(history.length)]!);
      else {
        history.push(Buffer.from(piece));
        fillContent(piece, "random", new Prng(`${SEED} r${round} n${n}`));
      }
    }
    const data = Buffer.from(disk);
    const g = gatedDisk(data, pick(CHUNKS + 1) * CHUNK);
    const running = backup(repo, {
      vm: "vm",
      disks: [g.disk],
      mode: "file",
      consistency: "crash-consistent",
      inflight: 1 + pick(3),
    });
    // Held at its gate (or done, when the gate is past the end): forget and gc run against it.
    await Promise.race([g.atGate, running]);
    for (let k = pick(4); k > 0; k--) {
      await forget(repo, { last: 1 + pick(2) });
      const r = await gc(repo, { graceMs: 0, repackUnused: 0.3 });
      stats.gcRuns++;
      stats.condemned += r.packsCondemned ?? 0;
      stats.deleted += r.packsDeleted ?? 0;
      stats.resurrected += r.packsResurrected ?? 0;
      stats.repacked += r.packsRepacked ?? 0;
      stats.waiting += r.packsWaiting ?? 0;
    }
    g.open();
    const done = await running;
    expected.set(done.id, sha(data));

    const left = await repo.snapshots();
    for (const id of [...expected.keys()])
      if (!left.some((s) => `${s.vm}/${s.time}` === id)) expected.delete(id);
    for (const snap of left) {
      const id = `${snap.vm}/${snap.time}`;
      const out = join(dir, "out.raw");
      await restoreDiskToFile(repo, snap, "disk", out);
      assert.equal(sha(await fs.readFile(out)), expected.get(id), `round ${round}: ${id} restores exactly`);
      await fs.rm(out, { force: true });
    }
    if (round % 10 === 0 || round === ROUNDS) {
      const v = await verifyRepository(repo, { readData: true });
      assert.equal(v.ok, true, `round ${round}: ${JSON.stringify(v)}`);
    }
  }
  t.diagnostic(JSON.stringify(stats));
  // The interleavings reached every branch of gc's pack logic.
  assert.ok(stats.condemned > 0 && stats.deleted > 0 && stats.repacked > 0, JSON.stringify(stats));
});
