// Disk names of a Proxmox VM's QEMU, as the QEMU session lists them, against VMID.conf's keys.
// qemu-server names drives `drive-KEY` and devices `KEY`: Proxmox VE 8 attaches them with
// `-drive ...,id=drive-scsi0`, Proxmox VE 9 with `-blockdev ...,node-name=drive-scsi0`, where
// QEMU reports a scsi-hd's or ide-hd's `qdev` as its bare id ("scsi0") and a virtio-blk's as a
// QOM path. Proxmox VE itself can't be installed here: QEMU is started, stopped before the
// guest runs (-S), with both styles of command line; a fixture root holds VMID.conf.
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { PveConf } from "../../src/hypervisor/pve/conf.js";
import { PveAdapter } from "../../src/hypervisor/pve/index.js";
import { buildDocument } from "../../src/hypervisor/pve/model.js";
import { listDisks } from "../../src/hypervisor/qemu/live.js";
import { QmpClient } from "../../src/hypervisor/qemu/qmp.js";
import { socketAccepts } from "../../src/util/process.js";
import { pveRoot } from "../helpers/pve.js";
import { qmpOnce, until } from "../helpers/vm.js";

const run = promisify(execFile);

const CONF = `name: names
sata0: local:100/vm-100-disk-2.raw,size=8M
scsi0: local:100/vm-100-disk-0.raw,size=8M
scsihw: virtio-scsi-single
virtio0: local:100/vm-100-disk-1.qcow2,size=8M
`;

function attach(style: "drive" | "blockdev", key: string, file: string, format: string): string[] {
  const dev = {
    scsi0: `scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0`,
    virtio0: "virtio-blk-pci,drive=drive-virtio0,id=virtio0",
    sata0: "ide-hd,bus=ide.0,drive=drive-sata0,id=sata0",
  }[key]!;
  const drive =
    style === "drive"
      ? ["-drive", `file=${file},if=none,id=drive-${key},format=${format},cache=none,aio=threads`]
      : [
          "-blockdev",
          `driver=file,filename=${file},node-name=file-drive-${key},cache.direct=on`,
          "-blockdev",
          `driver=${format},file=file-drive-${key},node-name=drive-${key}`,
        ];
  return [...drive, "-device", dev];
}

describe("disk names of a Proxmox VM's QEMU", () => {
  for (const style of ["drive", "blockdev"] as const) {
    test(`-${style}: the QEMU session's disk names are VMID.conf's keys`, async (t) => {
      const r = pveRoot(t, { 100: CONF });
      const images = join(r.local, "images", "100");
      mkdirSync(images, { recursive: true });
      const files = {
        scsi0: join(images, "vm-100-disk-0.raw"),
        virtio0: join(images, "vm-100-disk-1.qcow2"),
        sata0: join(images, "vm-100-disk-2.raw"),
      };
      writeFileSync(files.scsi0, Buffer.alloc(8 << 20));
      writeFileSync(files.sata0, Buffer.alloc(8 << 20));
      await run("qemu-img", ["create", "-q", "-f", "qcow2", files.virtio0, "8M"]);
      const qmpPath = join(r.run, "100.qmp");
      const child: ChildProcess = spawn(
        "qemu-system-x86_64",
        [
          "-S",
          "-display",
          "none",
          "-nodefaults",
          "-machine",
          "q35,accel=tcg",
          "-chardev",
          `socket,id=qmp,path=${qmpPath},server=on,wait=off`,
          "-mon",
          "chardev=qmp,mode=control",
          "-device",
          "virtio-scsi-pci,id=scsihw0",
          ...attach(style, "scsi0", files.scsi0, "raw"),
          ...attach(style, "virtio0", files.virtio0, "qcow2"),
          ...attach(style, "sata0", files.sata0, "raw"),
        ],
        { stdio: ["ignore", "ignore", "inherit"] },
      );
      const exited = new Promise((res) => child.once("exit", res));
      t.after(async () => {
        await qmpOnce(qmpPath, "quit").catch(() => child.kill("SIGKILL"));
        await exited;
      });
      await until("QMP", 20_000, async () => ((await socketAccepts(qmpPath)) ? true : undefined));
      const qmp = await QmpClient.connect(qmpPath);
      const disks = await listDisks(qmp).finally(() => qmp.close());
      assert.deepEqual(disks.map((d) => [d.name, d.file]).sort(), [
        ["sata0", files.sata0],
        ["scsi0", files.scsi0],
        ["virtio0", files.virtio0],
      ]);
      const adapter = new PveAdapter({ root: r.root });
      const text = readFileSync(adapter.confPath(100), "utf8");
      const logs: string[] = [];
      const doc = buildDocument(
        100,
        text,
        PveConf.parse(text, { where: "100.conf" }),
        await adapter.storages(),
        {
          doc: { kind: "qemu", name: "names", uuid: null, cpus: 1, memoryBytes: 0, disks: [], nics: [] },
          disks,
        },
        (m) => logs.push(m),
      );
      assert.deepEqual(logs, []);
      assert.deepEqual(doc.disks.map((d) => [d.name, d.volume, d.file, d.storage]).sort(), [
        ["sata0", "local:100/vm-100-disk-2.raw", files.sata0, "local"],
        ["scsi0", "local:100/vm-100-disk-0.raw", files.scsi0, "local"],
        ["virtio0", "local:100/vm-100-disk-1.qcow2", files.virtio0, "local"],
      ]);
    });
  }
});
