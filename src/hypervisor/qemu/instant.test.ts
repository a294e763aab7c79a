// The QEMU instant-recovery command line (NBD backings attached to the overlays' format nodes,
// moved disks on their production files) and its record: an InstantVm survives the JSON round
// trip through the engine's state file, and a tampered one is refused. Pure.
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import type { InstantVm } from "../adapter.js";
import {
  attachNbdBacking,
  checkQemuInstantVm,
  fileChildOf,
  instantArgv,
  type QemuInstantData,
} from "./instant-record.js";

const base = [
  "qemu-system-x86_64",
  "-blockdev",
  "driver=file,filename=/ir/vblk0.overlay.qcow2,node-name=disk0-file",
  "-blockdev",
  "driver=qcow2,file=disk0-file,node-name=disk0",
  "-device",
  "virtio-blk-pci,drive=disk0,id=vblk0",
  "-blockdev",
  '{"driver":"file","filename":"/ir/vblk1.overlay.qcow2","node-name":"d1f"}',
  "-blockdev",
  '{"driver":"qcow2","file":"d1f","node-name":"disk1"}',
  "-device",
  "virtio-blk-pci,drive=disk1,id=vblk1",
];

const backing = (node: string, i: number) => ({
  node,
  backingNode: `instant-bk${i}`,
  nbdNode: `instant-nbd${i}`,
  socket: "/ir/run/nbd,sock",
  export: `vblk${i}`,
  reconnectDelay: 300,
});

function record(): InstantVm {
  const data: QemuInstantData = {
    accelerator: "tcg",
    qmpSocket: "/ir/run/qmp.sock",
    log: "/ir/run/qemu.log",
    console: "/ir/run/console.log",
    uuid: "11111111-2222-3333-4444-555555555555",
    nbd: { socket: "/ir/run/nbd.sock", reconnectDelay: 60 },
    baseArgv: base,
    disks: [
      {
        name: "vblk0",
        size: 1 << 20,
        export: "vblk0",
        node: "disk0",
        fileNode: "disk0-file",
        backingNode: "instant-bk0",
        nbdNode: "instant-nbd0",
        production: { node: "instant-prod0", fileNode: "instant-prod0-file" },
      },
      {
        name: "vblk1",
        size: 1 << 20,
        export: "vblk1",
        node: "disk1",
        fileNode: "d1f",
        backingNode: "instant-bk1",
        nbdNode: "instant-nbd1",
      },
    ],
  };
  return {
    adapter: "qemu",
    name: "ir",
    where: "QMP socket /ir/run/qmp.sock",
    pid: 4242,
    disks: [
      {
        name: "vblk0",
        overlay: "/ir/vblk0.overlay.qcow2",
        production: { path: "/prod/vblk0.raw", format: "raw" },
      },
      { name: "vblk1", overlay: "/ir/vblk1.overlay.qcow2" },
    ],
    data: { ...data },
    details: { qmpSocket: "/ir/run/qmp.sock", console: "/ir/run/console.log" },
    warnings: ["a warning"],
  };
}

describe("instant recovery command line", () => {
  test("each format node gets a raw-over-nbd backing, defined just before it", () => {
    const out = attachNbdBacking(base, [backing("disk0", 0), backing("disk1", 1)]);
    assert.deepEqual(out.slice(0, 9), [
      "qemu-system-x86_64",
      "-blockdev",
      "driver=file,filename=/ir/vblk0.overlay.qcow2,node-name=disk0-file",
      "-blockdev",
      "driver=nbd,node-name=instant-nbd0,server.type=unix,server.path=/ir/run/nbd,,sock,export=vblk0,read-only=on,reconnect-delay=300",
      "-blockdev",
      "driver=raw,file=instant-nbd0,node-name=instant-bk0,read-only=on",
      "-blockdev",
      "driver=qcow2,file=disk0-file,node-name=disk0,backing=instant-bk0",
    ]);
    const j = out.indexOf('{"driver":"qcow2","file":"d1f","node-name":"disk1","backing":"instant-bk1"}');
    assert.ok(j > 0, out.join(" "));
    assert.match(out[j - 4]!, /^driver=nbd,node-name=instant-nbd1,.*export=vblk1/);
    assert.equal(out.length, base.length + 8);
    assert.equal(fileChildOf(base, "disk0"), "disk0-file");
    assert.equal(fileChildOf(base, "disk1"), "d1f");
  });

  test("a disk without a -blockdev format node is refused before anything runs", () => {
    const drive = ["qemu-system-x86_64", "-drive", "file=/ir/a.qcow2,format=qcow2,if=virtio"];
    assert.throws(() => attachNbdBacking(drive, [backing("disk0", 0)]), /needs -blockdev disks/);
  });

  test("moved disks run from their production files, the others stay on NBD", () => {
    const vm = record();
    const out = instantArgv(vm, vm.data as unknown as QemuInstantData);
    assert.ok(out.includes("driver=file,filename=/prod/vblk0.raw,node-name=disk0-file"));
    assert.ok(out.includes("driver=raw,file=disk0-file,node-name=disk0"));
    assert.ok(!out.some((a) => a.includes("instant-nbd0")));
    assert.ok(out.some((a) => a.includes("instant-nbd1") && a.includes("reconnect-delay=60")));
  });
});

describe("instant recovery record", () => {
  test("survives the round trip through a JSON state file", () => {
    const vm = record();
    const back = JSON.parse(JSON.stringify(vm)) as InstantVm;
    assert.deepEqual(checkQemuInstantVm(back), vm);
    const data = back.data as unknown as QemuInstantData;
    assert.deepEqual(instantArgv(back, data), instantArgv(vm, vm.data as unknown as QemuInstantData));
  });

  const damaged: Array<[string, (vm: InstantVm & { data: QemuInstantData }) => void, RegExp]> = [
    [
      "a program that is not QEMU",
      (vm) => {
        vm.data.baseArgv[0] = "/tmp/x/qemu";
      },
      /runs "\/tmp\/x\/qemu", not a qemu-system-\* binary/,
    ],
    [
      "an overlay path with ..",
      (vm) => {
        vm.disks[1]!.overlay = "/ir/../etc/passwd";
      },
      /disks\.1\.overlay: the overlay ".*" is not an absolute path without "\.\."/,
    ],
    [
      "a node-name with options smuggled in",
      (vm) => {
        vm.data.disks[1]!.nbdNode = "n,server.path=/x";
      },
      /node-name "n,server.path=\/x" is not a QEMU id/,
    ],
    [
      "disks without nodes",
      (vm) => {
        vm.data.disks.pop();
      },
      /its disks \(vblk0, vblk1\) and their nodes \(vblk0\) differ/,
    ],
    [
      "another adapter's record",
      (vm) => {
        vm.adapter = "libvirt";
      },
      /belongs to the "libvirt" adapter/,
    ],
    [
      "a pid that is not one",
      (vm) => {
        (vm as { pid: unknown }).pid = "1; rm -rf /";
      },
      /the QEMU pid is not a whole number/,
    ],
  ];
  for (const [what, edit, message] of damaged) {
    test(`refuses ${what}`, () => {
      const vm = JSON.parse(JSON.stringify(record())) as InstantVm & { data: QemuInstantData };
      edit(vm);
      assert.throws(
        () => checkQemuInstantVm(vm),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, "DATA_CORRUPT");
          assert.match(err.message, /the instant recovery record of "ir" is damaged/);
          assert.match(err.message, message);
          return true;
        },
      );
    });
  }
});
