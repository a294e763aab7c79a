// strata jobs and strata run through the real binaries: a daemon as a child process, the CLI
// talking to it over its unix socket; without a daemon, an error naming the socket.
import assert from "node:assert/strict";
import { existsSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { collect, startStrata, strata, tempDir } from "../helpers/cli.js";
import { writeImage } from "../server/helpers.js";

interface JobView {
  id: number;
  policy: string;
  vm: string;
  kind: string;
  runs: Array<{ id: number; outcome: string; trigger: string; restorePoint: string | null }>;
}

test("strata run starts a VM's backup in the daemon and follows it; strata jobs lists it", async (t) => {
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  for (const vm of ["vm1", "vm2"]) writeImage(join(dir, `${vm}.img`), 2);
  const socket = join(dir, "run", "strata.sock");
  const config = join(dir, "strata.yaml");
  writeFileSync(
    config,
    `timezone: UTC
catalog: ${join(dir, "catalog.db")}
state-dir: ${join(dir, "state")}
api: { socket: ${socket} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm1: { sources: ["file:${join(dir, "vm1.img")}"] }
  vm2: { sources: ["file:${join(dir, "vm2.img")}"] }
policies:
  nightly:
    repository: main
    vms: all
    schedule: "0 3 * * *"
    retention: { keep-last: 3 }
`,
  );
  // No daemon yet: the error says so and names the socket.
  const down = await strata(["jobs", "--config", config]);
  assert.equal(down.code, 1);
  assert.match(down.stderr, new RegExp(`daemon is not running: there is no socket ${socket}`));

  const daemon = startStrata(["daemon", "--config", config]);
  const out = collect(daemon);
  t.after(() => daemon.kill("SIGKILL"));
  for (let i = 0; !existsSync(socket); i++) {
    assert.ok(i < 100, `the daemon's socket appears; stderr:\n${out.stderr}`);
    await new Promise((r) => setTimeout(r, 100));
  }

  const run = await strata(["run", "vm1", "--wait", "--config", config, "--json"]);
  assert.equal(run.code, 0, run.stderr);
  const ended = JSON.parse(run.stdout.trim().split("\n").at(-1)!) as Array<{
    outcome: string;
    trigger: string;
    restorePoint: string;
  }>;
  assert.equal(ended.length, 1, "vm1 is in one policy");
  assert.equal(ended[0]!.outcome, "success");
  assert.equal(ended[0]!.trigger, "manual");
  assert.match(ended[0]!.restorePoint, /^vm1\//);

  const unknown = await strata(["run", "vm9", "--socket", socket]);
  assert.equal(unknown.code, 2);
  assert.match(
    unknown.stderr,
    /no backup job of a policy or VM named "vm9" .*policies: nightly; VMs: vm1, vm2/,
  );

  const listed = await strata(["jobs", "--socket", socket, "--json"]);
  assert.equal(listed.code, 0, listed.stderr);
  const jobs = JSON.parse(listed.stdout) as JobView[];
  const vm1 = jobs.find((j) => j.vm === "vm1" && j.kind === "backup")!;
  assert.equal(vm1.runs[0]!.outcome, "success");
  assert.equal(vm1.runs[0]!.restorePoint, ended[0]!.restorePoint);
  assert.equal(jobs.find((j) => j.vm === "vm2" && j.kind === "backup")!.runs.length, 0);
  const text = await strata(["jobs", "--socket", socket]);
  assert.match(text.stdout, /nightly\s+vm1\s+backup\s+0 3 \* \* \*\s+\d{4}-\d\d-\d\dT03:00:00Z\n/);
  assert.match(
    text.stdout,
    /run \d+\s+success\s+\S+\s+manual\s+[\d.]+ s\s+read 2\.0 MiB, new 1\.0 MiB {2}vm1\//,
  );

  daemon.kill("SIGTERM");
  assert.equal((await out.result).code, 0);
  assert.ok(!existsSync(socket), "the socket is removed on stop");
});
