// The command-line policy: real VMs' command lines (Strata's test guest, libvirt, Proxmox VE,
// QEMU by hand) pass, and every option that would run a host program or reach host files
// beyond the VM's own is refused with an error naming it, when the configuration is read and
// again on the exact argv about to run. The run-time checks look at real files in a temporary
// directory; nothing is started.
import assert from "node:assert/strict";
import { chmod, mkdir, mkdtemp, rm, symlink, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { type Rewrite, rewriteCommandLine } from "./clone.js";
import { byHand, libvirt, proxmox, testGuest } from "./cmdline-policy.fixtures.js";
import { checkCommandLineToRun, checkRecordedCommandLine, type RunPolicy } from "./cmdline-policy.js";

const refuse = (what: string): never => {
  throw new Error(what);
};
const recorded = (argv: readonly string[], disks: readonly string[] = testGuest.disks) =>
  checkRecordedCommandLine(argv, disks, refuse);

describe("recorded command lines of real VMs pass", () => {
  for (const [name, f] of Object.entries({ testGuest, libvirt, proxmox, byHand })) {
    test(name, () => {
      const scan = recorded(f.argv, f.disks);
      const images = scan.paths.filter((p) => p.use === "image");
      assert.ok(images.length >= f.disks.length, JSON.stringify(images));
    });
  }
  test("libvirt's inherited descriptors and Proxmox's -daemonize are noted, not refused, when read", () => {
    assert.deepEqual(recorded(libvirt.argv, libvirt.disks).fds.length, 4);
    assert.deepEqual(recorded(proxmox.argv, proxmox.disks).dropped, ["-daemonize"]);
  });
});

/** The test guest's line with `extra` appended: what each refusal adds to a legitimate VM. */
const withExtra = (...extra: string[]) => [...testGuest.argv, ...extra];

const refusals: Array<[string, string[], RegExp]> = [
  [
    "a tap's script",
    ["-netdev", "tap,id=n1,script=/tmp/x/evil.sh"],
    /-netdev tap: script=\/tmp\/x\/evil\.sh runs a host program/,
  ],
  [
    "a tap's downscript",
    ["-netdev", "tap,id=n1,script=no,downscript=/tmp/x/evil.sh"],
    /downscript=\/tmp\/x\/evil\.sh runs a host program/,
  ],
  [
    "a tap's script given twice (QEMU takes the last)",
    ["-netdev", "tap,id=n1,script=no,script=/tmp/x/evil.sh"],
    /-netdev: script= appears twice/,
  ],
  [
    "a device type given twice (QEMU takes the last)",
    ["-device", "e1000,driver=usb-host,hostbus=1,hostaddr=2"],
    /-device: driver= appears twice/,
  ],
  [
    "a JSON key given twice",
    ["-netdev", '{"type":"user","id":"n1","type":"tap","script":"no"}'],
    /-netdev: key "type" appears twice/,
  ],
  ["-icount record/replay", ["-icount", "shift=auto,rr=record,rrfile=/etc/passwd"], /-icount rr= records/],
  [
    "a tap's script in JSON",
    ["-netdev", '{"type":"tap","id":"n1","script":"/tmp/x/evil.sh"}'],
    /-netdev tap: script=\/tmp\/x\/evil\.sh runs a host program/,
  ],
  [
    "a -nic tap's script",
    ["-nic", "tap,script=/tmp/x/evil.sh"],
    /-nic tap: script=\/tmp\/x\/evil\.sh runs a host program/,
  ],
  ["a -net tap's script", ["-net", "tap,script=/tmp/x/evil.sh"], /-net tap: script=.* runs a host program/],
  [
    "a bridge helper",
    ["-netdev", "bridge,id=n1,br=br0,helper=/tmp/x/helper"],
    /-netdev bridge: helper=\/tmp\/x\/helper runs a host program/,
  ],
  ["user networking's smb=", ["-netdev", "user,id=n1,smb=/etc"], /smb= runs a host Samba server/],
  ["user networking's tftp=", ["-netdev", "user,id=n1,tftp=/etc"], /tftp= serves a host directory/],
  [
    "user networking's guestfwd= to a command",
    ["-netdev", "user,id=n1,guestfwd=tcp:10.0.2.100:80-cmd:/bin/sh"],
    /guestfwd= forwards guest connections to a host program/,
  ],
  ["-incoming exec:", ["-incoming", "exec:/bin/sh -c 'touch /x'"], /-incoming exec:.*runs a host program/],
  ["a pipe chardev", ["-chardev", "pipe,id=p0,path=/etc/passwd"], /-chardev pipe opens host named pipes/],
  ["a host serial chardev", ["-chardev", "serial,id=s0,path=/dev/ttyS0"], /hands a host serial device/],
  ["-serial pipe:", ["-serial", "pipe:/tmp/x/p"], /-serial pipe:\/tmp\/x\/p opens host named pipes/],
  ["-serial on a host device", ["-serial", "/dev/ttyS0"], /-serial \/dev\/ttyS0 hands a host device/],
  ["-plugin", ["-plugin", "/tmp/x/libevil.so"], /option -plugin loads a host library/],
  ["-readconfig", ["-readconfig", "/tmp/x/more.cfg"], /option -readconfig reads further options/],
  ["-add-fd", ["-add-fd", "fd=3,set=1"], /option -add-fd hands host file descriptors/],
  [
    "-set",
    ["-set", "netdev.n0.script=/tmp/x/evil.sh"],
    /option -set changes options after they were checked/,
  ],
  ["-runas", ["-runas", "nobody"], /option -runas changes the user/],
  ["-run-with", ["-run-with", "chroot=/tmp/x"], /option -run-with changes the user or root/],
  ["-chroot", ["-chroot", "/tmp/x"], /option -chroot changes QEMU's root/],
  ["-loadvm", ["-loadvm", "snap1"], /option -loadvm loads a saved VM state/],
  ["-L", ["-L", "/tmp/x"], /option -L changes where QEMU looks for firmware/],
  ["-virtfs", ["-virtfs", "local,path=/,mount_tag=host,security_model=passthrough"], /option -virtfs shares/],
  ["-fsdev", ["-fsdev", "local,id=f0,path=/,security_model=none"], /option -fsdev shares a host directory/],
  ["a legacy -hda", ["-hda", "/etc/shadow"], /option -hda is a legacy disk option/],
  ["a writable -pflash", ["-pflash", "/usr/share/OVMF/OVMF.fd"], /option -pflash opens a host file writable/],
  ["-gdb", ["-gdb", "tcp::1234"], /option -gdb opens a debugger port/],
  ["-trace", ["-trace", "events=/etc/shadow"], /option -trace reads or writes host files/],
  ["an unknown option", ["-frobnicate", "x"], /option -frobnicate is not one Strata passes through/],
  ["a double-dash option", ["--plugin", "/tmp/x/libevil.so"], /option -plugin loads a host library/],
  ["a bare argument (a disk image to QEMU)", ["/etc/shadow"], /bare argument "\/etc\/shadow"/],
  [
    "-qmp over TCP",
    ["-qmp", "tcp:0.0.0.0:4444,server,nowait"],
    /-qmp tcp:.* opens a QEMU monitor on the network/,
  ],
  ["-monitor over telnet", ["-monitor", "telnet::4445,server,nowait"], /opens a QEMU monitor on the network/],
  [
    "a monitor on a TCP chardev",
    ["-chardev", "socket,id=m1,host=0.0.0.0,port=4446,server=on,wait=off", "-mon", "chardev=m1,mode=control"],
    /-mon chardev=m1,mode=control opens a QEMU monitor on the network/,
  ],
  [
    "a serial mux'd with a TCP monitor",
    ["-serial", "mon:tcp::4447,server"],
    /opens a QEMU monitor on the network/,
  ],
  [
    "an abstract socket",
    ["-chardev", "socket,id=a0,path=/tmp/.X11-unix/X0,abstract=on"],
    /abstract=on reaches host services/,
  ],
  [
    "a host file opened writable by -blockdev",
    ["-blockdev", "driver=file,filename=/etc/shadow,node-name=x0", "-device", "virtio-blk-pci,drive=x0"],
    /-blockdev file: filename=\/etc\/shadow is not one of the VM's disks, and would be opened writable/,
  ],
  [
    "a host file nested in a JSON -blockdev",
    ["-blockdev", '{"driver":"qcow2","node-name":"x0","file":{"driver":"file","filename":"/etc/shadow"}}'],
    /-blockdev qcow2: filename=\/etc\/shadow is not one of the VM's disks/,
  ],
  [
    "a host file as a qcow2 disk's backing",
    [
      "-blockdev",
      "driver=qcow2,node-name=x0,file=disk0-file,backing.driver=file,backing.filename=/etc/shadow",
    ],
    /filename=\/etc\/shadow is not one of the VM's disks/,
  ],
  [
    "a host device by -blockdev host_device",
    ["-blockdev", "driver=host_device,filename=/dev/sda,node-name=x0"],
    /-blockdev host_device: filename=\/dev\/sda is not one of the VM's disks, and would be opened writable/,
  ],
  [
    "an auto-read-only host file a device may write",
    [
      "-blockdev",
      '{"driver":"file","filename":"/etc/shadow","node-name":"x0","auto-read-only":true}',
      "-device",
      "virtio-blk-pci,drive=x0",
    ],
    /filename=\/etc\/shadow is not one of the VM's disks, and would be opened writable/,
  ],
  [
    "a -drive of a host file",
    ["-drive", "file=/etc/shadow,if=virtio,format=raw"],
    /-drive file=\/etc\/shadow.*is not one of the VM's disks, and would be opened writable/,
  ],
  [
    "a -drive json: filename",
    ["-drive", 'file=json:{"driver":"file","filename":"/etc/shadow"},readonly=on'],
    /file=json:.* is not one of the VM's disks, nor a local file/,
  ],
  ["a -drive fat: directory", ["-drive", "file=fat:rw:/etc,format=raw"], /file=fat: shares a host directory/],
  [
    "a vvfat block node",
    ["-blockdev", "driver=vvfat,dir=/etc,node-name=x0"],
    /driver vvfat shares a host directory/,
  ],
  ["vfio-pci", ["-device", "vfio-pci,host=0000:01:00.0"], /-device vfio-pci passes a host PCI device/],
  ["usb-host", ["-device", "usb-host,hostbus=1,hostaddr=2"], /-device usb-host passes a host USB device/],
  ["-usbdevice host:", ["-usbdevice", "host:1234:5678"], /-usbdevice host:1234:5678 is not an emulated/],
  [
    "an rng on another device",
    ["-object", "rng-random,id=r1,filename=/dev/watchdog"],
    /filename=\/dev\/watchdog is not \/dev\/urandom/,
  ],
  ["input-linux", ["-object", "input-linux,id=k0,evdev=/dev/input/event0"], /hands a host input device/],
  [
    "filter-dump",
    ["-object", "filter-dump,id=d0,netdev=n0,file=/etc/x"],
    /writes the guest's network traffic/,
  ],
  ["an unknown object", ["-object", "authz-listfile,id=a0,filename=/etc/x"], /object type "authz-listfile"/],
  ["-machine dumpdtb=", ["-machine", "q35,dumpdtb=/etc/x"], /-machine dumpdtb= writes a host file/],
  ["-display spice-app", ["-display", "spice-app"], /-display spice-app runs a host viewer program/],
  ["a wav audio backend", ["-audiodev", "wav,id=a0,path=/etc/x"], /-audiodev wav writes the guest's sound/],
  [
    "TPM passthrough",
    ["-tpmdev", "passthrough,id=t0,path=/dev/tpm0"],
    /-tpmdev passthrough hands the host's TPM/,
  ],
  ["a path with ..", ["-kernel", "/srv/guest/../../etc/shadow"], /-kernel=.* has a "\.\." segment/],
  ["invalid JSON", ["-device", '{"driver":'], /-device .* is not valid JSON/],
];

describe("refused when the configuration is read", () => {
  for (const [what, extra, message] of refusals) {
    test(what, () => assert.throws(() => recorded(withExtra(...extra)), message));
  }
});

describe("the exact argv about to run", () => {
  /** A host like a real one: public firmware and kernel, a secret, a run directory, a clone target. */
  async function host(t: { after: (fn: () => Promise<void>) => void }) {
    const root = await mkdtemp(join(tmpdir(), "strata-policy-"));
    t.after(() => rm(root, { recursive: true, force: true }));
    await chmod(root, 0o755);
    const pub = join(root, "share");
    await mkdir(pub, { mode: 0o755 });
    for (const f of ["vmlinux", "initrd.cpio", "OVMF_CODE.fd", "netinst.iso", "bootsplash.jpg"])
      await writeFile(join(pub, f), "x", { mode: 0o644 });
    const secret = join(root, "secret.key");
    await writeFile(secret, "s", { mode: 0o600 });
    const target = join(root, "clone");
    await mkdir(join(target, "run"), { recursive: true, mode: 0o755 });
    return { root, pub, secret, target, run: join(target, "run") };
  }

  function cloneOf(
    argv: readonly string[],
    disks: ReadonlyArray<[from: string, to: string, format: string, node?: string]>,
    run: string,
  ): { argv: string[]; policy: RunPolicy } {
    const rw: Rewrite = {
      files: new Map(disks.map(([from, to]) => [from, to])),
      formats: new Map(
        disks.flatMap(([, , format, node]) => (node ? [[node, format] as [string, string]] : [])),
      ),
      fileFormats: new Map(disks.map(([from, , format]) => [from, format])),
      accel: "tcg",
      clone: { name: "c1", uuid: "11111111-2222-3333-4444-555555555555", macs: new Map(), runDir: run },
    };
    const out = rewriteCommandLine(argv, rw).argv;
    return {
      argv: out,
      policy: { disks: new Map(disks.map(([, to, f]) => [to, f])), dirs: [run, join(run, "..")], cwd: run },
    };
  }

  test("clones of the test guest, of Proxmox's and of a hand-started VM pass", async (t) => {
    const h = await host(t);
    const guest = testGuest.argv.map((a) => a.replaceAll("/srv/guest", h.pub));
    const g = cloneOf(
      guest,
      [
        ["/vms/t/vblk0.qcow2", join(h.target, "vblk0.qcow2"), "qcow2", "disk0"],
        ["/vms/t/vblk1.raw", join(h.target, "vblk1.raw"), "raw", "disk1"],
      ],
      h.run,
    );
    assert.deepEqual(await checkCommandLineToRun(g.argv, g.policy), []);

    const pve = proxmox.argv.map((a) =>
      a
        .replace("/usr/share/pve-edk2-firmware//OVMF_CODE_4M.fd", join(h.pub, "OVMF_CODE.fd"))
        .replace("/var/lib/vz/template/iso/debian-12.4.0-amd64-netinst.iso", join(h.pub, "netinst.iso"))
        .replace("/usr/share/qemu-server/bootsplash.jpg", join(h.pub, "bootsplash.jpg")),
    );
    pve[0] = "qemu-system-x86_64";
    const p = cloneOf(
      pve,
      [
        ["/dev/pve/vm-100-disk-0", join(h.target, "scsi0.raw"), "raw"],
        ["/dev/pve/vm-100-disk-1", join(h.target, "efidisk0.raw"), "raw"],
      ],
      h.run,
    );
    assert.ok(!p.argv.includes("-daemonize"), "the clone runs without -daemonize");
    // Proxmox's scripts are not on this host: QEMU would fail to run them, nothing else.
    await checkCommandLineToRun(p.argv, p.policy);

    const hand = cloneOf(
      byHand.argv.map((a) => a.replace("/srv/iso/debian-12.iso", join(h.pub, "netinst.iso"))),
      [["/srv/vm/db1/root.qcow2", join(h.target, "root.qcow2"), "qcow2"]],
      h.run,
    );
    assert.deepEqual(await checkCommandLineToRun(hand.argv, hand.policy), []);
  });

  test("a -drive disk restored without its format is refused (QEMU would probe guest data)", async (t) => {
    const h = await host(t);
    const disk = join(h.target, "root.raw");
    const policy: RunPolicy = { disks: new Map([[disk, "raw"]]), dirs: [h.run], cwd: h.run };
    const base = ["qemu-system-x86_64", "-display", "none"];
    await assert.rejects(
      checkCommandLineToRun([...base, "-drive", `file=${disk},if=virtio`], policy),
      /disk .*root\.raw is raw, but would be opened without a format \(probed\)/,
    );
    await assert.rejects(
      checkCommandLineToRun(
        [
          ...base,
          "-blockdev",
          `driver=file,filename=${disk},node-name=f0`,
          "-blockdev",
          "driver=qcow2,file=f0,node-name=d0",
        ],
        policy,
      ),
      /disk .*root\.raw is raw, but would be opened as qcow2/,
    );
    await checkCommandLineToRun([...base, "-drive", `file=${disk},if=virtio,format=raw`], policy);
  });

  const runTime: Array<
    [string, (h: { pub: string; secret: string; run: string; root: string }) => string[], RegExp]
  > = [
    [
      "a pid file outside the run directory",
      () => ["-pidfile", "/etc/passwd"],
      /-pidfile: -pidfile=\/etc\/passwd is outside the run directory/,
    ],
    [
      "a socket QEMU would unlink outside the run directory",
      () => ["-chardev", "socket,id=s1,path=/etc/passwd,server=on,wait=off", "-serial", "chardev:s1"],
      /-chardev socket: path=\/etc\/passwd is outside the run directory/,
    ],
    [
      "a serial console file outside the run directory",
      () => ["-serial", "file:/etc/cron.d/x"],
      /-serial file:\/etc\/cron\.d\/x: file=\/etc\/cron\.d\/x is outside the run directory/,
    ],
    [
      "a client socket the guest could talk through",
      () => ["-chardev", "socket,id=s1,path=/run/docker.sock", "-device", "virtserialport,chardev=s1"],
      /path=\/run\/docker\.sock connects to a socket outside the run directory/,
    ],
    [
      "a secret host file shown to the guest",
      (h) => ["-initrd", h.secret],
      /-initrd=.*secret\.key is not readable by every user of this host/,
    ],
    [
      "a kernel that does not exist",
      (h) => ["-kernel", join(h.pub, "nope")],
      /-kernel=.*nope does not exist on this host/,
    ],
    [
      "a device file as an ISO",
      () => ["-cdrom", "/dev/zero"],
      /-cdrom: file=\/dev\/zero is not a regular file/,
    ],
    [
      "a read-only image of a host file not every user may read",
      (h) => ["-drive", `file=${h.secret},media=cdrom`],
      /secret\.key is not readable by every user/,
    ],
    [
      "an option ROM from a secret file",
      (h) => ["-device", `virtio-net-pci,romfile=${h.secret}`],
      /-device virtio-net-pci: romfile=.* is not readable by every user/,
    ],
    [
      "guest RAM on a host file",
      () => ["-object", "memory-backend-file,id=m0,size=64M,mem-path=/etc/passwd"],
      /mem-path=\/etc\/passwd is not a hugetlbfs or tmpfs directory/,
    ],
    [
      "an NBD disk on another socket",
      () => [
        "-blockdev",
        "driver=nbd,node-name=n0,server.type=unix,server.path=/run/other.sock,read-only=on",
      ],
      /server\.path=\/run\/other\.sock connects to a socket outside the run directory/,
    ],
    [
      "a monitor socket QEMU would unlink (server=yes)",
      () => ["-qmp", "unix:/etc/passwd,server=yes,wait=no"],
      /-qmp unix:\/etc\/passwd,server=yes,wait=no: unix=\/etc\/passwd is outside the run directory/,
    ],
    [
      "an NBD disk over TCP (a local server could export the host's disks)",
      () => ["-blockdev", "driver=nbd,node-name=n0,server.type=inet,server.host=127.0.0.1,server.port=10809"],
      /-blockdev nbd: server\.type=inet reaches storage over the network/,
    ],
    ["-daemonize", () => ["-daemonize"], /-daemonize: Strata starts QEMU itself/],
    ["-incoming", () => ["-incoming", "defer"], /-incoming defer: Strata starts QEMU itself/],
    [
      "libvirt's inherited descriptors",
      () => ["-netdev", '{"type":"tap","fd":"34","id":"n1"}'],
      /-netdev fd=34 passes a file descriptor of the program that started the VM/,
    ],
    [
      "a network disk",
      () => ["-drive", "file=rbd:pool/vm-100-disk-0,format=raw,readonly=on"],
      /file=rbd:pool\/vm-100-disk-0 is not a local file this restore wrote/,
    ],
  ];
  for (const [what, extra, message] of runTime) {
    test(`refuses ${what}`, async (t) => {
      const h = await host(t);
      const policy: RunPolicy = { disks: new Map(), dirs: [h.run], cwd: h.run };
      await assert.rejects(
        checkCommandLineToRun(["qemu-system-x86_64", "-display", "none", ...extra(h)], policy),
        (err: Error & { code?: string }) => {
          assert.equal(err.code, "DATA_CORRUPT");
          assert.match(err.message, /^refusing to run QEMU: /);
          assert.match(err.message, message);
          return true;
        },
      );
    });
  }

  test("a run file that is a symbolic link, a system run directory, a program of someone else's", async (t) => {
    const h = await host(t);
    await symlink("/etc/passwd", join(h.run, "console.log"));
    const policy: RunPolicy = { disks: new Map(), dirs: [h.run], cwd: h.run };
    await assert.rejects(
      checkCommandLineToRun(["qemu-system-x86_64", "-serial", `file:${join(h.run, "console.log")}`], policy),
      /console\.log is a symbolic link/,
    );
    for (const dir of ["/etc", "/tmp", "/var/run", "/usr/lib/x"])
      await assert.rejects(
        checkCommandLineToRun(["qemu-system-x86_64"], { disks: new Map(), dirs: [dir], cwd: dir }),
        /the run directory .* is a system directory: restore as a clone/,
      );
    const shared = join(h.root, "shared");
    await mkdir(shared);
    await chmod(shared, 0o777);
    await assert.rejects(
      checkCommandLineToRun(["qemu-system-x86_64"], { disks: new Map(), dirs: [shared], cwd: shared }),
      /is writable by every user/,
    );
    const fake = join(h.root, "bin", "qemu-system-x86_64");
    await mkdir(join(h.root, "bin"), { mode: 0o777 });
    await chmod(join(h.root, "bin"), 0o777);
    await writeFile(fake, "#!/bin/sh\n", { mode: 0o755 });
    await assert.rejects(
      checkCommandLineToRun([fake], policy),
      /the program .*qemu-system-x86_64 is in .*bin, which others than root can change/,
    );
    await assert.rejects(checkCommandLineToRun(["/bin/sh"], policy), /not a qemu-system-\* binary/);
    // QEMU's own, named by path, is fine.
    await checkCommandLineToRun(["/usr/bin/qemu-system-x86_64"], policy);
  });

  test("a client socket only a monitor uses may be anywhere (Proxmox's event daemon), in place too", async (t) => {
    const h = await host(t);
    const argv = [
      "qemu-system-x86_64",
      "-chardev",
      `socket,id=qmp,path=${join(h.run, "100.qmp")},server=on,wait=off`,
      "-mon",
      "chardev=qmp,mode=control",
      "-chardev",
      "socket,id=qmp-event,path=/var/run/qmeventd.sock,reconnect=5",
      "-mon",
      "chardev=qmp-event,mode=control",
      "-qmp",
      "unix:/run/other-manager.sock",
    ];
    await checkCommandLineToRun(argv, { disks: new Map(), dirs: [h.run], cwd: h.run });
  });

  test("a public kernel someone else may change runs, with a warning", async (t) => {
    const h = await host(t);
    const k = join(h.pub, "vmlinux");
    await chmod(k, 0o666);
    const w = await checkCommandLineToRun(["qemu-system-x86_64", "-kernel", k], {
      disks: new Map(),
      dirs: [h.run],
      cwd: h.run,
    });
    assert.equal(w.length, 1);
    assert.match(w[0]!, /vmlinux is not root's own file, or others can change it/);
  });
});
