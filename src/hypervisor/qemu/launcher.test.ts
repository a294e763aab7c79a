import assert from "node:assert/strict";
import { mkdtemp, rm, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { buildCommandLine, chooseAccelerator } from "./launcher.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-launcher-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test("the command line names both block layers and every device, as QEMU-NOTES shows", () => {
  const args = buildCommandLine(
    {
      runDir: "/run/vm",
      name: "web,1",
      disks: [
        { file: "/img/a,b.qcow2", format: "qcow2", nodeName: "disk0", id: "vblk0" },
        { file: "/img/c.raw", format: "raw", nodeName: "disk1", id: "vblk1", readOnly: true, bootIndex: 1 },
      ],
      memoryMiB: 512,
      cpus: 2,
      kernel: { kernel: "/k", initrd: "/i", append: "console=ttyS0" },
      noReboot: true,
    },
    "tcg",
  );
  const pairs = (flag: string) => args.flatMap((a, i) => (args[i - 1] === flag ? [a] : []));
  assert.deepEqual(pairs("-blockdev"), [
    "driver=file,filename=/img/a,,b.qcow2,node-name=disk0-file",
    "driver=qcow2,file=disk0-file,node-name=disk0",
    "driver=file,filename=/img/c.raw,node-name=disk1-file,read-only=on",
    "driver=raw,file=disk1-file,node-name=disk1,read-only=on",
  ]);
  assert.deepEqual(pairs("-device"), [
    "virtio-blk-pci,drive=disk0,id=vblk0",
    "virtio-blk-pci,drive=disk1,id=vblk1,bootindex=1",
    "virtio-serial-pci,id=vser0",
    "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
  ]);
  assert.deepEqual(pairs("-chardev"), [
    "file,id=serial0,path=/run/vm/console.log",
    "socket,id=qmp0,path=/run/vm/qmp.sock,server=on,wait=off",
    "socket,id=qga0,path=/run/vm/qga.sock,server=on,wait=off",
  ]);
  assert.deepEqual(pairs("-machine"), ["q35,accel=tcg"]);
  assert.deepEqual(pairs("-name"), ["web,,1"]);
  assert.deepEqual(
    [pairs("-m"), pairs("-smp"), pairs("-kernel"), pairs("-append")],
    [["512"], ["2"], ["/k"], ["console=ttyS0"]],
  );
  for (const flag of ["-nodefaults", "-no-user-config", "-no-reboot"]) assert.ok(args.includes(flag), flag);
  assert.deepEqual(pairs("-display"), ["none"]);
  assert.ok(!args.includes("-cpu"), "TCG keeps the default CPU model");
  const kvm = buildCommandLine({ runDir: "/r", disks: [], guestAgent: false }, "kvm");
  assert.deepEqual(
    kvm.flatMap((a, i) => (kvm[i - 1] === "-cpu" || kvm[i - 1] === "-machine" ? [a] : [])),
    ["q35,accel=kvm", "host"],
  );
  assert.ok(!kvm.some((a) => a.includes("qga")));
});

test("KVM only with vmx/svm and a usable /dev/kvm", async () => {
  const cpu = async (flags: string) => {
    const p = join(dir, `cpuinfo-${flags.replace(/\W/g, "")}`);
    await writeFile(p, `processor\t: 0\nflags\t\t: fpu ${flags} sse2\n\nprocessor\t: 1\n`);
    return p;
  };
  const kvm = join(dir, "kvm");
  await writeFile(kvm, "");
  assert.equal((await chooseAccelerator(await cpu("vmx"), kvm)).accel, "kvm");
  assert.equal((await chooseAccelerator(await cpu("svm"), kvm)).accel, "kvm");
  const nested = await chooseAccelerator(await cpu("hypervisor"), kvm);
  assert.equal(nested.accel, "tcg");
  assert.match(nested.reason, /neither vmx nor svm/);
  const noDev = await chooseAccelerator(await cpu("vmx"), join(dir, "no-kvm"));
  assert.equal(noDev.accel, "tcg");
  assert.match(noDev.reason, /not usable/);
  assert.equal((await chooseAccelerator(join(dir, "no-cpuinfo"), kvm)).accel, "tcg");
});
