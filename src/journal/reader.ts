/**
 * Reading a journal directory: its segments in order, every entry checked, the window it covers,
 * and replay of its writes up to an instant onto a target.
 *
 * Journal files are hostile input. Every header is bounded and checked (magic, version, MAC under
 * the journal's id, field ranges), entry numbers must follow one another across segments, and
 * every payload is verified (digest, and the GCM tag when encrypted) before it is used. The only
 * damage that is not an error is the one a crash in the middle of an append leaves: the final
 * entry of the newest segment cut short, zero-filled, or not matching its digest while it ends
 * exactly at the end of the file. It is skipped ("torn"). Anything else is DATA_CORRUPT naming
 * the file and the byte offset.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type CodecKeys, decodeChunk } from "../repo/codec.js";
import { ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import {
  decodeEntryHeader,
  decodeSegmentHeader,
  ENTRY_HEADER_SIZE,
  type EntryHeader,
  EntryKind,
  SEGMENT_HEADER_SIZE,
  type SegmentHeader,
  segmentNumber,
} from "./format.js";
import { type JournalMeta, readMeta } from "./meta.js";

/** Segments a directory may hold before the reader refuses it (10 years of 10-minute segments is 525 960). */
export const MAX_SEGMENTS = 1_000_000;
/** A segment larger than this is refused. */
export const MAX_SEGMENT_BYTES = 16 * 1024 * 1024 * 1024;

export interface SegmentFile {
  number: bigint;
  name: string;
  path: string;
}

/** An entry as read: its header, and its data for a WRITE when payloads were asked for. */
export interface JournalEntry extends EntryHeader {
  /** Plaintext of a WRITE (when read with payloads). */
  data?: Buffer;
  /** Where it sits, for messages. */
  file: string;
  at: number;
}

/** The segments of `dir`, oldest first; files that are not segments are ignored. */
export async function listSegments(dir: string): Promise<SegmentFile[]> {
  let names: string[];
  try {
    names = await fs.readdir(dir);
  } catch (err) {
    if (isNotFound(err)) throw new StrataError(ErrorCode.NOT_FOUND, `no journal at ${dir}`);
    throw err;
  }
  const out: SegmentFile[] = [];
  for (const name of names) {
    const n = segmentNumber(name);
    if (n !== undefined) out.push({ number: n, name, path: join(dir, name) });
    if (out.length > MAX_SEGMENTS)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `journal ${dir} holds more than ${MAX_SEGMENTS} segments`,
      );
  }
  return out.sort((a, b) => (a.number < b.number ? -1 : a.number > b.number ? 1 : 0));
}

function corrupt(file: string, at: number, why: string): StrataError {
  return new StrataError(ErrorCode.DATA_CORRUPT, `journal segment ${file} is damaged at byte ${at}: ${why}`);
}

/** Positional reads through a window, so that small entries cost no syscall each. */
class WindowReader {
  private buf = Buffer.alloc(0);
  private start = 0;
  constructor(
    private readonly fh: fs.FileHandle,
    readonly size: number,
    private readonly windowBytes = 4 * 1024 * 1024,
  ) {}
  /** Exactly `length` bytes at `pos` (the caller checked they are inside the file). */
  async read(pos: number, length: number): Promise<Buffer> {
    if (pos >= this.start && pos + length <= this.start + this.buf.length)
      return this.buf.subarray(pos - this.start, pos - this.start + length);
    const want = Math.min(Math.max(length, this.windowBytes), this.size - pos);
    const b = Buffer.allocUnsafe(want);
    let got = 0;
    while (got < want) {
      const { bytesRead } = await this.fh.read(b, got, want - got, pos + got);
      if (bytesRead === 0) break;
      got += bytesRead;
    }
    if (got < length) throw new StrataError(ErrorCode.IO_ERROR, `short read at ${pos}`);
    this.buf = b.subarray(0, got);
    this.start = pos;
    return this.buf.subarray(0, length);
  }
}

function allZero(b: Buffer): boolean {
  for (let i = 0; i < b.length; i++) if (b[i] !== 0) return false;
  return true;
}

export interface SegmentScan {
  header: SegmentHeader;
  /** Bytes of whole, valid entries (the header included): where the next append goes. */
  validEnd: number;
  /** Bytes past validEnd that a crash left (the torn entry), 0 when none. */
  tornBytes: number;
}

export interface ScanOptions {
  keys: CodecKeys | undefined;
  /** The journal id every segment must carry. */
  journalId: Buffer;
  /** This is the newest segment: its final entry may be torn. */
  last: boolean;
  /** Decode and verify WRITE payloads (and hand them out). */
  payloads: boolean;
  /** With payloads: only for the entries this accepts (the others' payloads are skipped unread). */
  wantPayload?: (e: EntryHeader) => boolean;
  /** Called for each valid entry, in order. Return false to stop. */
  onEntry?: (e: JournalEntry) => boolean | Promise<boolean>;
}

