// Offline mode: Strata shuts the guest down through its agent, reads the images, hands the
// checkpoint bitmap over with qemu-img, and starts the VM again with the same command line.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { rm } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { findQemuProcess } from "../../src/hypervisor/qemu/live.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, qmpOnce } from "../helpers/vm.js";

const run = promisify(execFile);

async function ext4State(raw: string): Promise<string> {
  const { stdout } = await run("dumpe2fs", ["-h", raw]);
  return /^Filesystem state:\s*(.*)$/m.exec(stdout)?.[1]?.trim() ?? "unknown";
}

async function waitConsole(path: string, re: RegExp, ms = 60_000): Promise<void> {
  const { readFile } = await import("node:fs/promises");
  const end = Date.now() + ms;
  while (!re.test(await readFile(path, "utf8").catch(() => ""))) {
    if (Date.now() > end) throw new Error(`console never showed ${re}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}

describe("offline backup with --shutdown", { timeout: 300_000 }, () => {
  test("clean-shutdown restore points, the VM started again, incremental the second time", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "32M" },
        { id: "vblk1", format: "qcow2", size: "32M", ext4: true },
      ],
      workload: ["/dev/vda"],
      data: "/dev/vdb",
      wlsize: "4M",
    });
    const socket = g.vm.qmpSocket;
    // The restarted QEMU is Strata's child, not the test's: stop it by its QMP socket.
    t.after(async () => {
      const p = await findQemuProcess(socket);
      if (p) process.kill(p.pid, "SIGKILL");
    });
    const src = `qmp:${socket},qga=${g.vm.qgaSocket}`;
    const refused = await strata(["backup", "--repo", repo, "--vm", "off", "--mode", "offline", src], {
      env,
    });
    assert.equal(refused.code, 2);
    assert.match(refused.stderr, /offline mode needs --shutdown/);

    const seq = await g.waitSeq(30);
    const r1 = summary<{ id: string; mode: string; consistency: string }>(
      await strataOk(
        ["backup", "--repo", repo, "--vm", "off", "--mode", "offline", "--shutdown", "--json", src],
        { env },
      ),
    );
    assert.equal(r1.mode, "offline");
    assert.equal(r1.consistency, "clean-shutdown");
    // The VM is back: a new QEMU process answers on the same socket and the guest boots.
    const status = await qmpOnce<{ status: string }>(socket, "query-status");
    assert.equal(status.status, "running");
    await waitConsole(g.vm.consoleLog, /STRATA-GUEST-READY/);
    const out = join(dir, "r1");
    await strataOk(["restore", "--repo", repo, r1.id, "--target", out, "--format", "raw"]);
    const recs = await verifyRecords(join(out, "vblk0.raw"));
    assert.ok(recs.gapFree && recs.lastSeq >= seq, JSON.stringify(recs).slice(0, 300));
    assert.equal(
      await ext4State(join(out, "vblk1.raw")),
      "clean",
      "the guest unmounted its filesystem before the backup",
    );
    await rm(out, { recursive: true });

    // The checkpoint bitmap was added to the images: the next offline backup reads only changes.
    await waitConsole(g.vm.consoleLog, /STRATA-WORKLOAD stats seq=\d+/);
    const r2 = summary<{ id: string; disks: Array<{ name: string; readMode: string; bytesRead: number }> }>(
      await strataOk(
        ["backup", "--repo", repo, "--vm", "off", "--mode", "offline", "--shutdown", "--json", src],
        { env },
      ),
    );
    for (const d of r2.disks) assert.equal(d.readMode, "changed", d.name);
    assert.ok(r2.disks.find((d) => d.name === "vblk1")!.bytesRead < 4 * 1024 * 1024);
    await strataOk(["restore", "--repo", repo, r2.id, "--target", join(dir, "r2"), "--format", "raw"]);
    assert.ok((await verifyRecords(join(dir, "r2", "vblk0.raw"))).gapFree);
    assert.equal((await qmpOnce<{ status: string }>(socket, "query-status")).status, "running");
  });
});
