/** Opens the filesystem in a byte range with the reader its magic number calls for. */
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ByteSource } from "./byte-source.js";
import { detectFilesystem, READABLE } from "./fs-detect.js";
import { ExtReader } from "./fs-ext.js";
import { FatReader } from "./fs-fat.js";
import type { FileSystemReader } from "./fs-types.js";

/**
 * A reader for the filesystem in `source`. `where` names the place in messages ("disk root,
 * partition 2"). An unknown or unsupported filesystem is a USAGE error naming what was found.
 */
export async function openFileSystem(source: ByteSource, where: string): Promise<FileSystemReader> {
  const type = await detectFilesystem(source);
  if (type === undefined)
    throw new StrataError(ErrorCode.USAGE, `no filesystem Strata knows on ${where} (no known magic number)`);
  if (!READABLE.has(type))
    throw new StrataError(
      ErrorCode.USAGE,
      `${where} holds ${type}, which Strata cannot read in-process (it reads ext2/3/4 and FAT; ` +
        "XFS, Btrfs and NTFS through libguestfs when libguestfs-tools is installed); " +
        "serve the restore point with `strata serve` and use libguestfs or a helper VM",
    );
  if (type === "vfat") return FatReader.open(source);
  return ExtReader.open(source, type);
}