/** Reads one segment and checks it whole (see the module comment). */
export async function scanSegment(path: string, o: ScanOptions): Promise<SegmentScan> {
  const fh = await fs.open(path, "r");
  try {
    const size = (await fh.stat()).size;
    if (size > MAX_SEGMENT_BYTES) throw corrupt(path, 0, `${size} bytes, more than a segment holds`);
    const r = new WindowReader(fh, size);
    // A segment gets its name only once its header is on disk (temporary name, fsync, rename).
    if (size < SEGMENT_HEADER_SIZE) throw corrupt(path, 0, `${size} bytes, shorter than a segment header`);
    const h = decodeSegmentHeader(await r.read(0, SEGMENT_HEADER_SIZE), o.keys);
    if (!h.ok) throw corrupt(path, 0, h.why);
    if (!h.header.journalId.equals(o.journalId))
      throw corrupt(path, 0, "belongs to another journal (journal id differs from journal.json)");
    let pos = SEGMENT_HEADER_SIZE;
    const torn = (): SegmentScan => ({ header: h.header, validEnd: pos, tornBytes: size - pos });
    while (pos < size) {
      const left = size - pos;
      if (left < ENTRY_HEADER_SIZE) {
        if (o.last) return torn();
        throw corrupt(path, pos, `${left} bytes left, less than an entry header`);
      }
      const raw = await r.read(pos, ENTRY_HEADER_SIZE);
      const eh = decodeEntryHeader(raw, o.journalId, o.keys);
      if (!eh.ok) {
        if (o.last && allZero(await r.read(pos, left))) return torn();
        throw corrupt(path, pos, eh.why);
      }
      const e = eh.header;
      const end = pos + ENTRY_HEADER_SIZE + e.storedLength;
      if (end > size) {
        if (o.last) return torn();
        throw corrupt(path, pos, `entry runs ${end - size} bytes past the end of the segment`);
      }
      const entry: JournalEntry = { ...e, file: path, at: pos };
      if (e.kind === EntryKind.WRITE && o.payloads && (o.wantPayload?.(e) ?? true)) {
        // decodeChunk decrypts in place: hand it a copy of its own.
        const stored = Buffer.from(await r.read(pos + ENTRY_HEADER_SIZE, e.storedLength));
        try {
          entry.data = decodeChunk(stored, e.digest, o.keys, `entry ${e.seq}`, undefined, "blake3");
          if (entry.data.length !== e.length)
            throw corrupt(path, pos, `payload of ${entry.data.length} bytes, header says ${e.length}`);
        } catch (err) {
          if (o.last && end === size) return torn();
          if (
            err instanceof StrataError &&
            err.code === ErrorCode.DATA_CORRUPT &&
            err.message.startsWith("journal")
          )
            throw err;
          throw corrupt(path, pos, err instanceof Error ? err.message : String(err));
        }
      }
      if (o.onEntry && (await o.onEntry(entry)) === false)
        return { header: h.header, validEnd: end, tornBytes: 0 };
      pos = end;
    }
    return { header: h.header, validEnd: pos, tornBytes: 0 };
  } finally {
    await fh.close();
  }
}

export interface JournalWindow {
  /** Host times (ns) of the first and last entries; undefined when the journal has none. */
  fromNs?: bigint;
  toNs?: bigint;
  firstSeq?: bigint;
  lastSeq?: bigint;
  entries: number;
  /** Bytes of all segment files. */
  bytes: number;
  /** Bytes of the guest's data the entries stand for (writes and zeroed ranges). */
  dataBytes: number;
  segments: number;
  /** Bytes a crash left at the end of the newest segment (ignored). */
  tornBytes: number;
}

/** An open journal directory for reading. */
export class JournalReader {
  private constructor(
    readonly dir: string,
    readonly meta: JournalMeta,
    private readonly keys: CodecKeys | undefined,
  ) {}

  static async open(dir: string, keys: CodecKeys | undefined): Promise<JournalReader> {
    const meta = await readMeta(dir, keys);
    if (!meta) throw new StrataError(ErrorCode.NOT_FOUND, `no journal at ${dir} (no journal.json)`);
    return new JournalReader(dir, meta, keys);
  }

  get journalId(): Buffer {
    return Buffer.from(this.meta.id, "hex");
  }

