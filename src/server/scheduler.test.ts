import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { Catalog } from "../catalog/catalog.js";
import { FakeClock } from "../util/clock.js";
import { jitterOffset, jobKey, parseSchedule } from "./schedule.js";
import { interruptDeadRuns, recoverAfterRestart, Scheduler } from "./scheduler.js";

const at = (iso: string) => Date.parse(iso);
const MIN = 60_000;

const every15 = (key: string, jitterMs = 0) => ({ key, schedule: parseSchedule("every 15m"), jitterMs });

function catalog(t: TestContext, clock: FakeClock): Catalog {
  const dir = mkdtempSync(join(tmpdir(), "strata-sched-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const c = Catalog.open(join(dir, "catalog.db"), { clock });
  t.after(() => c.close());
  return c;
}

test("jobs come due at their slots, each once per due() however late the call", () => {
  const clock = new FakeClock(at("2026-11-29T16:07:00Z"));
  const s = new Scheduler(clock);
  s.add(every15("a"), clock.now());
  s.add({ key: "b", schedule: parseSchedule("0 17 * * *", { timezone: "UTC" }), jitterMs: 0 }, clock.now());
  assert.deepEqual(s.due(), [], "nothing is due at once");
  assert.equal(s.nextWakeup(), at("2026-11-29T16:15:00Z"));
  clock.set(at("2026-11-29T16:15:00Z"));
  assert.deepEqual(s.due(), [{ key: "a", trigger: "schedule", scheduledFor: at("2026-11-29T16:15:00Z") }]);
  assert.deepEqual(s.due(), [], "a slot is returned once");
  // The loop was stuck for 50 minutes: one run of a, answering the latest slot; b's 17:00 too.
  clock.set(at("2026-11-29T17:05:00Z"));
  assert.deepEqual(s.due(), [
    { key: "a", trigger: "schedule", scheduledFor: at("2026-11-29T16:30:00Z") },
    { key: "b", trigger: "schedule", scheduledFor: at("2026-11-29T17:00:00Z") },
  ]);
  assert.equal(s.nextOf("a"), at("2026-11-29T17:15:00Z"));
  assert.equal(s.nextOf("b"), at("2026-11-30T17:00:00Z"));
  s.remove("a");
  assert.equal(s.nextWakeup(), at("2026-11-30T17:00:00Z"));
});

test("jitter moves each job's due times by its own fixed offset", () => {
  const clock = new FakeClock(at("2026-11-29T16:00:00Z"));
  const s = new Scheduler(clock);
  const jobs = ["web/web1/backup", "web/web2/backup", "web/web3/backup"].map((k) => every15(k, 5 * MIN));
  for (const j of jobs) s.add(j, clock.now());
  const dues: number[] = [];
  while (dues.length < 6) {
    clock.set(s.nextWakeup()!);
    for (const d of s.due()) dues.push(d.scheduledFor);
  }
  const expected = jobs
    // The 16:00 slot's due time is 16:00 plus the offset, after the start: it counts.
    .flatMap((j) =>
      [0, 1].map((n) => at("2026-11-29T16:00:00Z") + n * 15 * MIN + jitterOffset(j.key, 5 * MIN)),
    )
    .sort((a, b) => a - b);
  assert.deepEqual(dues, expected);
  assert.ok(new Set(dues.map((d) => d % (15 * MIN))).size > 1, "the jobs do not all start together");
});

test("a schedule missed while the daemon was down runs exactly once on start", () => {
  const clock = new FakeClock(at("2026-11-29T16:40:00Z"));
  const s = new Scheduler(clock);
  // Last run answered 12:00; 12:15 ... 16:30 passed while the daemon was down.
  s.add(every15("a"), at("2026-11-29T12:00:00Z"));
  // Last run answered 16:30: nothing missed.
  s.add(every15("b"), at("2026-11-29T16:30:00Z"));
  assert.equal(s.nextWakeup(), clock.now(), "wakes at once for the missed run");
  assert.deepEqual(s.due(), [{ key: "a", trigger: "missed", scheduledFor: at("2026-11-29T16:30:00Z") }]);
  assert.deepEqual(s.due(), []);
  clock.set(at("2026-11-29T16:45:00Z"));
  assert.deepEqual(
    s.due().map((d) => [d.key, d.trigger]),
    [
      ["a", "schedule"],
      ["b", "schedule"],
    ],
  );
});

test("interrupted runs are found in the catalog, marked, and rerun once; missed ones run once; others wait", (t) => {
  const clock = new FakeClock(at("2026-11-29T10:00:00Z"));
  const c = catalog(t, clock);
  const job = (vm: string) =>
    c.ensureJob({ policy: "web", vm, kind: "backup", repository: "main", schedule: "every 15m" });
  const [j1, j2, j3, j4] = [job("web1"), job("web2"), job("web3"), job("web4")];
  // web1 was running at 10:15 when the daemon (pid 111) died.
  const dead = c.startRun(j1.id, {
    trigger: "schedule",
    scheduledFor: at("2026-11-29T10:15:00Z"),
    pid: 111,
    host: "h1",
  });
  // web2 finished its 10:15 run; the 10:30 due time passes while the daemon is down.
  clock.set(at("2026-11-29T10:15:00Z"));
  const ok = c.startRun(j2.id, {
    trigger: "schedule",
    scheduledFor: at("2026-11-29T10:15:00Z"),
    pid: 111,
    host: "h1",
  });
  clock.advance(MIN);
  c.endRun(ok.id, { outcome: "success" });
  // web3 ran for 10:30 before the daemon stopped, and is being backed up by hand right now, by a live process (pid 222): nothing to catch up.
  clock.set(at("2026-11-29T10:30:00Z"));
  const ran = c.startRun(j3.id, { trigger: "schedule", scheduledFor: clock.now(), pid: 111, host: "h1" });
  c.endRun(ran.id, { outcome: "success" });
  const manual = c.startRun(j3.id, { trigger: "manual", pid: 222, host: "h1" });
  // web4 never ran; it was made at 10:00, so its 10:15 and 10:30 due times were missed.
  clock.set(at("2026-11-29T10:37:00Z"));
  const s = new Scheduler(clock);
  const timed = (j: typeof j1) => ({ job: j, timed: every15(jobKey(j)) });
  const interrupted = recoverAfterRestart(c, s, [timed(j1), timed(j2), timed(j3), timed(j4)], {
    clock,
    host: "h1",
    isAlive: (pid) => pid === 222,
  });
  assert.deepEqual(
    interrupted.map((r) => r.id),
    [dead.id],
  );
  const marked = c.run(dead.id)!;
  assert.equal(marked.outcome, "interrupted");
  assert.equal(marked.endedAt, clock.now());
  assert.match(marked.error!, /pid 111/);
  assert.match(c.logs(dead.id)[0]!.message, /interrupted/);
  assert.equal(c.run(manual.id)!.outcome, "running", "a live process's run is left alone");
  assert.deepEqual(s.due(), [
    { key: "web/web1/backup", trigger: "rerun", scheduledFor: at("2026-11-29T10:30:00Z"), rerunOf: dead.id },
    { key: "web/web2/backup", trigger: "missed", scheduledFor: at("2026-11-29T10:30:00Z") },
    { key: "web/web4/backup", trigger: "missed", scheduledFor: at("2026-11-29T10:30:00Z") },
  ]);
  assert.deepEqual(s.due(), [], "each runs once");
  assert.deepEqual(
    c.openRuns().map((r) => r.id),
    [manual.id],
  );
  // A second start finds nothing more to recover.
  assert.deepEqual(interruptDeadRuns(c, { clock, host: "h1", isAlive: (pid) => pid === 222 }), []);
});

test("a run recorded by another host is taken as interrupted: its process can't be checked", (t) => {
  const clock = new FakeClock(at("2026-11-29T10:00:00Z"));
  const c = catalog(t, clock);
  const j = c.ensureJob({ policy: "p", vm: "v", kind: "verify", repository: "main", schedule: "every 1h" });
  const r = c.startRun(j.id, {
    trigger: "schedule",
    scheduledFor: clock.now(),
    pid: process.pid,
    host: "old-host",
  });
  const out = interruptDeadRuns(c, { clock, host: "new-host", isAlive: () => true });
  assert.deepEqual(
    out.map((x) => x.id),
    [r.id],
  );
  assert.match(out[0]!.error!, /host old-host/);
});
