/**
 * LVM2 physical volumes, read as `pvs`/`lvs` would, from the bytes alone: nothing is activated.
 *
 * A PV carries a label in one of its first four sectors ("LABELONE", then "LVM2 001" and the
 * PV header: its UUID, data areas and metadata areas). Each metadata area starts with a header
 * (magic " LVM2 x[5A%r0N*>") whose first location points at the current metadata: the volume
 * group written out in LVM's text format (`vg0 { physical_volumes { pv0 {…} } logical_volumes
 * {…} }`), in a circular buffer after the 512-byte header, with a CRC. Every PV of a VG holds a
 * copy (unless created with `--metadatacopies 0`), so the copy with the highest `seqno` among
 * the PVs found wins.
 *
 * From the metadata Strata lists the volume groups and logical volumes of a restore point, says
 * which PVs an LV needs (following its segments through sub-LVs: thin pools, RAID images,
 * mirrors), and maps a linear LV to byte ranges of its PVs so its filesystem can be recognised
 * by magic number. Reading an LV's files is left to libguestfs, whose kernel activates the VG.
 *
 * The metadata is the guest's: its text is read only up to {@link MAX_METADATA}, strings are
 * found with indexOf (an unterminated one fails at once, not after 16 M string appends),
 * nesting is bounded, at most {@link MAX_LVS} LVs and {@link MAX_PVS} PVs of a VG are taken
 * (the rest are counted and said), and LVs and PVs are found by name through maps, so nothing
 * costs the square of their number.
 */
import { crc32 } from "node:zlib";
import { ErrorCode, StrataError } from "../util/errors.js";
import { type ByteSource, readPadded } from "./byte-source.js";

const SECTOR = 512;
const LABEL_SCAN_SECTORS = 4;
const MDA_MAGIC = " LVM2 x[5A%r0N*>";
const MDA_HEADER_SIZE = 512;
const INITIAL_CRC = 0xf597a6cf;
/** A raw_locn flag: this metadata area is to be ignored (`pvchange --metadataignore`). */
const RAW_LOCN_IGNORED = 1;
/**
 * Metadata text larger than this is refused rather than read: LVM's default metadata area is
 * 1 MiB, and 40,000 LVs take about 14 MiB of text.
 */
export const MAX_METADATA = 16 * 1024 * 1024;
/** LVs of one VG taken from its metadata; more are counted in {@link VolumeGroup.omittedLvs}. */
export const MAX_LVS = 4096;
/** PVs of one VG taken from its metadata. */
export const MAX_PVS = 4096;
/** Sections nest about five deep in real metadata; deeper is refused, not recursed into. */
const MAX_NESTING = 32;

/** LVM's CRC: the CRC-32 table without the initial and final inversion, seeded with 0xf597a6cf. */
export function lvmCrc(data: Buffer, seed = INITIAL_CRC): number {
  return (crc32(data, (seed ^ 0xffffffff) >>> 0) ^ 0xffffffff) >>> 0;
}

/** A value in LVM's text format. */
export type LvmValue = string | number | Array<string | number> | LvmSection;
/** A `name { … }` section; keys in the order they were written. */
export interface LvmSection {
  [key: string]: LvmValue;
}

/** Parses LVM's text metadata format (what `vgcfgbackup` writes). */
export function parseLvmText(text: string): LvmSection {
  let i = 0;
  const fail = (what: string): never => {
    const line = text.slice(0, i).split("\n").length;
    throw new StrataError(ErrorCode.DATA_CORRUPT, `LVM metadata, line ${line}: ${what}`);
  };
  const skip = () => {
    for (;;) {
      while (i < text.length && /\s/.test(text[i]!)) i++;
      if (text[i] !== "#") return;
      while (i < text.length && text[i] !== "\n") i++;
    }
  };
  const name = (): string => {
    const m = /^[A-Za-z0-9_.+-]+/.exec(text.slice(i, i + 256));
    if (!m) return fail(`expected a name at "${text.slice(i, i + 20)}"`);
    i += m[0].length;
    return m[0];
  };
  const scalar = (): string | number => {
    if (text[i] === '"') {
      // Pieces between escapes: the closing quote is searched for once (again only when an
      // escape consumed it), a backslash only up to it, so a string costs its length once.
      const parts: string[] = [];
      let quote = -1;
      i++;
      for (;;) {
        if (quote < i) quote = text.indexOf('"', i);
        if (quote < 0) return fail("unterminated string");
        const piece = text.slice(i, quote);
        const at = piece.indexOf("\\");
        if (at < 0) {
          parts.push(piece);
          i = quote + 1;
          return parts.join("");
        }
        parts.push(piece.slice(0, at), text[i + at + 1] ?? "");
        i += at + 2;
      }
    }
    const m = /^-?\d+(\.\d+)?/.exec(text.slice(i, i + 64));
    if (!m) return fail(`expected a value at "${text.slice(i, i + 20)}"`);
    i += m[0].length;
    return Number(m[0]);
  };
  const section = (top: boolean, depth = 0): LvmSection => {
    if (depth > MAX_NESTING) fail(`sections nested more than ${MAX_NESTING} deep`);
    const out: LvmSection = Object.create(null) as LvmSection;
    for (;;) {
      skip();
      if (i >= text.length) {
        if (!top) fail("unexpected end in a section");
        return out;
      }
      if (text[i] === "}") {
        if (top) fail('unbalanced "}"');
        i++;
        return out;
      }
      const key = name();
      skip();
      if (text[i] === "{") {
        i++;
        out[key] = section(false, depth + 1);
      } else if (text[i] === "=") {
        i++;
        skip();
        if (text[i] === "[") {
          i++;
          const list: Array<string | number> = [];
          for (;;) {
            skip();
            if (text[i] === "]") break;
            list.push(scalar());
            skip();
            if (text[i] === ",") i++;
            else if (text[i] !== "]") fail('expected "," or "]"');
          }
          i++;
          out[key] = list;
        } else {
          out[key] = scalar();
        }
      } else {
        fail(`expected "=" or "{" after ${key}`);
      }
    }
  };
  return section(true);
}

