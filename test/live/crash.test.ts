// Strata killed (kill -9) at several points of a live backup: the VM keeps running and writing,
// `strata doctor` finds what was left, `doctor --fix` removes it (checked through QMP and the
// agent), and the next backup works and restores a gap-free prefix.
import assert from "node:assert/strict";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { mkdir } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { QgaClient } from "../../src/hypervisor/qemu/qga.js";
import { startStrata, strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, leftovers, qmpOnce } from "../helpers/vm.js";

function stateItems(path: string): string[] {
  if (!existsSync(path)) return [];
  try {
    return (JSON.parse(readFileSync(path, "utf8")) as { items: Array<{ kind: string }> }).items.map(
      (i) => i.kind,
    );
  } catch {
    return [];
  }
}

describe("kill -9 during a live backup", { timeout: 400_000 }, () => {
  test("leaves the VM running; doctor --fix leaves nothing behind; the next backup works", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const env = { STRATA_STATE_DIR: state };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "192M" },
        { id: "vblk1", format: "qcow2", size: "32M", ext4: true },
      ],
      workload: ["/dev/vda"],
      data: "/dev/vdb",
      wlsize: "8M",
    });
    const src = `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;
    await g.waitSeq(20);
    const first = summary(await strataOk(["backup", "--repo", repo, "--vm", "k", "--json", src], { env }));
    const stateFile = join(state, "k.json");

    const points: Array<[string, () => boolean]> = [
      ["fleecing node created", () => stateItems(stateFile).includes("node")],
      ["exports up", () => stateItems(stateFile).includes("export")],
    ];
    for (const [label, cond] of points) {
      const child = startStrata(["backup", "--repo", repo, "--vm", "k", src], { env });
      const exited = new Promise((r) => child.on("exit", r));
      const end = Date.now() + 60_000;
      while (!cond()) {
        if (Date.now() > end) throw new Error(`never reached: ${label}`);
        if (child.exitCode !== null) throw new Error(`backup ended before: ${label}`);
        await sleep(2);
      }
      child.kill("SIGKILL");
      await exited;
      // The guest keeps running and writing.
      const before = await g.seq();
      await g.waitSeq(before + 10);
      const l = await leftovers(g.vm, state);
      assert.equal(l.status, "running");
      assert.ok(l.files.includes("k.json"), `${label}: the state file records the run`);
      const report = await strata(["doctor", "--json"], { env });
      assert.equal(report.code, 1, `${label}: doctor without --fix reports and fails`);
      assert.match(report.stderr, /leftover\(s\) found/);
      const fixed = summary<{ clean: boolean; findings: Array<{ what: string }> }>(
        await strataOk(["doctor", "--fix", "--json"], { env }),
      );
      assert.equal(fixed.clean, true);
      const after = await leftovers(g.vm, state);
      assert.deepEqual(after.nodes, [], label);
      assert.deepEqual(after.exports, [], label);
      assert.deepEqual(after.jobs, [], label);
      assert.deepEqual(after.files, [], label);
      assert.equal(after.frozen, "thawed");
      // The previous checkpoint stays; the dead run's new bitmap and the temporary one are gone.
      assert.deepEqual(after.bitmaps.disk0!.filter((n) => n.startsWith("strata-")).length, 1, label);
    }

    // What other tools leave is reported with its size, and never touched.
    await qmpOnce(g.vm.qmpSocket, "block-dirty-bitmap-add", {
      node: "disk0",
      name: "other-tool",
      granularity: 65536,
    });
    const foreign = summary<{
      findings: Array<{ owner: string; what: string; bytes?: number; fixed: boolean }>;
    }>(await strataOk(["doctor", "--fix", "--json", "--vm", "k", `qmp:${g.vm.qmpSocket}`], { env }));
    const other = foreign.findings.find((f) => f.what.includes("other-tool"));
    assert.ok(other, JSON.stringify(foreign.findings));
    assert.equal(other.owner, "foreign");
    assert.equal(other.fixed, false);
    assert.equal(other.bytes, (192 * 1024 * 1024) / 65536 / 8);
    assert.ok((await leftovers(g.vm, state)).bitmaps.disk0!.includes("other-tool"));

    // A freeze that a dead run left (recorded before it froze): doctor thaws it.
    const qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 10_000 });
    await mkdir(state, { recursive: true });
    writeFileSync(
      stateFile,
      JSON.stringify({
        vm: "k",
        qmp: g.vm.qmpSocket,
        qga: g.vm.qgaSocket,
        pid: 999999,
        started: new Date().toISOString(),
        items: [{ kind: "freeze" }],
      }),
    );
    await qga.fsfreezeFreeze();
    assert.equal(await qga.fsfreezeStatus(), "frozen");
    await qga.close();
    const fix = await strataOk(["doctor", "--fix"], { env });
    assert.match(fix.stdout, /removed/);
    assert.equal((await leftovers(g.vm, state)).frozen, "thawed");

    // The next backup works, incrementally from the last good restore point.
    const seq = await g.seq();
    const next = summary<{ id: string; parent: string; disks: Array<{ name: string; readMode: string }> }>(
      await strataOk(["backup", "--repo", repo, "--vm", "k", "--json", src], { env }),
    );
    assert.equal(next.parent, first.time);
    assert.equal(next.disks.find((d) => d.name === "vblk0")!.readMode, "changed");
    const out = join(dir, "out");
    await strataOk(["restore", "--repo", repo, next.id, "--target", out, "--format", "raw"]);
    const r = await verifyRecords(join(out, "vblk0.raw"));
    assert.ok(r.gapFree);
    assert.ok(r.lastSeq >= seq);
    assert.equal(summary(await strataOk(["verify", "--repo", repo, "--json"])).ok, true);
  });
});
