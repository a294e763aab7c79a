import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from "node:fs";
import { createRequire } from "node:module";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import type BetterSqlite3 from "better-sqlite3";
import { FakeClock } from "../util/clock.js";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { Catalog } from "./catalog.js";
import { APPLICATION_ID, MIGRATIONS, SCHEMA_VERSION } from "./schema.js";

const Database = createRequire(import.meta.url)("better-sqlite3") as typeof BetterSqlite3;
const T0 = Date.UTC(2026, 10, 20, 2, 0, 0);

function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-catalog-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

function open(t: TestContext, path: string, clock = new FakeClock(T0)): Catalog {
  const c = Catalog.open(path, { clock });
  t.after(() => c.close());
  return c;
}

test("a new catalog is created 0600 in WAL mode, marked as Strata's, at the current schema version", (t) => {
  const path = join(tempDir(t), "sub", "catalog.db");
  const c = open(t, path);
  assert.equal(c.schemaVersion, SCHEMA_VERSION);
  assert.equal(statSync(path).mode & 0o777, 0o600);
  c.close();
  const raw = new Database(path, { readonly: true });
  t.after(() => raw.close());
  assert.equal(raw.pragma("journal_mode", { simple: true }), "wal");
  assert.equal(raw.pragma("application_id", { simple: true }), APPLICATION_ID);
  assert.equal(raw.pragma("user_version", { simple: true }), SCHEMA_VERSION);
});

test("a missing catalog is not created when asked not to", (t) => {
  const path = join(tempDir(t), "catalog.db");
  assert.throws(
    () => Catalog.open(path, { create: false }),
    (e) => isStrataError(e, ErrorCode.NOT_FOUND) && e.message.includes(path),
  );
});

test("a garbage file is refused as CATALOG_CORRUPT naming it, and left as it was", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const garbage = Buffer.from("this is not a database, just some text a script put here\n".repeat(100));
  writeFileSync(path, garbage);
  assert.throws(
    () => Catalog.open(path),
    (e) =>
      isStrataError(e, ErrorCode.CATALOG_CORRUPT) &&
      e.message.includes(path) &&
      /not an SQLite database/.test(e.message),
  );
  assert.deepEqual(readFileSync(path), garbage);
});

test("a catalog whose header was overwritten is refused as CATALOG_CORRUPT", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const c = Catalog.open(path);
  c.ensureJob({ policy: "p", vm: "web1", kind: "backup", repository: "main", schedule: "every 15m" });
  c.close();
  const bytes = readFileSync(path);
  bytes.write("garbage garbage!", 0);
  writeFileSync(path, bytes);
  assert.throws(
    () => Catalog.open(path),
    (e) => isStrataError(e, ErrorCode.CATALOG_CORRUPT) && e.message.includes(path),
  );
});

test("damage inside a catalog that opens is reported as CATALOG_CORRUPT by the call that meets it", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const c = Catalog.open(path);
  const job = c.ensureJob({ policy: "p", vm: "v", kind: "backup", repository: "main", schedule: null });
  const run = c.startRun(job.id, { trigger: "manual" });
  for (let i = 0; i < 2000; i++) c.log(run.id, "info", `line ${i} ${"x".repeat(200)}`);
  c.close();
  // Overwrite every page but the first (the schema) with garbage.
  const bytes = readFileSync(path);
  const pageSize = bytes.readUInt16BE(16);
  assert.ok(bytes.length > 4 * pageSize, "the catalog has several pages");
  bytes.fill(0xa5, pageSize);
  writeFileSync(path, bytes);
  const damaged = Catalog.open(path);
  t.after(() => damaged.close());
  assert.throws(
    () => damaged.logs(run.id),
    (e) =>
      isStrataError(e, ErrorCode.CATALOG_CORRUPT) && e.message.includes(path) && /damaged/.test(e.message),
  );
});

test("a writer waits for another's write lock, then fails with LOCKED naming the catalog", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const c = Catalog.open(path, { busyTimeoutMs: 200 });
  t.after(() => c.close());
  const other = new Database(path);
  other.exec("BEGIN IMMEDIATE");
  t.after(() => other.close());
  const start = Date.now();
  assert.throws(
    () => c.ensureJob({ policy: "p", vm: "v", kind: "gc", repository: "main", schedule: null }),
    (e) =>
      isStrataError(e, ErrorCode.LOCKED) &&
      e.message.includes(path) &&
      /busy for more than 0\.2 s/.test(e.message),
  );
  assert.ok(Date.now() - start >= 150, "it waited for the lock first");
  // Readers are not blocked by the writer (WAL).
  assert.deepEqual(c.jobs(), []);
  other.exec("COMMIT");
  assert.equal(
    c.ensureJob({ policy: "p", vm: "v", kind: "gc", repository: "main", schedule: null }).kind,
    "gc",
  );
});