/** A byte range of a PV. */
interface Area {
  offset: number;
  size: number;
}

/** What one PV's label and metadata say. */
export interface PhysicalVolumeScan {
  /** The PV's UUID without dashes (32 characters). */
  uuid: string;
  /** Size recorded in the label, in bytes. */
  deviceSize: number;
  /** The newest metadata of its volume group found on this PV, or undefined (an orphan PV, or none kept here). */
  metadata?: { text: string; seqno: number };
}

/**
 * Reads the LVM label and metadata of the PV in `source`. Undefined when there is no LVM2 label;
 * a label that is there but damaged is a DATA_CORRUPT error.
 */
export async function readPhysicalVolume(source: ByteSource): Promise<PhysicalVolumeScan | undefined> {
  const head = await readPadded(source, 0, LABEL_SCAN_SECTORS * SECTOR);
  for (let s = 0; s < LABEL_SCAN_SECTORS; s++) {
    const label = head.subarray(s * SECTOR, (s + 1) * SECTOR);
    if (label.toString("latin1", 0, 8) !== "LABELONE") continue;
    if (label.toString("latin1", 24, 32) !== "LVM2 001") continue;
    if (lvmCrc(label.subarray(20)) !== label.readUInt32LE(16))
      throw new StrataError(ErrorCode.DATA_CORRUPT, `LVM label in sector ${s}: checksum mismatch`);
    const at = label.readUInt32LE(20);
    if (at < 32 || at + 40 > SECTOR)
      throw new StrataError(ErrorCode.DATA_CORRUPT, "LVM label: bad header offset");
    const pv = label.subarray(at);
    const uuid = pv.toString("latin1", 0, 32);
    const deviceSize = Number(pv.readBigUInt64LE(32));
    // Two zero-terminated lists of (offset, size): data areas, then metadata areas.
    let p = 40;
    const list = (): Area[] => {
      const out: Area[] = [];
      for (; p + 16 <= pv.length; p += 16) {
        const offset = Number(pv.readBigUInt64LE(p));
        const size = Number(pv.readBigUInt64LE(p + 8));
        if (offset === 0) {
          p += 16;
          return out;
        }
        out.push({ offset, size });
      }
      return out;
    };
    list(); // data areas: pe_start in the metadata says the same
    const mdas = list();
    let metadata: PhysicalVolumeScan["metadata"];
    for (const mda of mdas) {
      const m = await readMetadataArea(source, mda).catch(() => undefined);
      if (m && (!metadata || m.seqno > metadata.seqno)) metadata = m;
    }
    return { uuid, deviceSize, ...(metadata ? { metadata } : {}) };
  }
  return undefined;
}

