// Disk I/O limits the kernel enforces: the real daemon with io-read moves itself into a cgroup
// child "strata" (v2 io.max where the v2 tree has the io controller, else v1 blkio throttle, as
// on hybrid hosts) and its backup of a raw image (read with O_DIRECT, so every byte reaches the
// disk) runs at that rate within 10 %, while the same read unthrottled is more than twice as fast.
// The v2 path is shown on a directory tree shaped like a cgroup v2 mount (this host's v2 tree has
// no io controller, so the kernel's own cannot be used here); ioprio, the last fallback, is set
// on a real process and read back with ionice.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, readFileSync, rmdirSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { Catalog } from "../../src/catalog/catalog.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { applyIoLimits, detectIoMechanism, hostDisks, ioprioLevel } from "../../src/util/io-control.js";
import { runProgram } from "../../src/util/process.js";
import { collect, startStrata, strata, strataOk, tempDir } from "../helpers/cli.js";
import { writeImage } from "./helpers.js";

const MiB = 1 << 20;

async function until<T>(what: string, ms: number, fn: () => T | undefined): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

/** Drops `path`'s pages from the page cache (GNU dd: nocache with count=0 advises the whole file). */
async function uncache(path: string): Promise<void> {
  await runProgram("sync", ["-f", path]);
  await runProgram("dd", [`if=${path}`, "iflag=nocache", "count=0", "status=none"]);
}