test("another program's SQLite database is refused, not migrated", (t) => {
  const path = join(tempDir(t), "other.db");
  const other = new Database(path);
  other.exec("CREATE TABLE things (x INTEGER)");
  other.close();
  assert.throws(
    () => Catalog.open(path),
    (e) => isStrataError(e, ErrorCode.CATALOG_CORRUPT) && /another program/.test(e.message),
  );
  const check = new Database(path, { readonly: true });
  t.after(() => check.close());
  assert.equal(check.pragma("user_version", { simple: true }), 0);
  assert.deepEqual(check.prepare("SELECT name FROM sqlite_schema").all(), [{ name: "things" }]);
});

test("a catalog of a newer schema version is refused with CATALOG_VERSION", (t) => {
  const path = join(tempDir(t), "catalog.db");
  Catalog.open(path).close();
  const raw = new Database(path);
  raw.pragma(`user_version = ${SCHEMA_VERSION + 1}`);
  raw.close();
  assert.throws(
    () => Catalog.open(path),
    (e) => isStrataError(e, ErrorCode.CATALOG_VERSION) && e.message.includes(`version ${SCHEMA_VERSION + 1}`),
  );
});

test("jobs are made once per (policy, vm, kind), updated when their schedule changes, retired when gone", (t) => {
  const clock = new FakeClock(T0);
  const c = open(t, join(tempDir(t), "catalog.db"), clock);
  const a = c.ensureJob({
    policy: "web",
    vm: "web1",
    kind: "backup",
    repository: "main",
    schedule: "every 15m",
  });
  clock.advance(1000);
  const again = c.ensureJob({
    policy: "web",
    vm: "web1",
    kind: "backup",
    repository: "main",
    schedule: "every 15m",
  });
  assert.equal(again.id, a.id);
  assert.equal(again.updatedAt, T0, "an unchanged job keeps its updatedAt");
  const changed = c.ensureJob({
    policy: "web",
    vm: "web1",
    kind: "backup",
    repository: "main",
    schedule: "0 2 * * *",
  });
  assert.equal(changed.id, a.id);
  assert.equal(changed.schedule, "0 2 * * *");
  assert.equal(changed.updatedAt, T0 + 1000);
  const gc = c.ensureJob({ policy: "web", kind: "gc", repository: "main", schedule: null });
  assert.equal(gc.vm, "");
  assert.equal(c.retireJobsExcept([a.id]), 1);
  assert.deepEqual(
    c.jobs().map((j) => j.id),
    [a.id],
  );
  assert.equal(c.jobs({ includeRemoved: true }).length, 2);
  assert.equal(c.job(gc.id)?.removedAt, T0 + 1000);
  // Back in the configuration: the same job again.
  assert.equal(
    c.ensureJob({ policy: "web", kind: "gc", repository: "main", schedule: null }).removedAt,
    null,
  );
  assert.throws(() =>
    c.ensureJob({ policy: "web", kind: "nonsense" as "gc", repository: "main", schedule: null }),
  );
});

test("a run records its progress, bytes, outcome and duration, and ends once", (t) => {
  const clock = new FakeClock(T0);
  const c = open(t, join(tempDir(t), "catalog.db"), clock);
  const job = c.ensureJob({
    policy: "web",
    vm: "web1",
    kind: "backup",
    repository: "main",
    schedule: "every 15m",
  });
  const run = c.startRun(job.id, { trigger: "schedule", scheduledFor: T0 - 5 });
  assert.equal(run.outcome, "running");
  assert.equal(run.endedAt, null);
  assert.equal(run.pid, process.pid);
  assert.deepEqual(
    c.openRuns().map((r) => r.id),
    [run.id],
  );
  c.progress(run.id, 10, 100);
  assert.deepEqual([c.run(run.id)?.progressDone, c.run(run.id)?.progressTotal], [10, 100]);
  clock.advance(90_000);
  const ended = c.endRun(run.id, {
    outcome: "success",
    bytesRead: 1000,
    bytesNew: 300,
    bytesStored: 120,
    restorePoint: "web1/2026-11-20T02:00:00Z",
  });
  assert.equal(ended.outcome, "success");
  assert.equal(ended.durationMs, 90_000);
  assert.equal(ended.endedAt, T0 + 90_000);
  assert.deepEqual([ended.bytesRead, ended.bytesNew, ended.bytesStored], [1000, 300, 120]);
  assert.deepEqual(c.openRuns(), []);
  assert.throws(
    () => c.endRun(run.id, { outcome: "failed" }),
    (e) => isStrataError(e, ErrorCode.INTERNAL),
  );
  const second = c.startRun(job.id, { trigger: "manual" });
  assert.equal(c.lastRun(job.id)?.id, second.id);
  const failed = c.endRun(second.id, {
    outcome: "failed",
    errorCode: "SOURCE_UNREADABLE",
    error: "no such VM",
  });
  assert.deepEqual([failed.errorCode, failed.error], ["SOURCE_UNREADABLE", "no such VM"]);
  assert.deepEqual(
    c.runs(job.id).map((r) => r.id),
    [second.id, run.id],
  );
});

