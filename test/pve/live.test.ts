// A live backup of a Proxmox-style VM through the pve adapter and the engine. Proxmox VE itself
// can't be installed here, so its side is stood in for: a fixture root holds VMID.conf and
// storage.cfg (test/helpers/pve.ts), and the test guest's QEMU is started with the command line
// qemu-server builds (monitor at var/run/qemu-server/100.qmp, agent at 100.qga, `-drive
// ...,id=drive-scsi0` on virtio-scsi and `id=drive-virtio0` on virtio-blk, devices `scsi0` and
// `virtio0`, a BC:24:11 MAC, smbios1 UUID, vmgenid) — minus what stock QEMU lacks (`-id`, a
// Proxmox patch) or this machine can't do (a tap NIC on a bridge: user networking instead).
//
// Checked: the repository's disks are named by their configuration keys (the QEMU session's
// names match VMID.conf's), the configuration document carries VMID.conf byte for byte, the
// second backup reads only what changed, the restored disks are right, the QMP socket is free
// while the engine reads (a client of the test's own gets the greeting and a query-status
// answer at that moment), and nothing is left on the VM.
import assert from "node:assert/strict";
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import { planVmRestore, readVmConfig, restoreVm } from "../../src/engine/vm-restore.js";
import type { VmHandle } from "../../src/hypervisor/adapter.js";
import { PveAdapter } from "../../src/hypervisor/pve/index.js";
import { checkDocument, type PveConfigDocument } from "../../src/hypervisor/pve/model.js";
import { chooseAccelerator } from "../../src/hypervisor/qemu/launcher.js";
import { QmpClient } from "../../src/hypervisor/qemu/qmp.js";
import { AdapterRegistry } from "../../src/hypervisor/registry.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { noProgress } from "../../src/util/progress.js";
import { tempDir } from "../helpers/cli.js";
import { testGuest } from "../helpers/guest.js";
import { pveRoot } from "../helpers/pve.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { qmpOnce, until } from "../helpers/vm.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;
const UUID = "0b7e5c1e-4f2a-4c1b-9d3e-7a1f2b3c4d5e";
const GENID = "5c3b1f0e-2d4a-4e6b-8c9d-0a1b2c3d4e5f";

/** VMID.conf of the test VM, as Proxmox VE 8 writes one (fields sorted, description first). */
const CONF = `#Test guest standing in for a Proxmox VM
agent: 1
boot: order=virtio0
cores: 1
memory: 256
meta: creation-qemu=7.2.0,ctime=1732870000
name: web1
net0: virtio=BC:24:11:AA:BB:CC,bridge=vmbr0,firewall=1
ostype: l26
scsi0: local:100/vm-100-disk-1.raw,cache=none,size=32M
scsi1: local:100/vm-100-disk-2.raw,backup=0,size=8M
scsihw: virtio-scsi-pci
smbios1: uuid=${UUID}
virtio0: local:100/vm-100-disk-0.qcow2,cache=none,size=64M
vmgenid: ${GENID}
`;

interface PveVm {
  child: ChildProcess;
  qmp: string;
  console: string;
  exited: Promise<void>;
}

