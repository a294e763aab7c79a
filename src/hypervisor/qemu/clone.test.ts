import assert from "node:assert/strict";
import { test } from "node:test";
import {
  findAgentSocket,
  findConsoleLog,
  findQmpSocket,
  joinOpts,
  type Rewrite,
  randomMac,
  rewriteCommandLine,
  splitOpts,
  synthesiseCommandLine,
} from "./clone.js";
import { buildCommandLine } from "./launcher.js";
import type { VmConfig } from "./live.js";

const recorded = [
  "qemu-system-x86_64",
  ...buildCommandLine(
    {
      runDir: "/vms/web1/run",
      name: "web1",
      disks: [
        { file: "/vms/web1/a,b.qcow2", format: "qcow2", nodeName: "disk0", id: "vblk0" },
        { file: "/vms/web1/data.raw", format: "raw", nodeName: "disk1", id: "vblk1" },
      ],
      kernel: { kernel: "/boot/k", append: "console=ttyS0 root=/dev/vda" },
      extraArgs: [
        "-netdev",
        "user,id=n0",
        "-device",
        "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56",
        "-pidfile",
        "/vms/web1/run/qemu.pid",
      ],
    },
    "tcg",
  ),
];

const pairs = (argv: readonly string[], flag: string) =>
  argv.flatMap((a, i) => (argv[i - 1] === flag ? [a] : []));

function cloneRewrite(extra: Partial<Rewrite> = {}): Rewrite {
  return {
    files: new Map([
      ["/vms/web1/a,b.qcow2", "/clones/c1/vblk0.qcow2"],
      ["/vms/web1/data.raw", "/clones/c1/vblk1.raw"],
    ]),
    formats: new Map(),
    fileFormats: new Map(),
    accel: "tcg",
    clone: {
      name: "c1",
      uuid: "11111111-2222-3333-4444-555555555555",
      macs: new Map([["nic0", "52:54:00:aa:bb:cc"]]),
      runDir: "/clones/c1/run",
    },
    ...extra,
  };
}

test("options split on single commas; ,, is a comma inside a value, and joins back", () => {
  const o = splitOpts("driver=file,filename=/a,,b.img,node-name=x,server");
  assert.deepEqual(o, [
    { key: "driver", value: "file" },
    { key: "filename", value: "/a,b.img" },
    { key: "node-name", value: "x" },
    { key: undefined, value: "server" },
  ]);
  assert.equal(joinOpts(o), "driver=file,filename=/a,,b.img,node-name=x,server");
});

test("random MACs are QEMU-prefixed, locally administered and differ", () => {
  const a = randomMac();
  assert.match(a, /^52:54:00(:[0-9a-f]{2}){3}$/);
  assert.equal(Number.parseInt(a.slice(0, 2), 16) & 0x02, 0x02);
  const many = new Set(Array.from({ length: 50 }, randomMac));
  assert.ok(many.size > 45);
});

test("a clone gets new disk paths, name, UUID, MAC and run files; nothing of the original's run dir is left", () => {
  const r = rewriteCommandLine(recorded, cloneRewrite());
  assert.deepEqual(pairs(r.argv, "-blockdev"), [
    "driver=file,filename=/clones/c1/vblk0.qcow2,node-name=disk0-file",
    "driver=qcow2,file=disk0-file,node-name=disk0",
    "driver=file,filename=/clones/c1/vblk1.raw,node-name=disk1-file",
    "driver=raw,file=disk1-file,node-name=disk1",
  ]);
  assert.deepEqual(pairs(r.argv, "-name"), ["c1"]);
  assert.deepEqual(pairs(r.argv, "-uuid"), ["11111111-2222-3333-4444-555555555555"]);
  assert.ok(pairs(r.argv, "-device").includes("virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:aa:bb:cc"));
  assert.equal(r.qmpSocket, "/clones/c1/run/qmp.sock");
  assert.equal(findQmpSocket(r.argv), "/clones/c1/run/qmp.sock");
  assert.equal(findConsoleLog(r.argv), "/clones/c1/run/console.log");
  assert.deepEqual(pairs(r.argv, "-pidfile"), ["/clones/c1/run/qemu.pid"]);
  assert.ok(!r.argv.some((a) => a.includes("/vms/web1")), r.argv.join(" "));
  // The guest's own settings are kept as recorded.
  assert.deepEqual(pairs(r.argv, "-append"), ["console=ttyS0 root=/dev/vda"]);
  assert.deepEqual(pairs(r.argv, "-kernel"), ["/boot/k"]);
  assert.equal(r.argv.length, recorded.length + 2);
});

