/**
 * The write journal's bytes: segment headers and entries (docs/format.md, "Write journal").
 * Pure functions; the writer and the reader do the file work.
 */
import { createHash } from "node:crypto";
import { Blake3Hasher, blake3 } from "@napi-rs/blake-hash";
import { type CodecKeys, chunkDigest, storedSizeBound } from "../repo/codec.js";

/** Magic numbers as in the repository format: the first 8 bytes of SHA-256 of a versioned string. */
function magic(text: string): Buffer {
  return createHash("sha256").update(text).digest().subarray(0, 8);
}

/** First bytes of every segment file. */
export const SEGMENT_MAGIC = magic("strata journal segment v1");
/** First bytes of every entry. */
export const ENTRY_MAGIC = magic("strata journal entry v1");
export const JOURNAL_VERSION = 1;
export const SEGMENT_HEADER_SIZE = 128;
export const ENTRY_HEADER_SIZE = 112;
/** Bytes of a segment header / entry header covered by its MAC (the MAC follows). */
const SEGMENT_MACED = 96;
const ENTRY_MACED = 80;
export const SEGMENT_FLAG_ENCRYPTED = 1;

/** Largest write an entry holds (NBD's largest request); bigger writes are split. */
export const MAX_ENTRY_DATA = 32 * 1024 * 1024;
/** Largest range a zero or trim entry names (the length field is 32 bits). */
export const MAX_ENTRY_RANGE = 0xffff_ffff;
/** Disk ids are 16 bits. */
export const MAX_DISKS = 65_536;
/** Journal ids are 16 random bytes. */
export const JOURNAL_ID_SIZE = 16;

export const EntryKind = {
  /** `length` bytes of data at `offset`, stored as a codec chunk. */
  WRITE: 1,
  /** `length` zero bytes at `offset`; no payload. */
  ZEROES: 2,
  /** The guest discarded `length` bytes at `offset`; no payload (replay leaves the bytes as they are). */
  TRIM: 3,
} as const;
export type EntryKind = (typeof EntryKind)[keyof typeof EntryKind];

export interface EntryHeader {
  kind: EntryKind;
  disk: number;
  /** Entry number, +1 per entry across all segments of a journal. */
  seq: bigint;
  /** Host clock, ns since the Unix epoch; strictly increasing within a journal. */
  timeNs: bigint;
  offset: number;
  length: number;
  /** Bytes of the stored payload following the header (0 unless WRITE). */
  storedLength: number;
  /** Digest of the plaintext (BLAKE3, keyed with the MAC key when encrypted); zeros without payload. */
  digest: Buffer;
}

export interface SegmentHeader {
  encrypted: boolean;
  journalId: Buffer;
  number: bigint;
  createdNs: bigint;
}

function mac(keys: CodecKeys | undefined, ...parts: Uint8Array[]): Buffer {
  if (keys) {
    const h = Blake3Hasher.newKeyed(keys.macKey);
    for (const p of parts) h.update(Buffer.from(p.buffer, p.byteOffset, p.byteLength));
    return h.digestBuffer();
  }
  return blake3(Buffer.concat(parts));
}

export function encodeSegmentHeader(h: SegmentHeader, keys: CodecKeys | undefined): Buffer {
  const b = Buffer.alloc(SEGMENT_HEADER_SIZE);
  SEGMENT_MAGIC.copy(b, 0);
  b.writeUInt32LE(JOURNAL_VERSION, 8);
  b.writeUInt32LE(h.encrypted ? SEGMENT_FLAG_ENCRYPTED : 0, 12);
  h.journalId.copy(b, 16, 0, JOURNAL_ID_SIZE);
  b.writeBigUInt64LE(h.number, 32);
  b.writeBigUInt64LE(h.createdNs, 40);
  mac(keys, b.subarray(0, SEGMENT_MACED)).copy(b, SEGMENT_MACED);
  return b;
}

/** Parses a segment header; returns why it is not one instead of throwing. */
export function decodeSegmentHeader(
  b: Buffer,
  keys: CodecKeys | undefined,
): { ok: true; header: SegmentHeader } | { ok: false; why: string } {
  if (b.length < SEGMENT_HEADER_SIZE) return { ok: false, why: "shorter than a segment header" };
  if (!b.subarray(0, 8).equals(SEGMENT_MAGIC)) return { ok: false, why: "not a journal segment (bad magic)" };
  const version = b.readUInt32LE(8);
  if (version !== JOURNAL_VERSION) return { ok: false, why: `unknown journal version ${version}` };
  const flags = b.readUInt32LE(12);
  if ((flags & ~SEGMENT_FLAG_ENCRYPTED) !== 0)
    return { ok: false, why: `unknown flags 0x${flags.toString(16)}` };
  const encrypted = (flags & SEGMENT_FLAG_ENCRYPTED) !== 0;
  if (encrypted !== (keys !== undefined))
    return {
      ok: false,
      why: encrypted
        ? "encrypted segment, but no key was given"
        : "unencrypted segment in an encrypted journal",
    };
  if (!b.subarray(48, SEGMENT_MACED).equals(Buffer.alloc(SEGMENT_MACED - 48)))
    return { ok: false, why: "reserved bytes are not zero" };
  if (!mac(keys, b.subarray(0, SEGMENT_MACED)).equals(b.subarray(SEGMENT_MACED, SEGMENT_HEADER_SIZE)))
    return {
      ok: false,
      why: encrypted ? "header MAC does not match (wrong key, or damaged)" : "header checksum does not match",
    };
  return {
    ok: true,
    header: {
      encrypted,
      journalId: Buffer.from(b.subarray(16, 32)),
      number: b.readBigUInt64LE(32),
      createdNs: b.readBigUInt64LE(40),
    },
  };
}

