// The service loop in-process on a fake clock: due jobs run within the limits, over a real
// repository with image-file VMs; each run is recorded; retention follows each backup; stop
// cancels and records; a failing run records its error.
import assert from "node:assert/strict";
import { rmSync } from "node:fs";
import { test } from "node:test";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { checkConfig } from "../../src/server/config.js";
import type { JobRunner, RunContext } from "../../src/server/runner.js";
import { FakeClock } from "../../src/util/clock.js";
import { daemonOf, setup } from "./helpers.js";

const T0 = Date.parse("2026-11-29T10:07:00Z");
const MIN = 60_000;

/** Wraps a runner to count how many of its runs overlap. */
function counting(inner: JobRunner): JobRunner & { max: number; byRepo: Map<string, number> } {
  let now = 0;
  const perRepo = new Map<string, number>();
  const r = {
    max: 0,
    byRepo: new Map<string, number>(),
    async run(ctx: RunContext) {
      now++;
      const n = (perRepo.get(ctx.repository.name) ?? 0) + 1;
      perRepo.set(ctx.repository.name, n);
      r.max = Math.max(r.max, now);
      r.byRepo.set(ctx.repository.name, Math.max(r.byRepo.get(ctx.repository.name) ?? 0, n));
      try {
        return await inner.run(ctx);
      } finally {
        now--;
        perRepo.set(ctx.repository.name, perRepo.get(ctx.repository.name)! - 1);
      }
    },
  };
  return r;
}

test("due backups run one per repository at a time, each recorded with its bytes and restore point; retention follows", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["vm1", "vm2"],
    clock,
    extra: "limits: { jobs: 2, jobs-per-repository: 1, worker-threads: 1 }",
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m
    retention: { keep-last: 2 }`,
  });
  const runner = counting(s.runner);
  const d = daemonOf(t, s, { runner, clock });
  await d.start();
  assert.equal(s.catalog.jobs().length, 4, "a backup and a retention job per VM");
  d.tick();
  await d.idle();
  assert.equal(runner.max, 0, "nothing is due before the first slot");
  for (let round = 1; round <= 3; round++) {
    clock.set(T0 + (15 * round - 7) * MIN);
    d.tick();
    await d.idle();
  }
  assert.equal(runner.max, 1, "jobs-per-repository 1 holds: never two runs on one repository");
  const repo = await Repository.open(new FsStore(s.repoPath));
  t.after(() => repo.close());
  for (const vm of ["vm1", "vm2"]) {
    const backup = s.catalog.jobs().find((j) => j.vm === vm && j.kind === "backup")!;
    const runs = s.catalog.runs(backup.id);
    assert.equal(runs.length, 3, `${vm}: one run per slot`);
    for (const r of runs) {
      assert.equal(r.outcome, "success", `${vm} run ${r.id}: ${r.error}`);
      assert.equal(r.trigger, "schedule");
      assert.ok(r.bytesRead >= 1 << 20, "the image's data was read");
      assert.ok(r.restorePoint?.startsWith(`${vm}/`));
      assert.ok(r.progressTotal > 0 && r.progressDone === r.progressTotal, "progress reached its total");
      assert.ok(s.catalog.logs(r.id).some((l) => /restore point .* created/.test(l.message)));
    }
    assert.ok(runs[0]!.bytesNew < runs[2]!.bytesNew, "later backups of unchanged data add nothing");
    const retention = s.catalog.jobs().find((j) => j.vm === vm && j.kind === "retention")!;
    const rr = s.catalog.runs(retention.id);
    assert.equal(rr.length, 3, "retention after each backup");
    assert.ok(rr.every((r) => r.outcome === "success"));
    const inRepo = (await repo.snapshots(vm)).map((p) => `${p.vm}/${p.time}`);
    assert.equal(inRepo.length, 2, "keep-last 2 applied");
    assert.deepEqual(
      s.catalog.restorePoints({ vm }).map((p) => `${p.vm}/${p.time}`),
      inRepo,
      "the catalog's restore points are the repository's",
    );
    const newest = s.catalog.restorePoints({ vm }).at(-1)!;
    assert.equal(newest.runId, runs[0]!.id, "the newest restore point names the run that made it");
  }
});

test("the host's job limit holds across repositories, and is reached", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["a", "b", "c"],
    clock,
    extra: `limits: { jobs: 2, jobs-per-repository: 2 }`,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m`,
  });
  // A runner that holds each run until three have been asked for or the others ended.
  const gates: Array<() => void> = [];
  const gated: JobRunner = {
    run: () => new Promise((resolve) => gates.push(() => resolve({}))),
  };
  const runner = counting(gated);
  const d = daemonOf(t, s, { runner, clock });
  await d.start();
  clock.set(T0 + 8 * MIN);
  d.tick();
  await new Promise((r) => setImmediate(r));
  assert.equal(d.running().length, 2, "two of three due runs start");
  assert.equal(d.queued().length, 1, "the third waits for a slot");
  gates.shift()!();
  await new Promise((r) => setTimeout(r, 20));
  assert.equal(d.running().length, 2, "the third starts when one ends");
  while (gates.length > 0) {
    gates.shift()!();
    await new Promise((r) => setTimeout(r, 10));
  }
  await d.idle();
  assert.equal(runner.max, 2);
});

