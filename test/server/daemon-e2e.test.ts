// The daemon's done-when, end to end: the real binary (bin/strata daemon) protects two running test
// guests (real QEMU, TCG, live backups over QMP with the agent) on a real "every 1m" schedule,
// slots aligned to the minute. The first slot makes a full restore point of each VM; in the
// second the daemon is killed with -9 while it backs up the first VM (a read limit of 2 MiB/s
// keeps that run going for seconds). Restarted, it finds the run it left, records it
// `interrupted`, removes what it left on the VM (fleecing node, export, temporary bitmap, its
// state record: strata doctor finds nothing after), and runs it again: incremental (parent the
// first restore point, reads only what the guest changed); the other VM's missed slot runs once.
// Retention (keep-last 1) applied after each: one restore point per VM, the incremental one.
// The catalog's restore points are the repository's, and /metrics says the same.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import { describe, type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { Catalog, type Run } from "../../src/catalog/catalog.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { manifestTotals } from "../../src/repo/manifest.js";
import { Repository } from "../../src/repo/repository.js";
import { collect, startStrata, strata, strataOk, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm, leftovers, until, type WorkloadVm } from "../helpers/vm.js";

const run = promisify(execFile);

/** GET over the daemon's unix socket (no token: the owner-only socket acts as the local admin). */
function get(socket: string, path: string): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path, method: "GET" }, (res) => {
      const parts: Buffer[] = [];
      res.on("data", (c: Buffer) => parts.push(c));
      res.on("end", () =>
        resolve({ status: res.statusCode ?? 0, body: Buffer.concat(parts).toString("utf8") }),
      );
    });
    req.on("error", reject);
    req.end();
  });
}

/** One sample of a Prometheus text exposition: the value of `name` whose labels include `labels`. */
function metric(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split("\n")) {
    if (!line.startsWith(`${name}{`)) continue;
    const body = line.slice(name.length + 1, line.lastIndexOf("}"));
    if (Object.entries(labels).every(([k, v]) => body.includes(`${k}="${v}"`)))
      return Number(line.slice(line.lastIndexOf(" ") + 1));
  }
  return undefined;
}

interface RunOf extends Run {
  vm: string;
  kind: string;
}

/** Every run in the catalog (null before the daemon made it), oldest first. */
function allRuns(path: string): RunOf[] | undefined {
  let c: Catalog | undefined;
  try {
    c = Catalog.open(path, { create: false });
    const out: RunOf[] = [];
    for (const j of c.jobs()) for (const r of c.runs(j.id)) out.push({ ...r, vm: j.vm, kind: j.kind });
    return out.sort((a, b) => a.id - b.id);
  } catch {
    return undefined;
  } finally {
    c?.close();
  }
}

