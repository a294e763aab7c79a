// LVM2 metadata on hand-built PVs in memory: the label and a metadata area whose text wraps
// around the circular buffer, the text format, thin and linear LVs. The CRC is checked against
// values from an independent byte-wise implementation of LVM's calc_crc (seed 0xf597a6cf, no
// inversion). Real PVs written by LVM itself are read in test/files/guestfs.test.ts.
import assert from "node:assert/strict";
import { test } from "node:test";
import { isStrataError } from "../util/errors.js";
import type { ByteSource } from "./byte-source.js";
import { detectFilesystem } from "./fs-detect.js";
import {
  concat,
  linearExtents,
  lvLayout,
  lvmCrc,
  MAX_LVS,
  MAX_METADATA,
  parseLvmText,
  parseVolumeGroup,
  pvsOf,
  readPhysicalVolume,
} from "./lvm.js";

function memory(buf: Buffer): ByteSource {
  return { size: buf.length, read: async (o, n) => Buffer.from(buf.subarray(o, o + n)) };
}

const METADATA = `# a comment
vg0 {
id = "zlKE9r-3ml5-lZoU-Gaf2-N2RA-nvMI-zU6IgC"
seqno = 7
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
extent_size = 8192	# 4 MiB
physical_volumes {
pv0 {
id = "xJwcBs-6Wsk-15PE-Uojz-1ZC2-vmT6-CghnDe"
device = "/dev/sda3"
pe_start = 2048
pe_count = 9
}
pv1 {
id = "0rKUW4-e51D-h00Z-OF3d-IFdx-PcdM-2GwnOB"
device = "/dev/sdb"
pe_start = 2048
pe_count = 15
}
}
logical_volumes {
root {
status = ["READ", "WRITE", "VISIBLE"]
segment_count = 2
segment1 {
start_extent = 0
extent_count = 15
type = "striped"
stripe_count = 1
stripes = [
"pv1", 0
]
}
segment2 {
start_extent = 15
extent_count = 5
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
}
pool {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 1
type = "thin-pool"
metadata = "pool_tmeta"
pool = "pool_tdata"
discards = "passdown"
}
}
pool_tmeta {
status = ["READ", "WRITE"]
segment1 {
start_extent = 0
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 5]
}
}
pool_tdata {
status = ["READ", "WRITE"]
segment1 {
start_extent = 0
extent_count = 1
type = "striped"
stripe_count = 1
stripes = ["pv0", 6]
}
}
thin {
status = ["READ", "WRITE", "VISIBLE"]
segment1 {
start_extent = 0
extent_count = 25
type = "thin"
thin_pool = "pool"
device_id = 1
}
}
}
}
contents = "Text Format Volume Group"
version = 1
description = "Write from \\"lvcreate\\"."
`;

test("LVM's CRC matches its C implementation", () => {
  assert.equal(lvmCrc(Buffer.from("123456789")), 0x4991cf02);
  assert.equal(lvmCrc(Buffer.alloc(0)), 0xf597a6cf);
  const ramp = Buffer.alloc(512);
  for (let i = 0; i < 512; i++) ramp[i] = i & 0xff;
  assert.equal(lvmCrc(ramp), 0xc95beec5);
});

test("the text format: sections, arrays, strings with escapes, comments", () => {
  const doc = parseLvmText(METADATA);
  assert.equal(doc.version, 1);
  assert.equal(doc.description, 'Write from "lvcreate".');
  const vg = doc.vg0 as Record<string, unknown>;
  assert.deepEqual(vg.status, ["RESIZEABLE", "READ", "WRITE"]);
  assert.equal(vg.extent_size, 8192);
  assert.throws(
    () => parseLvmText("vg0 {\nseqno = 1\n"),
    (e) => isStrataError(e, "DATA_CORRUPT"),
  );
  assert.throws(
    () => parseLvmText('a = "open'),
    (e) => isStrataError(e, "DATA_CORRUPT"),
  );
  // Hostile nesting is refused with an error, not a stack overflow.
  assert.throws(
    () => parseLvmText(`${"a { ".repeat(100_000)}${"} ".repeat(100_000)}`),
    (e) => isStrataError(e, "DATA_CORRUPT"),
  );
});