test("stop cancels a running job, records it cancelled with its reason, and waits for it", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["vm1"],
    clock,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m`,
  });
  let cleanedUp = false;
  const runner: JobRunner = {
    run: (ctx) =>
      new Promise((_, reject) => {
        ctx.progress.emit({ type: "progress", job: "x", done: 1, total: 4 });
        ctx.signal.addEventListener("abort", () => {
          cleanedUp = true;
          reject(ctx.signal.reason);
        });
      }),
  };
  const d = daemonOf(t, s, { runner, clock });
  await d.start();
  clock.set(T0 + 8 * MIN);
  d.tick();
  assert.equal(d.running().length, 1);
  await d.stop("the daemon received SIGTERM");
  assert.ok(cleanedUp, "the runner saw the abort");
  const [run] = s.catalog.runs(s.catalog.jobs()[0]!.id);
  assert.equal(run!.outcome, "cancelled");
  assert.equal(run!.errorCode, "ABORTED");
  assert.match(run!.error!, /SIGTERM/);
  assert.equal(run!.progressDone, 1, "progress so far is stored");
  assert.ok(s.catalog.logs(run!.id).some((l) => /cancelled: the daemon received SIGTERM/.test(l.message)));
});

test("a backup that fails is recorded failed with the error's code and text; retention does not run", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["gone"],
    clock,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m
    retention: { keep-last: 1 }`,
  });
  rmSync(s.images.gone!);
  const d = daemonOf(t, s, { clock });
  await d.start();
  clock.set(T0 + 8 * MIN);
  d.tick();
  await d.idle();
  const jobs = s.catalog.jobs();
  const [run] = s.catalog.runs(jobs.find((j) => j.kind === "backup")!.id);
  assert.equal(run!.outcome, "failed");
  assert.ok(run!.errorCode && run!.errorCode !== "INTERNAL", `a classified error, got ${run!.errorCode}`);
  assert.match(run!.error!, /gone\.img/, "the error names the missing image");
  assert.equal(s.catalog.runs(jobs.find((j) => j.kind === "retention")!.id).length, 0);
});

