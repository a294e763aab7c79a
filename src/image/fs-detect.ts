/**
 * Filesystem (and volume) type detection by magic numbers, as blkid does it: only the bytes at
 * fixed offsets are looked at, nothing is mounted. The result names what was found even when
 * Strata cannot read it in-process (XFS, Btrfs, NTFS, LVM, LUKS, swap…), so an error can say so.
 */
import { type ByteSource, readPadded } from "./byte-source.js";

export type FsType =
  | "ext2"
  | "ext3"
  | "ext4"
  | "vfat"
  | "exfat"
  | "ntfs"
  | "xfs"
  | "btrfs"
  | "LVM2_member"
  | "crypto_LUKS"
  | "swap"
  | "iso9660"
  | "squashfs";

/** Types {@link detectFilesystem} knows that Strata reads in-process. */
export const READABLE: ReadonlySet<FsType> = new Set(["ext2", "ext3", "ext4", "vfat"]);

/**
 * How far into a device the magic numbers looked for reach: through the Btrfs superblock at
 * 64 KiB. The signatures of other filesystems Linux mounts (ReiserFS and UFS at 64 KiB, JFS and
 * ISO 9660 at 32 KiB, F2FS, HFS+, NILFS at 1 KiB…) lie within it too.
 */
const PROBE = 0x11000;

/** The filesystem at the start of `source`, or undefined when no known magic number is there. */
export async function detectFilesystem(source: ByteSource): Promise<FsType | undefined> {
  if (source.size < 1024) return undefined;
  const b = await readPadded(source, 0, Math.min(PROBE, source.size));
  const at = (offset: number, text: string) =>
    b.length >= offset + text.length && b.subarray(offset, offset + text.length).toString("latin1") === text;
  if (b.length >= 0x440 && b.readUInt16LE(0x438) === 0xef53) return extVariant(b);
  if (at(0, "XFSB")) return "xfs";
  if (at(0x10040, "_BHRfS_M")) return "btrfs";
  if (at(3, "NTFS    ")) return "ntfs";
  if (at(3, "EXFAT   ")) return "exfat";
  if (at(0, "LUKS\xba\xbe")) return "crypto_LUKS";
  if (at(0x218, "LVM2 001") || at(0x018, "LVM2 001")) return "LVM2_member";
  if (at(0, "hsqs")) return "squashfs";
  if (at(0x8001, "CD001")) return "iso9660";
  for (const page of [4096, 8192, 16384, 65536])
    if (at(page - 10, "SWAPSPACE2") || at(page - 10, "SWAP-SPACE")) return "swap";
  if (isFat(b)) return "vfat";
  return undefined;
}

/**
 * True when the bytes every filesystem signature lives in (see PROBE) are all zeros: whatever
 * the device holds, it is not a filesystem (a never-used logical volume, a wiped partition).
 */
export async function blankHead(source: ByteSource): Promise<boolean> {
  const b = await readPadded(source, 0, Math.min(PROBE, source.size));
  return b.every((x) => x === 0);
}

function extVariant(b: Buffer): FsType {
  const compat = b.readUInt32LE(0x400 + 0x5c);
  const incompat = b.readUInt32LE(0x400 + 0x60);
  const roCompat = b.readUInt32LE(0x400 + 0x64);
  // ext4-only features: extents, 64bit, flex_bg, huge_file, gdt_csum, dir_nlink, extra_isize, metadata_csum.
  if (incompat & (0x40 | 0x80 | 0x200) || roCompat & (0x08 | 0x10 | 0x20 | 0x40 | 0x400)) return "ext4";
  if (compat & 0x04) return "ext3"; // has_journal
  return "ext2";
}

/** A FAT boot sector: signature, a jump, and a BPB whose numbers make sense. */
export function isFat(b: Buffer): boolean {
  if (b.length < 512 || b[510] !== 0x55 || b[511] !== 0xaa) return false;
  if (b[0] !== 0xeb && b[0] !== 0xe9) return false;
  const bps = b.readUInt16LE(11);
  const spc = b[13]!;
  const reserved = b.readUInt16LE(14);
  const fats = b[16]!;
  const media = b[21]!;
  return (
    [512, 1024, 2048, 4096].includes(bps) &&
    spc > 0 &&
    (spc & (spc - 1)) === 0 &&
    reserved > 0 &&
    fats >= 1 &&
    fats <= 4 &&
    (media === 0xf0 || media >= 0xf8) &&
    (b.readUInt16LE(22) > 0 || b.readUInt32LE(36) > 0)
  );
}
