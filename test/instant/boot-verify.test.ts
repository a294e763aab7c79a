// Boot verification of live backups of the test guest (TCG): a good restore point boots as an
// isolated clone (its NIC on a private hub), its guest agent answers and the check command run
// through the agent (the ext4 data disk is mounted and holds the guest's boot marker) exits 0;
// a restore point taken after the data disk's first 64 KiB (superblock, group descriptors) were
// zeroed fails (the guest's boot cannot mount it, the check says so); a timeout shorter than the
// boot fails with a clear TIMEOUT. Each result is recorded with its restore point in the catalog
// and shown by strata snapshots; the daemon's boot-verify step (the real job runner) fails the
// damaged newest point the same way. After each verification nothing is left: no QEMU, no
// serving process, no overlay, record or run file.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { readdirSync, readFileSync } from "node:fs";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { describe, type TestContext, test } from "node:test";
import { promisify } from "node:util";
import { Catalog } from "../../src/catalog/catalog.js";
import { buildRegistry } from "../../src/cli/adapters.js";
import { checkConfig } from "../../src/server/config.js";
import { createJobRunner } from "../../src/server/runner.js";
import { isStrataError } from "../../src/util/errors.js";
import { BIN, strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm } from "../helpers/vm.js";

const run = promisify(execFile);

/** Processes whose command line mentions `needle` (QEMU with overlays there, strata serve of the repository). */
function processesMentioning(needle: string): string[] {
  const found: string[] = [];
  for (const pid of readdirSync("/proc").filter((p) => /^\d+$/.test(p))) {
    if (Number(pid) === process.pid) continue;
    try {
      const cmd = readFileSync(`/proc/${pid}/cmdline`, "utf8").replaceAll("\0", " ");
      const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
      if (cmd.includes(needle) && stat.charAt(stat.lastIndexOf(")") + 2) !== "Z")
        found.push(`${pid}: ${cmd}`);
    } catch {
      // gone meanwhile
    }
  }
  return found;
}

/** Every file under `dir`, relative. */
async function filesUnder(dir: string): Promise<string[]> {
  const entries = await readdir(dir, { recursive: true, withFileTypes: true }).catch(() => []);
  return entries.filter((e) => !e.isDirectory()).map((e) => join(e.parentPath, e.name).slice(dir.length + 1));
}

interface BootSummary {
  restorePoint: string;
  outcome: "passed" | "failed";
  answerMs: number | null;
  durationMs: number;
  error: string | null;
  errorCode: string | null;
  command?: { exitcode: number | null; stdout: string; stderr: string };
  catalog: string | null;
}

interface SnapshotRow {
  id: string;
  boot: { outcome: string; at: string; answerMs: number | null; error: string | null } | null;
}

