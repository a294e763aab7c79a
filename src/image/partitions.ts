/**
 * Partition tables: MBR (primary, extended and logical partitions) and GPT, read from a
 * {@link ByteSource} with 512-byte sectors.
 *
 * GPT wins when LBA 1 holds a GPT header whose CRC32 checks (the backup header at the last
 * sector is used when the primary is damaged). Otherwise sector 0 is an MBR only if it carries
 * the 0x55AA signature, every entry is well formed (boot flag 0x00 or 0x80, inside the disk) and
 * at least one entry is used; this rejects the boot sector of a filesystem written straight onto
 * the disk (a FAT boot sector also ends in 0x55AA, but its "entries" are boot code or zeros).
 * Logical partitions are numbered from 5 in the order of the EBR chain, as Linux does.
 *
 * The table is the guest's, so every count and size in it is bounded before it is used: GPT
 * entries of 128 to 4096 bytes (a power-of-two multiple of 128, as UEFI requires; Linux itself
 * reads only 128-byte entries) and at most 4096 of them, so the entry array read is at most
 * 16 MiB; an EBR chain of at most 100 links (Linux's own limit in msdos.c), never visiting an
 * EBR twice (a loop) and never leaving the extended partition's disk.
 */
import { crc32 } from "node:zlib";
import { ErrorCode, StrataError } from "../util/errors.js";
import { type ByteSource, readPadded } from "./byte-source.js";

export const SECTOR = 512;

/** One partition. Offsets and sizes are in bytes. */
export interface Partition {
  /** 1-based, as Linux names them (sda1…; logical MBR partitions from 5). */
  number: number;
  start: number;
  size: number;
  /** MBR: the type byte as `0x83`; GPT: the type GUID in upper case. */
  type: string;
  /** A readable name of the type, when known ("Linux filesystem", "EFI System", …). */
  typeName: string;
  /** GPT partition name, when set. */
  label?: string;
}

export interface PartitionTable {
  /** `none`: no partition table (a filesystem may start at byte 0). */
  scheme: "mbr" | "gpt" | "none";
  partitions: Partition[];
}

const MBR_TYPES = new Map<number, string>([
  [0x01, "FAT12"],
  [0x04, "FAT16 <32M"],
  [0x05, "Extended"],
  [0x06, "FAT16"],
  [0x07, "HPFS/NTFS/exFAT"],
  [0x0b, "W95 FAT32"],
  [0x0c, "W95 FAT32 (LBA)"],
  [0x0e, "W95 FAT16 (LBA)"],
  [0x0f, "W95 Extended (LBA)"],
  [0x82, "Linux swap"],
  [0x83, "Linux"],
  [0x85, "Linux extended"],
  [0x8e, "Linux LVM"],
  [0xee, "GPT protective"],
  [0xef, "EFI System"],
  [0xfd, "Linux raid autodetect"],
]);

const GPT_TYPES: Record<string, string> = {
  "0FC63DAF-8483-4772-8E79-3D69D8477DE4": "Linux filesystem",
  "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709": "Linux root (x86-64)",
  "933AC7E1-2EB4-4F13-B844-0E14E2AEF915": "Linux home",
  "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F": "Linux swap",
  "E6D6D379-F507-44C2-A23C-238F2A3DF928": "Linux LVM",
  "A19D880F-05FC-4D3B-A006-743F0F84911E": "Linux RAID",
  "BC13C2FF-59E6-4262-A352-B275FD6F7172": "Linux extended boot",
  "C12A7328-F81F-11D2-BA4B-00A0C93EC93B": "EFI System",
  "21686148-6449-6E6F-744E-656564454649": "BIOS boot",
  "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7": "Microsoft basic data",
  "E3C9E316-0B5C-4DB8-817D-F92DF00215AE": "Microsoft reserved",
  "DE94BBA4-06D1-4D40-A16A-BFD50179D6AC": "Windows recovery",
};

const EXTENDED = new Set([0x05, 0x0f, 0x85]);