/** The current metadata text in one metadata area, or undefined when it holds none. */
async function readMetadataArea(
  source: ByteSource,
  mda: Area,
): Promise<{ text: string; seqno: number } | undefined> {
  if (mda.offset + MDA_HEADER_SIZE > source.size) return undefined;
  const h = await source.read(mda.offset, MDA_HEADER_SIZE);
  if (h.toString("latin1", 4, 20) !== MDA_MAGIC) return undefined;
  if (lvmCrc(h.subarray(4)) !== h.readUInt32LE(0)) return undefined;
  const size = Number(h.readBigUInt64LE(32));
  const offset = Number(h.readBigUInt64LE(40));
  const length = Number(h.readBigUInt64LE(48));
  const checksum = h.readUInt32LE(56);
  const flags = h.readUInt32LE(60);
  if (offset === 0 || length === 0 || flags & RAW_LOCN_IGNORED) return undefined;
  if (length > MAX_METADATA || length > size || offset >= size) return undefined;
  // The text may wrap from the end of the area back to just after its header.
  const first = Math.min(length, size - offset);
  const parts = [await readPadded(source, mda.offset + offset, first)];
  if (first < length) parts.push(await readPadded(source, mda.offset + MDA_HEADER_SIZE, length - first));
  const raw = Buffer.concat(parts);
  if (lvmCrc(raw) !== checksum) return undefined;
  const text = raw.toString("utf8").replace(/\0+$/, "");
  const seqno = Number(/\bseqno\s*=\s*(\d+)/.exec(text)?.[1] ?? -1);
  return { text, seqno };
}

/** One PV as the volume group's metadata describes it. */
export interface VgPhysicalVolume {
  /** Its key in the metadata ("pv0"). */
  key: string;
  /** UUID without dashes. */
  uuid: string;
  /** The device it was on when the metadata was last written ("/dev/sda3"), a hint only. */
  device?: string;
  /** Where the extents start, in bytes from the start of the PV. */
  peStart: number;
  peCount: number;
}

/** A run of extents of a segment: on a PV (by key), or on another LV (RAID images, mirrors…). */
export interface SegmentArea {
  pv?: string;
  lv?: string;
  /** First extent on that PV or LV. */
  start: number;
}

export interface LvSegment {
  startExtent: number;
  extentCount: number;
  /** "striped" (linear when one stripe), "thin", "thin-pool", "raid1", "mirror", "cache"… */
  type: string;
  /** The PVs (for "striped") of the segment. */
  stripes: SegmentArea[];
  /** Other LVs the segment is built on (pools, images, metadata, origins). */
  uses: string[];
}

export interface LogicalVolume {
  name: string;
  /** Shown by `lvs` without -a (not a pool's or RAID's hidden part). */
  visible: boolean;
  /** Bytes. */
  size: number;
  segments: LvSegment[];
}

export interface VolumeGroup {
  name: string;
  id: string;
  seqno: number;
  /** Bytes per extent. */
  extentSize: number;
  pvs: VgPhysicalVolume[];
  lvs: LogicalVolume[];
  /** The same LVs and PVs by name and key. */
  lvByName: Map<string, LogicalVolume>;
  pvByKey: Map<string, VgPhysicalVolume>;
  /** LVs holding an old-style snapshot's copy-on-write store (used by a "snapshot" segment). */
  cowLvs: Set<string>;
  /** LVs and PVs in the metadata beyond {@link MAX_LVS} and {@link MAX_PVS}: not taken. */
  omittedLvs: number;
  omittedPvs: number;
}

/** The volume group in a metadata text. */
export function parseVolumeGroup(text: string): VolumeGroup {
  const doc = parseLvmText(text);
  const entry = Object.entries(doc).find(([, v]) => isSection(v));
  if (!entry) throw new StrataError(ErrorCode.DATA_CORRUPT, "LVM metadata holds no volume group");
  const [name, vg] = entry as [string, LvmSection];
  const extentSize = num(vg.extent_size) * SECTOR;
  const pvs: VgPhysicalVolume[] = [];
  let omittedPvs = 0;
  for (const [key, v] of Object.entries(section(vg.physical_volumes))) {
    if (!isSection(v)) continue;
    if (pvs.length >= MAX_PVS) {
      omittedPvs++;
      continue;
    }
    const device = typeof v.device === "string" ? v.device : undefined;
    pvs.push({
      key,
      uuid: String(v.id ?? "").replace(/-/g, ""),
      ...(device === undefined ? {} : { device }),
      peStart: num(v.pe_start) * SECTOR,
      peCount: num(v.pe_count),
    });
  }
  const lvs: LogicalVolume[] = [];
  let omittedLvs = 0;
  for (const [lvName, v] of Object.entries(section(vg.logical_volumes))) {
    if (!isSection(v)) continue;
    if (lvs.length >= MAX_LVS) {
      omittedLvs++;
      continue;
    }
    const status = Array.isArray(v.status) ? v.status.map(String) : [];
    const segments: LvSegment[] = [];
    for (const seg of Object.values(v)) {
      if (!isSection(seg) || seg.start_extent === undefined) continue;
      const stripes: SegmentArea[] = [];
      const uses: string[] = [];
      for (const [k, val] of Object.entries(seg)) {
        if (k === "stripes" && Array.isArray(val)) {
          for (let j = 0; j + 1 < val.length; j += 2)
            stripes.push({ pv: String(val[j]), start: Number(val[j + 1]) });
        } else if (typeof val === "string" && k !== "type") {
          uses.push(val);
        } else if (Array.isArray(val) && k !== "tags") {
          for (const x of val) if (typeof x === "string") uses.push(x);
        }
      }
      segments.push({
        startExtent: num(seg.start_extent),
        extentCount: num(seg.extent_count),
        type: String(seg.type ?? "unknown"),
        stripes,
        uses,
      });
    }
    segments.sort((a, b) => a.startExtent - b.startExtent);
    const extents = segments.reduce((n, s) => n + s.extentCount, 0);
    lvs.push({ name: lvName, visible: status.includes("VISIBLE"), size: extents * extentSize, segments });
  }
  const cowLvs = new Set<string>();
  for (const l of lvs)
    for (const seg of l.segments) if (seg.type === "snapshot") for (const u of seg.uses) cowLvs.add(u);
  return {
    name,
    id: String(vg.id ?? ""),
    seqno: num(vg.seqno),
    extentSize,
    pvs,
    lvs,
    lvByName: new Map(lvs.map((l) => [l.name, l])),
    pvByKey: new Map(pvs.map((p) => [p.key, p])),
    cowLvs,
    omittedLvs,
    omittedPvs,
  };
}