test("run logs come back in order, page by page", (t) => {
  const c = open(t, join(tempDir(t), "catalog.db"));
  const job = c.ensureJob({ policy: "web", vm: "web1", kind: "verify", repository: "main", schedule: null });
  const run = c.startRun(job.id, { trigger: "manual" });
  c.log(run.id, "info", "first");
  c.log(run.id, "warn", "second");
  const all = c.logs(run.id);
  assert.deepEqual(
    all.map((l) => [l.level, l.message]),
    [
      ["info", "first"],
      ["warn", "second"],
    ],
  );
  c.log(run.id, "error", "third");
  assert.deepEqual(
    c.logs(run.id, all[1]!.id).map((l) => l.message),
    ["third"],
  );
  assert.throws(() => c.log(run.id, "loud" as "info", "x"));
});

test("restore points are replaced as a set: new ones added, gone ones removed, the run that made one kept", (t) => {
  const c = open(t, join(tempDir(t), "catalog.db"));
  const repo = { id: "abc123", location: "/backup/strata" };
  const point = (vm: string, time: string) => ({
    vm,
    time,
    timeMs: Date.parse(time),
    mode: "snapshot",
    consistency: "crash-consistent",
    parent: null,
    disks: 1,
    size: 1024,
    bytesRead: 1024,
    bytesNew: 512,
    bytesStored: 100,
    durationMs: 1500,
    host: "h1",
  });
  const job = c.ensureJob({ policy: "web", vm: "web1", kind: "backup", repository: "main", schedule: null });
  const run = c.startRun(job.id, { trigger: "manual" });
  c.putRestorePoint(repo, { ...point("web1", "2026-11-20T02:00:00Z"), runId: run.id });
  const r = c.replaceRestorePoints(repo, [
    point("web1", "2026-11-20T02:00:00Z"),
    point("web1", "2026-11-21T02:00:00Z"),
    point("db1", "2026-11-21T02:00:00Z"),
  ]);
  assert.deepEqual(r, { added: 2, removed: 0, kept: 1 });
  assert.equal(c.restorePoints({ vm: "web1" })[0]?.runId, run.id);
  const r2 = c.replaceRestorePoints(repo, [point("web1", "2026-11-21T02:00:00Z")]);
  assert.deepEqual(r2, { added: 0, removed: 2, kept: 1 });
  assert.deepEqual(
    c.restorePoints().map((p) => `${p.vm}/${p.time}`),
    ["web1/2026-11-21T02:00:00Z"],
  );
  // Another repository's rows are not touched.
  c.replaceRestorePoints({ id: "other", location: "/b2" }, [point("web1", "2026-11-22T02:00:00Z")]);
  assert.equal(c.restorePoints({ repository: "abc123" }).length, 1);
  assert.equal(c.restorePoints().length, 2);
});

test("a second connection reads while a run is written (WAL), and the data survives reopening", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const writer = open(t, path);
  const job = writer.ensureJob({ policy: "p", vm: "v", kind: "backup", repository: "main", schedule: null });
  const run = writer.startRun(job.id, { trigger: "manual" });
  const reader = Catalog.open(path, { readonly: true });
  t.after(() => reader.close());
  assert.equal(reader.openRuns().length, 1);
  writer.endRun(run.id, { outcome: "success" });
  assert.equal(reader.run(run.id)?.outcome, "success");
  writer.close();
  const again = open(t, path);
  assert.equal(again.runs(job.id)[0]?.outcome, "success");
});

test("a version 1 catalog migrates to jobs of kind restore and instant, its runs and logs kept", (t) => {
  const path = join(tempDir(t), "catalog.db");
  const raw = new Database(path);
  raw.exec(MIGRATIONS[0]!);
  raw.pragma(`application_id = ${APPLICATION_ID}`);
  raw.pragma("user_version = 1");
  raw.exec(`INSERT INTO jobs (id, policy, vm, kind, repository, created_at, updated_at) VALUES (7, 'p', 'v', 'backup', 'main', 1, 1);
            INSERT INTO runs (id, job_id, trigger, host, pid, started_at) VALUES (3, 7, 'manual', 'h', 1, 2);
            INSERT INTO run_logs (run_id, time, level, message) VALUES (3, 2, 'info', 'kept');`);
  assert.throws(() =>
    raw.exec(
      "INSERT INTO jobs (policy, vm, kind, repository, created_at, updated_at) VALUES ('x', 'v', 'restore', 'main', 1, 1)",
    ),
  );
  raw.close();
  const c = Catalog.open(path);
  t.after(() => c.close());
  assert.equal(c.schemaVersion, SCHEMA_VERSION);
  assert.equal(c.job(7)?.kind, "backup");
  assert.equal(c.run(3)?.jobId, 7);
  assert.deepEqual(
    c.logs(3).map((l) => l.message),
    ["kept"],
  );
  const restore = c.ensureJob({
    policy: "(api)",
    vm: "v",
    kind: "restore",
    repository: "main",
    schedule: null,
  });
  const instant = c.ensureJob({
    policy: "(api)",
    vm: "v",
    kind: "instant",
    repository: "main",
    schedule: null,
  });
  assert.notEqual(restore.id, instant.id);
  assert.equal(c.startRun(restore.id, { trigger: "manual" }).jobId, restore.id);
  // Foreign keys hold again after the migration: a run of no job is refused.
  assert.throws(() => c.startRun(999, { trigger: "manual" }));
});
