import assert from "node:assert/strict";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { jitterOffset, nextDue, nextSlot, parseSchedule } from "./schedule.js";

const at = (iso: string) => Date.parse(iso);
const usage = (pattern: RegExp) => (e: unknown) =>
  isStrataError(e, ErrorCode.USAGE) && pattern.test(e.message);

test("every N: slots aligned to the epoch, strictly after the time given", () => {
  const s = parseSchedule("every 15m");
  assert.deepEqual(s.kind === "every" && s.everyMs, 900_000);
  assert.equal(nextSlot(s, at("2026-11-29T16:07:12Z")), at("2026-11-29T16:15:00Z"));
  assert.equal(nextSlot(s, at("2026-11-29T16:15:00Z")), at("2026-11-29T16:30:00Z"));
  assert.equal(nextSlot(s, at("2026-11-29T16:14:59.999Z")), at("2026-11-29T16:15:00Z"));
  assert.equal(nextSlot(parseSchedule("every 1d"), at("2026-11-29T16:00:00Z")), at("2026-11-30T00:00:00Z"));
  assert.equal(nextSlot(parseSchedule("every  2h"), at("2026-11-29T16:00:00Z")), at("2026-11-29T18:00:00Z"));
});

test("cron expressions: five fields, next match strictly after, in the given time zone", () => {
  const s = parseSchedule("0 2 * * *", { timezone: "UTC" });
  assert.equal(nextSlot(s, at("2026-11-29T01:59:59Z")), at("2026-11-29T02:00:00Z"));
  assert.equal(nextSlot(s, at("2026-11-29T02:00:00Z")), at("2026-11-30T02:00:00Z"));
  const weekdays = parseSchedule("30 8 * * 1-5", { timezone: "UTC" });
  // 2026-11-28 is a Saturday: the next is Monday the 30th.
  assert.equal(nextSlot(weekdays, at("2026-11-28T09:00:00Z")), at("2026-11-30T08:30:00Z"));
  const berlin = parseSchedule("0 2 * * *", { timezone: "Europe/Berlin" });
  assert.equal(
    nextSlot(berlin, at("2026-11-29T00:00:00Z")),
    at("2026-11-29T01:00:00Z"),
    "02:00 CET is 01:00 UTC",
  );
  assert.equal(nextSlot(parseSchedule("@hourly"), at("2026-11-29T16:20:00Z")), at("2026-11-29T17:00:00Z"));
});

test("bad schedules are refused, saying what is wrong", () => {
  assert.throws(() => parseSchedule("every 30s"), usage(/shorter than the shortest, every 1m/));
  assert.throws(() => parseSchedule("every 15 minutes"), usage(/"every N<unit>" with unit s, m, h or d/));
  assert.throws(() => parseSchedule("61 * * * *"), usage(/minute: 61/));
  assert.throws(() => parseSchedule("0 2 * *"), usage(/cron expression of 5 fields/));
  assert.throws(() => parseSchedule("0 0 * * * *"), usage(/5 fields/));
  assert.throws(() => parseSchedule("0 0 31 2 *"), usage(/never matches/));
  assert.throws(() => parseSchedule("daily"), usage(/neither/));
});

test("jitter: a fixed offset per job, within [0, jitter), different between jobs", () => {
  const offsets = Array.from({ length: 200 }, (_, i) => jitterOffset(`web/vm${i}/backup`, 600_000));
  for (const o of offsets) assert.ok(o >= 0 && o < 600_000, `${o} in range`);
  assert.equal(jitterOffset("web/vm1/backup", 600_000), jitterOffset("web/vm1/backup", 600_000));
  assert.ok(new Set(offsets).size > 190, "offsets spread");
  // Spread over the whole window, not bunched: each tenth of it gets some.
  const tenths = new Set(offsets.map((o) => Math.floor(o / 60_000)));
  assert.equal(tenths.size, 10);
  assert.equal(jitterOffset("x", 0), 0);
});

test("nextDue is the next slot plus the job's offset, strictly after the time given", () => {
  const job = { key: "web/web1/backup", schedule: parseSchedule("every 15m"), jitterMs: 120_000 };
  const off = jitterOffset(job.key, job.jitterMs);
  assert.ok(off > 0);
  const slot = at("2026-11-29T16:15:00Z");
  assert.equal(nextDue(job, slot), slot + off, "the 16:15 slot is due at 16:15 + offset");
  assert.equal(nextDue(job, slot + off - 1), slot + off);
  assert.equal(nextDue(job, slot + off), slot + 900_000 + off, "then the next slot's");
  const never = { key: "k", schedule: parseSchedule("every 1m"), jitterMs: 0 };
  assert.equal(nextDue(never, 0), 60_000);
});
