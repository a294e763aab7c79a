/**
 * Verifier for the records strata-workload writes (scripts/guest/workload.c holds the layout;
 * this file mirrors it). A test restores or copies a disk the workload wrote to and asks
 * {@link verifyRecords} whether it holds a valid, gap-free prefix of the newest run's writes:
 *
 *   - slot 0 of the region names the newest run (every run starts there);
 *   - with L = the highest seq of that run found, every seq s in max(1, L - slots + 1) .. L must
 *     sit, valid, in slot (s - 1) % slots (older seqs were overwritten when the ring wrapped);
 *   - slots not (yet) written by the newest run may be empty or hold older runs' records;
 *   - any record with the magic but a bad checksum or a wrong place is a bad record.
 *
 * "Valid prefix" = `gapFree` (no missing seq, no bad record). A test that knows the guest had
 * written at least seq X before the backup instant also checks `lastSeq >= X`.
 */
import { execFile } from "node:child_process";
import { mkdtemp, open, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { crc32 } from "node:zlib";
import { JournalReader } from "../../src/journal/reader.js";
import type { CodecKeys } from "../../src/repo/codec.js";

export const RECORD_SIZE = 4096;
export const RECORD_MAGIC = "STRATAW1";
export const RECORD_VERSION = 1;

/** Field offsets, as in the workload's header comment. */
const F = {
  magic: 0,
  version: 8,
  recordSize: 12,
  runId: 16,
  seq: 24,
  slot: 32,
  slots: 40,
  regionOffset: 48,
  timeNs: 56,
  prevLatencyNs: 64,
  crc: 4092,
} as const;

export interface WorkloadRecord {
  runId: string;
  seq: number;
  slot: number;
  slots: number;
  regionOffset: number;
  timeNs: bigint;
  prevLatencyNs: bigint;
}

export type ParsedSlot =
  | { kind: "empty" }
  | { kind: "bad"; reason: string }
  | { kind: "record"; record: WorkloadRecord };

/** Decodes one 4 KiB slot: empty (no magic), bad (magic, but damaged), or a record. */
export function parseRecord(buf: Uint8Array): ParsedSlot {
  if (buf.length !== RECORD_SIZE) return { kind: "bad", reason: `slot is ${buf.length} bytes, not 4096` };
  const b = Buffer.from(buf.buffer, buf.byteOffset, buf.byteLength);
  if (b.toString("latin1", F.magic, F.magic + 8) !== RECORD_MAGIC) return { kind: "empty" };
  const stored = b.readUInt32LE(F.crc);
  const actual = crc32(b.subarray(0, F.crc));
  if (stored !== actual) return { kind: "bad", reason: `crc ${hex32(actual)} != stored ${hex32(stored)}` };
  const version = b.readUInt32LE(F.version);
  if (version !== RECORD_VERSION) return { kind: "bad", reason: `unknown record version ${version}` };
  const size = b.readUInt32LE(F.recordSize);
  if (size !== RECORD_SIZE) return { kind: "bad", reason: `record size field ${size}` };
  return {
    kind: "record",
    record: {
      runId: b.readBigUInt64LE(F.runId).toString(16).padStart(16, "0"),
      seq: Number(b.readBigUInt64LE(F.seq)),
      slot: Number(b.readBigUInt64LE(F.slot)),
      slots: Number(b.readBigUInt64LE(F.slots)),
      regionOffset: Number(b.readBigUInt64LE(F.regionOffset)),
      timeNs: b.readBigUInt64LE(F.timeNs),
      prevLatencyNs: b.readBigUInt64LE(F.prevLatencyNs),
    },
  };
}

function hex32(n: number): string {
  return n.toString(16).padStart(8, "0");
}

export interface BadRecord {
  slot: number;
  /** Byte offset of the slot in the image. */
  offset: number;
  reason: string;
}

export interface RecordScan {
  /** Run id (hex) of the newest run, from slot 0; null when the region holds no record. */
  runId: string | null;
  /** Ring size in slots, from the records (0 when empty). */
  slots: number;
  /** Valid records of the newest run that are part of the expected window. */
  count: number;
  /** Lowest and highest seq of the window (0 when empty). */
  firstSeq: number;
  lastSeq: number;
  /** True once the run wrote past the end of its region. */
  wrapped: boolean;
  /** Every seq of the window present and valid, and no bad record anywhere in the region. */
  gapFree: boolean;
  /** Seqs of the window that are missing (at most 100 listed). */
  missing: number[];
  badRecords: BadRecord[];
}

export interface VerifyOptions {
  /** Region start in bytes (the workload's -o); default 0. */
  regionOffset?: number;
  /** Image format when a path is given; non-raw images are converted with qemu-img first. */
  format?: string;
}

/**
 * Checks the workload records in a raw image file (or an image of another format, converted by
 * qemu-img) or in a buffer holding the image. See the module comment for the rules.
 */
export async function verifyRecords(
  image: string | Uint8Array,
  options: VerifyOptions = {},
): Promise<RecordScan> {
  if (typeof image !== "string") return scan(async (off, len) => slice(image, off, len), options);
  if (options.format && options.format !== "raw") {
    const dir = await mkdtemp(join(tmpdir(), "strata-records-"));
    try {
      const raw = join(dir, "image.raw");
      await promisify(execFile)("qemu-img", ["convert", "-f", options.format, "-O", "raw", image, raw]);
      return await verifyRecords(raw, { ...options, format: "raw" });
    } finally {
      await rm(dir, { recursive: true, force: true });
    }
  }
  const fh = await open(image, "r");
  try {
    return await scan(async (off, len) => {
      const buf = Buffer.alloc(len);
      const { bytesRead } = await fh.read(buf, 0, len, off);
      return buf.subarray(0, bytesRead);
    }, options);
  } finally {
    await fh.close();
  }
}

function slice(image: Uint8Array, off: number, len: number): Uint8Array {
  return image.subarray(Math.min(off, image.length), Math.min(off + len, image.length));
}

type Reader = (offset: number, length: number) => Promise<Uint8Array>;

async function scan(read: Reader, options: VerifyOptions): Promise<RecordScan> {
  const regionOffset = options.regionOffset ?? 0;
  const result: RecordScan = {
    runId: null,
    slots: 0,
    count: 0,
    firstSeq: 0,
    lastSeq: 0,
    wrapped: false,
    gapFree: true,
    missing: [],
    badRecords: [],
  };
  const first = await read(regionOffset, RECORD_SIZE);
  const head = first.length === RECORD_SIZE ? parseRecord(first) : { kind: "empty" as const };
  if (head.kind === "empty") return result;
  if (head.kind === "bad") {
    result.gapFree = false;
    result.badRecords.push({ slot: 0, offset: regionOffset, reason: head.reason });
    return result;
  }
  const { runId, slots } = head.record;
  result.runId = runId;
  result.slots = slots;
  if (head.record.regionOffset !== regionOffset) {
    result.badRecords.push({
      slot: 0,
      offset: regionOffset,
      reason: `record says region starts at ${head.record.regionOffset}, not ${regionOffset}`,
    });
  }

  // seqOfSlot[i] = seq of the newest run's record in slot i, or 0.
  const seqOfSlot = new Float64Array(slots);
  const chunkSlots = 256;
  for (let base = 0; base < slots; base += chunkSlots) {
    const n = Math.min(chunkSlots, slots - base);
    const buf = await read(regionOffset + base * RECORD_SIZE, n * RECORD_SIZE);
    for (let k = 0; k < n; k++) {
      const slot = base + k;
      const offset = regionOffset + slot * RECORD_SIZE;
      const bytes = buf.subarray(k * RECORD_SIZE, (k + 1) * RECORD_SIZE);
      if (bytes.length < RECORD_SIZE) {
        result.badRecords.push({ slot, offset, reason: "image ends inside the region" });
        continue;
      }
      const p = parseRecord(bytes);
      if (p.kind === "empty") continue;
      if (p.kind === "bad") {
        result.badRecords.push({ slot, offset, reason: p.reason });
        continue;
      }
      const r = p.record;
      if (r.runId !== runId) continue; // an older run's leftover, outside the window by definition
      if (r.slot !== slot || r.slots !== slots || r.seq < 1 || (r.seq - 1) % slots !== slot) {
        result.badRecords.push({
          slot,
          offset,
          reason: `seq ${r.seq} (slot field ${r.slot}/${r.slots}) does not belong in slot ${slot}/${slots}`,
        });
        continue;
      }
      seqOfSlot[slot] = r.seq;
    }
  }

  let last = 0;
  for (const s of seqOfSlot) last = Math.max(last, s);
  const firstSeq = Math.max(1, last - slots + 1);
  for (let s = firstSeq; s <= last; s++) {
    if (seqOfSlot[(s - 1) % slots] === s) result.count++;
    else if (result.missing.length < 100) result.missing.push(s);
  }
  const missingCount = last - firstSeq + 1 - result.count;
  result.firstSeq = last > 0 ? firstSeq : 0;
  result.lastSeq = last;
  result.wrapped = last > slots;
  result.gapFree = missingCount === 0 && result.badRecords.length === 0;
  return result;
}

export interface LatencySummary {
  final: boolean;
  seq: number;
  n: number;
  p50Us: number;
  p99Us: number;
  maxUs: number;
}

/** Extracts the workload's "STRATA-WORKLOAD stats ..." lines from console or log text. */
export function parseLatencySummaries(text: string): LatencySummary[] {
  const out: LatencySummary[] = [];
  const re = /STRATA-WORKLOAD stats( final)? seq=(\d+) n=(\d+) p50_us=(\d+) p99_us=(\d+) max_us=(\d+)/g;
  for (const m of text.matchAll(re)) {
    out.push({
      final: m[1] !== undefined,
      seq: Number(m[2]),
      n: Number(m[3]),
      p50Us: Number(m[4]),
      p99Us: Number(m[5]),
      maxUs: Number(m[6]),
    });
  }
  return out;
}

/** Host time (ns) at which each record reached the journal, per disk and seq, for the newest run. */
export async function journalRecordTimes(
  dir: string,
  keys?: CodecKeys,
): Promise<{ times: Map<string, Map<number, bigint>>; skewNs: bigint[] }> {
  const r = await JournalReader.open(dir, keys);
  const times = new Map<string, Map<number, bigint>>();
  const skewNs: bigint[] = [];
  let run: string | undefined;
  await r.walk((e) => {
    if (!e.data) return true;
    for (let at = 0; at + 4096 <= e.data.length; at += 4096) {
      const p = parseRecord(e.data.subarray(at, at + 4096));
      if (p.kind !== "record") continue;
      if (p.record.seq === 1) run = p.record.runId;
      if (run !== undefined && p.record.runId !== run) continue;
      const disk = r.diskName(e.disk);
      let m = times.get(disk);
      if (!m) {
        m = new Map();
        times.set(disk, m);
      }
      if (!m.has(p.record.seq)) m.set(p.record.seq, e.timeNs);
      // Records the initial copy carried were written long before: no measure of the skew.
      if (r.meta.syncedNs === undefined || e.timeNs >= BigInt(r.meta.syncedNs))
        skewNs.push(e.timeNs - p.record.timeNs);
    }
    return true;
  });
  return { times, skewNs };
}
