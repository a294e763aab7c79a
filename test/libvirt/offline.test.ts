// Backups of a shut-off libvirt domain: its images read through qemu-storage-daemon (whose image
// locks keep the domain from starting meanwhile), incrementally through the bitmap QEMU stored
// for the previous checkpoint, and the chain going on live afterwards. After a SIGKILL the bitmap
// is gone and the read is full, with the reason.
import assert from "node:assert/strict";
import { mkdir, readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { backupVm, type VmBackupResult } from "../../src/engine/vm-backup.js";
import { LibvirtAdapter, type LibvirtCheckpointRecord } from "../../src/hypervisor/libvirt/index.js";
import { ensureLibvirtd, libvirtWorkspace, stopLibvirtd, testDomain, virsh } from "../helpers/libvirt.js";
import { verifyRecords } from "../helpers/records.js";

describe("libvirt: a shut-off domain", { timeout: 600_000 }, () => {
  after(stopLibvirtd);
  test("offline backups through the stored bitmaps, and the chain across them", async (t) => {
    await ensureLibvirtd();
    const { dir, state, repo } = await libvirtWorkspace(t);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-off",
      disks: [
        { target: "vda", format: "qcow2", size: "32M" },
        { target: "vdb", format: "raw", size: "16M" },
      ],
      workload: ["/dev/vda", "/dev/vdb"],
      wlsize: "8M",
    });
    const logs: string[] = [];
    const run = async () => {
      const t0 = Date.now();
      const r = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), {
        vm: "off",
        mode: "snapshot",
        quiesce: "try",
        stateDir: state,
        log: (m) => logs.push(m),
      });
      t.diagnostic(
        `${r.id}: ${r.manifest.mode} ${r.manifest.consistency} in ${Date.now() - t0} ms: ` +
          r.manifest.disks.map((d) => `${d.name} ${d.readMode ?? "-"} read ${d.bytesRead}`).join(", "),
      );
      assert.deepEqual(await readdir(join(state, "libvirt")), [], "nothing left in the state directory");
      return r;
    };
    const verify = async (r: VmBackupResult, seq: number) => {
      const out = join(dir, r.id.replace(/[^A-Za-z0-9]/g, "_"));
      await mkdir(out);
      const snap = await repo.findSnapshot(r.id);
      for (const n of ["vda", "vdb"]) {
        await restoreDiskToFile(repo, snap, n, join(out, `${n}.raw`));
        const v = await verifyRecords(join(out, `${n}.raw`));
        assert.ok(v.gapFree && v.lastSeq >= seq, `${r.id} ${n}: ${JSON.stringify(v).slice(0, 300)}`);
      }
    };
    const vda = (r: VmBackupResult) => r.manifest.disks.find((d) => d.name === "vda")!;

    await dom.waitSeq(30);
    const r1 = await run();
    await dom.waitSeq((await dom.seq()) + 30);
    await virsh("destroy", dom.name);
    const seq2 = await dom.seq();

    // Shut off: read through the bitmap QEMU stored on the way out; the checkpoint goes on.
    const r2 = await run();
    assert.equal(r2.manifest.mode, "offline");
    assert.equal(r2.manifest.consistency, "crash-consistent", "destroyed, not shut down by the guest");
    assert.equal(vda(r2).readMode, "changed", vda(r2).fullReadReason);
    assert.ok(vda(r2).bytesRead <= 8 * 256 * 1024, `read ${vda(r2).bytesRead}`);
    assert.equal(r2.manifest.disks.find((d) => d.name === "vdb")!.readMode, "full");
    assert.deepEqual(r2.manifest.bitmap, r1.manifest.bitmap);
    await verify(r2, seq2);

    // While the images are read, the domain cannot start and write them (QEMU's image locks).
    const session = await (await adapter.resolve(`libvirt:${dom.name}`)).openBackup({
      vm: "off",
      repository: repo.config.id,
      mode: "snapshot",
      quiesce: "try",
      granularity: 256 * 1024,
      stateDir: state,
      log: () => {},
    });
    await assert.rejects(virsh("start", dom.name), /lock/i);
    await session.finish(false);

    // Running again: the live backup builds on the same checkpoint.
    await dom.start();
    await dom.waitSeq(30);
    const seq3 = await dom.seq();
    const r3 = await run();
    assert.equal(vda(r3).readMode, "changed", vda(r3).fullReadReason);
    await verify(r3, seq3);
    assert.notEqual(
      (r3.manifest.bitmap as LibvirtCheckpointRecord).checkpoint,
      (r1.manifest.bitmap as LibvirtCheckpointRecord).checkpoint,
    );

    // Killed: the new checkpoint's bitmap never reached the image; full read, and why.
    await dom.waitSeq(seq3 + 20);
    process.kill(await dom.pid(), "SIGKILL");
    for (let i = 0; i < 100 && (await virsh("domstate", dom.name)).trim() !== "shut off"; i++)
      await new Promise((r) => setTimeout(r, 100));
    const r4 = await run();
    assert.equal(vda(r4).readMode, "full");
    assert.match(vda(r4).fullReadReason ?? "", /bitmap .* (is missing|is inconsistent)/);
    await verify(r4, seq3);
  });
});