test("io-read: the daemon's backup reads its disk at the configured MiB/s within 10 %, by a kernel cgroup", async (t) => {
  const mechanism = detectIoMechanism();
  assert.notEqual(
    mechanism.kind,
    "ioprio",
    `this host offers a cgroup I/O controller: ${JSON.stringify(mechanism)}`,
  );
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  const image = join(dir, "vm1.img");
  writeImage(image, 64);
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
  vm1: { sources: ["file:${image}"] }
limits: { io-read: 8, io-weight: 50 }
policies:
  p:
    repository: main
    vms: all
    schedule: "0 3 * * *"
`,
  );
  const check = await strataOk(["daemon", "--check", "--config", config]);
  assert.match(check.stdout, /disk reads 8 MiB\/s/);
  assert.match(
    check.stdout,
    mechanism.kind === "blkio"
      ? /disk limits by cgroup v1 blkio throttle/
      : /disk limits by cgroup v2 io\.max/,
  );

  // Unthrottled first: the same image, uncached, read by a backup of the CLI.
  await strataOk(["init", "--repo", join(dir, "free"), "--chunk-size", "64K"]);
  await uncache(image);
  const free = await strataOk([
    "backup",
    "--repo",
    join(dir, "free"),
    "--vm",
    "free",
    "--json",
    `file:${image}`,
  ]);
  const freeMs = (JSON.parse(free.stdout.trim().split("\n").at(-1)!) as { durationMs: number }).durationMs;

  await uncache(image);
  const child = startStrata(["daemon", "--config", config]);
  const out = collect(child);
  t.after(() => child.kill("SIGKILL"));
  t.after(() => {
    // The cgroup the daemon made, once it has no process (another daemon may still use it).
    const cg = "cgroup" in mechanism ? mechanism.cgroup : undefined;
    if (cg && existsSync(cg)) {
      try {
        rmdirSync(cg);
      } catch {}
    }
  });
  await until("the API socket", 15_000, () => (existsSync(socket) ? true : undefined));
  const cgroupLine = readFileSync(`/proc/${child.pid}/cgroup`, "utf8")
    .split("\n")
    .find((l) => (mechanism.kind === "blkio" ? /^\d+:[^:]*blkio[^:]*:/.test(l) : l.startsWith("0::")));
  assert.match(cgroupLine ?? "", /\/strata$/, "the daemon runs in its cgroup child");
  // The bytes the daemon fetched from storage (/proc/PID/io read_bytes, O_DIRECT reads included),
  // sampled while it runs: the rate between 10 % and 90 % of the image leaves out the run's
  // start and end (repository, catalog), which are not disk reads of the image.
  const readBytes = () =>
    Number(/^read_bytes: (\d+)$/m.exec(readFileSync(`/proc/${child.pid}/io`, "utf8"))![1]);
  const base = readBytes();
  const samples: Array<{ t: number; bytes: number }> = [];
  const sampler = setInterval(() => {
    try {
      samples.push({ t: performance.now(), bytes: readBytes() - base });
    } catch {}
  }, 100);
  t.after(() => clearInterval(sampler));
  const started = await strata(["run", "vm1", "--socket", socket]);
  assert.equal(started.code, 0, started.stderr);
  const run = await until("the finished backup", 120_000, () => {
    const c = Catalog.open(catalogPath, { create: false });
    try {
      const job = c.jobs().find((j) => j.kind === "backup");
      return job && c.runs(job.id).find((r) => r.outcome !== "running");
    } finally {
      c.close();
    }
  });
  clearInterval(sampler);
  child.kill("SIGTERM");
  const r = await out.result;
  assert.equal(run.outcome, "success", `${run.error}\n${r.stderr}`);
  assert.match(
    r.stdout,
    mechanism.kind === "blkio" ? /disk limits: cgroup v1 blkio .*reads 8 MiB\/s/ : /disk limits: cgroup v2/,
  );
  const from = samples.find((x) => x.bytes >= 6.4 * MiB);
  const to = samples.find((x) => x.bytes >= 57.6 * MiB);
  assert.ok(from && to, `the daemon read the image from storage: ${samples.at(-1)?.bytes} bytes`);
  const rate = (to.bytes - from.bytes) / MiB / ((to.t - from.t) / 1000);
  const freeRate = 64 / (freeMs / 1000);
  t.diagnostic(
    `io-read 8: ${rate.toFixed(2)} MiB/s from storage (the run: ${run.durationMs} ms for ${run.bytesRead} bytes); ` +
      `the same backup unthrottled (CLI): ${freeRate.toFixed(1)} MiB/s`,
  );
  assert.equal(run.bytesRead, 64 * MiB);
  assert.ok(Math.abs(rate - 8) <= 0.8, `8 MiB/s within 10 %: ${rate.toFixed(2)} MiB/s`);
  assert.ok(freeRate > 16, `unthrottled, the read is more than twice as fast: ${freeRate.toFixed(1)} MiB/s`);
});

test("cgroup v2 with the io controller: io.max and io.weight on a child of the process's cgroup", async (t) => {
  // A tree shaped like a cgroup v2 mount: this host's v2 tree has no io controller.
  const root = join(tempDir(t), "cgroup2");
  const sys = join(root, "..", "sys-block");
  mkdirSync(join(root, "system.slice", "strata.service"), { recursive: true });
  writeFileSync(join(root, "cgroup.controllers"), "cpuset cpu io memory pids\n");
  writeFileSync(join(root, "system.slice", "strata.service", "cgroup.subtree_control"), "");
  for (const [name, dev, size] of [
    ["vda", "254:0", "536870912"],
    ["zram0", "253:0", "0"],
  ] as const) {
    mkdirSync(join(sys, name), { recursive: true });
    writeFileSync(join(sys, name, "dev"), `${dev}\n`);
    writeFileSync(join(sys, name, "size"), `${size}\n`);
  }
  assert.deepEqual(hostDisks(sys), ["254:0"], "disks without a size are left out");
  const m = detectIoMechanism({
    mounts: `sysfs /sys sysfs rw 0 0\ncgroup2 ${root} cgroup2 rw,nsdelegate 0 0\n`,
    cgroups: "0::/system.slice/strata.service\n",
    sysBlock: sys,
  });
  assert.deepEqual(m, {
    kind: "cgroup2",
    root,
    cgroup: join(root, "system.slice", "strata.service", "strata"),
  });
  const applied = await applyIoLimits({ readMiBs: 8, weight: 50 }, 4242, m, sys);
  const cg = join(root, "system.slice", "strata.service", "strata");
  assert.deepEqual(applied.refused, []);
  assert.equal(readFileSync(join(cg, "cgroup.procs"), "utf8"), "4242\n");
  assert.equal(
    readFileSync(join(root, "system.slice", "strata.service", "cgroup.subtree_control"), "utf8"),
    "+io\n",
  );
  assert.equal(readFileSync(join(cg, "io.max"), "utf8"), `254:0 rbps=${8 * MiB} wbps=max\n`);
  assert.equal(readFileSync(join(cg, "io.weight"), "utf8"), "default 50\n");
  assert.match(applied.summary, /^cgroup v2 .*strata: reads 8 MiB\/s on 254:0, io\.weight 50$/);
});

test("the mechanism follows what the host offers: hybrid v1 blkio, then ioprio", () => {
  const hybrid = detectIoMechanism({
    mounts:
      "cgroup /sys/fs/cgroup/blkio cgroup rw,relatime,blkio 0 0\ncgroup2 /nonexistent/unified cgroup2 rw 0 0\n",
    cgroups: "7:blkio:/machine\n0::/\n",
    sysBlock: "/sys/block",
  });
  assert.deepEqual(hybrid, {
    kind: "blkio",
    root: "/sys/fs/cgroup/blkio",
    cgroup: "/sys/fs/cgroup/blkio/machine/strata",
  });
  const none = detectIoMechanism({ mounts: "proc /proc proc rw 0 0\n", cgroups: "", sysBlock: "/sys/block" });
  assert.equal(none.kind, "ioprio");
  assert.match(none.kind === "ioprio" ? none.why : "", /no cgroup v2 mounted; no cgroup v1 blkio mounted/);
  assert.deepEqual([10000, 100, 99, 67, 66, 34, 33, 1].map(ioprioLevel), [4, 4, 5, 5, 6, 6, 7, 7]);
});

test("ioprio, the fallback: every thread of the process gets the weight's best-effort level; rates are refused by name", async (t) => {
  const child = spawn("sleep", ["60"], { stdio: "ignore" });
  t.after(() => child.kill("SIGKILL"));
  const applied = await applyIoLimits({ weight: 20, readMiBs: 5 }, child.pid!, {
    kind: "ioprio",
    why: "no controller (test)",
  });
  assert.match(applied.summary, /^ioprio: weight 20 as ioprio best-effort 7$/);
  assert.deepEqual(applied.refused, ["reads 5 MiB/s: no cgroup I/O controller here (no controller (test))"]);
  const shown = await runProgram("ionice", ["-p", String(child.pid)]);
  assert.equal(shown.trim(), "best-effort: prio 7");
});