test("a volume group: PVs, visible LVs, linear mapping across PVs, what a thin LV needs", () => {
  const vg = parseVolumeGroup(METADATA);
  assert.equal(vg.name, "vg0");
  assert.equal(vg.seqno, 7);
  assert.equal(vg.extentSize, 4 * 1024 * 1024);
  assert.deepEqual(
    vg.pvs.map((p) => [p.key, p.uuid, p.device, p.peStart, p.peCount]),
    [
      ["pv0", "xJwcBs6Wsk15PEUojz1ZC2vmT6CghnDe", "/dev/sda3", 1048576, 9],
      ["pv1", "0rKUW4e51Dh00ZOF3dIFdxPcdM2GwnOB", "/dev/sdb", 1048576, 15],
    ],
  );
  assert.deepEqual(
    vg.lvs.filter((l) => l.visible).map((l) => [l.name, l.size, lvLayout(l)]),
    [
      ["root", 80 * 1024 * 1024, "linear"],
      ["pool", 4 * 1024 * 1024, "thin-pool"],
      ["thin", 100 * 1024 * 1024, "thin"],
    ],
  );
  const lv = (name: string) => vg.lvs.find((l) => l.name === name)!;
  assert.deepEqual(linearExtents(vg, lv("root")), [
    { pv: "pv1", offset: 1048576, length: 60 * 1024 * 1024 },
    { pv: "pv0", offset: 1048576, length: 20 * 1024 * 1024 },
  ]);
  assert.equal(linearExtents(vg, lv("thin")), undefined);
  assert.deepEqual([...pvsOf(vg, lv("root"))].sort(), ["pv0", "pv1"]);
  assert.deepEqual([...pvsOf(vg, lv("thin"))], ["pv0"]);
});

/** A PV of `size` bytes: label in sector 1, one metadata area at 4 KiB holding `text` at `at`. */
function buildPv(text: string, at: number, size = 2 * 1024 * 1024): Buffer {
  const disk = Buffer.alloc(size);
  const mdaOffset = 4096;
  const mdaSize = 8192;
  const label = disk.subarray(512, 1024);
  label.write("LABELONE", 0, "latin1");
  label.writeBigUInt64LE(1n, 8);
  label.writeUInt32LE(32, 20);
  label.write("LVM2 001", 24, "latin1");
  label.write("xJwcBs6Wsk15PEUojz1ZC2vmT6CghnDe", 32, "latin1");
  label.writeBigUInt64LE(BigInt(size), 64);
  label.writeBigUInt64LE(1048576n, 72); // data area, then a zero entry
  label.writeBigUInt64LE(BigInt(mdaOffset), 104); // metadata area, then a zero entry
  label.writeBigUInt64LE(BigInt(mdaSize), 112);
  label.writeUInt32LE(lvmCrc(label.subarray(20)), 16);
  const raw = Buffer.from(text);
  const h = disk.subarray(mdaOffset, mdaOffset + 512);
  h.write(" LVM2 x[5A%r0N*>", 4, "latin1");
  h.writeUInt32LE(1, 20);
  h.writeBigUInt64LE(BigInt(mdaOffset), 24);
  h.writeBigUInt64LE(BigInt(mdaSize), 32);
  h.writeBigUInt64LE(BigInt(at), 40);
  h.writeBigUInt64LE(BigInt(raw.length), 48);
  h.writeUInt32LE(lvmCrc(raw), 56);
  h.writeUInt32LE(lvmCrc(h.subarray(4)), 0);
  // The circular buffer: what does not fit before the end goes right after the header.
  const first = Math.min(raw.length, mdaSize - at);
  raw.copy(disk, mdaOffset + at, 0, first);
  raw.copy(disk, mdaOffset + 512, first);
  return disk;
}

