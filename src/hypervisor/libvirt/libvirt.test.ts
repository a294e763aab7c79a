// The libvirt adapter's parsing and planning, in-process (no libvirtd): source URIs, hostile
// XML and checkpoint records, and the clone rewrite of a domain XML.
import assert from "node:assert/strict";
import { test } from "node:test";
import { readCheckpointRecord, redefinableXml } from "./backup.js";
import { parseLibvirtConfig } from "./config.js";
import { parseDomain } from "./domain.js";
import { parseLibvirtUri } from "./index.js";
import { checkLibvirtInstantVm } from "./instant.js";
import { cloneFacts, planLibvirtRestore } from "./restore.js";
import { parseXml } from "./xml.js";

const XML = `<domain type='kvm'>
  <name>web1</name>
  <uuid>0d4c2f9e-2b5a-4c1e-9a53-0a3c6f1e2b7d</uuid>
  <memory unit='GiB'>2</memory>
  <vcpu placement='static'>2</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type><nvram>/var/lib/libvirt/qemu/nvram/web1_VARS.fd</nvram></os>
  <devices>
    <disk type='file' device='disk'>
      <driver name='qemu' type='qcow2'/>
      <source file='/var/lib/libvirt/images/web1.qcow2'/>
      <backingStore/>
      <target dev='vda' bus='virtio'/>
    </disk>
    <disk type='block' device='disk'>
      <driver name='qemu' type='raw'/>
      <source dev='/dev/vg0/web1-data'/>
      <target dev='vdb' bus='virtio'/>
    </disk>
    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='/iso/debian.iso'/>
      <target dev='sda' bus='sata'/>
      <readonly/>
    </disk>
    <interface type='network'><mac address='52:54:00:aa:bb:cc'/><source network='default'/><model type='virtio'/></interface>
    <serial type='file'><source path='/var/log/web1.console'/><target port='0'/></serial>
    <console type='file'><source path='/var/log/web1.console'/><target type='serial' port='0'/></console>
    <channel type='unix'><source mode='bind' path='/var/lib/libvirt/qemu/web1.agent'/><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
    <graphics type='vnc' port='5901' autoport='no'/>
  </devices>
</domain>
`;

const doc = () =>
  parseLibvirtConfig({
    kind: "libvirt",
    name: "web1",
    uuid: null,
    cpus: 0,
    memoryBytes: 0,
    disks: [
      { name: "vda", file: "", format: "", size: 10 << 20 },
      { name: "vdb", file: "", format: "", size: 20 << 20 },
    ],
    nics: [],
    xml: XML,
  });

test("source URIs: domain and connection, and clear refusals", () => {
  assert.deepEqual(parseLibvirtUri("libvirt:web1"), { domain: "web1", uri: "qemu:///system" });
  assert.deepEqual(parseLibvirtUri("libvirt:web1?uri=qemu+ssh://root@h2/system"), {
    domain: "web1",
    uri: "qemu+ssh://root@h2/system",
  });
  assert.throws(() => parseLibvirtUri("libvirt:"), /USAGE|not a domain name/);
  assert.throws(() => parseLibvirtUri("libvirt:../etc"), /not a domain name Strata handles/);
  assert.throws(() => parseLibvirtUri("libvirt:web1?url=x"), /unknown or bad option "url=x"/);
  assert.throws(() => parseLibvirtUri("libvirt:web1?uri=qemu:///system;rm"), /unknown or bad option/);
  assert.throws(() => parseLibvirtUri("qmp:/x"), /not a libvirt source/);
});

test("domain XML: what a backup reads, with units and validation", () => {
  const d = parseDomain(XML);
  assert.equal(d.memoryBytes, 2 * 1024 ** 3);
  assert.equal(d.cpus, 2);
  assert.deepEqual(
    d.disks.map((x) => [x.target, x.type, x.device, x.format, x.source, x.readonly]),
    [
      ["vda", "file", "disk", "qcow2", "/var/lib/libvirt/images/web1.qcow2", false],
      ["vdb", "block", "disk", "raw", "/dev/vg0/web1-data", false],
      ["sda", "file", "cdrom", "raw", "/iso/debian.iso", true],
    ],
  );
  assert.throws(() => parseDomain(XML.replace("<name>web1", "<name>web 1")), /not one Strata handles/);
  assert.throws(() => parseDomain(XML.replace("web1.qcow2", "../../etc/shadow")), /unusable path/);
  assert.throws(
    () => parseDomain(XML.replace("<memory unit='GiB'>2", "<memory unit='GiB'>-2")),
    /bad <memory>/,
  );
  assert.throws(() => parseDomain(XML.replace("dev='vdb'", "dev='vda'")), /two disks are vda/);
});

