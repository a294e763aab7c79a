// Backups of Proxmox VMs that are shut off: their volumes are read as they are (raw directly,
// qcow2 through qemu-storage-daemon), named by their configuration keys. Proxmox VE can't be
// installed here: a fixture root stands in for the host (test/helpers/pve.ts).
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import { PveAdapter } from "../../src/hypervisor/pve/index.js";
import type { PveConfigDocument } from "../../src/hypervisor/pve/model.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { tempDir } from "../helpers/cli.js";
import { pveFixture, pveRoot } from "../helpers/pve.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;

describe("backups of Proxmox VMs that are shut off", () => {
  test("offline: the volumes as they are, named by configuration keys; live modes say the VM is off", async (t) => {
    const r = pveRoot(t, { 100: "100.conf", 101: "101.conf", 102: "102.conf" });
    const dir = tempDir(t, "strata-pve-off-");
    const images = join(r.local, "images", "101");
    mkdirSync(images, { recursive: true });
    const data = randomBytes(4 * MiB);
    const raw = join(dir, "data.raw");
    writeFileSync(raw, Buffer.concat([data, Buffer.alloc(4 * MiB)]));
    await run("qemu-img", [
      "convert",
      "-q",
      "-f",
      "raw",
      "-O",
      "qcow2",
      raw,
      join(images, "vm-101-disk-1.qcow2"),
    ]);
    await run("qemu-img", ["create", "-q", "-f", "qcow2", join(images, "vm-101-disk-0.qcow2"), "528K"]);
    // 101.conf's TPM state is a raw volume of its own (swtpm's, not QEMU's), read like any other.
    writeFileSync(join(images, "vm-101-disk-2.raw"), Buffer.alloc(4 * MiB, 7));

    const adapter = new PveAdapter({ root: r.root });
    const store = new FsStore(join(dir, "repo"));
    await Repository.init(store, { chunkSize: 256 * 1024 });
    const repo = await Repository.open(store, { threads: 1 });
    t.after(() => repo.close());
    const logs: string[] = [];
    const opts = {
      vm: "win-dc01",
      quiesce: "off" as const,
      stateDir: join(dir, "state"),
      log: (m: string) => logs.push(m),
    };
    const handle = await adapter.resolve("pve:101");
    await assert.rejects(backupVm(repo, handle, { ...opts, mode: "snapshot" }), (e: unknown) => {
      assert.ok(e instanceof StrataError && e.code === ErrorCode.SOURCE_UNREADABLE, String(e));
      assert.match(
        e.message,
        /Proxmox VM 101 \(win-dc01\) is not running: no QEMU answers on .*101\.qmp; back it up with --mode offline/,
      );
      return true;
    });
    const r1 = await backupVm(repo, handle, { ...opts, mode: "offline" });
    assert.equal(r1.manifest.mode, "offline");
    assert.equal(r1.manifest.consistency, "crash-consistent");
    assert.deepEqual(
      r1.manifest.disks.map((d) => [d.name, d.size]),
      [
        ["efidisk0", 528 * 1024],
        ["tpmstate0", 4 * MiB],
        ["virtio0", 8 * MiB],
      ],
    );
    assert.ok(logs.some((l) => /is shut off: its disks are read as they are/.test(l)));
    const snap = await repo.findSnapshot(r1.id);
    const doc = JSON.parse((await repo.blob(snap, snap.manifest.config!)).toString()) as PveConfigDocument;
    assert.equal(doc.conf, pveFixture("101.conf"));
    assert.equal(doc.qemu, null);
    assert.deepEqual(
      doc.disks.map((d) => [d.name, d.format, d.size]),
      [
        ["efidisk0", "qcow2", 528 * 1024],
        ["tpmstate0", "raw", 4 * MiB],
        ["virtio0", "qcow2", 8 * MiB],
      ],
    );
    await restoreDiskToFile(repo, snap, "virtio0", join(dir, "virtio0.raw"));
    assert.ok(
      readFileSync(join(dir, "virtio0.raw"))
        .subarray(0, 4 * MiB)
        .equals(data),
    );

    // An LVM volume that is not active (no /dev/VG/LV), and disks on storages Strata can't read,
    // are refused, naming them; backup=0 disks (100's scsi1) are not asked for.
    await assert.rejects(
      backupVm(repo, await adapter.resolve("pve:100"), { ...opts, vm: "web1", mode: "offline" }),
      /Proxmox VM 100 is shut off and the logical volume of scsi0 \(local-lvm:vm-100-disk-0\) is not active: \/dev\/pve\/vm-100-disk-0 does not exist \(activate it with "lvchange -ay pve\/vm-100-disk-0"\)/,
    );
    assert.ok(logs.some((l) => /^scsi1 \(local-lvm:vm-100-disk-1\) has backup=0: not backed up$/.test(l)));
    await assert.rejects(
      backupVm(repo, await adapter.resolve("pve:102"), { ...opts, vm: "k8s", mode: "offline" }),
      /Proxmox VM 102 is shut off and none of its disks is on a storage Strata can read \(ceph-vm:vm-102-disk-0, local-zfs:vm-102-disk-1\)/,
    );
  });
});