/** The keys of the PVs `lv` is built on, through whatever LVs its segments use. */
export function pvsOf(vg: VolumeGroup, lv: LogicalVolume): Set<string> {
  const out = new Set<string>();
  const seen = new Set<string>();
  const visit = (l: LogicalVolume) => {
    if (seen.has(l.name)) return;
    seen.add(l.name);
    for (const seg of l.segments) {
      for (const s of seg.stripes) if (s.pv !== undefined) out.add(s.pv);
      for (const u of seg.uses) {
        const sub = vg.lvByName.get(u);
        if (sub) visit(sub);
      }
    }
  };
  visit(lv);
  return out;
}

/** A piece of a linear LV: `length` bytes at `offset` of the PV `pv` (a key). */
export interface LinearExtent {
  pv: string;
  offset: number;
  length: number;
}

/**
 * Where a linear LV's bytes are, in order; undefined when the LV is not linear (striped over
 * several PVs, thin, RAID, mirrored, cached…).
 */
export function linearExtents(vg: VolumeGroup, lv: LogicalVolume): LinearExtent[] | undefined {
  // An old-style snapshot shows as an LV whose own extents hold the copy-on-write store.
  if (vg.cowLvs.has(lv.name)) return undefined;
  const out: LinearExtent[] = [];
  let next = 0;
  for (const seg of lv.segments) {
    const stripe = seg.stripes[0];
    if (seg.type !== "striped" || seg.stripes.length !== 1 || stripe?.pv === undefined) return undefined;
    if (seg.startExtent !== next) return undefined;
    const pv = vg.pvByKey.get(stripe.pv);
    if (!pv) return undefined;
    out.push({
      pv: pv.key,
      offset: pv.peStart + stripe.start * vg.extentSize,
      length: seg.extentCount * vg.extentSize,
    });
    next += seg.extentCount;
  }
  return out.length > 0 ? out : undefined;
}

/** The layout of an LV in a word: "linear", "striped", or its segment types ("thin", "raid1"). */
export function lvLayout(lv: LogicalVolume): string {
  const types = [
    ...new Set(lv.segments.map((s) => (s.type === "striped" && s.stripes.length === 1 ? "linear" : s.type))),
  ];
  return types.join("+") || "empty";
}

/** Byte sources laid end to end, as one. */
export function concat(parts: readonly ByteSource[]): ByteSource {
  const starts: number[] = [];
  let size = 0;
  for (const p of parts) {
    starts.push(size);
    size += p.size;
  }
  return {
    size,
    async read(offset, length) {
      if (offset < 0 || length < 0 || offset + length > size)
        throw new RangeError(`read ${offset}+${length} beyond a source of ${size} bytes`);
      const out: Buffer[] = [];
      let pos = offset;
      const end = offset + length;
      for (let k = 0; k < parts.length && pos < end; k++) {
        const s = starts[k]!;
        const p = parts[k]!;
        if (pos >= s + p.size) continue;
        const n = Math.min(end, s + p.size) - pos;
        out.push(await p.read(pos - s, n));
        pos += n;
      }
      return out.length === 1 ? out[0]! : Buffer.concat(out);
    },
  };
}

function isSection(v: LvmValue | undefined): v is LvmSection {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function section(v: LvmValue | undefined): LvmSection {
  return isSection(v) ? v : (Object.create(null) as LvmSection);
}

function num(v: LvmValue | undefined): number {
  return typeof v === "number" ? v : 0;
}
