import assert from "node:assert/strict";
import { test } from "node:test";
import { parseDuration, parseInstant } from "./duration.js";
import { isStrataError } from "./errors.js";

test("durations people write", () => {
  assert.equal(parseDuration("250ms"), 250);
  assert.equal(parseDuration("90s"), 90_000);
  assert.equal(parseDuration("90"), 90_000);
  assert.equal(parseDuration("1.5m"), 90_000);
  assert.equal(parseDuration("24h"), 86_400_000);
  assert.equal(parseDuration("7d"), 7 * 86_400_000);
  for (const bad of ["", "5 minutes", "-5s", "1e3s", "5w"])
    assert.throws(
      () => parseDuration(bad, "--fold"),
      (e: unknown) => isStrataError(e) && /--fold: not a duration/.test(e.message),
    );
});

test("instants: ISO-8601 with a zone, or a time before now", () => {
  const now = Date.UTC(2026, 10, 29, 8, 0, 0);
  assert.equal(parseInstant("2026-11-29T08:01:23.250Z", now), Date.UTC(2026, 10, 29, 8, 1, 23, 250));
  assert.equal(parseInstant("2026-11-29T09:01:23+01:00", now), Date.UTC(2026, 10, 29, 8, 1, 23));
  assert.equal(parseInstant("-90s", now), now - 90_000);
  assert.equal(parseInstant("-1.5h", now), now - 5_400_000);
  // A time without its zone would depend on the host's: refused.
  for (const bad of ["2026-11-29T08:01:23", "yesterday", "2026-11-29", "+90s"])
    assert.throws(() => parseInstant(bad, now), /not an instant/);
});
