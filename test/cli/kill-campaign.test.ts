// kill -9 campaign: backup, forget, gc and restore killed at random instants, many times over
// (STRATA_KILLS, default 100; the seed is printed and STRATA_KILL_SEED replays a run). After every
// kill only complete restore points show, each holding exactly the disk it was taken of, and a
// killed restore never leaves a file that looks whole; at the end verify --read-data is clean,
// gc leaves no stale lock, temporary object or unindexed pack, and every restore point restores
// bit-exact. gc repacks readily (--repack-unused 10), so repacks are killed too.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { existsSync, promises as fs, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fillContent, Prng, sha256File } from "../../src/image/synthetic.js";
import { collect, startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { chunkRegions, pastGcTimeSlack, storedFiles } from "../helpers/stored.js";

const KILLS = Number(process.env.STRATA_KILLS ?? 100);
const SEED = process.env.STRATA_KILL_SEED ?? randomBytes(4).toString("hex");
const CHUNK = 64 * 1024;
const SIZE = 48 * 1024 * 1024;
/** Chunks each backup attempt changes. */
const CHANGED = 64;

type Op = "backup" | "forget" | "gc" | "restore";
const OPS: readonly Op[] = ["backup", "backup", "forget", "gc", "restore"];

function sha(buf: Buffer): string {
  return createHash("sha256").update(buf).digest("hex");
}

/** Files under `dir` whose name marks an unfinished write. */
function temporaries(dir: string): string[] {
  const out: string[] = [];
  const walk = (d: string) => {
    for (const e of readdirSync(d, { withFileTypes: true })) {
      if (e.isDirectory()) walk(join(d, e.name));
      else if (e.name.includes(".tmp-")) out.push(join(d, e.name));
    }
  };
  if (existsSync(dir)) walk(dir);
  return out;
}

test(`kill -9 campaign: ${KILLS} kills of backup, forget, gc and restore`, {
  timeout: 30 * 60_000,
}, async (t) => {
  t.diagnostic(`seed ${SEED} (STRATA_KILL_SEED=${SEED} replays it)`);
  const rng = new Prng(`kill campaign ${SEED}`);
  const pick = (n: number) => rng.next() % n;
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const img = join(dir, "disk.img");
  const disk = Buffer.alloc(SIZE);
  fillContent(disk, "binary", new Prng(`disk ${SEED}`));
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);

  /** Restore point id → sha256 of the disk it must hold. */
  const expected = new Map<string, string>();
  const snapshots = async (): Promise<string[]> =>
    (
      JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{ id: string }>
    ).map((s) => s.id);
  let version = 0;
  /**
   * Changes CHANGED random chunks of the disk: every backup attempt has new content to store, and
   * packs lose enough of their chunks to restore points that forget removes for gc to repack them.
   */
  const mutate = async () => {
    version++;
    for (let i = 0; i < CHANGED; i++) {
      const at = pick(SIZE / CHUNK) * CHUNK;
      fillContent(disk.subarray(at, at + CHUNK), "random", new Prng(`${SEED} v${version} c${i}`));
    }
    await fs.writeFile(img, disk);
    return sha(disk);
  };
  const args = (op: Op, n: number): string[] => {
    switch (op) {
      case "backup":
        return ["backup", "--repo", repo, "--vm", "vm1", `file:${img},name=disk`];
      case "forget":
        return ["forget", "--repo", repo, "--keep-last", "3"];
      case "gc":
        // Repack readily, so that repacks run (and get killed) too.
        // --json: its progress events show when it repacks.
        return ["gc", "--repo", repo, "--grace", "0s", "--repack-unused", "10", "--json"];
      case "restore":
        return ["restore", "--repo", repo, "vm1/latest", "--target", join(dir, `out-${n}`)];
    }
  };

  // Each operation once, unkilled, to learn how long it runs.
  const duration = new Map<Op, number>();
  // How long the CLI takes to start and stop doing nothing: kills are spread over the rest.
  let startup = Number.POSITIVE_INFINITY;
  for (let i = 0; i < 3; i++) {
    const t0 = Date.now();
    await strataOk(["snapshots", "--repo", repo]);
    startup = Math.min(startup, Date.now() - t0);
  }
  // Five backups, so that forget removes two and gc has packs to repack: its duration includes a
  // repack, and kills of later gc runs land in theirs too.
  for (const op of ["backup", "backup", "backup", "backup", "backup", "forget", "gc", "restore"] as const) {
    const hash = op === "backup" ? await mutate() : "";
    const before = new Set(await snapshots());
    const t0 = Date.now();
    const r = await strataOk(args(op, 0));
    duration.set(op, Math.max(duration.get(op) ?? 0, Date.now() - t0));
    if (op === "gc") assert.ok(Number(summary(r).packsRepacked) > 0, "the first gc repacks");
    for (const id of await snapshots()) if (!before.has(id)) expected.set(id, hash);
  }
  t.diagnostic(`unkilled durations (ms): ${JSON.stringify(Object.fromEntries(duration))}`);

  const killsByOp = new Map<Op, number>();
  const locks = () => new Set(readdirSync(join(repo, "locks")));
  /** Restore points as the repository holds them: a folder with a manifest (what snapshots lists). */
  const points = (): string[] => {
    const vmDir = join(repo, "vms", "vm1");
    if (!existsSync(vmDir)) return [];
    return readdirSync(vmDir)
      .filter((time) => existsSync(join(vmDir, time, "manifest.json")))
      .map((time) => `vm1/${time}`)
      .sort();
  };
  /** Kills that found the operation holding its repository lock: inside the real work. */
  let inWork = 0;
  /** gc runs that repacked, and those of them killed while at it. */
  let repacking = 0;
  let repackKills = 0;
  let kills = 0;
  let attempts = 0;
  while (kills < KILLS) {
    assert.ok(attempts++ < KILLS * 4, `only ${kills} of ${attempts} runs could be killed while running`);
    const op = OPS[pick(OPS.length)]!;
    const hash = op === "backup" ? await mutate() : "";
    const before = points();
    const latest = before.at(-1);
    const locksBefore = locks();
    const child = startStrata(args(op, attempts));
    const output = collect(child);
    const exited = new Promise<number | null>((r) => child.on("exit", (code) => r(code)));
    let gone = false;
    void exited.then(() => {
      gone = true;
    });
    // The kill lands at a random instant of the operation's real work: from when it holds its
    // repository lock to about when it would have ended unkilled.
    const deadline = Date.now() + 60_000;
    while (!gone && ![...locks()].some((l) => !locksBefore.has(l)) && Date.now() < deadline) await sleep(2);
    if (!gone) await sleep(pick(Math.max(1, duration.get(op)! - startup)));
    if (gone) {
      // Finished before the kill: it must have succeeded.
      assert.equal(await exited, 0, `${op} exited with an error before it could be killed`);
    } else {
      child.kill("SIGKILL");
      await exited;
      kills++;
      if ([...locks()].some((l) => !locksBefore.has(l))) inWork++;
      killsByOp.set(op, (killsByOp.get(op) ?? 0) + 1);
    }
    if (op === "gc") {
      const events = (await output.result).stdout
        .split("\n")
        .filter((l) => l.startsWith("{"))
        .map((l) => JSON.parse(l) as { type: string; job?: string; message?: string });
      const start = events.find((e) => e.type === "start" && e.job === "gc");
      if (Number(/(\d+) to repack/.exec(start?.message ?? "")?.[1] ?? 0) > 0) {
        repacking++;
        // Killed after it chose what to repack and before it ended: while repacking.
        if (!events.some((e) => e.type === "end" && e.job === "gc")) repackKills++;
      }
    }
    const after = points();
    for (const id of after) {
      if (before.includes(id)) continue;
      assert.equal(op, "backup", `${id} appeared during a ${op}`);
      assert.ok(!expected.has(id), `${id} was listed before`);
      expected.set(id, hash);
    }
    for (const id of before)
      if (!after.includes(id)) assert.equal(op, "forget", `${id} disappeared during a ${op}`);
    if (op === "restore") {
      const out = join(dir, `out-${attempts}`, "disk.raw");
      if (existsSync(out)) {
        assert.equal(await sha256File(out), expected.get(latest!), "a restored file that shows is whole");
      }
      await fs.rm(join(dir, `out-${attempts}`), { recursive: true, force: true });
    }
    if (kills > 0 && kills % 25 === 0 && !gone) {
      assert.deepEqual(
        await snapshots(),
        after,
        `strata snapshots lists what the repository holds (${kills} kills)`,
      );
      const v = summary(await strataOk(["verify", "--repo", repo, "--json"]));
      assert.equal(v.ok, true, `verify after ${kills} kills`);
    }
  }
  t.diagnostic(
    `${kills} kills in ${attempts} runs, ${inWork} while the repository lock was held: ${JSON.stringify(Object.fromEntries(killsByOp))}; ` +
      `${repacking} gc runs repacked, ${repackKills} of them killed`,
  );
  assert.ok(inWork >= kills / 4, `only ${inWork} of ${kills} kills landed inside the operations' work`);

  // The dead runs' locks don't block gc; it removes their temporary objects and stale locks.
  await pastGcTimeSlack();
  await strataOk(args("gc", 0));
  assert.deepEqual(readdirSync(join(repo, "locks")), [], "no stale locks");
  assert.deepEqual(temporaries(repo), [], "no temporary objects");
  // Nor packs that killed backups or repacks stored but never indexed.
  assert.deepEqual(
    storedFiles(repo).filter((f) => f.includes("/packs/")),
    [...new Set((await chunkRegions(repo)).map((c) => c.path))].sort(),
    "every pack left is indexed",
  );
  const v = summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"]));
  assert.equal(v.ok, true, "verify --read-data");
  const left = await snapshots();
  assert.ok(left.length > 0);
  for (const id of left) {
    const out = join(dir, "final", id.replace(/[/:]/g, "_"));
    await strataOk(["restore", "--repo", repo, id, "--target", out]);
    assert.equal(await sha256File(join(out, "disk.raw")), expected.get(id), `${id} restores bit-exact`);
    await fs.rm(out, { recursive: true, force: true });
  }
  // And the repository still takes backups.
  const hash = await mutate();
  const last = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img},name=disk`]),
  );
  const out = join(dir, "last");
  await strataOk(["restore", "--repo", repo, String(last.id), "--target", out]);
  assert.equal(await sha256File(join(out, "disk.raw")), hash);
});
