// Partition tables and filesystem detection on hand-built images in memory: MBR with an EBR
// chain, GPT with its backup header, a FAT boot sector that must not pass for an MBR.
import assert from "node:assert/strict";
import { test } from "node:test";
import { crc32 } from "node:zlib";
import { isStrataError } from "../util/errors.js";
import type { ByteSource } from "./byte-source.js";
import { detectFilesystem } from "./fs-detect.js";
import { readPartitionTable, SECTOR } from "./partitions.js";

function memory(buf: Buffer): ByteSource {
  return { size: buf.length, read: async (o, n) => Buffer.from(buf.subarray(o, o + n)) };
}

function mbrEntry(sector: Buffer, i: number, type: number, lba: number, count: number): void {
  const o = 446 + i * 16;
  sector[o + 4] = type;
  sector.writeUInt32LE(lba, o + 8);
  sector.writeUInt32LE(count, o + 12);
  sector[510] = 0x55;
  sector[511] = 0xaa;
}

test("MBR: primaries, then logical partitions numbered from 5 along the EBR chain", async () => {
  const disk = Buffer.alloc(4096 * SECTOR);
  mbrEntry(disk, 0, 0x83, 2048, 1000);
  mbrEntry(disk, 1, 0x05, 3072, 1024);
  // EBR 1 at 3072: logical at +64, next EBR at extended start + 512.
  const ebr1 = disk.subarray(3072 * SECTOR, 3073 * SECTOR);
  mbrEntry(ebr1, 0, 0x83, 64, 100);
  mbrEntry(ebr1, 1, 0x05, 512, 512);
  const ebr2 = disk.subarray((3072 + 512) * SECTOR, (3073 + 512) * SECTOR);
  mbrEntry(ebr2, 0, 0x0c, 32, 200);
  const t = await readPartitionTable(memory(disk));
  assert.equal(t.scheme, "mbr");
  assert.deepEqual(
    t.partitions.map((p) => [p.number, p.start / SECTOR, p.size / SECTOR, p.type, p.typeName]),
    [
      [1, 2048, 1000, "0x83", "Linux"],
      [2, 3072, 1024, "0x05", "Extended"],
      [5, 3136, 100, "0x83", "Linux"],
      [6, 3616, 200, "0x0c", "W95 FAT32 (LBA)"],
    ],
  );
});

function guidBytes(text: string): Buffer {
  const h = text.replace(/-/g, "");
  const b = Buffer.from(h, "hex");
  b.subarray(0, 4).reverse();
  b.subarray(4, 6).reverse();
  b.subarray(6, 8).reverse();
  return b;
}

function gptHeader(disk: Buffer, at: number, entries: Buffer, entriesLba: number): void {
  const h = disk.subarray(at * SECTOR, (at + 1) * SECTOR);
  h.write("EFI PART", 0, "latin1");
  h.writeUInt32LE(0x10000, 8);
  h.writeUInt32LE(92, 12);
  h.writeBigUInt64LE(BigInt(entriesLba), 72);
  h.writeUInt32LE(128, 80);
  h.writeUInt32LE(128, 84);
  h.writeUInt32LE(crc32(entries), 88);
  h.writeUInt32LE(0, 16);
  h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
}

