// The real binary: `strata daemon --config F` as a child process runs a scheduled backup of an
// image-file VM, records the run and its restore point in the catalog, and stops cleanly on
// SIGTERM. Schedules shorter than a minute are allowed only by STRATA_TEST_MIN_EVERY.
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { getPriority } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Catalog } from "../../src/catalog/catalog.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { collect, startStrata, strata, tempDir } from "../helpers/cli.js";
import { writeImage } from "./helpers.js";

async function until<T>(what: string, ms: number, fn: () => T | undefined): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

test("strata daemon runs a scheduled backup, records run and restore point, and stops on SIGTERM", async (t) => {
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  writeImage(join(dir, "vm1.img"), 2);
  const catalogPath = join(dir, "catalog.db");
  const config = join(dir, "strata.yaml");
  writeFileSync(
    config,
    `catalog: ${catalogPath}
state-dir: ${join(dir, "state")}
api: { socket: ${join(dir, "strata.sock")} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm1: { sources: ["file:${join(dir, "vm1.img")}"] }
limits: { nice: 5 }
policies:
  quick:
    repository: main
    vms: all
    schedule: every 2s
    retention: { keep-last: 5 }
`,
  );
  // Without the test switch, such a schedule is refused, on its line.
  const refused = await strata(["daemon", "--check", "--config", config]);
  assert.equal(refused.code, 2);
  assert.match(refused.stderr, /strata\.yaml:13:15: policies\.quick\.schedule: .*shortest, every 1m/);

  const child = startStrata(["daemon", "--config", config], { env: { STRATA_TEST_MIN_EVERY: "1" } });
  const out = collect(child);
  t.after(() => child.kill("SIGKILL"));
  const run = await until("a finished backup run", 30_000, () => {
    let c: Catalog | undefined;
    try {
      c = Catalog.open(catalogPath, { create: false });
      const job = c.jobs().find((j) => j.kind === "backup");
      return job && c.runs(job.id).find((r) => r.outcome !== "running");
    } catch {
      return undefined; // not created yet
    } finally {
      c?.close();
    }
  }).catch((err) => {
    throw new Error(`${(err as Error).message}\nstdout:\n${out.stdout}\nstderr:\n${out.stderr}`);
  });
  assert.equal(run.outcome, "success", `${run.error}\n${out.stderr}`);
  // "missed" when the daemon took longer than one period to start (a loaded host): the first due
  // time had passed, and it ran once, as a missed one does.
  assert.ok(["schedule", "missed"].includes(run.trigger), `trigger ${run.trigger}`);
  assert.equal(run.pid, child.pid);
  assert.ok(run.bytesRead >= 1 << 20 && run.durationMs !== null);
  child.kill("SIGTERM");
  const r = await out.result;
  assert.equal(r.code, 0, `exit code; stderr:\n${r.stderr}`);
  assert.match(r.stdout, /info: SIGTERM: stopping/);
  assert.match(r.stdout, /info: stopped/);
  const c = Catalog.open(catalogPath, { create: false });
  t.after(() => c.close());
  assert.deepEqual(c.openRuns(), [], "no run is left open");
  const points = c.restorePoints({ vm: "vm1" });
  assert.ok(points.some((p) => `${p.vm}/${p.time}` === run.restorePoint && p.runId === run.id));
  const repo = await Repository.open(new FsStore(repoPath));
  t.after(() => repo.close());
  assert.ok((await repo.snapshots("vm1")).some((s) => `${s.vm}/${s.time}` === run.restorePoint));
});

/** The nice value of each thread of process `pid` (field 19 of /proc/PID/task/TID/stat). */
function threadNices(pid: number): number[] {
  return readdirSync(`/proc/${pid}/task`).map((tid) => {
    const stat = readFileSync(`/proc/${pid}/task/${tid}/stat`, "utf8");
    return Number(stat.slice(stat.lastIndexOf(")") + 2).split(" ")[16]);
  });
}

test("SIGTERM mid-backup: the real daemon cancels the run, records it, releases the repository and exits 0", async (t) => {
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  writeImage(join(dir, "vm1.img"), 32);
  const catalogPath = join(dir, "catalog.db");
  const socket = join(dir, "strata.sock");
  const config = join(dir, "strata.yaml");
  writeFileSync(
    config,
    `catalog: ${catalogPath}
state-dir: ${join(dir, "state")}
api: { socket: ${socket} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm1: { sources: ["file:${join(dir, "vm1.img")}"] }
limits: { nice: 7, worker-threads: 1 }
policies:
  slow:
    repository: main
    vms: all
    schedule: "0 3 * * *"
    limits: { job-bandwidth: 2, nice: 12 }
`,
  );
  const child = startStrata(["daemon", "--config", config]);
  const out = collect(child);
  t.after(() => child.kill("SIGKILL"));
  await until("the API socket", 10_000, () => (existsSync(socket) ? true : undefined));
  const started = await strata(["run", "vm1", "--socket", socket]);
  assert.equal(started.code, 0, started.stderr);
  assert.match(started.stdout, /slow\/vm1\/backup: started run \d+/);
  await new Promise((r) => setTimeout(r, 1500));
  // The host's nice 7 on the daemon's threads, the policy's 12 on the job's one codec worker.
  // Lowering nice needs root (CAP_SYS_NICE): without it, a test run at a higher nice keeps it.
  const host = process.getuid?.() === 0 ? 7 : Math.max(7, getPriority());
  const nices = threadNices(child.pid!);
  const codec = nices.filter((n) => n === Math.max(12, host));
  assert.ok(
    nices.length > 2 && codec.length === 1 && nices.filter((n) => n === host).length === nices.length - 1,
    `the daemon's threads run at nice ${host}, the job's codec worker at 12: ${nices}`,
  );
  child.kill("SIGTERM");
  const r = await out.result;
  assert.equal(r.code, 0, r.stderr);
  const c = Catalog.open(catalogPath, { create: false });
  t.after(() => c.close());
  const job = c.jobs().find((j) => j.kind === "backup")!;
  const [run] = c.runs(job.id);
  assert.equal(run!.outcome, "cancelled");
  assert.equal(run!.errorCode, "ABORTED");
  assert.match(run!.error!, /the daemon received SIGTERM/);
  assert.ok(run!.progressDone > 0 && run!.progressDone < run!.progressTotal, "stopped part-way");
  assert.deepEqual(c.openRuns(), []);
  assert.deepEqual(readdirSync(join(repoPath, "locks")), [], "no lock left on the repository");
  const repo = await Repository.open(new FsStore(repoPath));
  t.after(() => repo.close());
  assert.deepEqual(await repo.snapshots("vm1"), [], "no restore point from a cancelled run");
});
