/**
 * Appending to a journal: one writer per journal directory, entries in one ordered stream for
 * all disks of a VM.
 *
 * Group commit: append() encodes the entry (zstd, AES-GCM when encrypted) and queues it; the
 * queue goes to the segment file in one writev, in order, and each append resolves once its
 * entry has been written (it is in the page cache: a crash of Strata loses nothing, a crash of
 * the host may). fdatasync runs at least every `syncIntervalMs` (default 250 ms) while there is
 * something to sync, and at once for sync() (an NBD FLUSH): after a host crash the journal holds
 * every entry acknowledged up to one interval plus one fdatasync before the crash (the RPO).
 *
 * Segments rotate when they reach `maxSegmentBytes` or `maxSegmentAgeMs`. A new segment is
 * written under a temporary name with its header, synced, renamed and the directory synced, so a
 * segment file always has a whole header. Opening a journal that a crash left with a torn entry
 * at its end truncates the entry away before anything new is appended.
 *
 * Entry times come from the host clock in ns (ms resolution), kept strictly increasing: a clock
 * stepped backwards holds the journal's time until it passes it again, so "the journal up to T"
 * is always one prefix of the stream.
 *
 * A write or fdatasync error fails the writer: every queued and later append rejects with it.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import { type CodecKeys, encodeChunk, ZSTD_FAST } from "../repo/codec.js";
import { type Clock, systemClock } from "../util/clock.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import {
  ENTRY_HEADER_SIZE,
  EntryKind,
  encodeEntryHeader,
  encodeSegmentHeader,
  MAX_ENTRY_DATA,
  MAX_ENTRY_RANGE,
  payloadDigest,
  segmentName,
} from "./format.js";
import { type JournalMeta, newJournalId, readMeta, syncDir, writeMeta } from "./meta.js";
import { listSegments, scanSegment } from "./reader.js";

export interface JournalWriterOptions {
  dir: string;
  /** The repository's keys when it is encrypted: entries are then encrypted and MACed with them. */
  keys: CodecKeys | undefined;
  vm: string;
  /** The repository's id. */
  repository: string;
  /** The VM's disks, in order; a journal reopened must name the same disks with the same sizes. */
  disks: ReadonlyArray<{ name: string; size: number }>;
  /** fdatasync at least this often while entries wait for it (default 250 ms). */
  syncIntervalMs?: number;
  /** Start a new segment at this size (default 64 MiB). */
  maxSegmentBytes?: number;
  /** Start a new segment after this long (default 10 min). */
  maxSegmentAgeMs?: number;
  clock?: Clock;
  /** Called once when the writer fails (a write or sync error). */
  onError?: (err: StrataError) => void;
}

export interface JournalStats {
  /** Entries appended and written since the writer opened. */
  entries: number;
  /** Guest bytes the entries stand for (writes and zeroed ranges). */
  dataBytes: number;
  /** Bytes written to segment files (headers included). */
  journalBytes: number;
  syncs: number;
  /** Longest fdatasync, ms. */
  maxSyncMs: number;
  /** Host time (ms) of the last completed fdatasync, 0 before the first. */
  lastSyncAt: number;
  /** Entry number written last, and the last one known durable. */
  writtenSeq: bigint;
  durableSeq: bigint;
  /** Host time (ms) of the oldest written entry not yet durable, 0 when everything is. */
  oldestUnsyncedAt: number;
  segment: string;
}

interface Queued {
  bufs: Buffer[];
  seq: bigint;
  bytes: number;
  resolve: () => void;
  reject: (err: unknown) => void;
}

interface Waiter {
  seq: bigint;
  resolve: () => void;
  reject: (err: unknown) => void;
}

export class JournalWriter {
  private fh!: fs.FileHandle;
  private segmentPath = "";
  private segmentNo = 0n;
  private segmentBytes = 0;
  private segmentStartedAt = 0;
  private nextSeq = 1n;
  private lastTimeNs = 0n;
  private queue: Queued[] = [];
  private writing = false;
  private syncing: Promise<void> | undefined;
  private rotating = false;
  private waiters: Waiter[] = [];
  private timer: NodeJS.Timeout | undefined;
  private failure: StrataError | undefined;
  private closed = false;
  private readonly journalId: Buffer;
  private readonly diskIds = new Map<string, number>();
  private readonly clock: Clock;
  private readonly st: JournalStats;
  private unsyncedSince = 0;
  private metaChain: Promise<void> = Promise.resolve();

