/**
 * Image files and block devices named on the command line as `file:PATH[,name=DISK][,format=FMT]`:
 * parsing the specs and opening them as block sources (the image-file adapter, adapter.ts, makes a
 * backup session of them). No hypervisor is involved; Strata can't tell how the
 * VM left the disks, so such restore points are recorded as crash-consistent.
 *
 * An image is read as raw unless `format=` says otherwise: never probed, since a guest that
 * writes an image header into its raw disk must not choose how the host reads it (see
 * image/image-safety.ts, which also refuses images that refer to other files).
 *
 * Raw files are read directly with positioned reads (fastest), skipping holes found with
 * SEEK_DATA/SEEK_HOLE (qemu-img map). Block devices are read whole (zero chunks are still never
 * stored). Every other format QEMU reads (qcow2, vmdk, vhdx, vpc, vdi) is exported read-only by
 * qemu-storage-daemon and read over NBD, asking base:allocation so that unallocated and zero
 * clusters are skipped. qemu-storage-daemon takes QEMU's image lock, so an image that a running
 * VM has open is refused with a clear message rather than read while it changes.
 */
import { promises as fs } from "node:fs";
import { basename } from "node:path";
import { vetImageSource } from "../../image/image-safety.js";
import { imageMap, type MapExtent, refuseIfWrittenByVm } from "../../image/qemu-img.js";
import { RawFileSource } from "../../image/raw-file.js";
import { StorageDaemon } from "../../image/storage-daemon.js";
import { BASE_ALLOCATION, NbdClient, StateFlag } from "../../nbd/index.js";
import { NAME_RE } from "../../repo/format.js";
import { ErrorCode, ioError, StrataError } from "../../util/errors.js";

/** An extent of a disk; structurally the engine's DataExtent (hypervisor must not import engine). */
interface DataExtent {
  offset: number;
  length: number;
  zero: boolean;
}

export interface FileSpec {
  path: string;
  name: string;
  /** Image format as the user stated it; raw when absent (never probed: the guest writes the image). */
  format?: string;
}

const FORMATS = new Set([
  "raw",
  "qcow2",
  "vmdk",
  "vhdx",
  "vpc",
  "vdi",
  "qed",
  "parallels",
  "cloop",
  "dmg",
  "bochs",
]);

/** Parses `file:PATH[,name=DISK][,format=FMT]` specs; disk names default to the file name without extension. */
export function parseFileSpecs(specs: readonly string[]): FileSpec[] {
  const out: FileSpec[] = [];
  for (const spec of specs) {
    if (!spec.startsWith("file:")) {
      throw new StrataError(
        ErrorCode.USAGE,
        `unknown source "${spec}": sources look like file:/path/to/disk.img[,name=DISK][,format=qcow2]`,
      );
    }
    const parts = spec.slice(5).split(",");
    const path = parts[0] ?? "";
    if (path === "") throw new StrataError(ErrorCode.USAGE, `source "${spec}" names no file`);
    let name = basename(path).replace(/\.(img|raw|bin|disk|qcow2|vmdk|vhdx|vhd|vdi)$/i, "");
    let format: string | undefined;
    for (const opt of parts.slice(1)) {
      const [k, v] = opt.split("=", 2);
      if (k === "name" && v) name = v;
      else if (k === "format" && v && FORMATS.has(v)) format = v;
      else {
        throw new StrataError(
          ErrorCode.USAGE,
          `unknown option "${opt}" in source "${spec}" (known: name=DISK, format=raw|qcow2|vmdk|vhdx|vpc|vdi)`,
        );
      }
    }
    name = name.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^[^A-Za-z0-9]+/, "") || "disk";
    if (!NAME_RE.test(name))
      throw new StrataError(ErrorCode.USAGE, `bad disk name "${name}" in source "${spec}"`);
    out.push({ path, name, ...(format === undefined ? {} : { format }) });
  }
  const seen = new Map<string, number>();
  for (const s of out) {
    const n = seen.get(s.name) ?? 0;
    seen.set(s.name, n + 1);
    if (n > 0) s.name = `${s.name}-${n}`;
  }
  return out;
}

export interface OpenedDisk {
  name: string;
  source: string;
  /** Image format read ("raw" for block devices). */
  format: string;
  size: number;
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  allocation?(): Promise<DataExtent[]>;
  close(): Promise<void>;
}

/** `map`: the file's allocation map, asked for early (none for a block device: read whole). */
async function openRaw(spec: FileSpec, map: Promise<MapExtent[]> | undefined): Promise<OpenedDisk> {
  const src = await RawFileSource.open(spec.path);
  const disk: OpenedDisk = {
    name: spec.name,
    source: spec.path,
    format: "raw",
    size: src.size,
    read: (o, l, into) => src.read(o, l, into),
    close: () => src.close(),
  };
  if (map) {
    disk.allocation = async () =>
      (await map).map((e) => ({
        offset: e.offset,
        length: e.length,
        zero: e.zero || !e.data,
      }));
  }
  return disk;
}

