import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { attachNbdBacking, fileChildOf, type InstantState, instantArgv } from "./instant.js";

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

  test("migrated disks run from their production files, the others stay on NBD", () => {
    const state = {
      socket: "/ir/run/nbd.sock",
      reconnectDelay: 60,
      accelerator: "tcg",
      baseArgv: base,
      disks: [
        {
          name: "vblk0",
          size: 1,
          node: "disk0",
          fileNode: "disk0-file",
          backingNode: "instant-bk0",
          nbdNode: "instant-nbd0",
          overlay: "/ir/vblk0.overlay.qcow2",
          production: { path: "/prod/vblk0.raw", format: "raw", node: "p0", fileNode: "p0f" },
        },
        {
          name: "vblk1",
          size: 1,
          node: "disk1",
          fileNode: "d1f",
          backingNode: "instant-bk1",
          nbdNode: "instant-nbd1",
          overlay: "/ir/vblk1.overlay.qcow2",
        },
      ],
    } as unknown as InstantState;
    const out = instantArgv(state);
    assert.ok(out.includes("driver=file,filename=/prod/vblk0.raw,node-name=disk0-file"));
    assert.ok(out.includes("driver=raw,file=disk0-file,node-name=disk0"));
    assert.ok(!out.some((a) => a.includes("instant-nbd0")));
    assert.ok(out.some((a) => a.includes("instant-nbd1") && a.includes("reconnect-delay=60")));
  });
});