/** GPT entry sizes read: 128 × 2^n bytes up to this. */
export const GPT_MAX_ENTRY_SIZE = 4096;
/** GPT entries read at most (the usual table has 128). */
export const GPT_MAX_ENTRIES = 4096;
/** EBRs followed at most, as Linux (block/partitions/msdos.c) does. */
export const MAX_EBR_CHAIN = 100;

/** Reads the partition table of a disk. A damaged table is an error; no table is `none`. */
export async function readPartitionTable(disk: ByteSource): Promise<PartitionTable> {
  if (disk.size < 2 * SECTOR) return { scheme: "none", partitions: [] };
  const head = await readPadded(disk, 0, 2 * SECTOR);
  const mbr = head.subarray(0, SECTOR);
  const signed = mbr[510] === 0x55 && mbr[511] === 0xaa;
  const protective = signed && [0, 1, 2, 3].some((i) => mbr[446 + i * 16 + 4] === 0xee);
  if (protective || head.subarray(SECTOR, SECTOR + 8).toString("latin1") === "EFI PART") {
    const gpt = await readGpt(disk, head.subarray(SECTOR));
    if (typeof gpt === "object") return gpt;
    if (protective)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `the disk has a protective MBR but neither GPT header (primary or backup) is valid: ${gpt}`,
      );
  }
  if (!signed) return { scheme: "none", partitions: [] };
  const entries = [0, 1, 2, 3].map((i) => mbrEntry(mbr, i));
  const sectors = Math.floor(disk.size / SECTOR);
  const wellFormed = entries.every(
    (e) => (e.flag === 0 || e.flag === 0x80) && (e.type === 0 || (e.lba > 0 && e.lba < sectors)),
  );
  if (!wellFormed || !entries.some((e) => e.type !== 0 && e.count > 0))
    return { scheme: "none", partitions: [] };
  const partitions: Partition[] = [];
  let next = 5;
  for (const [i, e] of entries.entries()) {
    if (e.type === 0 || e.count === 0) continue;
    partitions.push(mbrPartition(i + 1, e.type, e.lba, e.count, disk.size));
    if (EXTENDED.has(e.type)) {
      for (const l of await readLogical(disk, e.lba)) {
        // As Linux does, a logical partition that starts beyond the disk keeps its number but is
        // left out.
        const number = next++;
        if (l.lba < sectors) partitions.push(mbrPartition(number, l.type, l.lba, l.count, disk.size));
      }
    }
  }
  return { scheme: "mbr", partitions };
}

interface MbrEntry {
  flag: number;
  type: number;
  lba: number;
  count: number;
}

function mbrEntry(sector: Buffer, i: number): MbrEntry {
  const o = 446 + i * 16;
  return {
    flag: sector[o]!,
    type: sector[o + 4]!,
    lba: sector.readUInt32LE(o + 8),
    count: sector.readUInt32LE(o + 12),
  };
}

function mbrPartition(number: number, type: number, lba: number, count: number, diskSize: number): Partition {
  const start = lba * SECTOR;
  // A table that claims more than the disk holds is clamped, so reads stay inside the disk.
  const size = Math.max(0, Math.min(count * SECTOR, diskSize - start));
  return {
    number,
    start,
    size,
    type: `0x${type.toString(16).padStart(2, "0")}`,
    typeName: MBR_TYPES.get(type) ?? "unknown",
  };
}

/** Follows the EBR chain of an extended partition starting at sector `base`. */
async function readLogical(disk: ByteSource, base: number): Promise<MbrEntry[]> {
  const out: MbrEntry[] = [];
  const seen = new Set<number>();
  let ebr = base;
  while (!seen.has(ebr) && seen.size < MAX_EBR_CHAIN && (ebr + 1) * SECTOR <= disk.size) {
    seen.add(ebr);
    const s = await disk.read(ebr * SECTOR, SECTOR);
    if (s[510] !== 0x55 || s[511] !== 0xaa) break;
    const logical = mbrEntry(s, 0);
    if (logical.type !== 0 && logical.count > 0) out.push({ ...logical, lba: ebr + logical.lba });
    const link = mbrEntry(s, 1);
    if (!EXTENDED.has(link.type) || link.lba === 0) break;
    ebr = base + link.lba;
  }
  return out;
}

