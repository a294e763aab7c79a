/**
 * The disks at an instant T as readable sources, without writing an image first: an index of
 * the journal's extents up to T over a base.
 *
 * Opening walks the entry headers once (payloads are not read): for each disk, a sorted list of
 * non-overlapping extents, each naming the newest entry with time <= T that wrote it (WRITE:
 * where its payload is in which segment; ZEROES: zeros). A later entry cuts the extents it
 * covers, so the list is "the latest write <= T for each range", the same bytes replay in order
 * gives (src/journal/index.ts). A read takes each extent's bytes from its entry (payload read,
 * verified and decompressed/decrypted, then sliced; a small LRU keeps recent payloads) and the
 * gaps from the base (a restore point's disk, or zeros for the journal's own initial copy).
 *
 * Memory is one small record per extent: bounded by the distinct ranges written, not by the
 * bytes. Segments dropped (--window) while a view is open fail the reads that need them (EIO to
 * an NBD client), never return other data.
 */
import { promises as fs } from "node:fs";
import type { CodecKeys } from "../repo/codec.js";
import { decodeChunk } from "../repo/codec.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { ENTRY_HEADER_SIZE, EntryKind } from "./format.js";
import type { JournalReader } from "./reader.js";

/** Where an extent's bytes are: an entry's payload (or zeros), starting at the entry's `offset`. */
interface EntryRef {
  file: string;
  at: number;
  seq: bigint;
  /** Disk offset of the entry's first byte. */
  offset: number;
  length: number;
  storedLength: number;
  digest: Buffer;
  zero: boolean;
}

/** Bytes of a disk, read at any offset (a restore point's disk, an image). */
export interface DiskBytes {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
}

interface Extent {
  start: number;
  end: number;
  ref: EntryRef;
}

/** Sorted, non-overlapping extents of one disk; a new one replaces what it covers. */
export class ExtentMap {
  readonly extents: Extent[] = [];

  /** Index of the first extent whose end is past `pos`. */
  private first(pos: number): number {
    let lo = 0;
    let hi = this.extents.length;
    while (lo < hi) {
      const mid = (lo + hi) >>> 1;
      if (this.extents[mid]!.end <= pos) lo = mid + 1;
      else hi = mid;
    }
    return lo;
  }

  set(start: number, end: number, ref: EntryRef): void {
    if (end <= start) return;
    const i = this.first(start);
    let j = i;
    const put: Extent[] = [];
    while (j < this.extents.length && this.extents[j]!.start < end) {
      const e = this.extents[j]!;
      if (e.start < start) put.push({ start: e.start, end: start, ref: e.ref });
      if (e.end > end) put.push({ start: end, end: e.end, ref: e.ref });
      j++;
    }
    // Keep order: the left remainder, the new extent, the right remainder.
    const left = put.filter((p) => p.start < start);
    const right = put.filter((p) => p.start >= end);
    this.extents.splice(i, j - i, ...left, { start, end, ref }, ...right);
  }

  /** The extents overlapping [start, end), in order. */
  overlapping(start: number, end: number): Extent[] {
    const out: Extent[] = [];
    for (let i = this.first(start); i < this.extents.length && this.extents[i]!.start < end; i++)
      out.push(this.extents[i]!);
    return out;
  }
}

export interface JournalViewOptions {
  /** The instant (ns): entries with a later time are not part of the view. */
  untilNs: bigint;
  /** Entries older than this (ns) are not part of the view (the base holds them). */
  fromNs?: bigint;
  /** Bytes of decoded payloads kept (LRU). Default 64 MiB. */
  cacheBytes?: number;
}

/** Counters of a view, for the serve summary and tests. */
export interface JournalViewStats {
  entries: number;
  extents: number;
  payloadReads: number;
  payloadHits: number;
  baseReads: number;
}

/** The journal up to an instant, indexed (see the module comment). */
export class JournalView {
  private readonly cache = new Map<string, { data: Promise<Buffer>; bytes: number }>();
  private cachedBytes = 0;
  private readonly files = new Map<string, Promise<fs.FileHandle>>();
  private readonly counters = { payloadReads: 0, payloadHits: 0, baseReads: 0 };

  private constructor(
    private readonly reader: JournalReader,
    private readonly keys: CodecKeys | undefined,
    readonly maps: ReadonlyMap<string, ExtentMap>,
    readonly entries: number,
    /** Time (ns) and number of the newest entry in the view. */
    readonly lastNs: bigint | undefined,
    readonly lastSeq: bigint | undefined,
    private readonly cacheBytes: number,
  ) {}