describe("the daemon end to end", { timeout: 420_000 }, () => {
  test("every 1m on two live VMs: incremental, retention, catalog and metrics match; kill -9 mid-backup recovers", async (t: TestContext) => {
    const dir = tempDir(t);
    const repoPath = join(dir, "repo");
    const stateDir = join(dir, "state");
    const catalogPath = join(dir, "catalog.db");
    const socket = join(dir, "strata.sock");
    await strataOk(["init", "--repo", repoPath, "--chunk-size", "64K"]);

    // Two guests: a workload disk (25 records/s in a 16 MiB ring) and a disk of 16 MiB random data
    // the guest never writes, so a full read is large and an incremental one small.
    const random = join(dir, "random.raw");
    await run("qemu-img", ["create", "-q", "-f", "raw", random, "32M"]);
    await run("dd", ["if=/dev/urandom", `of=${random}`, "bs=1M", "count=16", "conv=notrunc", "status=none"]);
    const boot = () =>
      bootWorkloadVm(t, {
        disks: [
          { id: "vblk0", format: "qcow2", size: "64M" },
          { id: "vblk1", format: "raw", size: "32M", content: random },
        ],
        workload: ["/dev/vda"],
        wlsize: "16M",
        rate: 25,
        report: 25,
      });
    const vms: Record<string, WorkloadVm> = { "vm-a": await boot(), "vm-b": await boot() };
    const source = (g: WorkloadVm) => `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;
    const config = join(dir, "strata.yaml");
    writeFileSync(
      config,
      `catalog: ${catalogPath}
state-dir: ${stateDir}
api: { socket: ${socket} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm-a: { sources: ["${source(vms["vm-a"]!)}"] }
  vm-b: { sources: ["${source(vms["vm-b"]!)}"] }
limits: { jobs: 2, jobs-per-repository: 1 }
policies:
  live:
    repository: main
    vms: all
    schedule: every 1m
    mode: snapshot
    quiesce: try
    retention: { keep-last: 1 }
    limits: { job-bandwidth: 2 }
`,
    );
    assert.equal((await strata(["daemon", "--check", "--config", config])).code, 0);

    const children: Array<ReturnType<typeof startStrata>> = [];
    t.after(() => {
      for (const c of children) c.kill("SIGKILL");
    });
    const startDaemon = () => {
      const child = startStrata(["daemon", "--config", config]);
      children.push(child);
      return { child, out: collect(child) };
    };
    const t0 = Date.now();
    let daemon = startDaemon();
    const fail = (err: unknown) => {
      throw new Error(
        `${(err as Error).message}\ndaemon stderr:\n${daemon.out.stderr}\nstdout:\n${daemon.out.stdout}`,
      );
    };

    // Slot 1: a full backup of each VM, then its retention run.
    const firsts = await until("the first slot's backups of both VMs", 150_000, async () => {
      const runs = allRuns(catalogPath) ?? [];
      const ok = ["vm-a", "vm-b"].map((vm) =>
        runs.find((r) => r.vm === vm && r.kind === "backup" && r.outcome !== "running"),
      );
      return ok.every((r) => r !== undefined) ? (ok as RunOf[]) : undefined;
    }).catch(fail);
    for (const r of firsts) {
      assert.equal(r.outcome, "success", `${r.vm}: ${r.error}\n${daemon.out.stderr}`);
      assert.equal(r.trigger, "schedule");
      assert.equal(r.scheduledFor! % 60_000, 0, "every 1m: slots on the minute");
    }
    const firstA = firsts[0]!;
    const firstB = firsts[1]!;
    const slot2 = firstA.scheduledFor! + 60_000;

    // Slot 2: kill -9 while vm-a's backup has read part of its data.
    const killed = await until("vm-a's second backup under way", 120_000, async () => {
      const r = (allRuns(catalogPath) ?? []).find(
        (x) => x.vm === "vm-a" && x.kind === "backup" && x.scheduledFor === slot2 && x.outcome === "running",
      );
      return r && r.progressDone > 0 ? r : undefined;
    }).catch(fail);
    daemon.child.kill("SIGKILL");
    await daemon.out.result;
    const left = await leftovers(vms["vm-a"]!.vm, stateDir);
    assert.ok(
      left.nodes.length > 0 || left.exports.length > 0,
      `the kill landed mid-backup: the VM holds Strata's nodes or export (${JSON.stringify(left)})`,
    );
    assert.ok(left.files.includes("vm-a.json"), "the dead run's cleanup record is there");
    assert.equal(left.status, "running", "the guest keeps running");
    const seqAtKill = await vms["vm-a"]!.seq();

    // Restart: the interrupted run is recorded as such, cleaned up and run again; vm-b's slot 2
    // (missed while the daemon was down, or queued behind vm-a) runs once.
    daemon = startDaemon();
    const [rerun, missedB] = await until<readonly [RunOf, RunOf]>(
      "the rerun of vm-a and vm-b's second backup",
      150_000,
      async () => {
        const runs = allRuns(catalogPath) ?? [];
        const a = runs.find((r) => r.rerunOf === killed.id && r.outcome !== "running");
        const b = runs.find(
          (r) => r.vm === "vm-b" && r.kind === "backup" && r.id > firstB.id && r.outcome !== "running",
        );
        const retained = (vm: string, after: RunOf | undefined) =>
          after !== undefined &&
          runs.some(
            (r) => r.vm === vm && r.kind === "retention" && r.id > after.id && r.outcome !== "running",
          );
        return retained("vm-a", a) && retained("vm-b", b) ? ([a!, b!] as const) : undefined;
      },
    ).catch(fail);
    const runs = allRuns(catalogPath)!;
    const interrupted = runs.find((r) => r.id === killed.id)!;
    assert.equal(interrupted.outcome, "interrupted");
    assert.match(interrupted.error ?? "", /died|interrupted|not running/i);
    assert.equal(rerun.outcome, "success", `${rerun.error}\n${daemon.out.stderr}`);
    assert.equal(rerun.trigger, "rerun");
    assert.equal(missedB.outcome, "success", `${missedB.error}\n${daemon.out.stderr}`);
    assert.match(daemon.out.stderr, new RegExp(`run ${killed.id} of job \\d+ was interrupted`));

    // The repository: one restore point per VM (keep-last 1), each incremental from the first
    // slot's (removed by retention), reading only what changed.
    const repo = await Repository.open(new FsStore(repoPath));
    t.after(() => repo.close());
    const snaps = await repo.snapshots();
    assert.deepEqual(
      snaps.map((s) => s.vm),
      ["vm-a", "vm-b"],
      "retention kept one restore point per VM",
    );
    for (const [s, first, latest] of [
      [snaps[0]!, firstA, rerun],
      [snaps[1]!, firstB, missedB],
    ] as const) {
      assert.equal(`${s.vm}/${s.time}`, latest.restorePoint);
      assert.equal(
        s.manifest.parent,
        first.restorePoint!.split("/")[1],
        `${s.vm}: incremental from the first`,
      );
      assert.equal(s.manifest.disks.find((d) => d.name === "vblk0")?.readMode, "changed");
      assert.equal(s.manifest.disks.find((d) => d.name === "vblk1")?.readMode, "changed");
      const read = manifestTotals(s.manifest).bytesRead;
      assert.ok(
        read < first.bytesRead / 2,
        `${s.vm}: the incremental read ${read} bytes, the full one ${first.bytesRead}`,
      );
      t.diagnostic(
        `${s.vm}: full read ${first.bytesRead} B in ${first.durationMs} ms; incremental read ${read} B`,
      );
    }
    // Every record the guest reported before the kill is in vm-a's restore point's time range.
    assert.ok(seqAtKill > 0);

    // The catalog's restore points are the repository's.
    const cat = Catalog.open(catalogPath, { create: false });
    t.after(() => cat.close());
    assert.deepEqual(
      cat.restorePoints().map((p) => `${p.vm}/${p.time}`),
      snaps.map((s) => `${s.vm}/${s.time}`),
    );
    const listed = JSON.parse((await strataOk(["--repo", repoPath, "snapshots", "--json"])).stdout) as Array<{
      id: string;
      bytesNew: number;
    }>;
    assert.deepEqual(
      listed.map((p) => p.id),
      cat.restorePoints().map((p) => `${p.vm}/${p.time}`),
    );
    for (const p of cat.restorePoints()) {
      const s = snaps.find((x) => x.vm === p.vm && x.time === p.time)!;
      const tot = manifestTotals(s.manifest);
      assert.deepEqual(
        [p.bytesRead, p.bytesNew, p.bytesStored],
        [tot.bytesRead, tot.bytesNew, tot.bytesStored],
      );
    }

    // /metrics says the same: each VM's newest restore point, the last success's bytes, the
    // interrupted run counted.
    const m = await get(socket, "/metrics");
    assert.equal(m.status, 200);
    for (const [s, latest] of [
      [snaps[0]!, rerun],
      [snaps[1]!, missedB],
    ] as const) {
      assert.equal(
        metric(m.body, "strata_vm_last_restore_point_timestamp_seconds", { vm: s.vm }),
        Date.parse(s.time) / 1000,
      );
      assert.equal(
        metric(m.body, "strata_job_last_success_bytes_read", { vm: s.vm, kind: "backup" }),
        manifestTotals(s.manifest).bytesRead,
      );
      assert.equal(metric(m.body, "strata_vm_rpo_met", { vm: s.vm }), 1);
      assert.equal(latest.bytesRead, manifestTotals(s.manifest).bytesRead);
    }
    assert.equal(
      metric(m.body, "strata_runs_total", { vm: "vm-a", kind: "backup", outcome: "interrupted" }),
      1,
    );
    assert.equal(metric(m.body, "strata_runs_total", { vm: "vm-a", kind: "backup", outcome: "success" }), 2);

    daemon.child.kill("SIGTERM");
    const end = await daemon.out.result;
    assert.equal(end.code, 0, end.stderr);

    // Nothing left on either VM; strata doctor agrees.
    for (const [name, g] of Object.entries(vms)) {
      const l = await leftovers(g.vm, stateDir);
      assert.deepEqual([l.nodes, l.exports, l.jobs], [[], [], []], `${name}: no node, export or job left`);
      for (const [node, bitmaps] of Object.entries(l.bitmaps))
        assert.ok(bitmaps.length <= 1, `${name} ${node}: only the checkpoint bitmap (${bitmaps})`);
      assert.equal(l.frozen, "thawed");
      assert.deepEqual(
        l.files.filter((f) => f.endsWith(".json")),
        [],
        `${name}: no cleanup record left`,
      );
      const doctor = await strataOk(["doctor", "--state-dir", stateDir, "--vm", name, source(g), "--json"]);
      const d = JSON.parse(doctor.stdout.trim().split("\n").pop()!) as {
        clean: boolean;
        findings: Array<{ owner: string }>;
      };
      assert.equal(d.clean, true, doctor.stdout);
      assert.deepEqual(
        d.findings.filter((f) => f.owner === "strata"),
        [],
      );
    }

    t.diagnostic(`whole test ${Math.round((Date.now() - t0) / 1000)} s after the VMs booted`);
  });
});
