/**
 * Guest-writable images are hostile input. A guest controls every byte of its disk, so a raw
 * disk may begin with a qcow2 header naming an external data file, or a VMDK descriptor whose
 * extent is a host file: probed, QEMU would read that host file in place of the disk (QEMU's
 * classic probing hole). So Strata never probes: an image is read as raw unless its format is
 * given, and an image of any other format is refused when it refers to another file (backing
 * file, external data file, VMDK extents, `json:` file names). References are found in the
 * image's own header first, before any QEMU program opens it (opening a data file or an extent
 * is already a read of a host file), then in what `qemu-img info` reports.
 */
import { open } from "node:fs/promises";
import { dirname, resolve } from "node:path";
import { AlignedSlots } from "../util/aligned.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { type ImageInfo, imageInfo } from "./qemu-img.js";
import { RawFileSource } from "./raw-file.js";

/** Formats whose QEMU driver takes a `backing` option (set to null when exporting). */
export const FORMATS_WITH_BACKING = new Set(["qcow2", "qed", "vmdk"]);

/** Bytes of the head read for sniffing and header checks; VMDK descriptors are read up to this. */
const HEAD = 64 * 1024;

async function readAt(path: string, offset: number, length: number): Promise<Buffer> {
  const fh = await open(path, "r");
  try {
    const buf = Buffer.alloc(length);
    const { bytesRead } = await fh.read(buf, 0, length, offset);
    return buf.subarray(0, bytesRead);
  } finally {
    await fh.close();
  }
}

/**
 * The image format the first bytes look like (QEMU's probes, by magic), or undefined when they
 * look like nothing but data. Used only to warn: a raw disk read as raw is always correct.
 */
export function sniffFormat(head: Buffer): string | undefined {
  const at = (off: number, magic: string) =>
    head.length >= off + magic.length && head.subarray(off, off + magic.length).toString("latin1") === magic;
  if (at(0, "QFI\xfb")) return "qcow2";
  if (at(0, "QED\0")) return "qed";
  if (at(0, "KDMV") || at(0, "COWD")) return "vmdk";
  if (isVmdkDescriptor(head)) return "vmdk";
  if (at(0, "vhdxfile")) return "vhdx";
  if (at(0, "conectix")) return "vpc";
  if (head.length >= 0x44 && head.readUInt32LE(0x40) === 0xbeda107f) return "vdi";
  if (at(0, "WithoutFreeSpace") || at(0, "WithouFreSpacExt")) return "parallels";
  if (at(0, "LUKS\xba\xbe")) return "luks";
  if (at(0, "Bochs Virtual HD Image")) return "bochs";
  if (at(0, "#!/bin/sh\n#V2.0 Format")) return "cloop";
  return undefined;
}

/** A VMDK text descriptor, as QEMU's vmdk probe recognises one (a `createType` line near the top). */
function isVmdkDescriptor(head: Buffer): boolean {
  const text = head.subarray(0, 4096).toString("latin1");
  return /^# Disk DescriptorFile/.test(text) || /^\s*createType\s*=/m.test(text.slice(0, 1024));
}

/**
 * What the file's first 4 KiB look like ({@link sniffFormat}), read around the page cache where
 * the file allows it: a raw disk is about to be read that way, and none of it should be cached.
 */
export async function sniffImageFile(path: string): Promise<string | undefined> {
  const src = await RawFileSource.open(path);
  try {
    const length = Math.min(4096, src.size);
    const memory = new AlignedSlots(1, 4096);
    return sniffFormat(Buffer.from(await src.read(0, length, Buffer.from(memory.memory, 0, 4096))));
  } finally {
    await src.close();
  }
}

function refuse(path: string, format: string, what: string): never {
  throw new StrataError(
    ErrorCode.SOURCE_UNREADABLE,
    `image ${path} (${format}) refers to another file: ${what}; refusing it, because reading it would read that file instead of the disk (flatten it first: qemu-img convert -O ${format} IMAGE NEW)`,
  );
}

/** qcow2 header: backing file, external data file (incompatible feature bit 2, extension "DATA"). */
function checkQcow2(path: string, h: Buffer): void {
  if (h.length < 72) refuse(path, "qcow2", "a header too short to check");
  const version = h.readUInt32BE(4);
  if (h.readBigUInt64BE(8) !== 0n || h.readUInt32BE(16) !== 0) refuse(path, "qcow2", "a backing file");
  let extStart = 72;
  if (version >= 3) {
    if (h.length < 104) refuse(path, "qcow2", "a header too short to check");
    if ((h.readBigUInt64BE(72) & 4n) !== 0n) refuse(path, "qcow2", "an external data file");
    extStart = h.readUInt32BE(100);
  }
  // Header extensions: u32 type, u32 length, data padded to 8 bytes; type 0 ends them.
  for (let off = extStart; off + 8 <= h.length; ) {
    const type = h.readUInt32BE(off);
    const len = h.readUInt32BE(off + 4);
    if (type === 0) return;
    if (type === 0x44415441) refuse(path, "qcow2", "an external data file");
    off += 8 + Math.ceil(len / 8) * 8;
  }
}