  private constructor(
    private readonly o: JournalWriterOptions,
    private meta: JournalMeta,
  ) {
    this.journalId = Buffer.from(meta.id, "hex");
    for (const d of meta.disks) this.diskIds.set(d.name, d.id);
    this.clock = o.clock ?? systemClock;
    this.st = {
      entries: 0,
      dataBytes: 0,
      journalBytes: 0,
      syncs: 0,
      maxSyncMs: 0,
      lastSyncAt: 0,
      writtenSeq: 0n,
      durableSeq: 0n,
      oldestUnsyncedAt: 0,
      segment: "",
    };
  }

  /** Opens (creating when needed) the journal in `o.dir` and starts a new segment. */
  static async open(o: JournalWriterOptions): Promise<JournalWriter> {
    const dir = resolve(o.dir);
    await fs.mkdir(dir, { recursive: true, mode: 0o700 });
    let meta = await readMeta(dir, o.keys);
    if (!meta) {
      meta = {
        format: 1,
        id: newJournalId(),
        vm: o.vm,
        encrypted: o.keys !== undefined,
        repository: o.repository,
        created: new Date(o.clock?.now() ?? Date.now()).toISOString(),
        disks: o.disks.map((d, id) => ({ id, name: d.name, size: d.size })),
        bases: [],
      };
      await writeMeta(dir, meta, o.keys);
    } else {
      const want = o.disks.map((d) => `${d.name}:${d.size}`).join(", ");
      const have = meta.disks.map((d) => `${d.name}:${d.size}`).join(", ");
      if (meta.vm !== o.vm || want !== have || meta.repository !== o.repository)
        throw new StrataError(
          ErrorCode.USAGE,
          `journal ${dir} belongs to VM ${meta.vm} (disks ${have}, repository ${meta.repository}), not to VM ${o.vm} (disks ${want}, repository ${o.repository}): use another directory`,
        );
    }
    const w = new JournalWriter({ ...o, dir }, meta);
    await w.recover();
    await w.startSegment();
    w.timer = setInterval(() => w.syncSoon(), Math.max(1, o.syncIntervalMs ?? 250));
    w.timer.unref();
    return w;
  }

  /** Finds where the previous writer stopped; truncates a torn final entry. */
  private async recover(): Promise<void> {
    const segs = await listSegments(this.o.dir);
    for (let i = segs.length - 1; i >= 0; i--) {
      const s = segs[i]!;
      let lastSeq: bigint | undefined;
      let lastNs = 0n;
      const scan = await scanSegment(s.path, {
        keys: this.o.keys,
        journalId: this.journalId,
        last: i === segs.length - 1,
        payloads: true,
        onEntry: (e) => {
          lastSeq = e.seq;
          lastNs = e.timeNs;
          return true;
        },
      });
      if (scan.tornBytes > 0) {
        const fh = await fs.open(s.path, "r+");
        try {
          await fh.truncate(scan.validEnd);
          await fh.sync();
        } finally {
          await fh.close();
        }
      }
      if (i === segs.length - 1) this.segmentNo = s.number + 1n;
      if (lastSeq !== undefined) {
        this.nextSeq = lastSeq + 1n;
        this.lastTimeNs = lastNs;
        break;
      }
    }
  }

  private async startSegment(): Promise<void> {
    const name = segmentName(this.segmentNo);
    const path = join(this.o.dir, name);
    const tmp = join(this.o.dir, `.${name}.tmp-${randomBytes(4).toString("hex")}`);
    const header = encodeSegmentHeader(
      {
        encrypted: this.o.keys !== undefined,
        journalId: this.journalId,
        number: this.segmentNo,
        createdNs: this.stamp(false),
      },
      this.o.keys,
    );
    const t = await fs.open(tmp, "wx", 0o600);
    try {
      await t.write(header, 0, header.length, 0);
      await t.sync();
    } finally {
      await t.close();
    }
    await fs.rename(tmp, path);
    await syncDir(this.o.dir);
    this.fh = await fs.open(path, "a");
    this.segmentPath = path;
    this.segmentBytes = header.length;
    this.segmentStartedAt = this.clock.now();
    this.st.journalBytes += header.length;
    this.st.segment = name;
    this.segmentNo++;
  }

