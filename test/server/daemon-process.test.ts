// The real binary: `strata daemon --config F` as a child process runs a scheduled backup of an
// image-file VM, records the run and its restore point in the catalog, and stops cleanly on
// SIGTERM. Schedules shorter than a minute are allowed only by STRATA_TEST_MIN_EVERY.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
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
  assert.equal(run.trigger, "schedule");
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
