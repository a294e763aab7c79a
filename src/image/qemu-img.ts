/** What qemu-img says about an image: format, size, allocation, bitmaps. */
import { resolve } from "node:path";
import { ErrorCode, StrataError } from "../util/errors.js";
import { runProgram } from "../util/process.js";

/** Image formats Strata reads and writes through QEMU. */
export const IMAGE_FORMATS = ["raw", "qcow2", "vmdk", "vhdx", "vpc", "vdi"] as const;
export type ImageFormat = (typeof IMAGE_FORMATS)[number];

export interface ImageInfo {
  format: string;
  virtualSize: number;
  actualSize: number;
  backingFile?: string;
  /** The file name QEMU opened ("json:{…}" when options were parsed out of it). */
  filename?: string;
  /** qcow2's external data file, when it has one. */
  dataFile?: string;
  /** The files of a VMDK's extents. */
  extentFiles: string[];
  bitmaps: Array<{ name: string; granularity: number; flags: string[] }>;
}

/**
 * `qemu-img info`. With `format` the image is read as that format (no probing). `shared` reads
 * an image another process holds open (-U); allocation seen that way may be stale.
 */
export async function imageInfo(
  path: string,
  options: { format?: string; shared?: boolean } = {},
): Promise<ImageInfo> {
  const args = ["info", "--output=json"];
  if (options.format) args.push("-f", options.format);
  if (options.shared) args.push("-U");
  // Absolute, so that no file name is taken for "json:{…}" options or a protocol ("nbd:…").
  args.push(resolve(path));
  let text: string;
  try {
    text = await runProgram("qemu-img", args);
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    if (/lock/i.test(msg)) {
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `image ${path} is in use by a running VM (QEMU holds its lock): back it up through the VM, or shut the VM down`,
        { cause: err },
      );
    }
    throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `cannot read image ${path}: ${msg}`, { cause: err });
  }
  const j = JSON.parse(text) as {
    format: string;
    filename?: string;
    "virtual-size": number;
    "actual-size"?: number;
    "backing-filename"?: string;
    "format-specific"?: {
      data?: {
        bitmaps?: Array<{ name: string; granularity: number; flags: string[] }>;
        "data-file"?: string;
        extents?: Array<{ filename?: string }>;
      };
    };
  };
  return {
    format: j.format,
    virtualSize: j["virtual-size"],
    actualSize: j["actual-size"] ?? 0,
    ...(j["backing-filename"] === undefined ? {} : { backingFile: j["backing-filename"] }),
    ...(j.filename === undefined ? {} : { filename: j.filename }),
    ...(j["format-specific"]?.data?.["data-file"] === undefined
      ? {}
      : { dataFile: j["format-specific"].data["data-file"] }),
    extentFiles: (j["format-specific"]?.data?.extents ?? []).flatMap((e) =>
      e.filename === undefined ? [] : [e.filename],
    ),
    bitmaps: j["format-specific"]?.data?.bitmaps ?? [],
  };
}

/** One run of `qemu-img map --output=json`. */
export interface MapExtent {
  offset: number;
  length: number;
  /** Bytes are stored (not a hole). */
  data: boolean;
  /** Reads as zeros. */
  zero: boolean;
}

/**
 * Allocation map of an image (uses SEEK_DATA/SEEK_HOLE on raw files, metadata on others).
 * `shared`: takes no image lock (-U), so that it can't disturb a lock check running beside it.
 */
export async function imageMap(
  path: string,
  format: string,
  options: { shared?: boolean } = {},
): Promise<MapExtent[]> {
  const args = ["map", "--output=json", "-f", format, ...(options.shared ? ["-U"] : []), resolve(path)];
  const text = await runProgram("qemu-img", args);
  const rows = JSON.parse(text) as Array<{ start: number; length: number; data: boolean; zero: boolean }>;
  return rows.map((r) => ({ offset: r.start, length: r.length, data: r.data, zero: r.zero }));
}

/** Adds a persistent, enabled dirty bitmap to a qcow2 image that no process has open. */
export async function addBitmap(path: string, name: string, granularity: number): Promise<void> {
  await runProgram("qemu-img", [
    "bitmap",
    "--add",
    "--granularity",
    String(granularity),
    "-f",
    "qcow2",
    path,
    name,
  ]);
}

/** Removes a persistent bitmap from a qcow2 image that no process has open. */
export async function removeBitmap(path: string, name: string): Promise<void> {
  await runProgram("qemu-img", ["bitmap", "--remove", "-f", "qcow2", path, name]);
}

/**
 * Refuses a raw image or block device that a running QEMU has open for writing. Strata reads raw
 * sources itself, which takes no lock, and QEMU never refuses a reader that only reads; so the
 * check asks QEMU's lock protocol for the write permission instead: qemu-io opens the source
 * read-write and quits, writing nothing (the mtime stays). A source Strata may not open for
 * writing (read-only media, permissions) can't be written by a VM through this host's QEMU either
 * way it is locked, and is read as it is.
 */
export async function refuseIfWrittenByVm(path: string): Promise<void> {
  try {
    await runProgram("qemu-io", ["-f", "raw", "-c", "quit", resolve(path)]);
  } catch (err) {
    const msg = err instanceof Error ? err.message : String(err);
    if (/"write" lock|another process/i.test(msg)) {
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `${path} is in use by a running VM (QEMU holds its write lock): back it up through the VM, or shut the VM down`,
        { cause: err },
      );
    }
    if (/permission denied|read-only/i.test(msg)) return;
    throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `cannot open ${path}: ${msg}`, { cause: err });
  }
}