test("GPT: entries with types and names; the backup header is used when the primary is damaged", async () => {
  const sectors = 8192;
  const disk = Buffer.alloc(sectors * SECTOR);
  mbrEntry(disk, 0, 0xee, 1, sectors - 1);
  const entries = Buffer.alloc(128 * 128);
  const put = (i: number, type: string, first: number, last: number, name: string) => {
    const e = entries.subarray(i * 128, (i + 1) * 128);
    guidBytes(type).copy(e, 0);
    e.writeBigUInt64LE(BigInt(first), 32);
    e.writeBigUInt64LE(BigInt(last), 40);
    e.write(name, 56, "utf16le");
  };
  put(0, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B", 2048, 4095, "esp");
  put(2, "0FC63DAF-8483-4772-8E79-3D69D8477DE4", 4096, 8000, "root");
  entries.copy(disk, 2 * SECTOR);
  gptHeader(disk, 1, entries, 2);
  const want = [
    [1, 2048, 2048, "EFI System", "esp"],
    [3, 4096, 3905, "Linux filesystem", "root"],
  ];
  const brief = (t: Awaited<ReturnType<typeof readPartitionTable>>) =>
    t.partitions.map((p) => [p.number, p.start / SECTOR, p.size / SECTOR, p.typeName, p.label]);
  const t1 = await readPartitionTable(memory(disk));
  assert.equal(t1.scheme, "gpt");
  assert.deepEqual(brief(t1), want);

  disk[SECTOR + 20] = disk[SECTOR + 20]! ^ 0xff; // the primary header's CRC no longer matches
  await assert.rejects(readPartitionTable(memory(disk)), (e) => isStrataError(e, "DATA_CORRUPT"));
  gptHeader(disk, sectors - 1, entries, 2);
  assert.deepEqual(brief(await readPartitionTable(memory(disk))), want);
});

test("a FAT boot sector on a bare disk is a filesystem, not an MBR", async () => {
  const disk = Buffer.alloc(64 * 1024 * 1024);
  const bs = disk.subarray(0, SECTOR);
  bs.set([0xeb, 0x3c, 0x90], 0);
  bs.write("mkfs.fat", 3, "latin1");
  bs.writeUInt16LE(512, 11);
  bs[13] = 4;
  bs.writeUInt16LE(4, 14);
  bs[16] = 2;
  bs.writeUInt16LE(512, 17);
  bs[21] = 0xf8;
  bs.writeUInt16LE(128, 22);
  bs.writeUInt32LE(131072, 32);
  bs.write("This is not a bootable disk", 0x3e, "latin1");
  bs[510] = 0x55;
  bs[511] = 0xaa;
  const t = await readPartitionTable(memory(disk));
  assert.equal(t.scheme, "none");
  assert.equal(await detectFilesystem(memory(disk)), "vfat");
  // The same sector with a real partition entry is an MBR after all.
  bs[0] = 0;
  mbrEntry(bs, 0, 0x83, 2048, 4096);
  assert.equal((await readPartitionTable(memory(disk))).scheme, "mbr");
});

test("magic numbers: ext4 by its features, XFS, Btrfs, NTFS, LVM, LUKS, swap; zeros are nothing", async () => {
  const img = (f: (b: Buffer) => void) => {
    const b = Buffer.alloc(0x20000);
    f(b);
    return detectFilesystem(memory(b));
  };
  assert.equal(
    await img((b) => {
      b.writeUInt16LE(0xef53, 0x438);
      b.writeUInt32LE(0x40, 0x460);
    }),
    "ext4",
  );
  assert.equal(
    await img((b) => {
      b.writeUInt16LE(0xef53, 0x438);
      b.writeUInt32LE(0x4, 0x45c);
    }),
    "ext3",
  );
  assert.equal(await img((b) => b.write("XFSB", 0, "latin1")), "xfs");
  assert.equal(await img((b) => b.write("_BHRfS_M", 0x10040, "latin1")), "btrfs");
  assert.equal(await img((b) => b.write("NTFS    ", 3, "latin1")), "ntfs");
  assert.equal(await img((b) => b.write("LVM2 001", 0x218, "latin1")), "LVM2_member");
  assert.equal(await img((b) => b.write("LUKS\xba\xbe", 0, "latin1")), "crypto_LUKS");
  assert.equal(await img((b) => b.write("SWAPSPACE2", 4086, "latin1")), "swap");
  assert.equal(await img(() => {}), undefined);
});

test("GPT: absurd entry sizes and counts are refused before anything is read or allocated", async () => {
  const sectors = 8192;
  for (const [entrySize, count, pattern] of [
    [1024 * 1024 * 1024, 4, /entry size 1073741824/],
    [0xffffffff, 1, /entry size 4294967295/],
    [192, 128, /entry size 192/],
    [128, 100000, /100000 entries/],
  ] as const) {
    const disk = Buffer.alloc(sectors * SECTOR);
    mbrEntry(disk, 0, 0xee, 1, sectors - 1);
    gptHeader(disk, 1, Buffer.alloc(0), 2);
    const h = disk.subarray(SECTOR, 2 * SECTOR);
    h.writeUInt32LE(count, 80);
    h.writeUInt32LE(entrySize, 84);
    h.writeUInt32LE(0, 16);
    h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
    let largest = 0;
    const source: ByteSource = {
      size: 1024 * 1024 * 1024 * 1024, // a sparse 1 TiB disk: the size alone does not stop it
      read: async (o, n) => {
        largest = Math.max(largest, n);
        return o < disk.length ? Buffer.from(disk.subarray(o, o + n)) : Buffer.alloc(n);
      },
    };
    await assert.rejects(
      readPartitionTable(source),
      (e) => isStrataError(e, "DATA_CORRUPT") && pattern.test(e.message),
      String(entrySize),
    );
    assert.ok(largest <= 2 * SECTOR, `read ${largest} bytes`);
  }
});

test("MBR: an EBR chain that loops ends, and a long one stops at 100 links as Linux does", async () => {
  const disk = Buffer.alloc(8192 * SECTOR);
  mbrEntry(disk, 0, 0x05, 2048, 6000);
  // EBR at 2048 links to 2048 + 4, which links back to the start.
  const e1 = disk.subarray(2048 * SECTOR, 2049 * SECTOR);
  mbrEntry(e1, 0, 0x83, 1, 1);
  mbrEntry(e1, 1, 0x05, 4, 2);
  const e2 = disk.subarray(2052 * SECTOR, 2053 * SECTOR);
  mbrEntry(e2, 0, 0x83, 1, 1);
  mbrEntry(e2, 1, 0x05, 0 + 1, 2); // +1 from the extended start: a third EBR...
  const e3 = disk.subarray(2049 * SECTOR, 2050 * SECTOR);
  mbrEntry(e3, 0, 0x83, 1, 1);
  mbrEntry(e3, 1, 0x05, 4, 2); // ...that links back to the second: a loop
  const looped = await readPartitionTable(memory(disk));
  assert.deepEqual(
    looped.partitions.map((p) => p.number),
    [1, 5, 6, 7],
  );
  // 200 EBRs in a row, each with a logical partition.
  const long = Buffer.alloc(8192 * SECTOR);
  mbrEntry(long, 0, 0x05, 2048, 6000);
  for (let i = 0; i < 200; i++) {
    const e = long.subarray((2048 + i * 2) * SECTOR, (2049 + i * 2) * SECTOR);
    mbrEntry(e, 0, 0x83, 1, 1);
    mbrEntry(e, 1, 0x05, (i + 1) * 2, 2);
  }
  const t = await readPartitionTable(memory(long));
  assert.equal(t.partitions.length, 1 + 100);
  assert.equal(t.partitions.at(-1)!.number, 104);
});