test("hostile XML: entities, size, depth, wrong root", () => {
  const bomb = `<!DOCTYPE d [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><domain><name>&b;</name></domain>`;
  assert.throws(() => parseXml(bomb, "domain", "t"), /DOCTYPE or ENTITY/);
  assert.throws(() => parseXml(`<domain>${"x".repeat(1024 * 1024)}</domain>`, "domain", "t"), /at most/);
  assert.throws(() => parseXml(`${"<a>".repeat(100)}${"</a>".repeat(100)}`, "a", "t"), /nested too deeply/);
  assert.throws(() => parseXml("<network/>", "domain", "t"), /expected one <domain>/);
  assert.throws(() => parseXml("<domain><name>x</domain>", "domain", "t"), /not well-formed XML \(line 1/);
});

test("checkpoint records from a manifest are checked before use", () => {
  const good = {
    kind: "libvirt-checkpoint",
    repository: "ab",
    domain: "web1",
    uuid: "0d4c2f9e-2b5a-4c1e-9a53-0a3c6f1e2b7d",
    checkpoint: "strata-0123456789ab-20261129t100000000z",
    disks: [{ name: "vda", size: 1 }],
    xml: null,
  };
  assert.ok(readCheckpointRecord(good).record);
  assert.match(readCheckpointRecord(null).reason ?? "", /no checkpoint/);
  assert.match(readCheckpointRecord({ ...good, kind: "qemu-bitmap" }).reason ?? "", /is a qemu-bitmap/);
  for (const bad of [
    { checkpoint: "virtnbdbackup.0" },
    { checkpoint: "strata-x'; rm" },
    { disks: [{ name: "vda", size: -1 }] },
    { disks: "vda" },
    { xml: 5 },
  ])
    assert.match(readCheckpointRecord({ ...good, ...bad }).reason ?? "", /malformed/, JSON.stringify(bad));
  // The reason names the first bad field.
  assert.match(
    readCheckpointRecord({ ...good, disks: [{ name: "vda", size: -1 }] }).reason ?? "",
    /malformed \(disks\.0\.size: the disk size is not a whole number/,
  );
  // A redefinable checkpoint XML loses its parent (bitmaps are independent in libvirt 9.0).
  const cp = `<domaincheckpoint><name>c2</name><parent><name>c1</name></parent><disks/></domaincheckpoint>`;
  assert.doesNotMatch(redefinableXml(cp), /parent/);
});

const restorePoint = { vm: "web1", time: "2026-11-29T10:00:00Z", consistency: "crash-consistent" as const };

test("a clone: new identity, files in the target, nothing of the original's shared", () => {
  const available = [
    { name: "vda", size: 10 << 20 },
    { name: "vdb", size: 20 << 20 },
  ];
  const plan = planLibvirtRestore(doc(), { target: "/srv/c", name: "web1b", available, restorePoint });
  const f = cloneFacts(plan.definition.text);
  assert.equal(f.name, "web1b");
  assert.notEqual(f.uuid, "0d4c2f9e-2b5a-4c1e-9a53-0a3c6f1e2b7d");
  assert.match(f.macs[0]!, /^52:54:00:[0-9a-f]{2}:[0-9a-f]{2}:[0-9a-f]{2}$/);
  assert.notEqual(f.macs[0], "52:54:00:aa:bb:cc");
  assert.deepEqual(
    plan.disks.map((d) => [d.name, d.format, d.path, d.size]),
    [
      ["vda", "qcow2", "/srv/c/vda.qcow2", 10 << 20],
      ["vdb", "raw", "/srv/c/vdb.raw", 20 << 20],
    ],
  );
  // The block device becomes a file; serial and console share one new file; the CD-ROM stays.
  assert.deepEqual(f.files, [
    "/srv/c/vda.qcow2",
    "/srv/c/vdb.raw",
    "/iso/debian.iso",
    "/srv/c/run/web1.console",
    "/srv/c/run/web1.console",
    "/srv/c/run/web1.agent",
  ]);
  assert.match(plan.definition.text, /<nvram>\/srv\/c\/web1b_VARS.fd<\/nvram>/);
  assert.doesNotMatch(plan.definition.text, /port='5901'/);
  assert.equal(plan.definition.file, "/srv/c/web1b.xml");
  // The restore point is named in the domain's metadata and in the plan's configuration.
  assert.match(
    plan.definition.text,
    /<metadata><strata:restore xmlns:strata="urn:strata:restore:1" from="web1\/2026-11-29T10:00:00Z" consistency="crash-consistent"><\/strata:restore><\/metadata>|<metadata><strata:restore xmlns:strata="urn:strata:restore:1" from="web1\/2026-11-29T10:00:00Z" consistency="crash-consistent"\/><\/metadata>/,
  );
  assert.equal(plan.config.restoredFrom, "web1/2026-11-29T10:00:00Z");
  // Restored again from the clone's XML, the element is replaced, not repeated.
  const again = planLibvirtRestore(
    { ...doc(), xml: plan.definition.text },
    {
      target: "/srv/d",
      name: "web1c",
      available,
      restorePoint: { ...restorePoint, time: "2026-11-30T10:00:00Z" },
    },
  );
  assert.equal(again.definition.text.match(/<strata:restore /g)?.length, 1);
  assert.match(again.definition.text, /from="web1\/2026-11-30T10:00:00Z"/);
  // Without a name a clone is NAME-restored, as every adapter's.
  assert.equal(planLibvirtRestore(doc(), { target: "/srv/c", available }).domain, "web1-restored");
  // A disk missing from the restore point is left out of a clone, never shared.
  const one = planLibvirtRestore(doc(), {
    target: "/srv/c",
    name: "web1b",
    available: available.slice(0, 1),
  });
  assert.doesNotMatch(one.definition.text, /web1-data/);
  assert.ok(one.warnings.some((w) => /vdb is left out of the clone/.test(w)));
  // In place keeps everything.
  const inPlace = planLibvirtRestore(doc(), { available });
  assert.equal(inPlace.definition.text.includes("0d4c2f9e-2b5a-4c1e-9a53-0a3c6f1e2b7d"), true);
  assert.deepEqual(
    inPlace.disks.map((d) => d.path),
    ["/var/lib/libvirt/images/web1.qcow2", "/dev/vg0/web1-data"],
  );
  assert.throws(
    () => planLibvirtRestore(doc(), { target: "/srv/c", name: "web1", available }),
    /other than web1/,
  );
  assert.throws(
    () => planLibvirtRestore(doc(), { target: "/srv/c", name: "a/b", available }),
    /not a domain name/,
  );
});

test("an instant recovery record read back is checked, its data above all", () => {
  const good = () => ({
    adapter: "libvirt",
    name: "web1b",
    where: "libvirt domain web1b",
    pid: 4242,
    disks: [
      { name: "vda", overlay: "/srv/ir/vda.overlay.qcow2" },
      {
        name: "vdb",
        overlay: "/srv/ir/vdb.overlay.qcow2",
        production: { path: "/srv/prod/vdb.qcow2", format: "qcow2" as "qcow2" | "raw" },
      },
    ],
    data: {
      uri: "qemu:///system",
      domain: "web1b",
      xmlFile: "/srv/ir/run/web1b.xml",
      socket: "/srv/ir/run/nbd.sock",
      sizes: { vda: 10 << 20, vdb: 20 << 20 },
    } as Record<string, unknown>,
    details: { domain: "web1b", uri: "qemu:///system", console: "/srv/ir/run/console.log" } as Record<
      string,
      string
    >,
    warnings: [],
  });
  assert.deepEqual(checkLibvirtInstantVm(good()), good());
  const cases: Array<[(v: ReturnType<typeof good>) => void, RegExp]> = [
    [(v) => (v.adapter = "qemu"), /belongs to the "qemu" adapter, not libvirt/],
    [(v) => (v.data = { ...v.data, uri: "qemu:///system;rm -rf /" }), /libvirt connection .* is not a URI/],
    [(v) => (v.data = { ...v.data, domain: "../etc" }), /domain name "..\/etc" is not one Strata handles/],
    [(v) => (v.data = { ...v.data, domain: "web1" }), /its domain web1 is not the VM it names \(web1b\)/],
    [
      (v) => (v.data = { ...v.data, xmlFile: "/srv/ir/../../etc/x.xml" }),
      /domain XML file .* is not an absolute path/,
    ],
    [(v) => (v.data = { ...v.data, xmlFile: "/etc/shadow" }), /is not a \.xml file/],
    [
      (v) => (v.data = { ...v.data, socket: "run/nbd.sock" }),
      /the NBD socket "run\/nbd.sock" is not an absolute path/,
    ],
    [(v) => (v.data = { ...v.data, sizes: { vda: 1 } }), /data\.sizes\.vdb: disk vdb has no size/],
    [(v) => (v.data = { ...v.data, sizes: { vda: 1, vdb: 2, vdz: 3 } }), /a size for unknown disk vdz/],
    [(v) => (v.data = { ...v.data, sizes: undefined }), /data\.sizes: the disk sizes are not an object/],
    [(v) => (v.data = null as unknown as Record<string, unknown>), /the libvirt record is not an object/],
    [(v) => (v.disks[0]!.name = "../x"), /disk name "..\/x" is not a libvirt disk target/],
    [
      (v) => (v.disks[0]!.overlay = "vda.qcow2"),
      /disks\.0\.overlay: the overlay "vda.qcow2" is not an absolute path/,
    ],
    [(v) => (v.disks[1]!.production!.format = "vmdk" as "raw"), /production format is not raw or qcow2/],
    [
      (v) => (v.details = { console: 5 as unknown as string }),
      /details\.console: the detail is not a string/,
    ],
    [(v) => (v.pid = -1), /the QEMU pid is not a whole number/],
  ];
  for (const [spoil, re] of cases) {
    const v = good();
    spoil(v);
    assert.throws(
      () => checkLibvirtInstantVm(v as Parameters<typeof checkLibvirtInstantVm>[0]),
      (err: Error & { code?: string }) => err.code === "DATA_CORRUPT" && re.test(err.message),
      String(re),
    );
  }
});