test("a PV's label and its metadata, also when the text wraps around the metadata area", async () => {
  const text = METADATA;
  for (const at of [512, 8192 - 100]) {
    const pv = await readPhysicalVolume(memory(buildPv(text, at)));
    assert.equal(pv?.uuid, "xJwcBs6Wsk15PEUojz1ZC2vmT6CghnDe");
    assert.equal(pv?.metadata?.seqno, 7);
    assert.equal(pv?.metadata?.text, text);
  }
  // A torn write (CRC mismatch) hides the metadata, not the PV.
  const torn = buildPv(text, 512);
  torn[4096 + 600]! ^= 1;
  const pv = await readPhysicalVolume(memory(torn));
  assert.equal(pv?.uuid, "xJwcBs6Wsk15PEUojz1ZC2vmT6CghnDe");
  assert.equal(pv?.metadata, undefined);
  // A damaged label is an error; no label at all is no PV.
  const bad = buildPv(text, 512);
  bad[512 + 40]! ^= 1;
  await assert.rejects(readPhysicalVolume(memory(bad)), (e) => isStrataError(e, "DATA_CORRUPT"));
  assert.equal(await readPhysicalVolume(memory(Buffer.alloc(4096))), undefined);
  assert.equal(await detectFilesystem(memory(buildPv(text, 512))), "LVM2_member");
});

test("concat lays sources end to end, reads across the seams", async () => {
  const a = Buffer.from("abcdef");
  const b = Buffer.from("ghij");
  const c = Buffer.from("klmnopq");
  const s = concat([memory(a), memory(b), memory(c)]);
  assert.equal(s.size, 17);
  assert.equal((await s.read(0, 17)).toString(), "abcdefghijklmnopq");
  assert.equal((await s.read(4, 8)).toString(), "efghijkl");
  assert.equal((await s.read(6, 4)).toString(), "ghij");
  await assert.rejects(s.read(10, 8), RangeError);
});

/** Metadata of a VG with `n` linear LVs of one 4 MiB extent each, all on pv0's first extent. */
function manyLvs(n: number): string {
  const lvs: string[] = [];
  for (let k = 0; k < n; k++)
    lvs.push(
      `lv${k} {\nid = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"\nstatus = ["READ", "WRITE", "VISIBLE"]\n` +
        `segment_count = 1\nsegment1 {\nstart_extent = 0\nextent_count = 1\ntype = "striped"\n` +
        `stripe_count = 1\nstripes = ["pv0", 0]\n}\n}\n`,
    );
  return (
    `vg0 {\nid = "zlKE9r-3ml5-lZoU-Gaf2-N2RA-nvMI-zU6IgC"\nseqno = 1\nextent_size = 8192\n` +
    `physical_volumes {\npv0 {\nid = "xJwcBs-6Wsk-15PE-Uojz-1ZC2-vmT6-CghnDe"\npe_start = 2048\npe_count = 10\n}\n}\n` +
    `logical_volumes {\n${lvs.join("")}}\n}\n`
  );
}

test("hostile metadata: an unterminated string, a string of escapes, 40,000 LVs, each in seconds", () => {
  const started = Date.now();
  assert.throws(
    () => parseLvmText(`a = "${"x".repeat(15 * 1024 * 1024)}`),
    (e) => isStrataError(e, "DATA_CORRUPT") && /unterminated string/.test(e.message),
  );
  const escapes = parseLvmText(`a = "${'\\"'.repeat(2_000_000)}"\nb = 1`);
  assert.equal(escapes.a, '"'.repeat(2_000_000));
  assert.equal(escapes.b, 1);
  const text = manyLvs(40_000);
  assert.ok(text.length < MAX_METADATA, `${text.length} bytes`);
  const vg = parseVolumeGroup(text);
  assert.equal(vg.lvs.length, MAX_LVS);
  assert.equal(vg.omittedLvs, 40_000 - MAX_LVS);
  for (const lv of vg.lvs) {
    assert.equal(linearExtents(vg, lv)?.length, 1);
    assert.deepEqual([...pvsOf(vg, lv)], ["pv0"]);
  }
  const ms = Date.now() - started;
  assert.ok(ms < 10_000, `${ms} ms`);
});
