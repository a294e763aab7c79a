// Proxmox VE configuration files, read and written by the pve adapter. Proxmox VE itself can't be
// installed here: fixtures of its files stand in for it. test/pve/fixtures/ holds configurations
// as Proxmox VE 8 writes them (100: lvmthin disks and a snapshot section; 101: OVMF, a dir
// storage with qcow2, EFI and TPM disks, an unused disk and a backup lock; 102: rbd and zfs
// disks, cloud-init, [PENDING] and [special:cloudinit] sections) and a storage.cfg.
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { describe, test } from "node:test";
import { PveConf } from "../../src/hypervisor/pve/conf.js";
import { drives, identity, nics, parseSize } from "../../src/hypervisor/pve/model.js";
import { parseStorageCfg, resolveVolume } from "../../src/hypervisor/pve/storage.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { PVE_FIXTURES } from "../helpers/pve.js";

/** A fixture's bytes, as Proxmox VE wrote them. */
const fixture = (name: string) => readFileSync(join(PVE_FIXTURES, name));

function rejects(text: string | Buffer, pattern: RegExp, code: string = ErrorCode.SOURCE_UNREADABLE) {
  assert.throws(
    () => PveConf.parse(text, { where: "/etc/pve/qemu-server/100.conf" }),
    (err: unknown) => {
      assert.ok(err instanceof StrataError, String(err));
      assert.equal(err.code, code);
      assert.match(err.message, /\/etc\/pve\/qemu-server\/100\.conf/);
      assert.match(err.message, pattern);
      return true;
    },
  );
}