  /** Host time in ns, strictly after the previous entry's. */
  private stamp(advance = true): bigint {
    let t = BigInt(Math.floor(this.clock.now())) * 1_000_000n;
    if (t <= this.lastTimeNs) t = this.lastTimeNs + 1n;
    if (advance) this.lastTimeNs = t;
    return t;
  }

  /** The id of a disk by name. */
  diskId(name: string): number {
    const id = this.diskIds.get(name);
    if (id === undefined) throw new StrataError(ErrorCode.INTERNAL, `journal has no disk "${name}"`);
    return id;
  }

  get dir(): string {
    return this.o.dir;
  }

  get window(): { lastNs: bigint; nextSeq: bigint } {
    return { lastNs: this.lastTimeNs, nextSeq: this.nextSeq };
  }

  /** The writer's figures (for status and measurements). */
  stats(): JournalStats {
    return { ...this.st, oldestUnsyncedAt: this.unsyncedSince };
  }

  /** Appends a write of `data` at `offset` of `disk`; resolves once it is in the segment file. */
  write(disk: string, offset: number, data: Buffer): Promise<void> {
    const id = this.diskId(disk);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < data.length; at += MAX_ENTRY_DATA) {
      const piece = data.subarray(at, Math.min(data.length, at + MAX_ENTRY_DATA));
      parts.push(this.enqueue(EntryKind.WRITE, id, offset + at, piece.length, piece));
    }
    return Promise.all(parts).then(() => {});
  }

  /** Appends "`length` zero bytes at `offset`". */
  writeZeroes(disk: string, offset: number, length: number): Promise<void> {
    return this.range(EntryKind.ZEROES, disk, offset, length);
  }

  /** Appends "the guest discarded `length` bytes at `offset`". */
  trim(disk: string, offset: number, length: number): Promise<void> {
    return this.range(EntryKind.TRIM, disk, offset, length);
  }

  private range(kind: EntryKind, disk: string, offset: number, length: number): Promise<void> {
    const id = this.diskId(disk);
    const parts: Promise<void>[] = [];
    for (let at = 0; at < length; at += MAX_ENTRY_RANGE)
      parts.push(this.enqueue(kind, id, offset + at, Math.min(MAX_ENTRY_RANGE, length - at)));
    return Promise.all(parts).then(() => {});
  }

  private enqueue(
    kind: EntryKind,
    disk: number,
    offset: number,
    length: number,
    data?: Buffer,
  ): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closed) return Promise.reject(new StrataError(ErrorCode.INTERNAL, "journal writer is closed"));
    const meta = this.meta.disks.find((d) => d.id === disk)!;
    if (!Number.isSafeInteger(offset) || offset < 0 || offset + length > meta.size)
      return Promise.reject(
        new RangeError(`range ${offset}+${length} beyond disk ${meta.name} (${meta.size} bytes)`),
      );
    const stored = data ? encodeChunk(data, this.o.keys, ZSTD_FAST) : undefined;
    const seq = this.nextSeq++;
    const header = encodeEntryHeader(
      {
        kind,
        disk,
        seq,
        timeNs: this.stamp(),
        offset,
        length,
        storedLength: stored?.length ?? 0,
        digest: data ? payloadDigest(data, this.o.keys) : Buffer.alloc(32),
      },
      this.journalId,
      this.o.keys,
    );
    return new Promise<void>((resolve, reject) => {
      this.queue.push({
        bufs: stored ? [header, stored] : [header],
        seq,
        bytes: ENTRY_HEADER_SIZE + (stored?.length ?? 0),
        resolve: () => {
          this.st.entries++;
          if (kind !== EntryKind.TRIM) this.st.dataBytes += length;
          resolve();
        },
        reject,
      });
      if (!this.writing) void this.writeLoop();
    });
  }

  private async writeLoop(): Promise<void> {
    this.writing = true;
    try {
      while (this.queue.length > 0 && !this.failure) {
        if (
          this.segmentBytes >= (this.o.maxSegmentBytes ?? 64 * 1024 * 1024) ||
          this.clock.now() - this.segmentStartedAt >= (this.o.maxSegmentAgeMs ?? 600_000)
        )
          await this.rotate();
        const batch = this.queue.splice(0, 1024);
        const bufs = batch.flatMap((q) => q.bufs);
        const bytes = batch.reduce((n, q) => n + q.bytes, 0);
        let done = 0;
        while (done < bytes) {
          const { bytesWritten } = await this.fh.writev(
            done === 0 ? bufs : [Buffer.concat(bufs).subarray(done)],
          );
          if (bytesWritten === 0) throw new StrataError(ErrorCode.IO_ERROR, "wrote 0 bytes");
          done += bytesWritten;
        }
        this.segmentBytes += bytes;
        this.st.journalBytes += bytes;
        this.st.writtenSeq = batch[batch.length - 1]!.seq;
        if (this.unsyncedSince === 0) this.unsyncedSince = this.clock.now();
        for (const q of batch) q.resolve();
        if (this.waiters.length > 0) this.syncSoon();
      }
    } catch (err) {
      this.fail(err);
    } finally {
      this.writing = false;
    }
  }

  private async rotate(): Promise<void> {
    this.rotating = true;
    try {
      await this.syncing;
      const t0 = this.clock.now();
      const written = this.st.writtenSeq;
      await this.fh.datasync();
      this.durable(written, t0);
      await this.fh.close();
      await this.startSegment();
    } finally {
      this.rotating = false;
    }
  }

  private durable(seq: bigint, t0: number): void {
    const now = this.clock.now();
    this.st.syncs++;
    this.st.maxSyncMs = Math.max(this.st.maxSyncMs, now - t0);
    this.st.lastSyncAt = now;
    if (seq > this.st.durableSeq) this.st.durableSeq = seq;
    // What was written after the synced entries was written after the sync began (t0).
    this.unsyncedSince = this.st.durableSeq >= this.st.writtenSeq ? 0 : t0;
    const ready = this.waiters.filter((w) => w.seq <= this.st.durableSeq);
    this.waiters = this.waiters.filter((w) => w.seq > this.st.durableSeq);
    for (const w of ready) w.resolve();
  }

  /** Starts an fdatasync of what is written, unless one runs (it then runs again after). */
  private syncSoon(): void {
    if (this.syncing || this.rotating || this.failure) return;
    const target = this.st.writtenSeq;
    if (target <= this.st.durableSeq) return;
    const fh = this.fh;
    const t0 = this.clock.now();
    this.syncing = fh
      .datasync()
      .then(() => this.durable(target, t0))
      .catch((err: unknown) => this.fail(err))
      .finally(() => {
        this.syncing = undefined;
        if (this.waiters.some((w) => w.seq <= this.st.writtenSeq)) this.syncSoon();
      });
  }

  /** Resolves once everything appended before the call is durable (an NBD FLUSH). */
  sync(): Promise<void> {
    if (this.failure) return Promise.reject(this.failure);
    const seq = this.nextSeq - 1n;
    if (seq <= this.st.durableSeq) return Promise.resolve();
    return new Promise<void>((resolve, reject) => {
      this.waiters.push({ seq, resolve, reject });
      this.syncSoon();
    });
  }

  /**
   * Records a base restore point whose backup started at `startNs` and was cut by `cutNs`: the
   * journal's entries from `startNs` on, replayed onto it, give any instant from `cutNs` on.
   */
  async addBase(snapshot: string, startNs: bigint, cutNs: bigint): Promise<void> {
    const base = { snapshot, startNs: startNs.toString(), cutNs: cutNs.toString() };
    await this.updateMeta((m) => ({ ...m, bases: [...m.bases, base] }));
  }

  /**
   * Drops whole segments (never the one being appended to) whose entries are all older than
   * `beforeNs`, and bases that need them; records that entries before `beforeNs` may be gone.
   * Returns the number of segments dropped.
   */
  async dropBefore(beforeNs: bigint): Promise<number> {
    const segs = await listSegments(this.o.dir);
    let dropped = 0;
    for (const s of segs) {
      if (s.path === this.segmentPath) break;
      let last: bigint | undefined;
      await scanSegment(s.path, {
        keys: this.o.keys,
        journalId: this.journalId,
        last: false,
        payloads: false,
        onEntry: (e) => {
          last = e.timeNs;
          return true;
        },
      });
      if (last !== undefined && last >= beforeNs) break;
      // journal.json first: a reader never finds a base whose entries are gone.
      const l = last;
      await this.updateMeta((m) => {
        const prev = m.droppedBeforeNs === undefined ? 0n : BigInt(m.droppedBeforeNs);
        const cut = l === undefined ? prev : l + 1n > prev ? l + 1n : prev;
        return {
          ...m,
          droppedBeforeNs: cut.toString(),
          bases: m.bases.filter((b) => BigInt(b.startNs) >= cut),
        };
      });
      await fs.rm(s.path);
      dropped++;
    }
    if (dropped > 0) await syncDir(this.o.dir);
    return dropped;
  }

  /** Records that the journal holds every disk whole from `ns` on (the initial copy is done). */
  async markSynced(ns: bigint): Promise<void> {
    if (this.meta.syncedNs !== undefined) return;
    await this.updateMeta((m) => ({ ...m, syncedNs: m.syncedNs ?? ns.toString() }));
  }

  /** The bitmaps that record what the journal may lack (journal.json's `cover`). */
  get cover(): JournalMeta["cover"] {
    return this.meta.cover;
  }

  /** The spans the journal does not hold (journal.json's `gaps`). */
  get gaps(): NonNullable<JournalMeta["gaps"]> {
    return this.meta.gaps ?? [];
  }

  /** The journal's metadata as last written. */
  get metadata(): JournalMeta {
    return this.meta;
  }

  /** Records which bitmaps now record every write the journal may lack. */
  async setCover(bitmaps: readonly string[], seq: number): Promise<void> {
    await this.updateMeta((m) => ({ ...m, cover: { bitmaps: [...bitmaps], seq } }));
  }

  /** Opens a gap from `fromNs` (the journal knows nothing from then on until it is closed). */
  async openGap(fromNs: bigint): Promise<void> {
    await this.updateMeta((m) => ({ ...m, gaps: [...(m.gaps ?? []), { fromNs: fromNs.toString() }] }));
  }

  /** Closes the open gap at `toNs`: from then on the journal holds every write again. */
  async closeGap(toNs: bigint): Promise<void> {
    await this.updateMeta((m) => ({
      ...m,
      gaps: (m.gaps ?? []).map((g) => (g.toNs === undefined ? { ...g, toNs: toNs.toString() } : g)),
    }));
  }

  /** journal.json changes one at a time, each on the latest. */
  private updateMeta(change: (m: JournalMeta) => JournalMeta): Promise<void> {
    const run = this.metaChain.then(async () => {
      this.meta = change(this.meta);
      await writeMeta(this.o.dir, this.meta, this.o.keys);
    });
    this.metaChain = run.catch(() => {});
    return run;
  }

  /** The base restore points journal.json lists, oldest first. */
  get bases(): JournalMeta["bases"] {
    return this.meta.bases;
  }

  /** Host time now, in the journal's terms (for a base's cut instant). */
  nowNs(): bigint {
    return BigInt(Math.floor(this.clock.now())) * 1_000_000n;
  }

  private fail(err: unknown): void {
    if (this.failure) return;
    const e =
      err instanceof StrataError
        ? err
        : new StrataError(
            ErrorCode.IO_ERROR,
            `journal segment ${this.segmentPath}: ${err instanceof Error ? err.message : String(err)}`,
            { cause: err },
          );
    this.failure = e;
    for (const q of this.queue.splice(0)) q.reject(e);
    for (const w of this.waiters.splice(0)) w.reject(e);
    this.o.onError?.(e);
  }

  get failed(): StrataError | undefined {
    return this.failure;
  }

  /** Writes and syncs what is queued, then closes the segment. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    if (this.timer) clearInterval(this.timer);
    while (this.writing || this.queue.length > 0) await new Promise((r) => setTimeout(r, 1));
    await this.syncing;
    if (!this.failure) {
      try {
        const t0 = this.clock.now();
        const written = this.st.writtenSeq;
        await this.fh.datasync();
        this.durable(written, t0);
      } catch (err) {
        this.fail(err);
      }
    }
    await this.fh.close().catch(() => {});
    if (this.failure) throw this.failure;
  }
}