test("a changed format changes the format node's driver, not the protocol node's", () => {
  const r = rewriteCommandLine(
    recorded,
    cloneRewrite({
      formats: new Map([["disk0", "raw"]]),
      fileFormats: new Map([["/vms/web1/a,b.qcow2", "raw"]]),
    }),
  );
  assert.equal(
    pairs(r.argv, "-blockdev")[0],
    "driver=file,filename=/clones/c1/vblk0.qcow2,node-name=disk0-file",
  );
  assert.equal(pairs(r.argv, "-blockdev")[1], "driver=raw,file=disk0-file,node-name=disk0");
});

test("in place only the accelerator follows the host: KVM's options become TCG's", () => {
  const kvm = recorded.map((a) => a.replace("accel=tcg", "accel=kvm"));
  kvm.push("-enable-kvm", "-cpu", "host");
  const r = rewriteCommandLine(kvm, {
    files: new Map(),
    formats: new Map(),
    fileFormats: new Map(),
    accel: "tcg",
  });
  assert.deepEqual(r.argv, [...recorded, "-cpu", "max"]);
  assert.deepEqual(r.warnings, []);
  const back = rewriteCommandLine(recorded, {
    files: new Map(),
    formats: new Map(),
    fileFormats: new Map(),
    accel: "kvm",
  });
  assert.deepEqual(pairs(back.argv, "-machine"), ["q35,accel=kvm"]);
});

test("-drive, -qmp unix:, -nic, JSON -blockdev and a TCP VNC display are rewritten too", () => {
  const argv = [
    "/usr/bin/qemu-system-x86_64",
    "-name",
    "guest=old,debug-threads=on",
    "-uuid",
    "00000000-0000-0000-0000-00000000000a",
    "-drive",
    "file=/vms/web1/data.raw,format=raw,if=virtio",
    "-blockdev",
    JSON.stringify({
      driver: "qcow2",
      "node-name": "disk0",
      file: { driver: "file", filename: "/vms/web1/a,b.qcow2" },
    }),
    "-qmp",
    "unix:/var/run/qemu-server/100.qmp,server,nowait",
    "-nic",
    "user,model=virtio",
    "-vnc",
    "127.0.0.1:1",
  ];
  const r = rewriteCommandLine(
    argv,
    cloneRewrite({
      fileFormats: new Map([["/vms/web1/data.raw", "qcow2"]]),
      formats: new Map([["disk0", "raw"]]),
    }),
  );
  assert.deepEqual(pairs(r.argv, "-name"), ["guest=c1,debug-threads=on"]);
  assert.deepEqual(pairs(r.argv, "-uuid"), ["11111111-2222-3333-4444-555555555555"]);
  assert.deepEqual(pairs(r.argv, "-drive"), ["file=/clones/c1/vblk1.raw,format=qcow2,if=virtio"]);
  assert.deepEqual(JSON.parse(pairs(r.argv, "-blockdev")[0]!), {
    driver: "raw",
    "node-name": "disk0",
    file: { driver: "file", filename: "/clones/c1/vblk0.qcow2" },
  });
  assert.deepEqual(pairs(r.argv, "-qmp"), ["unix:/clones/c1/run/100.qmp,server,nowait"]);
  assert.equal(r.qmpSocket, "/clones/c1/run/100.qmp");
  assert.match(pairs(r.argv, "-nic")[0]!, /^user,model=virtio,mac=52:54:00(:[0-9a-f]{2}){3}$/);
  assert.deepEqual(pairs(r.argv, "-vnc"), ["unix:/clones/c1/run/vnc.sock"]);
  assert.equal(r.warnings.length, 1);
});

test("a command line without QMP gets one in the run directory", () => {
  const r = rewriteCommandLine(["qemu-system-x86_64", "-m", "256"], cloneRewrite());
  assert.equal(r.qmpSocket, "/clones/c1/run/qmp.sock");
  assert.equal(findQmpSocket(r.argv), "/clones/c1/run/qmp.sock");
  const inPlace = rewriteCommandLine(["qemu-system-x86_64", "-m", "256"], {
    files: new Map(),
    formats: new Map(),
    fileFormats: new Map(),
    accel: "tcg",
    runDir: "/vms/web1/web1.run",
  });
  assert.equal(inPlace.qmpSocket, "/vms/web1/web1.run/qmp.sock");
});