/** The digest an entry header carries for `data`. */
export function payloadDigest(data: Uint8Array, keys: CodecKeys | undefined): Buffer {
  return chunkDigest(data, keys, "blake3");
}

export function encodeEntryHeader(h: EntryHeader, journalId: Buffer, keys: CodecKeys | undefined): Buffer {
  const b = Buffer.alloc(ENTRY_HEADER_SIZE);
  ENTRY_MAGIC.copy(b, 0);
  b[8] = h.kind;
  b.writeUInt16LE(h.disk, 10);
  b.writeUInt32LE(h.length, 12);
  b.writeBigUInt64LE(h.seq, 16);
  b.writeBigUInt64LE(h.timeNs, 24);
  b.writeBigUInt64LE(BigInt(h.offset), 32);
  b.writeUInt32LE(h.storedLength, 40);
  h.digest.copy(b, 48, 0, 32);
  mac(keys, journalId, b.subarray(0, ENTRY_MACED)).copy(b, ENTRY_MACED);
  return b;
}

/**
 * Parses and checks an entry header (its MAC under the journal's id, its fields and bounds);
 * returns why it is not a valid one instead of throwing.
 */
export function decodeEntryHeader(
  b: Buffer,
  journalId: Buffer,
  keys: CodecKeys | undefined,
): { ok: true; header: EntryHeader } | { ok: false; why: string } {
  if (b.length < ENTRY_HEADER_SIZE) return { ok: false, why: "shorter than an entry header" };
  if (!b.subarray(0, 8).equals(ENTRY_MAGIC)) return { ok: false, why: "bad entry magic" };
  if (!mac(keys, journalId, b.subarray(0, ENTRY_MACED)).equals(b.subarray(ENTRY_MACED, ENTRY_HEADER_SIZE)))
    return { ok: false, why: keys ? "entry MAC does not match" : "entry checksum does not match" };
  const kind = b[8]!;
  if (kind !== EntryKind.WRITE && kind !== EntryKind.ZEROES && kind !== EntryKind.TRIM)
    return { ok: false, why: `unknown entry kind ${kind}` };
  if (b[9] !== 0 || b.readUInt32LE(44) !== 0) return { ok: false, why: "reserved bytes are not zero" };
  const offset = b.readBigUInt64LE(32);
  const length = b.readUInt32LE(12);
  const storedLength = b.readUInt32LE(40);
  if (offset + BigInt(length) > BigInt(Number.MAX_SAFE_INTEGER))
    return { ok: false, why: `range ${offset}+${length} out of bounds` };
  if (length === 0) return { ok: false, why: "empty entry" };
  if (kind === EntryKind.WRITE) {
    if (length > MAX_ENTRY_DATA)
      return { ok: false, why: `write of ${length} bytes, more than an entry holds` };
    if (storedLength === 0 || storedLength > storedSizeBound(length))
      return { ok: false, why: `stored length ${storedLength} impossible for ${length} bytes` };
  } else if (storedLength !== 0) {
    return { ok: false, why: "a zero or trim entry with a payload" };
  }
  return {
    ok: true,
    header: {
      kind: kind as EntryKind,
      disk: b.readUInt16LE(10),
      seq: b.readBigUInt64LE(16),
      timeNs: b.readBigUInt64LE(24),
      offset: Number(offset),
      length,
      storedLength,
      digest: Buffer.from(b.subarray(48, 80)),
    },
  };
}

/** Segment file name for segment `n`: seg-<16 hex digits>.sjl, so that names sort by number. */
export function segmentName(n: bigint): string {
  return `seg-${n.toString(16).padStart(16, "0")}.sjl`;
}

/** The segment number a file name stands for, or undefined for any other name. */
export function segmentNumber(name: string): bigint | undefined {
  const m = /^seg-([0-9a-f]{16})\.sjl$/.exec(name);
  return m ? BigInt(`0x${m[1]}`) : undefined;
}