async function openViaNbd(spec: FileSpec, format: string): Promise<OpenedDisk> {
  const daemon = await StorageDaemon.start([{ path: spec.path, format, name: spec.name, noBacking: true }]);
  try {
    const client = await NbdClient.connect(
      { path: daemon.socket },
      { exportName: spec.name, metaContexts: [BASE_ALLOCATION] },
    );
    return {
      name: spec.name,
      source: spec.path,
      format,
      size: client.size,
      read: (o, l) => client.read(o, l),
      allocation: async () =>
        (await client.blockStatus(0, client.size, BASE_ALLOCATION)).map((e) => ({
          offset: e.offset,
          length: e.length,
          zero: (e.flags & StateFlag.ZERO) !== 0,
        })),
      close: async () => {
        await client.close().catch(() => {});
        await daemon.stop();
      },
    };
  } catch (err) {
    await daemon.stop();
    throw err;
  }
}

/**
 * What opening a file source checks first: it exists and is a file or block device, its format
 * (raw unless stated) passes image-safety's checks, and for raw sources no running QEMU holds its
 * write lock. Programs and reads only: nothing is left open, so it may start before it is known
 * that the source will be opened (see {@link vetFileSources}).
 */
export interface VettedSource {
  format: string;
  /** A raw file's allocation map, still being asked for (none for a block device: read whole). */
  map?: Promise<MapExtent[]>;
}

async function vetOne(spec: FileSpec, warn: (message: string) => void): Promise<VettedSource> {
  let st: import("node:fs").Stats;
  try {
    st = await fs.stat(spec.path);
  } catch (err) {
    throw ioError(ErrorCode.SOURCE_UNREADABLE, `cannot open source ${spec.path}`, err);
  }
  if (!st.isFile() && !st.isBlockDevice())
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `source ${spec.path} is neither a file nor a block device`,
    );
  // Block devices are read whole (no hole map); zero chunks are still never stored. Strata reads
  // raw sources itself, which takes no image lock: QEMU's own lock protocol is asked first, so
  // that a disk a running VM writes is refused instead of copied while it changes.
  // Each of these runs a program (qemu-img, qemu-io); a raw file's three run side by side, the
  // map (a few hundred ms on a cold cache) while the backup starts. The map takes no image lock,
  // so it can't make the lock check fail; it only reads, and is used only once the checks passed.
  const raw = (spec.format ?? "raw") === "raw";
  const map = raw && st.isFile() ? imageMap(spec.path, "raw", { shared: true }) : undefined;
  map?.catch(() => {});
  const vetted = vetImageSource(spec.path, spec.format, warn);
  const unlocked = raw ? refuseIfWrittenByVm(spec.path) : undefined;
  unlocked?.catch(() => {});
  const { format } = await vetted;
  if (format !== "raw") return { format };
  await unlocked;
  return map ? { format, map } : { format };
}

/**
 * Starts vetting every source now (see {@link VettedSource}), for {@link openFileDisks} to use
 * later: a backup vets its sources while it opens the repository (on an encrypted one, asking
 * the keyring for the key), instead of after. A failure surfaces when the result is used.
 */
export function vetFileSources(
  specs: readonly FileSpec[],
  warn: (message: string) => void = () => {},
): Array<Promise<VettedSource>> {
  return specs.map((s) => {
    const p = vetOne(s, warn);
    p.catch(() => {});
    return p;
  });
}

async function openOne(spec: FileSpec, vetting: Promise<VettedSource>): Promise<OpenedDisk> {
  const { format, map } = await vetting;
  return format === "raw" ? openRaw(spec, map) : openViaNbd(spec, format);
}

/** Opens every file source; closes what it opened if one fails. */
export async function openFileDisks(
  specs: readonly FileSpec[],
  options: { warn?: (message: string) => void; vetted?: ReadonlyArray<Promise<VettedSource>> } = {},
): Promise<OpenedDisk[]> {
  // All at once: each waits on programs and the disk, not on the CPU.
  const vetting = options.vetted ?? vetFileSources(specs, options.warn);
  const settled = await Promise.allSettled(specs.map((s, i) => openOne(s, vetting[i]!)));
  const opened = settled.flatMap((r) => (r.status === "fulfilled" ? [r.value] : []));
  const failed = settled.find((r): r is PromiseRejectedResult => r.status === "rejected");
  if (failed) {
    await Promise.all(opened.map((d) => d.close()));
    throw failed.reason;
  }
  return opened;
}
