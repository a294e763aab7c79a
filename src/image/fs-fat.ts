/**
 * FAT12/16/32 with VFAT long names, read-only, written for Strata (the `fatfs` package is
 * read-write, callback-based and FAT16/32 only; reading FAT is small enough to own).
 *
 * The type follows from the cluster count, as the specification says (not from the label in
 * the boot sector). Directories are read whole; files are read cluster run by cluster run
 * (contiguous clusters in one read). FAT sectors are cached per 64 KiB piece. Long names are
 * used when their checksum matches the short entry, otherwise the 8.3 name (with the NT
 * lower-case flags). Lookups are case-insensitive, as FAT is.
 *
 * FAT has no owners, modes or time zones: entries get uid/gid 0, mode 0755 (directories) or
 * 0644 (0444 when read-only), and timestamps are read as UTC. Access times are dates only.
 */
import { checkpoint } from "../util/checkpoint.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { badName, printable } from "../util/names.js";
import { type ByteSource, readPadded } from "./byte-source.js";
import {
  type FileSystemReader,
  type FsEntry,
  invalidEntry,
  joinPath,
  notFound,
  pathParts,
  READ_PIECE,
} from "./fs-types.js";

interface RawEntry {
  name: string;
  /** Why the name is not one FAT allows (see {@link fatNameProblem}). */
  invalid?: string;
  attr: number;
  cluster: number;
  size: number;
  mtime: number;
  atime: number;
}

const ATTR_READONLY = 0x01;
const ATTR_VOLUME = 0x08;
const ATTR_DIR = 0x10;
const ATTR_LFN = 0x0f;
const FAT_PIECE = 64 * 1024;
/** FAT pieces cached at most (16 MiB). */
const FAT_CACHE_PIECES = 256;
/** A FAT directory holds at most 65,536 entries of 32 bytes (the specification's limit). */
const MAX_DIR_BYTES = 65536 * 32;
/** Directories whose place (first cluster) is remembered by path, so walks don't look each path up from the root. */
const DIR_CACHE = 4096;

/** A FAT12/16/32 filesystem, read-only. */
export class FatReader implements FileSystemReader {
  readonly type = "vfat";
  private readonly fatCache = new Map<number, Buffer>();
  /** Directory path ("a/b", lower case) → its entry, for the last {@link DIR_CACHE} looked up. */
  private readonly dirCache = new Map<string, RawEntry>();
  private readonly bps: number;
  private readonly clusterSize: number;
  private readonly fatStart: number;
  private readonly rootStart: number;
  private readonly rootBytes: number;
  private readonly dataStart: number;
  private readonly clusters: number;
  readonly bits: 12 | 16 | 32;
  private readonly rootCluster: number;

