// The live bench's derived figures (ms per changed MiB, changed MiB/s, the fitted line) from
// measured values: rounds merge to the fastest time and the mean bytes, and the derivations
// recover a known linear cost.
import assert from "node:assert/strict";
import { test } from "node:test";
import { type LiveSample, liveFigures } from "./live.js";
import { MiB } from "./measure.js";

const near = (got: number | undefined, want: number, what: string) =>
  assert.ok(got !== undefined && Math.abs(got - want) < 1e-9, `${what}: ${got}, expected ${want}`);

/** A round whose backups cost `fixedS` plus `msPerMiB` per MiB read, storing `storedRatio` of it. */
function round(fixedS: number, msPerMiB: number, storedRatio: number): LiveSample[] {
  return [0, 4, 16, 64, 256].map((mib) => ({
    writtenMiB: mib,
    wall: fixedS + (mib * msPerMiB) / 1000,
    cpu: fixedS + mib / 100,
    bytesRead: mib * MiB,
    bytesStored: mib * MiB * storedRatio + 40_000,
  }));
}

test("figures come from the fastest round's times and the mean of the rounds' bytes", () => {
  // The fast round: 0.5 s fixed, 4 ms per MiB; a slow round is slower everywhere.
  const f = liveFigures([round(1.5, 6, 1), round(0.5, 4, 0.5), round(0.9, 5, 0.75)]);
  near(f.overheadS, 0.5, "fixed cost");
  assert.deepEqual(f.overheadRangeS, [0.5, 1.5]);
  near(f.fit.interceptS, 0.5, "intercept");
  near(f.fit.msPerMiB, 4, "slope");
  const at = (mib: number) => f.rows.find((r) => r.writtenMiB === mib)!;
  assert.equal(at(0).msPerMiB, undefined);
  assert.equal(at(0).changedMiBps, undefined);
  near(at(0).timesOverhead, 1, "0-change over itself");
  for (const mib of [4, 16, 64, 256]) near(at(mib).msPerMiB, 4, `ms/MiB at ${mib}`);
  near(at(256).wall, 0.5 + 1.024, "wall at 256");
  near(at(256).changedMiBps, 256 / 1.524, "MiB/s at 256");
  near(at(256).timesOverhead, 1.524 / 0.5, "256 over 0-change");
  near(at(64).bytesStored, 64 * MiB * 0.75 + 40_000, "mean stored bytes");
  near(at(64).cpu, 0.5 + 0.64, "CPU of the fastest round");
});

test("rounds that measured different change sizes, or no 0-change backup, are refused", () => {
  const a = round(0.5, 4, 1);
  const b = round(0.5, 4, 1).reverse();
  assert.throws(() => liveFigures([a, b]), /disagree on the change size/);
  assert.throws(() => liveFigures([a.slice(1)]), /no 0-change incremental/);
  assert.throws(() => liveFigures([]), /no samples/);
});