/** Starts the test guest with a qemu-server style command line (see the file comment). */
async function startPveStyleQemu(root: string, run: string, images: string, dir: string): Promise<PveVm> {
  const guest = await testGuest();
  const accel = (await chooseAccelerator()).accel;
  const console = join(dir, "console.log");
  writeFileSync(console, "");
  const append =
    "console=ttyS0 quiet panic=-1 strata.workload=/dev/vda strata.rate=100 strata.report=20 strata.wlsize=16M";
  const args = [
    "-name",
    "web1,debug-threads=on",
    "-no-shutdown",
    "-chardev",
    `socket,id=qmp,path=${join(run, "100.qmp")},server=on,wait=off`,
    "-mon",
    "chardev=qmp,mode=control",
    "-pidfile",
    join(run, "100.pid"),
    "-smbios",
    `type=1,uuid=${UUID}`,
    "-smp",
    "1,sockets=1,cores=1,maxcpus=1",
    "-nodefaults",
    "-display",
    "none",
    "-m",
    "256",
    "-machine",
    `type=q35,accel=${accel}`,
    "-kernel",
    guest.kernel,
    "-initrd",
    guest.initrd,
    "-append",
    append,
    "-chardev",
    `file,id=serial0,path=${console}`,
    "-serial",
    "chardev:serial0",
    "-device",
    `vmgenid,guid=${GENID}`,
    "-chardev",
    `socket,path=${join(run, "100.qga")},server=on,wait=off,id=qga0`,
    "-device",
    "virtio-serial,id=qga0",
    "-device",
    "virtserialport,chardev=qga0,name=org.qemu.guest_agent.0",
    "-device",
    "virtio-scsi-pci,id=scsihw0",
    "-drive",
    `file=${join(images, "vm-100-disk-1.raw")},if=none,id=drive-scsi0,cache=none,format=raw,aio=threads,detect-zeroes=on`,
    "-device",
    "scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=0,drive=drive-scsi0,id=scsi0",
    "-drive",
    `file=${join(images, "vm-100-disk-2.raw")},if=none,id=drive-scsi1,format=raw,aio=threads,detect-zeroes=on`,
    "-device",
    "scsi-hd,bus=scsihw0.0,channel=0,scsi-id=0,lun=1,drive=drive-scsi1,id=scsi1",
    "-drive",
    `file=${join(images, "vm-100-disk-0.qcow2")},if=none,id=drive-virtio0,cache=none,format=qcow2,aio=threads,detect-zeroes=on`,
    "-device",
    "virtio-blk-pci,drive=drive-virtio0,id=virtio0,bootindex=100",
    "-netdev",
    "user,id=net0,restrict=on",
    "-device",
    "virtio-net-pci,mac=BC:24:11:AA:BB:CC,netdev=net0,id=net0",
  ];
  const child = spawn("qemu-system-x86_64", args, { stdio: ["ignore", "ignore", "pipe"], cwd: root });
  let stderr = "";
  child.stderr!.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<void>((res) => child.once("exit", () => res()));
  let gone = false;
  void exited.then(() => {
    gone = true;
  });
  await until("the guest to boot", 90_000, async () => {
    if (gone) throw new Error(`QEMU exited: ${stderr}`);
    return readFileSync(console, "utf8").includes("STRATA-GUEST-READY") ? true : undefined;
  });
  return { child, qmp: join(run, "100.qmp"), console, exited };
}

async function stopQemu(vm: PveVm): Promise<void> {
  await qmpOnce(vm.qmp, "quit").catch(() => {});
  const t = setTimeout(() => vm.child.kill("SIGKILL"), 10_000);
  await vm.exited;
  clearTimeout(t);
}

/** Connects a QMP client of its own; resolves with the greeting's QEMU version and the VM status. */
async function probeQmp(socket: string): Promise<{ version: string; status: string }> {
  const qmp = await QmpClient.connect(socket, { connectTimeoutMs: 5000, commandTimeoutMs: 5000 });
  try {
    const v = qmp.greeting.version.qemu;
    const s = await qmp.execute<{ status: string }>("query-status");
    return { version: `${v.major}.${v.minor}`, status: s.status };
  } finally {
    await qmp.close();
  }
}

/**
 * The handle with the session's first disk read (and every 8th after) probing QMP from outside:
 * they happen while the engine reads, after the session cut its view.
 */
function probing(
  h: VmHandle,
  socket: string,
  probes: Array<{ at: string; version: string; status: string }>,
): VmHandle {
  return {
    ...h,
    openBackup: async (request) => {
      const s = await h.openBackup(request);
      probes.push({ at: "after the cut", ...(await probeQmp(socket)) });
      let reads = 0;
      return {
        ...s,
        disks: s.disks.map((d) => ({
          ...d,
          read: async (offset: number, length: number, into?: Buffer) => {
            if (reads++ % 8 === 0)
              probes.push({ at: `read ${reads} of ${d.name}`, ...(await probeQmp(socket)) });
            return d.read(offset, length, into);
          },
        })),
        finish: s.finish,
      };
    },
  };
}