describe("Proxmox VM configuration files", () => {
  test("every fixture round-trips byte for byte, also after an edit is undone", () => {
    for (const f of ["100.conf", "101.conf", "102.conf"]) {
      const bytes = fixture(f);
      const conf = PveConf.parse(bytes, { where: f });
      assert.equal(conf.toString(), bytes.toString("utf8"), f);
      assert.equal(conf.clone().toString(), bytes.toString("utf8"), `${f} (copy)`);
    }
    // Odd but legal spacing and no final newline are kept as they were.
    const odd = "# note\n\nname:   web1  \nmemory:2048\n\n\n[snap1]\nname: web1\t";
    assert.equal(PveConf.parse(odd, { where: "x" }).toString(), odd);
    assert.equal(PveConf.parse("", { where: "x" }).toString(), "");
  });

  test("an edit changes only its own line; new keys go after the main section's last key", () => {
    const text = fixture("100.conf").toString();
    const conf = PveConf.parse(text, { where: "100.conf" });
    conf.set("memory", "4096");
    conf.set("tags", "prod");
    const before = text.split("\n");
    const after = conf.toString().split("\n");
    assert.equal(after.length, before.length + 1);
    const changed = after.filter((l, i) => l !== before[i < 22 ? i : i - 1]);
    assert.deepEqual(changed, ["memory: 4096", "tags: prod"]);
    assert.equal(
      after.indexOf("tags: prod"),
      22,
      "after vmgenid, before the blank line and [before-upgrade]",
    );
    assert.equal(conf.get("memory", "before-upgrade"), "2048", "the snapshot keeps its own value");
  });

  test("drives, NICs, identity and snapshots as qemu-server reads them", () => {
    const c100 = PveConf.parse(fixture("100.conf"), { where: "100.conf" });
    assert.deepEqual(
      drives(c100).map((d) => [d.key, d.volume, d.media, d.sizeBytes, d.backup]),
      [
        ["ide2", "local:iso/debian-12.5.0-amd64-netinst.iso", "cdrom", 629 * 2 ** 20, true],
        ["scsi0", "local-lvm:vm-100-disk-0", "disk", 32 * 2 ** 30, true],
        ["scsi1", "local-lvm:vm-100-disk-1", "disk", 100 * 2 ** 30, false],
      ],
    );
    assert.deepEqual(nics(c100), [
      { id: "net0", model: "virtio", mac: "BC:24:11:AA:BB:CC", bridge: "vmbr0" },
    ]);
    assert.deepEqual(identity(c100), {
      name: "web1",
      uuid: "0b7e5c1e-4f2a-4c1b-9d3e-7a1f2b3c4d5e",
      cpus: 2,
      memoryBytes: 2048 * 2 ** 20,
    });
    assert.deepEqual(c100.snapshots(), ["before-upgrade"]);
    assert.equal(c100.get("vmstate", "before-upgrade"), "local-lvm:vm-100-state-before-upgrade");

    const c101 = PveConf.parse(fixture("101.conf"), { where: "101.conf" });
    assert.deepEqual(
      drives(c101).map((d) => d.key),
      ["efidisk0", "tpmstate0", "virtio0"],
    );
    assert.deepEqual(
      nics(c101).map((n) => [n.id, n.model, n.mac, n.bridge]),
      [
        ["net0", "e1000", "BC:24:11:12:34:56", "vmbr1"],
        ["net1", "virtio", "BC:24:11:65:43:21", "vmbr0"],
      ],
    );
    // `memory: current=4096` (PVE 8.1+), 2 sockets x 2 cores.
    assert.deepEqual(identity(c101), {
      name: "win-dc01",
      uuid: "9a8b7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d",
      cpus: 4,
      memoryBytes: 4096 * 2 ** 20,
    });

    const c102 = PveConf.parse(fixture("102.conf"), { where: "102.conf" });
    assert.deepEqual(c102.snapshots(), [], "PENDING and special:cloudinit are not snapshots");
    assert.equal(c102.get("memory", "PENDING"), "2048");
    assert.equal(drives(c102).find((d) => d.key === "ide2")?.media, "cdrom");
    assert.equal(parseSize("528K"), 528 * 1024);
    assert.equal(parseSize("12x"), undefined);
  });

  test("storage.cfg maps volumes to paths; other storage types are named as not handled", () => {
    const storages = parseStorageCfg(fixture("storage.cfg").toString(), "storage.cfg");
    assert.deepEqual([...storages.keys()], ["local", "local-lvm", "ceph-vm", "local-zfs", "nas"]);
    const path = (v: string) => {
      const r = resolveVolume(storages, v);
      assert.equal(r.kind, "path", v);
      return r.kind === "path" ? [r.path, r.format] : [];
    };
    assert.deepEqual(path("local-lvm:vm-100-disk-0"), ["/dev/pve/vm-100-disk-0", "raw"]);
    assert.deepEqual(path("local-lvm:base-100-disk-0/vm-101-disk-0"), ["/dev/pve/vm-101-disk-0", "raw"]);
    assert.deepEqual(path("local:101/vm-101-disk-1.qcow2"), [
      "/var/lib/vz/images/101/vm-101-disk-1.qcow2",
      "qcow2",
    ]);
    assert.deepEqual(path("local:100/base-100-disk-0.qcow2/101/vm-101-disk-0.qcow2"), [
      "/var/lib/vz/images/101/vm-101-disk-0.qcow2",
      "qcow2",
    ]);
    assert.deepEqual(path("nas:105/vm-105-disk-0.raw"), ["/mnt/pve/nas/images/105/vm-105-disk-0.raw", "raw"]);
    assert.deepEqual(path("/dev/disk/by-id/ata-WDC_1234"), ["/dev/disk/by-id/ata-WDC_1234", undefined]);
    for (const [v, type] of [
      ["ceph-vm:vm-102-disk-0", "rbd"],
      ["local-zfs:vm-102-disk-1", "zfspool"],
    ] as const) {
      const r = resolveVolume(storages, v);
      assert.equal(r.kind, "unhandled");
      if (r.kind === "unhandled")
        assert.match(r.reason, new RegExp(`type ${type}, which Strata does not map`));
    }
    for (const [v, why] of [
      ["nowhere:vm-1-disk-0", /storage "nowhere" is not defined/],
      ["local:../../etc/shadow", /not an image of dir storage local/],
      ["local:101/../../x.qcow2", /not an image of dir storage local/],
      ["local-lvm:../../dev/sda", /not a logical volume/],
      ["/var/lib/vz/../../etc/shadow", /'\.\.'/],
      ["vm-100-disk-0", /neither STORAGE:VOLUME nor an absolute path/],
    ] as const) {
      assert.throws(() => resolveVolume(storages, v), why, v);
    }
    assert.throws(
      () => parseStorageCfg("dir: local\n\tpath /x\ndir: local\n\tpath /y\n", "s.cfg"),
      /s\.cfg, line 3: storage local is defined twice/,
    );
    assert.throws(() => parseStorageCfg("dir local\n", "s.cfg"), /s\.cfg, line 1: not "TYPE: ID"/);
  });

  test("malformed configurations are refused with the file, the line and what is wrong", () => {
    rejects("name: web1\nthis is not a key\n", /line 2: not "key: value", a \[section\] or a # comment/);
    rejects(
      "name: web1\nmemory: 1\nname: web2\n",
      /line 3: key name appears twice in one section \(also line 1\)/,
    );
    rejects("name: a\n\n[s1]\nname: b\n\n[s1]\nname: c\n", /line 6: section \[s1\] appears twice/);
    rejects("name: web1\nmemory:\n", /line 2: key memory has no value/);
    rejects("name: web1\r\nmemory: 512\r\n", /line 1: holds a control character/);
    rejects("name: we\u0000b1\n", /line 1: holds a control character/);
    rejects("Name: web1\n", /line 1: not "key: value"/);
    rejects("[../../etc]\n", /line 1: not "key: value"/);
    rejects(Buffer.from([0x6e, 0x61, 0x6d, 0x65, 0x3a, 0x20, 0xff, 0xfe, 0x0a]), /not valid UTF-8/);
    rejects(`description: ${"x".repeat(70_000)}\n`, /line 1: longer than 65536 bytes/);
    rejects("#x\n".repeat(400_000), /larger than 1048576 bytes/);
    rejects("#\n".repeat(20_001), /more than 20000 lines/);
    rejects(
      Array.from({ length: 1001 }, (_, i) => `[s${i}]\nname: x\n`).join(""),
      /line 2001: more than 1000 sections/,
    );
  });
});