  private constructor(
    private readonly source: ByteSource,
    bs: Buffer,
  ) {
    this.bps = bs.readUInt16LE(11);
    const spc = bs[13]!;
    const reserved = bs.readUInt16LE(14);
    const fats = bs[16]!;
    const rootEntries = bs.readUInt16LE(17);
    const total = bs.readUInt16LE(19) || bs.readUInt32LE(32);
    const fatSize = bs.readUInt16LE(22) || bs.readUInt32LE(36);
    this.clusterSize = spc * this.bps;
    this.fatStart = reserved * this.bps;
    this.rootStart = (reserved + fats * fatSize) * this.bps;
    this.rootBytes = Math.ceil((rootEntries * 32) / this.bps) * this.bps;
    this.dataStart = this.rootStart + this.rootBytes;
    this.clusters = Math.floor((total * this.bps - this.dataStart) / this.clusterSize);
    this.bits = this.clusters < 4085 ? 12 : this.clusters < 65525 ? 16 : 32;
    this.rootCluster = this.bits === 32 ? bs.readUInt32LE(44) : 0;
    // The FAT type follows from the count the boot sector declares; only clusters that lie inside
    // the partition can be read (a volume cut short, or a boot sector that lies).
    this.clusters = Math.min(this.clusters, Math.floor((source.size - this.dataStart) / this.clusterSize));
    if (this.clusters <= 0 || this.dataStart > source.size)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        "the FAT boot sector describes a volume larger than its partition",
      );
  }

  static async open(source: ByteSource): Promise<FatReader> {
    return new FatReader(source, await readPadded(source, 0, 512));
  }

  async stat(path: string): Promise<FsEntry> {
    const parts = pathParts(path);
    if (parts.length === 0)
      return this.entry("/", "", { name: "", attr: ATTR_DIR, cluster: 0, size: 0, mtime: 0, atime: 0 });
    const raw = await this.lookup(parts, path);
    return this.entry(`/${parts.join("/")}`, raw.name, raw);
  }

  async list(path: string, signal?: AbortSignal): Promise<FsEntry[]> {
    const parts = pathParts(path);
    const dir = parts.length === 0 ? undefined : await this.lookup(parts, path);
    if (dir && !(dir.attr & ATTR_DIR)) throw notFound(path, "not a directory");
    const p = `/${parts.join("/")}`;
    const entries = await this.readDir(dir?.cluster ?? this.rootCluster, signal);
    return entries
      .map((e) =>
        e.invalid === undefined
          ? this.entry(joinPath(p, e.name), e.name, e)
          : invalidEntry(p, e.name, e.invalid),
      )
      .sort((a, b) => (a.name < b.name ? -1 : a.name > b.name ? 1 : 0));
  }

  async *read(path: string, pieceSize = READ_PIECE): AsyncIterable<Buffer> {
    const raw = await this.lookup(pathParts(path), path);
    if (raw.attr & ATTR_DIR) throw new StrataError(ErrorCode.USAGE, `${printable(path)}: is a directory`);
    let left = raw.size;
    for await (const [offset, length] of this.runs(raw.cluster, printable(path))) {
      if (left <= 0) return;
      let take = Math.min(length, left);
      for (let o = offset; take > 0; ) {
        const n = Math.min(take, pieceSize);
        yield await this.source.read(o, n);
        o += n;
        take -= n;
        left -= n;
      }
    }
    if (left > 0)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `${printable(path)}: cluster chain ends before the file does`,
      );
  }

  async close(): Promise<void> {
    this.fatCache.clear();
  }

  // ---- internals ------------------------------------------------------------------------------

  private entry(path: string, name: string, e: RawEntry): FsEntry {
    const dir = (e.attr & ATTR_DIR) !== 0;
    return {
      name,
      path,
      ...(dir ? { id: e.cluster === 0 ? this.rootCluster : e.cluster } : {}),
      kind: dir ? "directory" : "file",
      mode: dir ? 0o755 : e.attr & ATTR_READONLY ? 0o444 : 0o644,
      uid: 0,
      gid: 0,
      size: dir ? 0 : e.size,
      mtime: e.mtime,
      atime: e.atime,
    };
  }

  private async lookup(parts: string[], path: string): Promise<RawEntry> {
    let cluster = this.rootCluster;
    let found: RawEntry | undefined;
    let i = 0;
    // Start from the deepest directory on the way that was looked up before.
    for (let k = parts.length - 1; k > 0; k--) {
      const hit = this.dirCache.get(parts.slice(0, k).join("/").toLowerCase());
      if (hit) {
        found = hit;
        cluster = hit.cluster;
        i = k;
        break;
      }
    }
    for (; i < parts.length; i++) {
      if (found && !(found.attr & ATTR_DIR))
        throw notFound(`/${parts.slice(0, i).join("/")}`, "not a directory");
      const want = parts[i]!.toLowerCase();
      found = (await this.readDir(cluster)).find((e) => !e.invalid && e.name.toLowerCase() === want);
      if (!found) throw notFound(path);
      cluster = found.cluster;
      if (found.attr & ATTR_DIR) {
        if (this.dirCache.size >= DIR_CACHE) this.dirCache.clear();
        this.dirCache.set(
          parts
            .slice(0, i + 1)
            .join("/")
            .toLowerCase(),
          found,
        );
      }
    }
    return found!;
  }

  /** The entries of a directory (cluster 0: the FAT12/16 root region). */
  private async readDir(cluster: number, signal?: AbortSignal): Promise<RawEntry[]> {
    const pieces: Buffer[] = [];
    if (cluster === 0 && this.bits !== 32)
      pieces.push(await this.source.read(this.rootStart, this.rootBytes));
    else {
      // A chain running on through the volume (or around a loop) is not a directory: refused
      // after 65536 entries.
      const tick = checkpoint(signal);
      for await (const [o, n] of this.runs(cluster, "directory", MAX_DIR_BYTES)) {
        await tick();
        pieces.push(await this.source.read(o, n));
      }
    }
    const data = Buffer.concat(pieces);
    const out: RawEntry[] = [];
    let lfn: string[] = [];
    let lfnSum = -1;
    for (let o = 0; o + 32 <= data.length; o += 32) {
      const first = data[o]!;
      if (first === 0) break;
      const attr = data[o + 11]!;
      if (first === 0xe5) {
        lfn = [];
        continue;
      }
      if (attr === ATTR_LFN) {
        const ord = first & 0x1f;
        if (first & 0x40) lfn = [];
        lfn[ord - 1] = lfnPart(data.subarray(o, o + 32));
        lfnSum = data[o + 13]!;
        continue;
      }
      const short = data.subarray(o, o + 11);
      const longName = lfn.length > 0 && lfnSum === checksum(short) ? lfn.join("") : undefined;
      lfn = [];
      if (attr & ATTR_VOLUME) continue;
      const name = longName ?? shortName(short, data[o + 12]!);
      // The "." and ".." entries of a subdirectory are short entries; a long name of "." or
      // "..", or one holding "/", is something no FAT driver writes: flagged, never used.
      if (longName === undefined && (name === "." || name === "..")) continue;
      const invalid = fatNameProblem(name);
      const hi = this.bits === 32 ? data.readUInt16LE(o + 20) : 0;
      out.push({
        name,
        ...(invalid === undefined ? {} : { invalid }),
        attr,
        cluster: hi * 65536 + data.readUInt16LE(o + 26),
        size: data.readUInt32LE(o + 28),
        mtime: fatTime(data.readUInt16LE(o + 24), data.readUInt16LE(o + 22)),
        atime: fatTime(data.readUInt16LE(o + 18), 0),
      });
    }
    return out;
  }

  /** Byte ranges of a cluster chain, contiguous clusters merged. */
  private async *runs(start: number, what: string, maxBytes = Infinity): AsyncIterable<[number, number]> {
    if (start === 0) return; // an empty file
    let runStart = start;
    let runLen = 1;
    let c = start;
    for (let steps = 0; ; steps++) {
      if (c < 2 || c >= this.clusters + 2 || steps > this.clusters)
        throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: broken cluster chain at cluster ${c}`);
      if ((steps + 1) * this.clusterSize > maxBytes)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `${what} at cluster ${start} is longer than FAT allows (${maxBytes / 32} entries): its cluster chain is damaged`,
        );
      const next = await this.next(c);
      if (next === c + 1) {
        runLen++;
        c = next;
        continue;
      }
      yield [this.dataStart + (runStart - 2) * this.clusterSize, runLen * this.clusterSize];
      if (this.isEnd(next)) return;
      runStart = next;
      runLen = 1;
      c = next;
    }
  }

  private isEnd(v: number): boolean {
    return this.bits === 12 ? v >= 0xff8 : this.bits === 16 ? v >= 0xfff8 : v >= 0x0ffffff8;
  }

  private async next(cluster: number): Promise<number> {
    if (this.bits === 12) {
      const at = Math.floor(cluster * 1.5);
      const v = (await this.fatByte(at)) | ((await this.fatByte(at + 1)) << 8);
      return cluster & 1 ? v >> 4 : v & 0xfff;
    }
    if (this.bits === 16)
      return (await this.fatByte(cluster * 2)) | ((await this.fatByte(cluster * 2 + 1)) << 8);
    const b = await this.fatPiece(cluster * 4);
    return b.buf.readUInt32LE(b.at) & 0x0fffffff;
  }

  private async fatByte(offset: number): Promise<number> {
    const b = await this.fatPiece(offset);
    return b.buf[b.at]!;
  }

  /** The cached 64 KiB piece of the first FAT holding byte `offset` (4-byte entries never straddle). */
  private async fatPiece(offset: number): Promise<{ buf: Buffer; at: number }> {
    const piece = Math.floor(offset / FAT_PIECE);
    let buf = this.fatCache.get(piece);
    if (!buf) {
      buf = await readPadded(this.source, this.fatStart + piece * FAT_PIECE, FAT_PIECE);
      if (this.fatCache.size >= FAT_CACHE_PIECES) this.fatCache.clear(); // bounded, whatever the volume
      this.fatCache.set(piece, buf);
    }
    return { buf, at: offset - piece * FAT_PIECE };
  }
}

/** Characters a FAT long name may not hold (besides controls), as Microsoft's specification says. */
const FAT_FORBIDDEN = /[\x00-\x1f"*/:<>?\\|]/;

/** Why `name` is not a name FAT allows (or the host can take), or undefined. */
function fatNameProblem(name: string): string | undefined {
  const why = badName(name);
  if (why) return why;
  const bad = FAT_FORBIDDEN.exec(name);
  if (bad) return `a name FAT does not allow (it holds ${JSON.stringify(bad[0])})`;
  return undefined;
}

function lfnPart(e: Buffer): string {
  const units: number[] = [];
  for (const [from, to] of [
    [1, 11],
    [14, 26],
    [28, 32],
  ] as const) {
    for (let o = from; o < to; o += 2) units.push(e.readUInt16LE(o));
  }
  const end = units.indexOf(0);
  return String.fromCharCode(...(end < 0 ? units : units.slice(0, end)));
}

function checksum(short: Buffer): number {
  let sum = 0;
  for (const b of short) sum = (((sum & 1) << 7) + (sum >> 1) + b) & 0xff;
  return sum;
}

function shortName(short: Buffer, nt: number): string {
  let base = short.subarray(0, 8).toString("latin1").trimEnd();
  let ext = short.subarray(8, 11).toString("latin1").trimEnd();
  if (base.charCodeAt(0) === 0x05) base = `\u00e5${base.slice(1)}`;
  if (nt & 0x08) base = base.toLowerCase();
  if (nt & 0x10) ext = ext.toLowerCase();
  return ext ? `${base}.${ext}` : base;
}

/** A FAT date and time (local time of whoever wrote it; read as UTC), in ms since the epoch. */
function fatTime(date: number, time: number): number {
  if (date === 0) return 0;
  return Date.UTC(
    1980 + (date >> 9),
    ((date >> 5) & 0x0f) - 1,
    date & 0x1f,
    time >> 11,
    (time >> 5) & 0x3f,
    (time & 0x1f) * 2,
  );
}