test("without a recorded command line one is synthesised from the configuration", () => {
  const config: VmConfig = {
    kind: "qemu",
    name: "web1",
    uuid: "11111111-2222-3333-4444-555555555555",
    machine: "pc-q35-7.2",
    cpus: 2,
    memoryBytes: 512 * 1024 * 1024,
    disks: [
      {
        name: "vblk0",
        node: "disk0",
        device: "/machine/peripheral/vblk0/virtio-backend",
        format: "qcow2",
        file: "/c/vblk0.qcow2",
        size: 1 << 20,
      },
    ],
    nics: [{ id: "nic0", type: "virtio-net-pci", mac: "52:54:00:aa:bb:cc" }],
    firmware: "seabios (default)",
    commandLine: null,
  };
  const r = synthesiseCommandLine(config, "/c/run", "tcg");
  assert.deepEqual(pairs(r.argv, "-blockdev"), [
    "driver=file,filename=/c/vblk0.qcow2,node-name=disk0-file",
    "driver=qcow2,file=disk0-file,node-name=disk0",
  ]);
  assert.ok(pairs(r.argv, "-device").includes("virtio-blk-pci,drive=disk0,id=vblk0,bootindex=0"));
  assert.ok(
    pairs(r.argv, "-device").includes("virtio-net-pci,id=nic0,netdev=nic0-net,mac=52:54:00:aa:bb:cc"),
  );
  assert.deepEqual(pairs(r.argv, "-uuid"), [config.uuid]);
  assert.deepEqual(pairs(r.argv, "-m"), ["512"]);
  assert.deepEqual(pairs(r.argv, "-machine"), ["pc-q35-7.2,accel=tcg"]);
  assert.equal(r.qmpSocket, "/c/run/qmp.sock");
  assert.equal(findQmpSocket(r.argv), "/c/run/qmp.sock");
});

test("isolated (boot verification): NICs go to private hubs, -nic/-net are dropped, no default NIC; the agent socket is found", () => {
  const withAgent = [
    "qemu-system-x86_64",
    ...buildCommandLine(
      {
        runDir: "/vms/web1/run",
        name: "web1",
        disks: [{ file: "/vms/web1/a.qcow2", format: "qcow2", nodeName: "disk0", id: "vblk0" }],
        guestAgent: true,
        extraArgs: [
          "-netdev",
          "tap,id=n0,ifname=tap0,vhost=on",
          "-device",
          "virtio-net-pci,netdev=n0,id=nic0",
          "-netdev",
          "bridge,id=n1,br=br0",
          "-device",
          "e1000,netdev=n1,id=nic1",
          "-nic",
          "user,model=virtio",
          "-net",
          "nic",
          "-net",
          "user",
        ],
      },
      "tcg",
    ),
  ];
  assert.equal(findAgentSocket(withAgent), "/vms/web1/run/qga.sock");
  const r = rewriteCommandLine(
    withAgent,
    cloneRewrite({ isolate: true, files: new Map([["/vms/web1/a.qcow2", "/c/a.qcow2"]]) }),
  );
  assert.deepEqual(pairs(r.argv, "-netdev"), ["hubport,id=n0,hubid=4000", "hubport,id=n1,hubid=4001"]);
  assert.deepEqual(pairs(r.argv, "-nic"), ["none"]);
  assert.deepEqual(pairs(r.argv, "-net"), []);
  assert.ok(!r.argv.some((a) => /tap0|br0|vhost/.test(a)), r.argv.join(" "));
  // The NIC devices stay (the guest sees its hardware), on the isolated hubs.
  assert.equal(
    pairs(r.argv, "-device").filter((d) => /^(virtio-net-pci|e1000),netdev=n[01]/.test(d)).length,
    2,
  );
  // The agent's socket moved with the clone's run files.
  assert.equal(findAgentSocket(r.argv), "/clones/c1/run/qga.sock");
  assert.equal(
    findAgentSocket([
      "qemu-system-x86_64",
      ...buildCommandLine({ runDir: "/r", name: "x", disks: [], guestAgent: false }, "tcg"),
    ]),
    undefined,
  );
  // Not isolated: the network is as recorded.
  const open = rewriteCommandLine(withAgent, cloneRewrite());
  assert.ok(pairs(open.argv, "-netdev").includes("tap,id=n0,ifname=tap0,vhost=on"));
  assert.ok(!pairs(open.argv, "-nic").includes("none"));
});
