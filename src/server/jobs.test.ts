import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { Catalog } from "../catalog/catalog.js";
import { FakeClock } from "../util/clock.js";
import { checkConfig } from "./config.js";
import { planJobs, syncJobs } from "./jobs.js";
import { recoverAfterRestart, Scheduler } from "./scheduler.js";

const CONFIG = `repositories:
  main: { path: /backup/strata }
  offsite: { path: /mnt/offsite }
policies:
  web:
    repository: main
    vms: { globs: ["web*"] }
    schedule: every 15m
    jitter: 1m
    retention: { keep-daily: 7 }
    verify: { schedule: "0 4 * * *" }
  db:
    repository: offsite
    vms: { tags: [sql] }
    schedule: every 1h
`;

test("policies make a backup and a retention job per VM, and a verify job per policy", () => {
  const config = checkConfig(CONFIG, "strata.yaml").config!;
  const jobs = planJobs(config, [
    { name: "web1" },
    { name: "web2" },
    { name: "db1", tags: ["sql"] },
    { name: "x" },
  ]);
  assert.deepEqual(
    jobs.map((j) => [
      j.policy,
      j.vm,
      j.kind,
      j.repository,
      j.timed?.key ?? null,
      j.timed?.schedule.text ?? null,
    ]),
    [
      ["web", "web1", "backup", "main", "web/web1/backup", "every 15m"],
      ["web", "web1", "retention", "main", null, null],
      ["web", "web2", "backup", "main", "web/web2/backup", "every 15m"],
      ["web", "web2", "retention", "main", null, null],
      ["web", "", "verify", "main", "web//verify", "0 4 * * *"],
      ["db", "db1", "backup", "offsite", "db/db1/backup", "every 1h"],
    ],
  );
  assert.equal(jobs[0]!.timed!.jitterMs, 60_000);
});

test("syncing jobs into the catalog creates, keeps and retires them; the scheduler takes them from there", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-jobs-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const clock = new FakeClock(Date.parse("2026-11-29T10:00:00Z"));
  const catalog = Catalog.open(join(dir, "catalog.db"), { clock });
  t.after(() => catalog.close());
  const config = checkConfig(CONFIG, "strata.yaml").config!;
  const first = syncJobs(catalog, planJobs(config, [{ name: "web1" }, { name: "web2" }]));
  assert.equal(catalog.jobs().length, 5);
  // web2 is gone from the host: its jobs are retired, web1's stay the same rows.
  const second = syncJobs(catalog, planJobs(config, [{ name: "web1" }]));
  assert.equal(second[0]!.job.id, first[0]!.job.id);
  assert.deepEqual(
    catalog
      .jobs()
      .map((j) => `${j.policy}/${j.vm}/${j.kind}`)
      .sort(),
    ["web//verify", "web/web1/backup", "web/web1/retention"],
  );
  assert.equal(catalog.jobs({ includeRemoved: true }).length, 5);
  // The scheduled ones go to the scheduler: nothing is missed when they were just made...
  const scheduler = new Scheduler(clock);
  const timed = second.flatMap(({ job, spec }) => (spec.timed ? [{ job, timed: spec.timed }] : []));
  assert.deepEqual(
    timed.map((x) => x.timed.key),
    ["web/web1/backup", "web//verify"],
  );
  assert.deepEqual(recoverAfterRestart(catalog, scheduler, timed, { clock }), []);
  assert.deepEqual(scheduler.due(), []);
  // ...and the 10:00 slot plus web1's offset (under the 1m jitter) comes due on schedule.
  clock.set(Date.parse("2026-11-29T10:05:00Z"));
  assert.deepEqual(
    scheduler.due().map((d) => [d.key, d.trigger]),
    [["web/web1/backup", "schedule"]],
  );
});
