// Restore planning and definition of Proxmox VMs by the pve adapter, against a fixture root
// standing in for a Proxmox VE host (Proxmox VE itself can't be installed here; see
// test/helpers/pve.ts): clones get a new VMID, name, MACs, smbios1 UUID, vmgenid and volume
// names and never overwrite a configuration; in place rewrites VMID.conf only when a disk's path
// changes; storages Strata can't write to are refused clearly; a configuration document read
// from a repository is checked before use.
import assert from "node:assert/strict";
import { existsSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { describe, test } from "node:test";
import type { RestorePlan, VmConfigDocument } from "../../src/hypervisor/adapter.js";
import { PveConf } from "../../src/hypervisor/pve/conf.js";
import { PveAdapter } from "../../src/hypervisor/pve/index.js";
import {
  buildDocument,
  checkDocument,
  nics,
  type PveConfigDocument,
} from "../../src/hypervisor/pve/model.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { pveFixture, pveRoot } from "../helpers/pve.js";

/** Where a plan is restored from (the engine passes the restore point). */
const RP = {
  restorePoint: { vm: "web1", time: "2026-11-29T10:00:00Z", consistency: "crash-consistent" as const },
};
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
const PVE_MAC = /^BC:24:11:[0-9A-F]{2}:[0-9A-F]{2}:[0-9A-F]{2}$/;

/** The document a backup of VM `vmid` would record (from its configuration alone). */
async function docOf(adapter: PveAdapter, vmid: number): Promise<PveConfigDocument> {
  const text = readFileSync(adapter.confPath(vmid), "utf8");
  const conf = PveConf.parse(text, { where: `${vmid}.conf` });
  const doc = buildDocument(vmid, text, conf, await adapter.storages(), null, () => {});
  // JSON, as it comes back from a repository.
  return JSON.parse(JSON.stringify(doc)) as PveConfigDocument;
}

const available = (doc: PveConfigDocument, only?: string[]) =>
  doc.disks
    .filter((d) => !only || only.includes(d.name))
    .map((d) => ({ name: d.name, size: d.size || 2 ** 20 }));

async function refused(p: Promise<unknown> | (() => unknown), code: string, pattern: RegExp) {
  const run = typeof p === "function" ? async () => p() : () => p;
  await assert.rejects(run, (err: unknown) => {
    assert.ok(err instanceof StrataError, String(err));
    assert.equal(err.code, code, err.message);
    assert.match(err.message, pattern);
    return true;
  });
}

/** Lines of `a` that are not in `b`. */
const minus = (a: string, b: string) => {
  const other = new Set(b.split("\n"));
  return a.split("\n").filter((l) => !other.has(l));
};

describe("Proxmox VM restores (fixture root)", () => {
  test("a clone gets the next free VMID, a new identity and volumes, and never overwrites a configuration", async (t) => {
    const r = pveRoot(t, { 100: "100.conf", 101: "101.conf", 102: "102.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const doc = await docOf(adapter, 100);
    const plan = await adapter.planRestore(doc, { ...RP, target: r.local, available: available(doc) });
    assert.equal(plan.vmid, 103, "one above the highest VMID in use");
    assert.equal(plan.clone, true);
    assert.equal(plan.startHint, "qm start 103");
    assert.deepEqual(
      plan.disks.map((d) => [d.name, d.format, d.path]),
      [
        ["scsi0", "raw", join(r.local, "images", "103", "vm-103-disk-0.raw")],
        ["scsi1", "raw", join(r.local, "images", "103", "vm-103-disk-1.raw")],
      ],
    );
    assert.equal(plan.definition.file, join(r.etc, "qemu-server", "103.conf"));
    const original = pveFixture("100.conf");
    const text = plan.definition.text;
    const conf = PveConf.parse(text, { where: "clone" });
    assert.equal(conf.get("name"), "web1-restored");
    assert.equal(conf.get("scsi0"), "local:103/vm-103-disk-0.raw,iothread=1,size=32G");
    assert.equal(conf.get("scsi1"), "local:103/vm-103-disk-1.raw,backup=0,discard=on,iothread=1,size=100G");
    const mac = nics(conf)[0]!.mac!;
    assert.match(mac, PVE_MAC);
    assert.notEqual(mac, "BC:24:11:AA:BB:CC");
    assert.equal(conf.get("net0"), `virtio=${mac},bridge=vmbr0,firewall=1`);
    const smbios = /^uuid=([0-9a-f-]+),manufacturer=UHJveG1veA==,base64=1$/.exec(conf.get("smbios1")!);
    assert.ok(smbios, conf.get("smbios1"));
    assert.match(smbios[1]!, UUID);
    assert.notEqual(smbios[1], "0b7e5c1e-4f2a-4c1b-9d3e-7a1f2b3c4d5e");
    assert.match(conf.get("vmgenid")!, UUID);
    assert.notEqual(conf.get("vmgenid"), "5c3b1f0e-2d4a-4e6b-8c9d-0a1b2c3d4e5f");
    assert.deepEqual(conf.snapshots(), [], "the restored disks hold no snapshots");
    assert.equal(conf.get("parent"), undefined);
    // Everything else is the original's, byte for byte (comments, CD-ROM, boot order, meta).
    assert.deepEqual(
      minus(text, original).sort(),
      [
        `net0: virtio=${mac},bridge=vmbr0,firewall=1`,
        "name: web1-restored",
        "scsi0: local:103/vm-103-disk-0.raw,iothread=1,size=32G",
        "scsi1: local:103/vm-103-disk-1.raw,backup=0,discard=on,iothread=1,size=100G",
        `smbios1: ${conf.get("smbios1")}`,
        `vmgenid: ${conf.get("vmgenid")}`,
      ].sort(),
    );
    assert.ok(text.startsWith("#Web front end%3A nginx and php-fpm\n#\n#Owner: web team\nagent: 1\n"));
    assert.ok(text.includes("\nide2: local:iso/debian-12.5.0-amd64-netinst.iso,media=cdrom,size=629M\n"));
    assert.ok(
      plan.warnings.some((w) => /snapshots before-upgrade are left out/.test(w)),
      plan.warnings.join("\n"),
    );
    // The plan's document is the clone's, consistent with its text, and renders as it.
    const cdoc = checkDocument(plan.config);
    assert.equal(cdoc.vmid, 103);
    assert.equal(cdoc.uuid, smbios[1]);
    assert.deepEqual(
      cdoc.disks.map((d) => [d.name, d.volume, d.storage]),
      [
        ["scsi0", "local:103/vm-103-disk-0.raw", "local"],
        ["scsi1", "local:103/vm-103-disk-1.raw", "local"],
      ],
    );
    assert.equal(adapter.renderConfig(plan.config, "pve"), text);
    assert.equal(JSON.parse(adapter.renderConfig(plan.config, "json")).vmid, 103);
    await refused(
      () => adapter.renderConfig(plan.config, "xml"),
      ErrorCode.USAGE,
      /renders as pve or json, not xml/,
    );

    await adapter.define(plan, false);
    assert.equal(readFileSync(join(r.etc, "qemu-server", "103.conf"), "utf8"), text);
    // Never over an existing configuration, --force or not.
    await refused(adapter.define(plan, true), ErrorCode.TARGET_CONFLICT, /VMID 103 was taken meanwhile/);
    assert.equal(readFileSync(join(r.etc, "qemu-server", "103.conf"), "utf8"), text);
    // Nor over another node's VM of a cluster.
    writeFileSync(join(r.etc, "qemu-server", "103.conf"), "name: other\n");
    const again = await adapter.planRestore(doc, { ...RP, target: r.local, available: available(doc) });
    assert.equal(again.vmid, 104);
    const nodeDir = join(r.etc, "nodes", "pve2", "lxc");
    await import("node:fs/promises").then((fs) => fs.mkdir(nodeDir, { recursive: true }));
    writeFileSync(join(nodeDir, "104.conf"), "hostname: ct\n");
    await refused(adapter.define(again, false), ErrorCode.TARGET_CONFLICT, /VMID 104 was taken meanwhile/);
    assert.equal(
      (await adapter.planRestore(doc, { ...RP, target: r.local, available: available(doc) })).vmid,
      105,
    );
  });

  test("--name picks the clone's VMID or its name; a taken VMID or a bad name is refused", async (t) => {
    const r = pveRoot(t, { 100: "100.conf", 101: "101.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const doc = await docOf(adapter, 100);
    const opts = { target: r.local, available: available(doc) };
    const p205 = await adapter.planRestore(doc, { ...RP, ...opts, name: "205" });
    assert.equal(p205.vmid, 205);
    assert.equal(PveConf.parse(p205.definition.text, { where: "x" }).get("name"), "web1-restored");
    const named = await adapter.planRestore(doc, { ...RP, ...opts, name: "web1-copy" });
    assert.equal(named.vmid, 102);
    assert.equal(named.config.name, "web1-copy");
    await refused(
      adapter.planRestore(doc, { ...RP, ...opts, name: "101" }),
      ErrorCode.TARGET_CONFLICT,
      /VMID 101 is taken/,
    );
    await refused(adapter.planRestore(doc, { ...RP, ...opts, name: "42" }), ErrorCode.USAGE, /out of range/);
    await refused(
      adapter.planRestore(doc, { ...RP, ...opts, name: "web_1!" }),
      ErrorCode.USAGE,
      /not a valid Proxmox VM name/,
    );
    // A directory that is no storage's: absolute paths, said so.
    const elsewhere = join(r.root, "srv", "clones");
    const abs = await adapter.planRestore(doc, { ...RP, target: elsewhere, available: available(doc) });
    assert.equal(
      PveConf.parse(abs.definition.text, { where: "x" }).get("scsi0"),
      `${join(elsewhere, "vm-102-disk-0.raw")},iothread=1,size=32G`,
    );
    assert.ok(abs.warnings.some((w) => /not the directory of a dir storage/.test(w)));
  });

  test("a clone leaves out what it would share with the original: TPM state, unused disks, the lock", async (t) => {
    const r = pveRoot(t, { 101: "101.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const doc = await docOf(adapter, 101);
    const plan = await adapter.planRestore(doc, {
      ...RP,
      target: join(r.local, "images", "102"),
      available: available(doc, ["efidisk0", "virtio0"]),
    });
    assert.equal(plan.vmid, 102);
    const conf = PveConf.parse(plan.definition.text, { where: "clone" });
    assert.equal(
      conf.get("efidisk0"),
      "local:102/vm-102-disk-0.qcow2,efitype=4m,pre-enrolled-keys=1,size=528K",
    );
    assert.equal(conf.get("virtio0"), "local:102/vm-102-disk-1.qcow2,cache=writeback,discard=on,size=8G");
    assert.equal(conf.get("tpmstate0"), undefined);
    assert.equal(conf.get("unused0"), undefined);
    assert.equal(conf.get("lock"), undefined);
    const [n0, n1] = nics(conf);
    assert.match(n0!.mac!, PVE_MAC);
    assert.match(n1!.mac!, PVE_MAC);
    assert.notEqual(n0!.mac, n1!.mac);
    assert.equal(conf.get("net0"), `e1000=${n0!.mac},bridge=vmbr1,tag=20`);
    assert.equal(conf.get("net1"), `model=virtio,macaddr=${n1!.mac},bridge=vmbr0,queues=2`);
    assert.equal(conf.get("memory"), "current=4096");
    assert.ok(
      plan.warnings.some((w) =>
        /tpmstate0 .* is left out: the TPM state is not in the restore point/.test(w),
      ),
    );
    assert.ok(plan.warnings.some((w) => /unused0 .* unused disks are not backed up/.test(w)));
  });

  test("in place: same volumes and VMID; VMID.conf is written only when missing or when a path changes", async (t) => {
    const r = pveRoot(t, { 101: "101.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const doc = await docOf(adapter, 101);
    const opts = { available: available(doc, ["efidisk0", "virtio0"]) };
    const plan = await adapter.planRestore(doc, { ...RP, ...opts });
    assert.equal(plan.clone, false);
    assert.equal(plan.vmid, 101);
    assert.deepEqual(
      plan.disks.map((d) => [d.name, d.format, d.path]),
      [
        ["efidisk0", "qcow2", join(r.local, "images", "101", "vm-101-disk-0.qcow2")],
        ["virtio0", "qcow2", join(r.local, "images", "101", "vm-101-disk-1.qcow2")],
      ],
    );
    assert.equal(plan.definition.text, pveFixture("101.conf"));
    assert.equal(plan.definition.file, undefined, "the existing configuration is not written");
    const confFile = join(r.etc, "qemu-server", "101.conf");
    writeFileSync(confFile, `${pveFixture("101.conf")}tags: edited-since\n`);
    await adapter.define(plan, true);
    assert.match(
      readFileSync(confFile, "utf8"),
      /tags: edited-since/,
      "an existing configuration is left alone",
    );
    rmSync(confFile);
    const gone = await adapter.planRestore(doc, { ...RP, ...opts });
    assert.equal(gone.definition.file, confFile);
    await adapter.define(gone, false);
    assert.equal(
      readFileSync(confFile, "utf8"),
      pveFixture("101.conf"),
      "a deleted VM comes back byte for byte",
    );
    await refused(
      adapter.define(gone, true),
      ErrorCode.TARGET_CONFLICT,
      /101\.conf exists: Strata never overwrites/,
    );

    // Another format changes the file names: the configuration is rewritten, with --force only.
    const raw = await adapter.planRestore(doc, { ...RP, ...opts, format: "raw" });
    assert.deepEqual(
      raw.disks.map((d) => d.path),
      [
        join(r.local, "images", "101", "vm-101-disk-0.raw"),
        join(r.local, "images", "101", "vm-101-disk-1.raw"),
      ],
    );
    assert.deepEqual(minus(raw.definition.text, pveFixture("101.conf")).sort(), [
      "efidisk0: local:101/vm-101-disk-0.raw,efitype=4m,pre-enrolled-keys=1,size=528K",
      "virtio0: local:101/vm-101-disk-1.raw,cache=writeback,discard=on,size=8G",
    ]);
    assert.ok(!raw.definition.text.includes("lock: backup"));
    await refused(
      adapter.define(raw, false),
      ErrorCode.TARGET_CONFLICT,
      /exists and the restored disks have other paths: use --force/,
    );
    await adapter.define(raw, true);
    assert.equal(readFileSync(confFile, "utf8"), raw.definition.text);

    // One disk: no configuration is written.
    const one = await adapter.planRestore(doc, { ...RP, ...opts, disk: "virtio0" });
    assert.deepEqual(
      one.disks.map((d) => d.name),
      ["virtio0"],
    );
    assert.equal(one.definition.file, undefined);
    await refused(
      adapter.planRestore(doc, { ...RP, ...opts, disk: "scsi7" }),
      ErrorCode.NOT_FOUND,
      /no disk "scsi7" \(it has: efidisk0, virtio0\)/,
    );
  });

  test("in place onto storages Strata can't write is refused, naming the storage and what to do", async (t) => {
    const r = pveRoot(t, { 100: "100.conf", 102: "102.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const d100 = await docOf(adapter, 100);
    await refused(
      adapter.planRestore(d100, { ...RP, available: available(d100) }),
      ErrorCode.TARGET_CONFLICT,
      /disk scsi0 \(local-lvm:vm-100-disk-0\) can't be restored in place: its logical volume \/dev\/pve\/vm-100-disk-0 does not exist; create it first \(lvcreate -n vm-100-disk-0 .* --thinpool data\).*--target DIR/,
    );
    await refused(
      adapter.planRestore(d100, { ...RP, available: available(d100), format: "qcow2" }),
      ErrorCode.USAGE,
      /lvmthin storage local-lvm, which holds raw volumes only/,
    );
    const d102 = await docOf(adapter, 102);
    await refused(
      adapter.planRestore(d102, { ...RP, available: available(d102, ["scsi0"]) }),
      ErrorCode.TARGET_CONFLICT,
      /disk scsi0 \(ceph-vm:vm-102-disk-0\) can't be restored in place: storage ceph-vm is of type rbd, which Strata does not map to a path/,
    );
    // As a clone into a directory it works.
    const clone = await adapter.planRestore(d102, { ...RP, target: r.local, available: available(d102) });
    assert.deepEqual(
      clone.disks.map((d) => d.path),
      [
        join(r.local, "images", "103", "vm-103-disk-0.raw"),
        join(r.local, "images", "103", "vm-103-disk-1.raw"),
      ],
    );
    const conf = PveConf.parse(clone.definition.text, { where: "clone" });
    assert.deepEqual(conf.snapshots(), []);
    assert.equal(conf.get("vmgenid"), "0", "vmgenid 0 (disabled) stays disabled");
    assert.equal(conf.get("ide2"), "ceph-vm:vm-103-cloudinit,media=cdrom", "a cloud-init drive of its own");
    assert.ok(clone.warnings.some((w) => /sections \[PENDING\], \[special:cloudinit\] are left out/.test(w)));
  });

  test("a configuration document from a repository is checked before anything uses it", async (t) => {
    const r = pveRoot(t, { 101: "101.conf" });
    const adapter = new PveAdapter({ root: r.root });
    const good = await docOf(adapter, 101);
    assert.deepEqual(
      adapter.parseConfig(good).disks.map((d) => d.name),
      ["efidisk0", "tpmstate0", "virtio0"],
    );
    const bad = (change: (d: Record<string, unknown>) => void, pattern: RegExp) => {
      const d = JSON.parse(JSON.stringify(good)) as Record<string, unknown>;
      change(d);
      assert.throws(
        () => adapter.parseConfig(d as unknown as VmConfigDocument),
        (err: unknown) =>
          err instanceof StrataError && err.code === ErrorCode.DATA_CORRUPT && pattern.test(err.message),
        String(pattern),
      );
    };
    const disk0 = (d: Record<string, unknown>) => (d.disks as Array<Record<string, unknown>>)[0]!;
    bad((d) => {
      d.kind = "qemu";
    }, /kind is "qemu", not "pve"/);
    bad((d) => {
      d.vmid = "101; rm -rf /";
    }, /vmid: the vmid .* is not a Proxmox VM id/);
    bad((d) => {
      d.vmid = 12;
    }, /vmid: the vmid .* is not a Proxmox VM id/);
    bad((d) => {
      d.conf = `${d.conf}garbage line\n`;
    }, /of VM 101 in the repository, line 20: not "key: value"/);
    bad((d) => {
      d.conf = "#".repeat(2 * 1024 * 1024);
    }, /at most 1 MiB/);
    bad((d) => {
      disk0(d).name = "../../etc/passwd";
    }, /not a Proxmox drive key/);
    bad((d) => {
      disk0(d).name = "scsi5";
    }, /disks\.0\.name: disk scsi5 is not in the configuration text/);
    bad((d) => {
      disk0(d).volume = "local:101/other.qcow2";
    }, /volume differs/);
    bad((d) => {
      disk0(d).size = -1;
    }, /disks\.0\.size: the size is not a whole number/);
    bad((d) => {
      disk0(d).format = "qcow2; x";
    }, /disks\.0\.format: the format is not raw or qcow2 or vmdk/);
    bad((d) => {
      d.disks = [disk0(d), disk0(d)];
    }, /appears twice/);
    bad((d) => {
      (d.nics as Array<Record<string, unknown>>)[0]!.id = "net9";
    }, /NIC "net9" is not in the configuration text/);
    bad((d) => {
      d.conf = (d.conf as string).replace("e1000=BC:24:11:12:34:56", "e1000=BC:24:11:12:34");
    }, /NIC net0 has a bad MAC/);
    bad((d) => {
      d.uuid = "not-a-uuid";
    }, /uuid: the UUID "not-a-uuid" is not a UUID/);
    await refused(
      adapter.planRestore({ ...good, kind: "libvirt" } as VmConfigDocument, { ...RP, available: [] }),
      ErrorCode.DATA_CORRUPT,
      /not "pve"/,
    );
  });

  test("list, resolve and the running check", async (t) => {
    const r = pveRoot(t, { 100: "100.conf", 101: "101.conf", 102: "102.conf" });
    writeFileSync(join(r.etc, "qemu-server", "103.conf"), "this is not a configuration\n");
    writeFileSync(join(r.etc, "qemu-server", "notes.txt"), "x\n");
    const adapter = new PveAdapter({ root: r.root });
    // A socket that accepts but never greets: a monitor someone else holds.
    const server = createServer(() => {});
    await new Promise<void>((res) => server.listen(join(r.run, "101.qmp"), res));
    t.after(() => server.close());
    assert.deepEqual(await adapter.list(), [
      { adapter: "pve", source: "pve:100", name: "web1", state: "shut off" },
      { adapter: "pve", source: "pve:101", name: "win-dc01", state: "unknown" },
      { adapter: "pve", source: "pve:102", name: "k8s-node1", state: "shut off" },
      { adapter: "pve", source: "pve:103", name: "vm-103", state: "shut off" },
    ]);
    const h = await adapter.resolve("pve:100");
    assert.equal(h.defaultName, "web1");
    assert.equal(h.source, "pve:100");
    await refused(adapter.resolve("pve:42"), ErrorCode.USAGE, /pve:VMID .*VMID 100 to 999999999/);
    await refused(adapter.resolve("pve:web1"), ErrorCode.USAGE, /bad source "pve:web1"/);
    await refused(
      adapter.resolve("pve:999"),
      ErrorCode.NOT_FOUND,
      new RegExp(`no Proxmox VM 999: ${join(r.etc, "qemu-server", "999.conf")} does not exist`),
    );
    await refused(
      adapter.resolve("pve:103"),
      ErrorCode.SOURCE_UNREADABLE,
      /103\.conf, line 1: not "key: value"/,
    );
    // In place over a VM whose monitor answers: refused.
    const d101 = await docOf(adapter, 101);
    const plan = (await adapter.planRestore(d101, {
      ...RP,
      available: available(d101, ["virtio0"]),
    })) as RestorePlan;
    await refused(
      adapter.refuseIfRunning(plan),
      ErrorCode.TARGET_CONFLICT,
      /Proxmox VM 101 is running .*qm stop 101/,
    );
    server.close();
    await new Promise((res) => setTimeout(res, 50));
    rmSync(join(r.run, "101.qmp"), { force: true });
    await adapter.refuseIfRunning(plan);
    assert.ok(!existsSync(join(r.etc, "qemu-server", "104.conf")));
  });
});

describe("the QEMU session's disks and VMID.conf", () => {
  test("disks map to configuration keys by name; disks of one side only are said", () => {
    const text = pveFixture("100.conf");
    const conf = PveConf.parse(text, { where: "100.conf" });
    const storages = new Map();
    const logs: string[] = [];
    const qemuDoc = { kind: "qemu", name: "web1", uuid: null, cpus: 2, memoryBytes: 1, disks: [], nics: [] };
    const doc = buildDocument(
      100,
      text,
      conf,
      storages,
      {
        doc: qemuDoc,
        disks: [
          { name: "scsi0", file: "/dev/pve/vm-100-disk-0", format: "raw", size: 32 * 2 ** 30 },
          { name: "ide5", file: "/tmp/hotplug.qcow2", format: "qcow2", size: 2 ** 20 },
        ],
      },
      (m) => logs.push(m),
    );
    assert.deepEqual(
      doc.disks.map((d) => [d.name, d.volume, d.file, d.size]),
      [["scsi0", "local-lvm:vm-100-disk-0", "/dev/pve/vm-100-disk-0", 32 * 2 ** 30]],
    );
    assert.equal(doc.qemu, qemuDoc);
    assert.ok(
      logs.some((l) =>
        /^disk ide5 \(\/tmp\/hotplug\.qcow2\) of the running VM is not a drive of 100\.conf/.test(l),
      ),
      logs.join("\n"),
    );
    assert.ok(
      logs.some((l) => /^scsi1 \(local-lvm:vm-100-disk-1\) is in 100\.conf but not attached/.test(l)),
      logs.join("\n"),
    );
    assert.ok(!logs.some((l) => /ide2/.test(l)), "a CD-ROM is no disk");
    checkDocument(JSON.parse(JSON.stringify(doc)));
  });
});

describe("in place, paths a stored configuration names", () => {
  test("absolute paths are written only inside a file storage or as block devices; another VM on the VMID is said", async (t) => {
    const r = pveRoot(t, {});
    const inside = join(r.local, "images", "100", "extra.raw");
    writeFileSync(
      join(r.etc, "qemu-server", "100.conf"),
      `name: odd\nsmbios1: uuid=0b7e5c1e-4f2a-4c1b-9d3e-7a1f2b3c4d5e\nvirtio0: /etc/shadow,size=1M\nvirtio1: ${inside},size=1M\nvirtio2: /dev/null,size=1M\n`,
    );
    const adapter = new PveAdapter({ root: r.root });
    const doc = await docOf(adapter, 100);
    await refused(
      adapter.planRestore(doc, { ...RP, available: available(doc, ["virtio0"]) }),
      ErrorCode.TARGET_CONFLICT,
      /disk virtio0 \(\/etc\/shadow\) can't be restored in place: \/etc\/shadow is neither a block device nor inside a file storage/,
    );
    await refused(
      adapter.planRestore(doc, { ...RP, available: available(doc, ["virtio2"]) }),
      ErrorCode.TARGET_CONFLICT,
      /\/dev\/null is neither a block device/,
    );
    const ok = await adapter.planRestore(doc, { ...RP, available: available(doc, ["virtio1"]) });
    assert.deepEqual(
      ok.disks.map((d) => d.path),
      [inside],
    );
    assert.ok(!ok.warnings.some((w) => /another VM/.test(w)));
    writeFileSync(
      join(r.etc, "qemu-server", "100.conf"),
      "name: new\nsmbios1: uuid=11111111-2222-4333-8444-555555555555\n",
    );
    const other = await adapter.planRestore(doc, { ...RP, available: available(doc, ["virtio1"]) });
    assert.ok(
      other.warnings.some((w) =>
        /100\.conf now describes another VM \(smbios1 UUID 11111111-2222-4333-8444-555555555555/.test(w),
      ),
      other.warnings.join("\n"),
    );
  });
});
