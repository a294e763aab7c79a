// The QMP socket is free while the engine reads: a backup session holds QMP (and the agent) only
// to cut the view and to release it, so another client (Proxmox VE's `qm`, an operator) gets the
// greeting and answers while the disks are read. QEMU serves one QMP client at a time on a
// socket: had the session kept its connection, the second client would wait for the greeting.
// And a VM that goes away while its disks are read is a SOURCE_UNREADABLE error naming it, with
// nothing left in the state directory.
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { backupVm } from "../../src/engine/vm-backup.js";
import type { VmHandle } from "../../src/hypervisor/adapter.js";
import { QemuAdapter } from "../../src/hypervisor/qemu/adapter.js";
import { QmpClient } from "../../src/hypervisor/qemu/qmp.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { ErrorCode, isStrataError } from "../../src/util/errors.js";
import { strataOk, tempDir } from "../helpers/cli.js";
import { verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, leftovers } from "../helpers/vm.js";

/** A gate the first disk read waits at: `reached` once a read is held, `open()` lets all reads go. */
function gated(handle: VmHandle): { handle: VmHandle; reached: Promise<void>; open: () => void } {
  let reach!: () => void;
  const reached = new Promise<void>((r) => {
    reach = r;
  });
  let open!: () => void;
  const opened = new Promise<void>((r) => {
    open = r;
  });
  return {
    reached,
    open,
    handle: {
      ...handle,
      openBackup: async (request) => {
        const session = await handle.openBackup(request);
        return {
          ...session,
          disks: session.disks.map((d) => ({
            ...d,
            read: async (offset: number, length: number, into?: Buffer) => {
              reach();
              await opened;
              return d.read(offset, length, into);
            },
          })),
        };
      },
    },
  };
}

describe("QMP during a live backup", { timeout: 300_000 }, () => {
  test("another QMP client gets the greeting and answers while the engine reads", async (t) => {
    const dir = tempDir(t);
    const repoDir = join(dir, "repo");
    const state = join(dir, "state");
    await strataOk(["init", "--repo", repoDir, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "32M" }],
      workload: ["/dev/vda"],
      wlsize: "8M",
    });
    const seqBefore = await g.waitSeq(20);
    const adapter = new QemuAdapter(join(dir, "no-inventory.yaml"));
    const vm = await adapter.resolve(`qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`);
    const gate = gated(vm);
    const repo = await Repository.open(new FsStore(repoDir));
    t.after(() => repo.close());
    const running = backupVm(repo, gate.handle, {
      vm: "free",
      mode: "snapshot",
      quiesce: "try",
      stateDir: state,
    });
    running.catch(() => {});
    await Promise.race([gate.reached, running.then(() => assert.fail("the backup ended before it read"))]);

    // The engine holds a read: the view is cut and exported, the disks are being read.
    const t0 = Date.now();
    const other = await QmpClient.connect(g.vm.qmpSocket, { connectTimeoutMs: 3000, commandTimeoutMs: 3000 });
    try {
      assert.equal(typeof other.greeting.version.qemu.major, "number", "the greeting came");
      const status = await other.execute<{ status: string; running: boolean }>("query-status");
      assert.equal(status.running, true);
      const exports = await other.execute<Array<{ id: string }>>("query-block-exports");
      assert.ok(
        exports.some((e) => e.id.startsWith("strata-")),
        `the backup's export is up while it reads: ${JSON.stringify(exports)}`,
      );
    } finally {
      await other.close();
    }
    t.diagnostic(`a second QMP client was served in ${Date.now() - t0} ms during the read`);

    // Reading a few seconds more; then the backup finishes, consistent, and leaves nothing.
    await new Promise((r) => setTimeout(r, 2000));
    gate.open();
    const r = await running;
    // The guest has no filesystem on its disk to freeze: crash-consistent, cut through the agent.
    assert.ok(["filesystem-consistent", "crash-consistent"].includes(r.manifest.consistency));
    assert.ok(r.details.quiescedMs !== undefined);
    const l = await leftovers(g.vm, state);
    assert.deepEqual([l.nodes, l.exports, l.jobs, l.files], [[], [], [], []]);
    assert.equal(l.frozen, "thawed");
    assert.equal(l.bitmaps.disk0!.filter((n) => n.startsWith("strata-")).length, 1);
    const out = join(dir, "out");
    await strataOk(["restore", "--repo", repoDir, r.id, "--target", out, "--format", "raw"]);
    const recs = await verifyRecords(join(out, "vblk0.raw"));
    assert.ok(recs.gapFree && recs.lastSeq >= seqBefore, JSON.stringify(recs).slice(0, 300));
  });

  test("a VM killed while its disks are read: SOURCE_UNREADABLE naming it, nothing left behind", async (t) => {
    const dir = tempDir(t);
    const repoDir = join(dir, "repo");
    const state = join(dir, "state");
    await strataOk(["init", "--repo", repoDir, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "32M" }],
      workload: ["/dev/vda"],
      wlsize: "8M",
    });
    await g.waitSeq(10);
    const vm = await new QemuAdapter(join(dir, "no-inventory.yaml")).resolve(`qmp:${g.vm.qmpSocket}`);
    const gate = gated(vm);
    const repo = await Repository.open(new FsStore(repoDir));
    t.after(() => repo.close());
    const logs: string[] = [];
    const running = backupVm(repo, gate.handle, {
      vm: "doomed",
      mode: "snapshot",
      quiesce: "off",
      stateDir: state,
      log: (m) => logs.push(m),
    });
    running.catch(() => {});
    await gate.reached;
    await g.vm.stop({ mode: "kill" });
    gate.open();
    await assert.rejects(running, (err: unknown) => {
      assert.ok(isStrataError(err, ErrorCode.SOURCE_UNREADABLE), String(err));
      assert.match((err as Error).message, /^VM doomed went away during the backup/);
      return true;
    });
    assert.deepEqual(await readdir(state), [], `state directory after: ${logs.join("; ")}`);
    assert.deepEqual(await repo.snapshots("doomed", () => {}), [], "no restore point");
  });
});
