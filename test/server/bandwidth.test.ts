// Bandwidth limits measured: a backup run by the daemon with job-bandwidth reads its disk at that
// rate (within 10 %, timed from the run's own progress events), while the same backup without a
// limit reads much faster; a host-wide bandwidth shared by two jobs at once holds for both together.
import assert from "node:assert/strict";
import { test } from "node:test";
import type { Daemon, RunEvent } from "../../src/server/service.js";
import { daemonOf, HOURLY_ALL, setup } from "./helpers.js";

const MiB = 1 << 20;

/** Starts a job now and times its reads from its progress events: MiB/s between 10 % and the end. */
async function measure(d: Daemon, jobIds: number[]): Promise<{ rate: number; bytes: number }> {
  const points: Array<{ t: number; done: number }> = [];
  const per = new Map<number, number>();
  let total = 0;
  for (const id of jobIds) {
    const r = d.runNow(id);
    assert.equal(r.status, "started");
    if (r.status !== "started") continue;
    d.subscribe(r.run.id, (e: RunEvent) => {
      if (e.type !== "progress") return;
      per.set(r.run.id, e.done);
      total = e.total * jobIds.length;
      points.push({ t: performance.now(), done: [...per.values()].reduce((a, b) => a + b, 0) });
    });
  }
  await d.idle();
  const from = points.find((p) => p.done >= total * 0.1)!;
  const to = points.at(-1)!;
  return { rate: (to.done - from.done) / MiB / ((to.t - from.t) / 1000), bytes: to.done };
}

test("job-bandwidth holds a backup's reads to its MiB/s within 10 %; without it the read is faster", async (t) => {
  const s = await setup(t, {
    vms: ["free", "capped"],
    mib: 24,
    extra: "limits: { jobs: 1 }",
    policies: `  open:
    repository: main
    vms: { names: [free] }
    schedule: every 1h
  slow:
    repository: main
    vms: { names: [capped] }
    schedule: every 1h
    limits: { job-bandwidth: 8 }`,
  });
  const d = daemonOf(t, s);
  await d.start();
  const job = (vm: string) => s.catalog.jobs().find((j) => j.vm === vm && j.kind === "backup")!.id;
  const free = await measure(d, [job("free")]);
  const capped = await measure(d, [job("capped")]);
  t.diagnostic(`unthrottled ${free.rate.toFixed(1)} MiB/s, job-bandwidth 8: ${capped.rate.toFixed(2)} MiB/s`);
  assert.equal(capped.bytes, 24 * MiB);
  assert.ok(Math.abs(capped.rate - 8) <= 0.8, `8 MiB/s within 10 %: ${capped.rate.toFixed(2)} MiB/s`);
  assert.ok(
    free.rate > 16,
    `without a limit the read is faster than twice the limit: ${free.rate.toFixed(1)}`,
  );
  const run = s.catalog.runs(job("capped"))[0]!;
  assert.equal(run.outcome, "success");
  assert.ok(s.catalog.logs(run.id).some((l) => /reads at most 8 MiB\/s/.test(l.message)));
});

test("the host's bandwidth is shared: two jobs at once read together at its MiB/s within 10 %", async (t) => {
  const s = await setup(t, {
    vms: ["a", "b"],
    // Six seconds at the limit: a stall of the event loop on a loaded host delays the progress
    // events the rate is timed from, and weighs less the longer the run.
    mib: 24,
    extra: "limits: { jobs: 2, jobs-per-repository: 2, bandwidth: 8 }",
    policies: HOURLY_ALL,
  });
  const d = daemonOf(t, s);
  await d.start();
  const ids = s.catalog
    .jobs()
    .filter((j) => j.kind === "backup")
    .map((j) => j.id);
  const both = await measure(d, ids);
  t.diagnostic(`two jobs under bandwidth 8: ${both.rate.toFixed(2)} MiB/s together`);
  assert.equal(both.bytes, 48 * MiB);
  assert.ok(Math.abs(both.rate - 8) <= 0.8, `8 MiB/s together within 10 %: ${both.rate.toFixed(2)} MiB/s`);
});

test("a throttled backup is cancelled promptly while it waits for bandwidth, and leaves no restore point", async (t) => {
  const s = await setup(t, {
    vms: ["vm1"],
    mib: 24,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 1h
    limits: { job-bandwidth: 1 }`,
  });
  const d = daemonOf(t, s);
  await d.start();
  const r = d.runNow(s.catalog.jobs()[0]!.id);
  assert.equal(r.status, "started");
  if (r.status !== "started") return;
  await new Promise((res) => setTimeout(res, 500));
  const t0 = performance.now();
  assert.ok(d.cancel(r.run.id, "by the test"));
  await d.idle();
  const waited = performance.now() - t0;
  const run = s.catalog.run(r.run.id)!;
  assert.equal(run.outcome, "cancelled");
  assert.equal(run.errorCode, "ABORTED");
  assert.ok(waited < 2000, `cancelled in ${waited.toFixed(0)} ms, not after the whole read (24 s)`);
  assert.deepEqual(s.catalog.restorePoints({ vm: "vm1" }), []);
});