  static async open(
    reader: JournalReader,
    keys: CodecKeys | undefined,
    o: JournalViewOptions,
  ): Promise<JournalView> {
    const maps = new Map<string, ExtentMap>(reader.meta.disks.map((d) => [d.name, new ExtentMap()]));
    let entries = 0;
    let lastNs: bigint | undefined;
    let lastSeq: bigint | undefined;
    await reader.walk(
      (e) => {
        if (e.timeNs > o.untilNs) return false;
        if (o.fromNs !== undefined && e.timeNs < o.fromNs) return true;
        // Trims are not replayed (src/journal/reader.ts, replayJournal): the older bytes stay.
        if (e.kind === EntryKind.TRIM) return true;
        maps.get(reader.diskName(e.disk))!.set(e.offset, e.offset + e.length, {
          file: e.file,
          at: e.at,
          seq: e.seq,
          offset: e.offset,
          length: e.length,
          storedLength: e.storedLength,
          digest: e.digest,
          zero: e.kind === EntryKind.ZEROES,
        });
        entries++;
        lastNs = e.timeNs;
        lastSeq = e.seq;
        return true;
      },
      { payloads: false },
    );
    return new JournalView(reader, keys, maps, entries, lastNs, lastSeq, o.cacheBytes ?? 64 * 1024 * 1024);
  }

  stats(): JournalViewStats {
    let extents = 0;
    for (const m of this.maps.values()) extents += m.extents.length;
    return { entries: this.entries, extents, ...this.counters };
  }

  /**
   * Disk `name` at the instant: the journal's extents over `base` (same size; absent: zeros
   * where the journal wrote nothing).
   */
  disk(name: string, base?: DiskBytes): DiskBytes {
    const d = this.reader.meta.disks.find((x) => x.name === name);
    const map = this.maps.get(name);
    if (!d || !map) throw new StrataError(ErrorCode.NOT_FOUND, `the journal has no disk ${name}`);
    if (base && base.size !== d.size)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `disk ${name} is ${d.size} bytes in the journal but ${base.size} in its base`,
      );
    const size = d.size;
    return {
      size,
      read: async (offset, length) => {
        if (offset < 0 || length < 0 || offset + length > size)
          throw new RangeError(`read ${offset}+${length} beyond disk ${name} (${size} bytes)`);
        const out = Buffer.alloc(length);
        const end = offset + length;
        let pos = offset;
        const fill = async (from: number, to: number) => {
          if (to <= from || !base) return;
          this.counters.baseReads++;
          (await base.read(from, to - from)).copy(out, from - offset);
        };
        for (const e of map.overlapping(offset, end)) {
          const s = Math.max(e.start, offset);
          const t = Math.min(e.end, end);
          await fill(pos, s);
          if (!e.ref.zero) {
            const data = await this.payload(e.ref);
            data.copy(out, s - offset, s - e.ref.offset, t - e.ref.offset);
          }
          pos = t;
        }
        await fill(pos, end);
        return out;
      },
    };
  }

  /** An entry's data, verified (shared while being read, then cached). */
  private payload(ref: EntryRef): Promise<Buffer> {
    const key = `${ref.file}:${ref.at}`;
    const hit = this.cache.get(key);
    if (hit) {
      this.counters.payloadHits++;
      this.cache.delete(key);
      this.cache.set(key, hit);
      return hit.data;
    }
    this.counters.payloadReads++;
    const p = (async () => {
      const fh = await this.file(ref.file);
      const stored = Buffer.allocUnsafe(ref.storedLength);
      let got = 0;
      while (got < stored.length) {
        const { bytesRead } = await fh.read(
          stored,
          got,
          stored.length - got,
          ref.at + ENTRY_HEADER_SIZE + got,
        );
        if (bytesRead === 0) break;
        got += bytesRead;
      }
      if (got < stored.length)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `journal segment ${ref.file} is damaged at byte ${ref.at}: entry ${ref.seq} cut short`,
        );
      const data = decodeChunk(stored, ref.digest, this.keys, `entry ${ref.seq}`, undefined, "blake3");
      if (data.length !== ref.length)
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `journal segment ${ref.file} is damaged at byte ${ref.at}: payload of ${data.length} bytes, header says ${ref.length}`,
        );
      return data;
    })();
    const slot = { data: p, bytes: 0 };
    this.cache.set(key, slot);
    p.then(
      (data) => {
        if (this.cache.get(key) !== slot) return;
        slot.bytes = data.length;
        this.cachedBytes += data.length;
        // The newest stays even when larger than the bound: the read under way needs it.
        for (const [k, v] of this.cache) {
          if (this.cachedBytes <= this.cacheBytes || k === key) break;
          this.cache.delete(k);
          this.cachedBytes -= v.bytes;
        }
      },
      () => {
        if (this.cache.get(key) === slot) this.cache.delete(key);
      },
    );
    return p;
  }

  private file(path: string): Promise<fs.FileHandle> {
    let f = this.files.get(path);
    if (!f) {
      f = fs.open(path, "r").catch((err: unknown) => {
        this.files.delete(path);
        throw new StrataError(
          ErrorCode.DATA_MISSING,
          `journal segment ${path} cannot be read (dropped by --window?): ${(err as Error).message}`,
          { cause: err },
        );
      });
      this.files.set(path, f);
    }
    return f;
  }

  async close(): Promise<void> {
    for (const f of this.files.values()) await (await f.catch(() => undefined))?.close().catch(() => {});
    this.files.clear();
    this.cache.clear();
    this.cachedBytes = 0;
  }
}