describe("live backup of a Proxmox-style VM through the pve adapter", { timeout: 400_000 }, () => {
  test("disks named by VMID.conf keys, VMID.conf kept, incremental, QMP free while reading, nothing left", async (t) => {
    const r = pveRoot(t, {});
    const dir = tempDir(t, "strata-pve-live-");
    const images = join(r.local, "images", "100");
    mkdirSync(images, { recursive: true });
    writeFileSync(join(r.etc, "qemu-server", "100.conf"), CONF);
    await run("qemu-img", ["create", "-q", "-f", "qcow2", join(images, "vm-100-disk-0.qcow2"), "64M"]);
    // scsi0: content written from the host (the test guest has no virtio-scsi driver, so it stays as written).
    const scsi = Buffer.alloc(32 * MiB);
    for (let off = 0; off < scsi.length; off += 4 * MiB) randomBytes(MiB).copy(scsi, off);
    writeFileSync(join(images, "vm-100-disk-1.raw"), scsi);
    writeFileSync(join(images, "vm-100-disk-2.raw"), Buffer.alloc(8 * MiB, 1));
    const vm = await startPveStyleQemu(r.root, r.run, images, dir);
    t.after(() => stopQemu(vm));

    const adapter = new PveAdapter({ root: r.root });
    assert.deepEqual(await adapter.list(), [
      { adapter: "pve", source: "pve:100", name: "web1", state: "running" },
    ]);
    const store = new FsStore(join(dir, "repo"));
    await Repository.init(store, { chunkSize: 256 * 1024 });
    const repo = await Repository.open(store, { threads: 1 });
    t.after(() => repo.close());
    const state = join(dir, "state");
    const handle = await adapter.resolve("pve:100");
    assert.equal(handle.defaultName, "web1");

    const seq1 = await until("the workload", 60_000, async () => {
      const s = parseLatencySummaries(readFileSync(vm.console, "utf8")).at(-1)?.seq ?? 0;
      return s >= 40 ? s : undefined;
    });
    const probes: Array<{ at: string; version: string; status: string }> = [];
    const logs: string[] = [];
    const opts = {
      vm: "web1",
      mode: "snapshot" as const,
      quiesce: "try" as const,
      stateDir: state,
      log: (m: string) => logs.push(m),
    };
    const r1 = await backupVm(repo, probing(handle, vm.qmp, probes), opts);
    // QMP answered a client of the test's own after the cut and during the reads.
    assert.ok(probes.length >= 3, JSON.stringify(probes));
    assert.ok(
      probes.some((p) => /^read \d+ of scsi0$/.test(p.at)) &&
        probes.some((p) => /^read \d+ of virtio0$/.test(p.at)),
    );
    for (const p of probes) assert.equal(p.status, "running", p.at);
    assert.deepEqual(
      r1.manifest.disks.map((d) => [d.name, d.size, d.readMode]),
      [
        ["scsi0", 32 * MiB, "full"],
        ["virtio0", 64 * MiB, "full"],
      ],
    );
    assert.equal(r1.manifest.mode, "snapshot");
    assert.match(r1.manifest.consistency, /filesystem-consistent|crash-consistent/);
    assert.equal(r1.details.vmid, 100);

    // The configuration document: Proxmox's, with VMID.conf byte for byte and QEMU's inside.
    const snap1 = await repo.findSnapshot(r1.id);
    const doc = JSON.parse((await repo.blob(snap1, snap1.manifest.config!)).toString()) as PveConfigDocument;
    assert.equal(doc.conf, CONF);
    checkDocument(doc);
    assert.equal(doc.kind, "pve");
    assert.equal(doc.vmid, 100);
    assert.equal(doc.name, "web1");
    assert.equal(doc.uuid, UUID);
    assert.deepEqual(
      doc.disks.map((d) => [d.name, d.volume, d.file, d.format, d.size, d.storage, d.storageType]),
      [
        [
          "scsi0",
          "local:100/vm-100-disk-1.raw",
          join(images, "vm-100-disk-1.raw"),
          "raw",
          32 * MiB,
          "local",
          "dir",
        ],
        [
          "virtio0",
          "local:100/vm-100-disk-0.qcow2",
          join(images, "vm-100-disk-0.qcow2"),
          "qcow2",
          64 * MiB,
          "local",
          "dir",
        ],
      ],
    );
    assert.deepEqual(doc.nics, [{ id: "net0", model: "virtio", mac: "BC:24:11:AA:BB:CC", bridge: "vmbr0" }]);
    assert.equal(doc.qemu?.kind, "qemu");
    assert.equal(doc.qemu?.uuid, UUID);
    assert.deepEqual(
      doc.qemu?.nics.map((n) => n.mac?.toUpperCase()),
      ["BC:24:11:AA:BB:CC"],
    );
    assert.ok(!logs.some((l) => /not a drive of|not attached/.test(l)), logs.join("\n"));
    // scsi1 has backup=0: left out of the restore point and its document, and said so.
    assert.ok(
      logs.some((l) => /^scsi1 \(.*\) has backup=0 in .*100\.conf: not backed up$/.test(l)),
      logs.join("\n"),
    );

    // The restored disks: scsi0 exactly as written, virtio0 a gap-free prefix of the workload.
    const out = join(dir, "restored");
    mkdirSync(out);
    await restoreDiskToFile(repo, snap1, "scsi0", join(out, "scsi0.raw"));
    assert.ok(readFileSync(join(out, "scsi0.raw")).equals(scsi), "scsi0 restored byte for byte");
    await restoreDiskToFile(repo, snap1, "virtio0", join(out, "virtio0.raw"));
    const rec = await verifyRecords(join(out, "virtio0.raw"));
    assert.ok(rec.gapFree, `virtio0: missing ${rec.missing.slice(0, 5)}`);
    assert.ok(rec.lastSeq >= seq1, `virtio0 at seq ${rec.lastSeq}, the backup started after ${seq1}`);

    // The second backup reads only what changed: the checkpoint's disk names are the same.
    const probes2: typeof probes = [];
    const r2 = await backupVm(repo, probing(await adapter.resolve("pve:100"), vm.qmp, probes2), opts);
    assert.deepEqual(
      r2.manifest.disks.map((d) => [d.name, d.readMode, d.fullReadReason]),
      [
        ["scsi0", "changed", undefined],
        ["virtio0", "changed", undefined],
      ],
    );
    assert.equal(r2.manifest.disks[0]!.bytesRead, 0, "nothing wrote scsi0");
    assert.ok(
      r2.manifest.disks[1]!.bytesRead < 16 * MiB,
      `virtio0 read ${r2.manifest.disks[1]!.bytesRead} bytes`,
    );
    assert.ok(probes2.some((p) => p.at === "after the cut"));

    // Nothing left on the VM: no strata-* nodes, exports or jobs, one checkpoint bitmap per disk.
    const nodes = await qmpOnce<Array<{ "node-name": string }>>(vm.qmp, "query-named-block-nodes", {
      flat: true,
    });
    assert.deepEqual(
      nodes.map((n) => n["node-name"]).filter((n) => n.startsWith("strata-")),
      [],
    );
    assert.deepEqual(await qmpOnce(vm.qmp, "query-block-exports"), []);
    assert.deepEqual(await qmpOnce(vm.qmp, "query-jobs"), []);
    const blocks = await qmpOnce<
      Array<{ device: string; inserted?: { "dirty-bitmaps"?: Array<{ name: string }> } }>
    >(vm.qmp, "query-block");
    const ours = blocks.filter((x) => /^drive-(scsi0|scsi1|virtio0)$/.test(x.device));
    assert.equal(ours.length, 3);
    for (const b of ours)
      assert.equal(
        b.inserted?.["dirty-bitmaps"]?.filter((x) => x.name.startsWith("strata-")).length,
        1,
        b.device,
      );
    assert.deepEqual(
      readdirSync(state).filter((f) => !f.startsWith(".")),
      [],
    );

    // Restores through the engine (engine/vm-restore.ts finds the adapter by the document's kind):
    // in place over the running VM is refused; a clone gets VMID 101 in the same storage.
    const registry = new AdapterRegistry().register(adapter);
    const snap2 = await repo.findSnapshot(r2.id);
    const stored = await readVmConfig(repo, snap2, registry);
    assert.equal(stored?.adapter, adapter);
    const inPlace = await planVmRestore(stored!, snap2, {});
    await assert.rejects(
      restoreVm(repo, snap2, stored!, inPlace, { force: true, progress: noProgress }),
      (e: unknown) =>
        e instanceof StrataError &&
        e.code === ErrorCode.TARGET_CONFLICT &&
        /Proxmox VM 100 is running .*qm stop 100/.test(e.message),
    );
    const clone = await planVmRestore(stored!, snap2, { target: r.local });
    assert.equal(clone.vmid, 101);
    assert.equal(clone.startHint, "qm start 101");
    const cloned = {
      scsi0: join(r.local, "images", "101", "vm-101-disk-1.raw"),
      virtio0: join(r.local, "images", "101", "vm-101-disk-0.qcow2"),
    };
    assert.deepEqual(
      clone.disks.map((d) => d.path),
      [cloned.scsi0, cloned.virtio0],
    );
    assert.ok(
      clone.warnings.some((w) => /^scsi1 .* is left out: it is not in the restore point$/.test(w)),
      clone.warnings.join("\n"),
    );
    await restoreVm(repo, snap2, stored!, clone, { force: false, progress: noProgress });
    const conf101 = readFileSync(join(r.etc, "qemu-server", "101.conf"), "utf8");
    assert.match(conf101, /^virtio0: local:101\/vm-101-disk-0\.qcow2,cache=none,size=64M$/m);
    assert.match(conf101, /^scsi0: local:101\/vm-101-disk-1\.raw,cache=none,size=32M$/m);
    assert.doesNotMatch(conf101, /^scsi1:/m);
    assert.ok(readFileSync(cloned.scsi0).equals(scsi), "the clone's scsi0 is the original's bytes");
    const rec2 = await verifyRecords(cloned.virtio0, { format: "qcow2" });
    assert.ok(rec2.gapFree && rec2.lastSeq > rec.lastSeq, `the clone's virtio0 at seq ${rec2.lastSeq}`);
    // A second clone gets the next VMID; the first clone's configuration is never overwritten.
    assert.equal((await planVmRestore(stored!, snap2, { target: r.local })).vmid, 102);
    await assert.rejects(adapter.define(clone, true), /VMID 101 was taken meanwhile/);

    // Offline mode is refused while the VM runs: Strata does not shut down Proxmox VMs.
    await assert.rejects(
      backupVm(repo, await adapter.resolve("pve:100"), { ...opts, mode: "offline" }),
      /Proxmox VM 100 is running: Strata does not shut down Proxmox VMs/,
    );
  });
});
