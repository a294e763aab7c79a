// A backup reader that stalls (the strata process stopped outright, the extreme of a slow
// repository) never stalls the guest: copy-before-write keeps the old data in the local fleecing
// image, and guest writes go on at full speed. The backup then completes, consistent.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { startStrata, strataOk, tempDir } from "../helpers/cli.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm } from "../helpers/vm.js";

describe("a stalled backup reader", { timeout: 300_000 }, () => {
  test("does not slow the guest's writes, and the backup still completes consistent", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "64M" }],
      workload: ["/dev/vda"],
      wlsize: "32M",
      rate: 100,
    });
    const seqBefore = await g.waitSeq(40);
    const child = startStrata(["backup", "--repo", repo, "--vm", "slow", "--json", `qmp:${g.vm.qmpSocket}`], {
      env: { STRATA_STATE_DIR: state },
    });
    const done = new Promise<number>((r) => child.on("exit", (code) => r(code ?? 1)));
    const stateFile = join(state, "slow.json");
    const exportsUp = () =>
      existsSync(stateFile) &&
      (() => {
        try {
          return (
            JSON.parse(readFileSync(stateFile, "utf8")) as { items: Array<{ kind: string }> }
          ).items.some((i) => i.kind === "export");
        } catch {
          return false;
        }
      })();
    while (!exportsUp()) {
      if (child.exitCode !== null) throw new Error("the backup ended before its exports were up");
      await sleep(2);
    }
    // The point in time is cut and exported: now the reader stops for 4 s.
    child.kill("SIGSTOP");
    const consoleAt = (await g.vm.console()).length;
    // Console summaries come every 20 records: the true seq may be up to 20 ahead of this.
    const seqAtStop = await g.seq();
    await sleep(4000);
    const seqAfter = await g.seq();
    child.kill("SIGCONT");
    const stalled = parseLatencySummaries((await g.vm.console()).slice(consoleAt));
    const maxUs = Math.max(...stalled.map((s) => s.maxUs));
    t.diagnostic(
      `while the reader was stopped: ${seqAfter - seqAtStop} records written, worst write ${maxUs} us`,
    );
    assert.ok(seqAfter - seqAtStop >= 150, `only ${seqAfter - seqAtStop} records in 4 s at 100/s`);
    assert.ok(maxUs < 1_000_000, `a guest write took ${maxUs} us while the reader was stopped`);
    assert.equal(await done, 0, "the backup completes after the stall");
    const out = join(dir, "out");
    await strataOk(["restore", "--repo", repo, "slow/latest", "--target", out, "--format", "raw"]);
    const r = await verifyRecords(join(out, "vblk0.raw"));
    assert.ok(r.gapFree, JSON.stringify(r).slice(0, 300));
    assert.ok(
      r.lastSeq >= seqBefore && r.lastSeq <= seqAtStop + 25,
      `cut at ${r.lastSeq}, reader stopped at ${seqAtStop}`,
    );
  });
});