/** QED header: the backing-file feature bit and offset. */
function checkQed(path: string, h: Buffer): void {
  if (h.length < 64) refuse(path, "qed", "a header too short to check");
  if ((h.readBigUInt64LE(16) & 1n) !== 0n || h.readUInt32LE(56) !== 0) refuse(path, "qed", "a backing file");
}

/** Extent lines and parent hints of a VMDK descriptor. */
function checkVmdkDescriptor(path: string, text: string, embedded: boolean): void {
  if (/^\s*parentFileNameHint\s*=/m.test(text)) refuse(path, "vmdk", "a parent (backing) file");
  const extent = /^\s*(?:RW|RDONLY|NOACCESS)\s+\d+\s+\w+\s+"([^"]*)"/m.exec(text);
  if (extent && !embedded) refuse(path, "vmdk", `an extent in file "${extent[1]}"`);
}

/** VMDK: a sparse (KDMV) image whose embedded descriptor stays unused, or refused. */
async function checkVmdk(path: string, h: Buffer): Promise<void> {
  const magic = h.subarray(0, 4).toString("latin1");
  if (magic === "KDMV") {
    if (h.length < 44) refuse(path, "vmdk", "a header too short to check");
    const capacity = h.readBigUInt64LE(12);
    const descOffset = Number(h.readBigUInt64LE(28)) * 512;
    const descSize = Math.min(Number(h.readBigUInt64LE(36)) * 512, 1024 * 1024);
    // With capacity 0, QEMU takes the disk's layout from the embedded descriptor's extents.
    if (capacity === 0n) refuse(path, "vmdk", "extents listed in its embedded descriptor");
    if (descOffset > 0 && descSize > 0)
      checkVmdkDescriptor(path, (await readAt(path, descOffset, descSize)).toString("latin1"), true);
    return;
  }
  if (magic === "COWD") refuse(path, "vmdk", "a VMDK3 (COWD) image, which may name a parent");
  // Anything else QEMU opens as vmdk is a text descriptor: its extents are other files.
  checkVmdkDescriptor(path, h.toString("latin1"), false);
  refuse(path, "vmdk", "a descriptor whose extents are other files");
}

/** What `qemu-img info` reported, checked for the same references (and `json:` file names). */
export function checkImageInfo(path: string, format: string, info: ImageInfo): void {
  if (info.filename?.startsWith("json:")) refuse(path, format, `a json: file name (${info.filename})`);
  if (info.backingFile !== undefined) refuse(path, format, `backing file ${info.backingFile}`);
  if (info.dataFile !== undefined) refuse(path, format, `external data file ${info.dataFile}`);
  for (const f of info.extentFiles) {
    if (resolve(dirname(resolve(path)), f) !== resolve(path)) refuse(path, format, `an extent in file ${f}`);
  }
}

/**
 * Refuses an image of `format` whose own header refers to another file, before any QEMU program
 * opens it (opening an external data file or an extent already reads a host file). Raw images
 * refer to nothing. Follow with {@link checkImageInfo} on what `qemu-img info` reports.
 */
export async function checkImageHeader(path: string, format: string): Promise<void> {
  if (format !== "qcow2" && format !== "qed" && format !== "vmdk") return;
  const head = await readAt(resolve(path), 0, HEAD);
  if (format === "qcow2") checkQcow2(path, head);
  else if (format === "qed") checkQed(path, head);
  else if (format === "vmdk") await checkVmdk(path, head);
}

/**
 * Vets an image file about to be read as a backup source: its format is `format`, or raw when
 * none is given (never probed; `warn` is told when a file read as raw begins like an image of
 * another format). Refuses images that refer to other files. Returns `qemu-img info`'s report
 * (which also refuses an image a running VM holds locked).
 */
export async function vetImageSource(
  path: string,
  format: string | undefined,
  warn: (message: string) => void = () => {},
): Promise<{ format: string; info: ImageInfo }> {
  const fmt = format ?? "raw";
  if (format === undefined) {
    const looks = await sniffImageFile(path);
    if (looks !== undefined) {
      warn(
        `${path} begins like a ${looks} image but is read as raw (sources are never probed): if it is a ${looks} image, not a raw disk, give its format: file:${path},format=${looks}`,
      );
    }
  }
  await checkImageHeader(path, fmt);
  const info = await imageInfo(path, { format: fmt });
  checkImageInfo(path, fmt, info);
  return { format: fmt, info };
}