describe("boot verification", { timeout: 480_000 }, () => {
  test("a good restore point boots and answers; a damaged one and a timeout fail, recorded, nothing left", async (t: TestContext) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const stateDir = join(dir, "state");
    const catalog = join(dir, "catalog.db");
    const env = { STRATA_STATE_DIR: stateDir, STRATA_CATALOG: catalog };
    const st = (args: string[]) => strata(["--repo", repo, ...args], { env });
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    t.after(() => {
      for (const p of processesMentioning(dir)) process.kill(Number(p.split(":")[0]), "SIGKILL");
    });

    // The guest: a workload disk, an ext4 data disk it mounts at boot, and a NIC on user networking
    // (which the verification must not bring up).
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "64M" },
        { id: "vblk1", format: "raw", size: "64M", ext4: true },
      ],
      workload: ["/dev/vda"],
      wlsize: "8M",
      data: "/dev/vdb",
      extraArgs: ["-netdev", "user,id=net0", "-device", "virtio-net-pci,netdev=net0,id=nic0"],
    });
    await g.waitSeq(20);
    const source = `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;
    const good = summary<{ id: string }>(
      await strataOk(["--repo", repo, "backup", "--vm", "live", "--json", source]),
    ).id;

    // Damage the data disk while the VM is off: its superblock and group descriptors are zeros.
    await g.vm.stop({ timeoutMs: 10_000 });
    await run("dd", [
      "if=/dev/zero",
      `of=${g.files.vblk1}`,
      "bs=64K",
      "count=1",
      "conv=notrunc",
      "status=none",
    ]);
    await g.restart();
    assert.match(await g.vm.console(), /mount \/dev\/vdb failed/, "the guest's own boot notices the damage");
    const damaged = summary<{ id: string }>(
      await strataOk(["--repo", repo, "backup", "--vm", "live", "--json", source]),
    ).id;
    await g.vm.stop({ timeoutMs: 10_000 });
    assert.notEqual(good, damaged);

    const check = "grep -q ' /mnt/data ' /proc/mounts && cat /mnt/data/boot-marker";
    const nothingLeft = async (what: string) => {
      assert.deepEqual(processesMentioning(dir), [], `${what}: no QEMU or server left`);
      assert.deepEqual(await filesUnder(stateDir), [], `${what}: no record, overlay or run file left`);
      const list = JSON.parse((await strataOk(["instant", "list", "--json"], { env })).stdout) as unknown[];
      assert.deepEqual(list, [], `${what}: no instant VM recorded`);
    };

    // 1. The good restore point boots; its agent answers; the check finds the data disk mounted.
    const ok = await st(["verify", "--boot", good, "--check", check, "--timeout", "180", "--json"]);
    assert.equal(ok.code, 0, ok.stderr);
    const passed = summary<BootSummary>(ok);
    assert.equal(passed.outcome, "passed", passed.error ?? "");
    assert.equal(passed.restorePoint, good);
    assert.ok(
      passed.answerMs !== null && passed.answerMs > 500 && passed.answerMs < 180_000,
      String(passed.answerMs),
    );
    assert.equal(passed.command?.exitcode, 0);
    assert.match(passed.command!.stdout, /written by the test guest at boot/);
    assert.equal(passed.catalog, catalog);
    assert.match(ok.stderr, /booting .* without a network/);
    t.diagnostic(
      `good point: agent answered after ${passed.answerMs} ms, verification took ${passed.durationMs} ms`,
    );
    await nothingLeft("after the good boot");

    // 2. The damaged one: the agent answers (it lives in the initramfs), but the data disk is not
    //    mounted, and the check says so. Exit code non-zero, the run's error names the command.
    const bad = await st(["verify", "--boot", damaged, "--check", check, "--timeout", "180", "--json"]);
    assert.notEqual(bad.code, 0);
    const failed = summary<BootSummary>(bad);
    assert.equal(failed.outcome, "failed");
    assert.equal(failed.errorCode, "EXTERNAL");
    assert.match(failed.error!, /the check command \/bin\/sh -c .* exited 1/);
    assert.match(bad.stderr, /boot verification of .* failed/);
    t.diagnostic(
      `damaged point: agent answered after ${failed.answerMs} ms; failed in ${failed.durationMs} ms`,
    );
    await nothingLeft("after the damaged boot");

    // 3. A timeout shorter than any boot: a clear TIMEOUT, and everything torn down.
    const slow = await st(["verify", "--boot", good, "--timeout", "1", "--json"]);
    assert.notEqual(slow.code, 0);
    const timedOut = summary<BootSummary>(slow);
    assert.equal(timedOut.outcome, "failed");
    assert.equal(timedOut.errorCode, "TIMEOUT");
    assert.match(timedOut.error!, /the guest agent did not answer within 1 s of the boot \(timeout\)/);
    assert.equal(timedOut.answerMs, null);
    await nothingLeft("after the timeout");

    // 4. The results are recorded with the restore points: strata snapshots (JSON and text) shows
    //    the last verification of each.
    const rows = JSON.parse(
      (await strataOk(["--repo", repo, "snapshots", "--json"], { env })).stdout,
    ) as SnapshotRow[];
    const byId = new Map(rows.map((r) => [r.id, r]));
    assert.equal(
      byId.get(good)?.boot?.outcome,
      "failed",
      "the timeout was the last verification of the good point",
    );
    assert.match(byId.get(good)!.boot!.error!, /timeout/);
    assert.equal(byId.get(damaged)?.boot?.outcome, "failed");
    assert.match(byId.get(damaged)!.boot!.error!, /exited 1/);
    // Verified again: passed, with its time to answer.
    summary<BootSummary>(
      await strataOk(["--repo", repo, "verify", "--boot", good, "--check", check, "--json"], { env }),
    );
    await nothingLeft("after the second good boot");
    const again = JSON.parse(
      (await strataOk(["--repo", repo, "snapshots", "--json"], { env })).stdout,
    ) as SnapshotRow[];
    const goodRow = again.find((r) => r.id === good)!;
    assert.equal(goodRow.boot?.outcome, "passed");
    assert.ok(goodRow.boot!.answerMs! > 0);
    const text = (await strataOk(["--repo", repo, "snapshots"], { env })).stdout;
    assert.match(text, new RegExp(`${good}.*passed \\d+\\.\\d s`));
    assert.match(text, new RegExp(`${damaged}.*FAILED`));

    // 5. The daemon's step: the real job runner with a policy's verify.boot, on the VM's newest
    //    restore point (the damaged one): the run fails with BOOT_FAILED and the catalog row says so.
    const yaml = [
      "repositories:",
      `  main: { path: ${repo} }`,
      "policies:",
      "  p:",
      "    repository: main",
      "    vms: { names: [live] }",
      "    schedule: every 1h",
      "    verify:",
      '      schedule: "0 4 * * *"',
      "      boot:",
      "        timeout: 3m",
      `        command: ${JSON.stringify(check)}`,
    ].join("\n");
    const checked = checkConfig(yaml, "strata.yaml");
    assert.deepEqual(checked.problems, []);
    const policy = checked.config!.policies.get("p")!;
    assert.deepEqual(policy.verify?.boot?.command, ["/bin/sh", "-c", check]);
    const cat = Catalog.open(catalog);
    t.after(() => cat.close());
    const job = cat.ensureJob({
      policy: "p",
      vm: "live",
      kind: "boot-verify",
      repository: "main",
      schedule: null,
    });
    const runRow = cat.startRun(job.id, { trigger: "manual" });
    const runner = createJobRunner({
      registry: buildRegistry(),
      catalog: cat,
      stateDir,
      serveCommand: (ref, r) => [
        process.execPath,
        BIN,
        "serve",
        ref,
        "--repo",
        r.path,
        "--cache-size",
        "64M",
      ],
    });
    const logs: string[] = [];
    await assert.rejects(
      runner.run({
        job,
        runId: runRow.id,
        completedBefore: 0,
        policy,
        repository: checked.config!.repositories.get("main")!,
        sources: [],
        limits: {},
        signal: new AbortController().signal,
        progress: { emit: () => {} },
        log: (_l, m) => logs.push(m),
      }),
      (e) => isStrataError(e, "BOOT_FAILED") && e.message.includes(damaged) && /exited 1/.test(e.message),
    );
    assert.ok(
      logs.some((m) => /guest agent answered/.test(m)),
      logs.join("\n"),
    );
    const [vm, time] = damaged.split("/") as [string, string];
    const point = cat.restorePoints({ vm }).find((p) => p.time === time)!;
    assert.equal(point.bootOutcome, "failed");
    assert.ok(point.bootVerifiedAt! > Date.parse(time));
    assert.match(point.bootError!, /exited 1/);
    await nothingLeft("after the daemon's step");
  });
});