  /**
   * Calls `fn` with every entry in order (entry numbers checked to follow one another). `fn`
   * returning false stops the walk.
   */
  async walk(
    fn: (e: JournalEntry) => boolean | Promise<boolean>,
    options: { payloads?: boolean; wantPayload?: (e: EntryHeader) => boolean } = {},
  ): Promise<{ tornBytes: number; bytes: number; segments: number }> {
    const segs = await listSegments(this.dir);
    let prev: bigint | undefined;
    let tornBytes = 0;
    let bytes = 0;
    let stopped = false;
    for (const [i, s] of segs.entries()) {
      const scan = await scanSegment(s.path, {
        keys: this.keys,
        journalId: this.journalId,
        last: i === segs.length - 1,
        payloads: options.payloads ?? true,
        ...(options.wantPayload ? { wantPayload: options.wantPayload } : {}),
        onEntry: async (e) => {
          if (prev !== undefined && e.seq !== prev + 1n)
            throw corrupt(s.path, e.at, `entry ${e.seq} follows entry ${prev}: entries are missing`);
          if (!this.meta.disks.some((d) => d.id === e.disk))
            throw corrupt(s.path, e.at, `entry names disk ${e.disk}, which journal.json does not list`);
          const disk = this.meta.disks.find((d) => d.id === e.disk)!;
          if (e.offset + e.length > disk.size)
            throw corrupt(
              s.path,
              e.at,
              `range ${e.offset}+${e.length} beyond disk ${disk.name} (${disk.size} bytes)`,
            );
          prev = e.seq;
          const go = await fn(e);
          if (go === false) stopped = true;
          return go;
        },
      });
      if (scan.header.number !== s.number)
        throw corrupt(s.path, 0, `header says segment ${scan.header.number}`);
      tornBytes += scan.tornBytes;
      bytes += (await fs.stat(s.path)).size;
      if (stopped) break;
    }
    return { tornBytes, bytes, segments: segs.length };
  }

  /** What the journal covers: first and last entry times, sizes. Payloads are not decoded. */
  async window(): Promise<JournalWindow> {
    const w: JournalWindow = { entries: 0, bytes: 0, dataBytes: 0, segments: 0, tornBytes: 0 };
    const r = await this.walk(
      (e) => {
        w.fromNs ??= e.timeNs;
        w.firstSeq ??= e.seq;
        w.toNs = e.timeNs;
        w.lastSeq = e.seq;
        w.entries++;
        if (e.kind !== EntryKind.TRIM) w.dataBytes += e.length;
        return true;
      },
      { payloads: false },
    );
    w.bytes = r.bytes;
    w.segments = r.segments;
    w.tornBytes = r.tornBytes;
    return w;
  }

  /** Disk name of a disk id. */
  diskName(id: number): string {
    const d = this.meta.disks.find((x) => x.id === id);
    if (!d) throw new StrataError(ErrorCode.DATA_CORRUPT, `journal ${this.dir}: no disk ${id}`);
    return d.name;
  }
}

/** Where replay puts the journal's writes. Calls come one at a time, in journal order. */
export interface ReplayTarget {
  write(disk: string, offset: number, data: Buffer): Promise<void>;
  zero(disk: string, offset: number, length: number): Promise<void>;
}

export interface ReplayResult {
  entries: number;
  bytes: number;
  /** Time (ns) of the last entry replayed. */
  lastNs?: bigint;
  lastSeq?: bigint;
}

/**
 * Replays every entry with time <= `untilNs` (and >= `fromNs`) in journal order onto `target`,
 * and stops at the first later one (entry times only grow). Trims are not replayed: what a discarded range reads
 * as is up to the disk, and the base's bytes are one valid answer. `disks` limits replay to
 * those disks (by name).
 */
export async function replayJournal(
  reader: JournalReader,
  target: ReplayTarget,
  o: { untilNs: bigint; fromNs?: bigint; disks?: ReadonlySet<string>; signal?: AbortSignal },
): Promise<ReplayResult> {
  const out: ReplayResult = { entries: 0, bytes: 0 };
  await reader.walk(
    async (e) => {
      if (e.timeNs > o.untilNs) return false;
      if (o.fromNs !== undefined && e.timeNs < o.fromNs) return true;
      o.signal?.throwIfAborted();
      const disk = reader.diskName(e.disk);
      if (o.disks === undefined || o.disks.has(disk)) {
        if (e.kind === EntryKind.WRITE) await target.write(disk, e.offset, e.data!);
        else if (e.kind === EntryKind.ZEROES) await target.zero(disk, e.offset, e.length);
        out.entries++;
        if (e.kind !== EntryKind.TRIM) out.bytes += e.length;
      }
      out.lastNs = e.timeNs;
      out.lastSeq = e.seq;
      return true;
    },
    { wantPayload: (e) => e.timeNs <= o.untilNs && (o.fromNs === undefined || e.timeNs >= o.fromNs) },
  );
  return out;
}
