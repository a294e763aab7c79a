import assert from "node:assert/strict";
import { spawnSync } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { FakeClock } from "../util/clock.js";
import { isStrataError } from "../util/errors.js";
import { FsStore } from "./fs-store.js";
import { isStale, Lock, type LockInfo, listLocks, STALE_AFTER_MS } from "./locks.js";

function store(t: import("node:test").TestContext): FsStore {
  const dir = mkdtempSync(join(tmpdir(), "strata-locks-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return new FsStore(dir);
}

/** A PID that certainly belonged to a process that has exited. */
function deadPid(): number {
  const r = spawnSync(process.execPath, ["-e", "process.stdout.write(String(process.pid))"]);
  return Number(r.stdout.toString());
}

test("exclusive conflicts with read and exclusive, never with backup", async (t) => {
  const s = store(t);
  const clock = new FakeClock(Date.now());
  const gc = await Lock.acquire(s, clock, "exclusive", "gc");
  await assert.rejects(
    Lock.acquire(s, clock, "read", "verify"),
    (e) => isStrataError(e, "LOCKED") && /by gc/.test(e.message),
  );
  await assert.rejects(Lock.acquire(s, clock, "exclusive", "forget"), (e) => isStrataError(e, "LOCKED"));
  const b = await Lock.acquire(s, clock, "backup", "backup of x", "x/t");
  await gc.release();
  const r1 = await Lock.acquire(s, clock, "read", "restore");
  const r2 = await Lock.acquire(s, clock, "read", "verify");
  assert.equal((await listLocks(s, clock)).length, 3);
  // Two writers may not claim the same restore point.
  await assert.rejects(Lock.acquire(s, clock, "backup", "backup of x", "x/t"), (e) =>
    isStrataError(e, "LOCKED"),
  );
  for (const l of [b, r1, r2]) await l.release();
  assert.equal((await listLocks(s, clock)).length, 0);
});

test("a lock whose process died is stale and gives way", async (t) => {
  const s = store(t);
  const clock = new FakeClock(Date.now());
  const held = await Lock.acquire(s, clock, "exclusive", "gc");
  assert.equal(isStale(held.info, clock), false);
  const dead: LockInfo = { ...held.info, pid: deadPid() };
  assert.equal(isStale(dead, clock), true);
  // A reused PID (alive, but a different process start) is stale too.
  assert.equal(isStale({ ...held.info, pidStart: "1" }, clock), true);
  await s.put(`locks/${held.info.id}`, Buffer.from(JSON.stringify(dead)));
  const next = await Lock.acquire(s, clock, "exclusive", "forget");
  assert.deepEqual(
    (await listLocks(s, clock)).map((l) => l.id),
    [next.info.id],
  );
  await next.release();
});

test("a lock from another host is stale once it stops being refreshed", () => {
  const clock = new FakeClock(1_000_000_000);
  const info: LockInfo = {
    id: "x",
    kind: "exclusive",
    host: "elsewhere",
    pid: 1,
    pidStart: "",
    started: clock.now(),
    refreshed: clock.now(),
    what: "gc",
  };
  clock.advance(STALE_AFTER_MS - 1);
  assert.equal(isStale(info, clock), false);
  clock.advance(2);
  assert.equal(isStale(info, clock), true);
});

test("a lock object that is not a lock (wrong types, a time that is not a number) is never used", async (t) => {
  const s = store(t);
  const clock = new FakeClock(Date.now());
  const good = await Lock.acquire(s, clock, "backup", "backup web1");
  t.after(() => good.release());
  const bad = [
    { ...good.info, id: "x1", started: "yesterday" },
    { ...good.info, id: "x2", kind: "superuser" },
    { ...good.info, id: "x3", pid: -1 },
    { ...good.info, id: "../x4" },
    ["not", "an", "object"],
  ];
  for (const [i, doc] of bad.entries())
    await s.put(`locks/hostile-${i}`, Buffer.from(JSON.stringify(doc)), { durable: true });
  const listed = await listLocks(s, clock, false);
  assert.deepEqual(
    listed.map((l) => l.id),
    [good.info.id],
    "only the well-formed lock is listed",
  );
  for (const l of listed) assert.equal(typeof l.started, "number");
});