test("VMs are listed again: a new VM gets its jobs, one gone is retired, an unreachable adapter's are kept", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: [],
    clock,
    extra: "limits: { jobs: 4, jobs-per-repository: 4 }",
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m`,
  });
  const vm = (name: string) => ({ adapter: "qemu", source: `vm:${name}`, name, state: "running" as const });
  let listed: { vms: ReturnType<typeof vm>[]; unreachable: Array<{ adapter: string; error: string }> } = {
    vms: [vm("web1")],
    unreachable: [],
  };
  const ran: string[] = [];
  const runner: JobRunner = {
    run: async (ctx) => {
      ran.push(`${ctx.job.vm}:${ctx.sources.join(",")}`);
      return {};
    },
  };
  const d = daemonOf(t, s, { runner, clock, listVms: async () => listed });
  await d.start();
  const backups = () =>
    s.catalog
      .jobs()
      .filter((j) => j.kind === "backup")
      .map((j) => j.vm);
  assert.deepEqual(backups(), ["web1"]);
  listed = { vms: [vm("web1"), vm("web2")], unreachable: [] };
  await d.resync();
  assert.deepEqual(backups(), ["web1", "web2"], "web2 appeared");
  clock.set(T0 + 8 * MIN);
  d.tick();
  await d.idle();
  assert.deepEqual(ran.sort(), ["web1:vm:web1", "web2:vm:web2"], "both run at the next slot");
  listed = { vms: [], unreachable: [{ adapter: "qemu", error: "QMP socket refused" }] };
  await d.resync();
  assert.deepEqual(backups(), ["web1", "web2"], "an adapter that can't be asked keeps its VMs");
  listed = { vms: [vm("web2")], unreachable: [] };
  await d.resync();
  assert.deepEqual(backups(), ["web2"], "web1 is gone");
  ran.length = 0;
  clock.set(T0 + 23 * MIN);
  d.tick();
  await d.idle();
  assert.deepEqual(ran, ["web2:vm:web2"], "a retired job is not scheduled");
  const web1 = s.catalog.jobs({ includeRemoved: true }).find((j) => j.vm === "web1" && j.kind === "backup")!;
  assert.ok(web1.removedAt !== null);
  assert.equal(s.catalog.runs(web1.id).length, 1, "its runs stay");
});

test("after downtime the loop runs a missed due time once, and reruns a run a dead daemon left open", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["vm1", "vm2"],
    clock,
    extra: "limits: { jobs: 2, jobs-per-repository: 2 }",
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m`,
  });
  const ran: string[] = [];
  const runner: JobRunner = {
    run: async (ctx) => {
      ran.push(ctx.job.vm);
      return {};
    },
  };
  const first = daemonOf(t, s, { runner, clock });
  await first.start();
  clock.set(T0 + 8 * MIN);
  first.tick();
  await first.idle();
  await first.stop();
  assert.deepEqual(ran.sort(), ["vm1", "vm2"]);
  // vm2's next run is left open by a process that died (pid 999999 does not exist).
  const vm2 = s.catalog.jobs().find((j) => j.vm === "vm2" && j.kind === "backup")!;
  const dead = s.catalog.startRun(vm2.id, { trigger: "schedule", scheduledFor: T0 + 23 * MIN, pid: 999_999 });
  // Down for an hour: four due times of each job passed.
  clock.set(T0 + 68 * MIN);
  ran.length = 0;
  const second = daemonOf(t, s, { runner, clock, isAlive: () => false });
  await second.start();
  await second.idle();
  assert.deepEqual(ran.sort(), ["vm1", "vm2"], "one run per job, not one per missed due time");
  const vm1 = s.catalog.jobs().find((j) => j.vm === "vm1" && j.kind === "backup")!;
  const [missed] = s.catalog.runs(vm1.id);
  assert.equal(missed!.trigger, "missed");
  assert.equal(missed!.scheduledFor, T0 + 68 * MIN, "answering the latest due time that passed");
  assert.equal(s.catalog.run(dead.id)!.outcome, "interrupted");
  const [rerun] = s.catalog.runs(vm2.id);
  assert.equal(rerun!.trigger, "rerun");
  assert.equal(rerun!.rerunOf, dead.id);
  assert.equal(rerun!.outcome, "success");
});

test("reload: a run going on finishes under its configuration; a new policy's jobs come, a changed schedule runs from now, no catch-up", async (t) => {
  const clock = new FakeClock(T0);
  const s = await setup(t, {
    vms: ["vm1"],
    clock,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 15m`,
  });
  let release: () => void = () => {};
  const held = new Promise<void>((r) => {
    release = r;
  });
  const seen: string[] = [];
  const runner: JobRunner = {
    run: async (ctx) => {
      seen.push(`${ctx.policy.name} ${ctx.policy.schedule.text}`);
      await held;
      return {};
    },
  };
  const d = daemonOf(t, s, { runner, clock });
  await d.start();
  const job = s.catalog.jobs()[0]!;
  assert.equal(d.runNow(job.id).status, "started");
  const next = (text: string) => {
    const checked = checkConfig(
      `repositories:\n  main: { path: ${s.repoPath} }\nvms:\n  vm1: { sources: ["file:${s.images.vm1}"] }\npolicies:\n${text}`,
      s.config.file,
    );
    assert.ok(checked.config, JSON.stringify(checked.problems));
    return checked.config;
  };
  // 11:17: the new hourly slot 11:00 has passed; scheduled from the job's creation it would run now.
  clock.advance(70 * MIN);
  await d.reload(
    next(`  p:
    repository: main
    vms: all
    schedule: every 1h
  q:
    repository: main
    vms: all
    schedule: every 30m`),
  );
  assert.deepEqual(
    d
      .entries()
      .map((e) => `${e.job.policy}/${e.job.vm}/${e.job.kind} ${e.policy.schedule.text}`)
      .sort(),
    ["p/vm1/backup every 1h", "q/vm1/backup every 30m"],
  );
  const pNext = d.nextDue(job.id)!;
  assert.ok(pNext > clock.now(), "the changed schedule's next run is after the reload, not a catch-up");
  assert.equal(d.queued().length, 0, "no catch-up run for the change");
  release();
  await d.idle();
  assert.deepEqual(seen, ["p every 15m"], "the run going on kept the schedule it started with");
  assert.equal(s.catalog.lastRun(job.id)?.outcome, "success");
  // Removing a policy retires its jobs and unschedules them.
  await d.reload(
    next(`  q:
    repository: main
    vms: all
    schedule: every 30m`),
  );
  assert.deepEqual(
    d.entries().map((e) => e.job.policy),
    ["q"],
  );
  assert.equal(d.nextDue(job.id), undefined);
});