/**
 * A GPT from the primary header (given) or, if that is damaged, the backup one; or why neither
 * could be read.
 */
async function readGpt(disk: ByteSource, primary: Buffer): Promise<PartitionTable | string> {
  const last = Math.floor(disk.size / SECTOR) - 1;
  const why: string[] = [];
  for (const [name, header] of [
    ["primary", primary],
    ["backup", await readPadded(disk, last * SECTOR, SECTOR)],
  ] as const) {
    const parsed = await parseGpt(disk, header);
    if (typeof parsed === "object") return parsed;
    why.push(`${name}: ${parsed}`);
  }
  return why.join("; ");
}

/** The table a GPT header describes, or why it is not valid. */
async function parseGpt(disk: ByteSource, h: Buffer): Promise<PartitionTable | string> {
  if (h.subarray(0, 8).toString("latin1") !== "EFI PART") return "no EFI PART signature";
  const headerSize = h.readUInt32LE(12);
  if (headerSize < 92 || headerSize > SECTOR) return `header size ${headerSize}`;
  const copy = Buffer.from(h.subarray(0, headerSize));
  const crc = copy.readUInt32LE(16);
  copy.writeUInt32LE(0, 16);
  if (crc32(copy) !== crc) return "header checksum mismatch";
  const entriesLba = Number(h.readBigUInt64LE(72));
  const count = h.readUInt32LE(80);
  const entrySize = h.readUInt32LE(84);
  // Checked before anything is read or allocated: a guest may write any numbers here.
  if (entrySize < 128 || entrySize > GPT_MAX_ENTRY_SIZE || (entrySize & (entrySize - 1)) !== 0)
    return `entry size ${entrySize} (Strata reads 128 × 2^n up to ${GPT_MAX_ENTRY_SIZE} bytes; Linux only 128)`;
  if (count > GPT_MAX_ENTRIES) return `${count} entries (Strata reads at most ${GPT_MAX_ENTRIES})`;
  if (entriesLba < 1 || entriesLba * SECTOR + count * entrySize > disk.size)
    return "the entry array lies beyond the disk";
  const table = await disk.read(entriesLba * SECTOR, count * entrySize);
  if (crc32(table) !== h.readUInt32LE(88)) return "entry array checksum mismatch";
  const partitions: Partition[] = [];
  for (let i = 0; i < count; i++) {
    const e = table.subarray(i * entrySize, (i + 1) * entrySize);
    const type = guid(e.subarray(0, 16));
    if (type === "00000000-0000-0000-0000-000000000000") continue;
    const first = Number(e.readBigUInt64LE(32));
    const lastLba = Number(e.readBigUInt64LE(40));
    const start = first * SECTOR;
    const size = Math.max(0, Math.min((lastLba - first + 1) * SECTOR, disk.size - start));
    const label = e.subarray(56, 128).toString("utf16le").replace(/\0.*$/s, "");
    partitions.push({
      number: i + 1,
      start,
      size,
      type,
      typeName: GPT_TYPES[type] ?? "unknown",
      ...(label ? { label } : {}),
    });
  }
  return { scheme: "gpt", partitions };
}

/** A GUID in its usual text form (the first three fields are little-endian on disk). */
function guid(b: Buffer): string {
  const hex = (x: Buffer) => x.toString("hex");
  const rev = (x: Buffer) => hex(Buffer.from(x).reverse());
  return [
    rev(b.subarray(0, 4)),
    rev(b.subarray(4, 6)),
    rev(b.subarray(6, 8)),
    hex(b.subarray(8, 10)),
    hex(b.subarray(10, 16)),
  ]
    .join("-")
    .toUpperCase();
}
