// kill -9 during gc and its repacking loses nothing: a repository whose packs are mostly unused
// (three chunks of four changed, older restore points forgotten) is collected by gc runs that are
// killed at random instants of their work. After every kill the remaining restore points verify;
// every few kills they restore bit-exact; at the end gc finishes, no pack is left that the index
// does not name, and verify --read-data is clean. STRATA_GC_KILLS (default 12) sets the count.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, promises as fs, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fillContent, Prng, sha256File } from "../../src/image/synthetic.js";
import { startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { chunkRegions, pastGcTimeSlack, storedFiles } from "../helpers/stored.js";

const KILLS = Number(process.env.STRATA_GC_KILLS ?? 12);
const SEED = process.env.STRATA_KILL_SEED ?? randomBytes(4).toString("hex");
const CHUNK = 64 * 1024;
const SIZE = 40 * 1024 * 1024;

test(`kill -9 during gc and repack: ${KILLS} kills`, { timeout: 20 * 60_000 }, async (t) => {
  t.diagnostic(`seed ${SEED} (STRATA_KILL_SEED=${SEED} replays it)`);
  const rng = new Prng(`gc kills ${SEED}`);
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const img = join(dir, "disk.img");
  const disk = Buffer.alloc(SIZE);
  fillContent(disk, "random", new Prng(`disk ${SEED}`));
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const expected = new Map<string, string>();
  let version = 0;

  /** A new restore point in which three chunks of every four changed, the older ones forgotten. */
  const makeGarbage = async () => {
    version++;
    for (let i = 0; i < SIZE / CHUNK; i++)
      if ((i + version) % 4 !== 0)
        fillContent(
          disk.subarray(i * CHUNK, (i + 1) * CHUNK),
          "random",
          new Prng(`${SEED} v${version} ${i}`),
        );
    await fs.writeFile(img, disk);
    const b = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
    expected.set(String(b.id), createHash("sha256").update(disk).digest("hex"));
    await strataOk(["forget", "--repo", repo, "--keep-last", "2"]);
  };
  const gcArgs = ["gc", "--repo", repo, "--grace", "0s", "--repack-unused", "10", "--json"];
  const snapshots = async () =>
    (
      JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{ id: string }>
    ).map((s) => s.id);

  await makeGarbage();
  await makeGarbage();
  await makeGarbage();
  // One unkilled run to learn how long gc's work takes.
  const t0 = Date.now();
  const first = summary(await strataOk(gcArgs));
  const duration = Date.now() - t0;
  t.diagnostic(`unkilled gc: ${duration} ms, ${JSON.stringify(first)}`);
  assert.ok(Number(first.packsRepacked) > 0, "the repository gives gc packs to repack");

  let kills = 0;
  let attempts = 0;
  /** How long after it takes its lock a gc run may be killed: its work's time, as last seen. */
  let window = duration;
  /** Kills that landed after the run had changed the repository (a pack or index written or deleted). */
  let midChange = 0;
  const objects = () => [...storedFiles(repo), ...readdirSync(join(repo, "index"))].sort().join("\n");
  while (kills < KILLS) {
    assert.ok(attempts++ < KILLS * 4, `only ${kills} of ${attempts} gc runs could be killed`);
    await makeGarbage();
    const before = await snapshots();
    const objectsBefore = objects();
    const locks = () => (existsSync(join(repo, "locks")) ? readdirSync(join(repo, "locks")) : []);
    const child = startStrata(gcArgs);
    const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
    let gone = false;
    void exited.then(() => {
      gone = true;
    });
    const deadline = Date.now() + 60_000;
    while (!gone && locks().length === 0 && Date.now() < deadline) await sleep(2);
    const locked = Date.now();
    if (!gone) await sleep(rng.next() % Math.max(1, window));
    if (gone) {
      assert.equal(await exited, 0, "gc ended with an error before it could be killed");
      // It ended sooner than the window allowed for (the machine got less busy): aim earlier.
      window = Math.max(1, Math.min(window, Date.now() - locked));
      continue;
    }
    child.kill("SIGKILL");
    await exited;
    kills++;
    if (objects() !== objectsBefore) midChange++;
    assert.deepEqual(await snapshots(), before, "gc never adds or removes a restore point");
    const v = summary(await strataOk(["verify", "--repo", repo, "--json"]));
    assert.equal(v.ok, true, `verify after kill ${kills}: ${JSON.stringify(v)}`);
    if (kills % 4 === 0) {
      for (const id of before) {
        const out = join(dir, `out-${kills}`);
        await strataOk(["restore", "--repo", repo, id, "--target", out]);
        assert.equal(await sha256File(join(out, "disk.raw")), expected.get(id), `${id} after kill ${kills}`);
        await fs.rm(out, { recursive: true, force: true });
      }
    }
  }
  t.diagnostic(`${kills} kills in ${attempts} gc runs`);

  // Finished runs clear what the killed ones left: condemned packs, orphans, superseded indexes.
  await pastGcTimeSlack();
  await strataOk(gcArgs);
  await strataOk(gcArgs);
  const indexed = new Set((await chunkRegions(repo)).map((c) => c.path));
  assert.deepEqual(
    storedFiles(repo).filter((f) => !indexed.has(f)),
    [],
    "every pack left is named by the index",
  );
  assert.equal(readdirSync(join(repo, "index")).length, 1, "one index object after gc");
  const v = summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"]));
  assert.equal(v.ok, true, "verify --read-data");
  for (const id of await snapshots()) {
    const out = join(dir, "final");
    await strataOk(["restore", "--repo", repo, id, "--target", out]);
    assert.equal(await sha256File(join(out, "disk.raw")), expected.get(id), `${id} restores bit-exact`);
    await fs.rm(out, { recursive: true, force: true });
  }
  t.diagnostic(`kills after the run had changed packs or indexes: ${midChange}`);
});
