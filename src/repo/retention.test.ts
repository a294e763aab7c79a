import assert from "node:assert/strict";
import { test } from "node:test";
import { applyRetention, isoWeek } from "./retention.js";

// Local-time dates at noon, so no period boundary is near.
const day = (y: number, m: number, d: number, h = 12) => new Date(y, m - 1, d, h).getTime();

test("keep-last keeps the newest n", () => {
  const items = [1, 2, 3, 4, 5].map((d) => day(2026, 1, d));
  const r = applyRetention(items, { last: 2 }, (t) => t);
  assert.deepEqual(
    r.keep.map((k) => k.item),
    [day(2026, 1, 5), day(2026, 1, 4)],
  );
  assert.equal(r.remove.length, 3);
});

test("daily keeps the newest of each of the last n days that have one", () => {
  const items = [
    day(2026, 1, 1, 9),
    day(2026, 1, 1, 18),
    day(2026, 1, 2, 9),
    day(2026, 1, 4, 9),
    day(2026, 1, 4, 20),
  ];
  const r = applyRetention(items, { daily: 2 }, (t) => t);
  assert.deepEqual(
    r.keep.map((k) => k.item),
    [day(2026, 1, 4, 20), day(2026, 1, 2, 9)],
  );
});

test("rules combine, and each kept item says why", () => {
  const items: number[] = [];
  for (let m = 1; m <= 12; m++) for (const d of [1, 15]) items.push(day(2025, m, d));
  const r = applyRetention(items, { last: 1, weekly: 2, monthly: 3, yearly: 5 }, (t) => t);
  const newest = r.keep[0]!;
  assert.equal(newest.item, day(2025, 12, 15));
  assert.deepEqual(newest.reasons, ["last", "weekly", "monthly", "yearly"]);
  assert.deepEqual(
    r.keep.map((k) => k.item),
    [day(2025, 12, 15), day(2025, 12, 1), day(2025, 11, 15), day(2025, 10, 15)],
  );
  assert.equal(r.keep.length + r.remove.length, items.length);
});

test("hourly and ISO weeks", () => {
  assert.equal(isoWeek(new Date(2026, 0, 1)), "2026-W1");
  assert.equal(isoWeek(new Date(2027, 0, 1)), "2026-W53");
  assert.equal(isoWeek(new Date(2024, 11, 30)), "2025-W1");
  const items = [day(2026, 3, 3, 10), day(2026, 3, 3, 10) + 60_000, day(2026, 3, 3, 11)];
  assert.equal(applyRetention(items, { hourly: 5 }, (t) => t).keep.length, 2);
});
