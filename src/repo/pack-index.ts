/**
 * Pack indexes (format v2): which pack holds which chunk, at which offset.
 *
 * An index object is stored like a chunk (zstd, then AES-256-GCM when encrypted) under
 * `index/<digest of its plaintext>`, so reading it verifies it. Its plaintext:
 *
 *   0   8  magic PACK_INDEX_MAGIC
 *   8   4  u32 S: superseded index objects
 *  12   4  u32 P: pack records
 *  16  32×S names of the index objects this one replaces (raw digests)
 *      then P pack records, each:
 *        16  pack id
 *         8  u64 condemned at, ms since the epoch; 0 while the pack is live
 *         4  u32 E: entries
 *         4  u32 flags: bit 0, its chunks were recompressed at a strong level (gc --recompress)
 *        40×E entries: digest(32) offset in the pack u32, stored length u32
 *
 * Backups write one index object for the packs they wrote. gc writes the whole new state (every
 * live and condemned pack) and names the objects it read as superseded: a reader ignores those,
 * so a crash between gc's write and its deletes changes nothing. When gc's state needs more than
 * one object, only the last one names the superseded objects, and a pack that several objects
 * mention is condemned if any of them says so (at the latest time said): each partial state is
 * then as safe as the one before it.
 *
 * A condemned pack is one gc found useless (no complete restore point needed its chunks) or
 * repacked. Writers never reuse its chunks; readers still may (a backup that started before gc
 * condemned it may reference them); a later gc deletes it once no writer that could have used
 * it is running (see gc-packs.ts).
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import {
  DIGEST_SIZE,
  MAX_CHUNK_SIZE,
  PACK_ENTRY_SIZE,
  PACK_INDEX_MAGIC,
  PACK_MAX_ENTRIES,
} from "./format.js";

export interface PackEntry {
  /** Chunk digest, hex. */
  digest: string;
  offset: number;
  length: number;
}

export interface PackRecord {
  /** Random id, 32 hex digits. */
  id: string;
  /** When gc condemned it (ms since the epoch), or 0 while it is live. */
  condemnedAt: number;
  /** {@link PACK_FLAG_RECOMPRESSED} or 0. */
  flags?: number;
  entries: PackEntry[];
}

/** Pack flag: gc --recompress wrote its chunks at a strong zstd level; it is not recompressed again. */
export const PACK_FLAG_RECOMPRESSED = 0x01;

export interface IndexDocument {
  /** Names (hex) of the index objects this one replaces. */
  supersedes: string[];
  packs: PackRecord[];
}

const HEADER = 16;
const RECORD_HEADER = 32;
/** Pack records an index object may hold; its plaintext stays below the chunk size limit. */
export const INDEX_MAX_BYTES = MAX_CHUNK_SIZE;

export function encodeIndex(doc: IndexDocument): Buffer {
  let size = HEADER + doc.supersedes.length * DIGEST_SIZE;
  for (const p of doc.packs) size += RECORD_HEADER + p.entries.length * PACK_ENTRY_SIZE;
  if (size > INDEX_MAX_BYTES) throw new StrataError(ErrorCode.INTERNAL, "pack index object too large");
  const b = Buffer.alloc(size);
  PACK_INDEX_MAGIC.copy(b, 0);
  b.writeUInt32LE(doc.supersedes.length, 8);
  b.writeUInt32LE(doc.packs.length, 12);
  let at = HEADER;
  for (const name of doc.supersedes) at += Buffer.from(name, "hex").copy(b, at);
  for (const p of doc.packs) {
    at += Buffer.from(p.id, "hex").copy(b, at);
    b.writeBigUInt64LE(BigInt(p.condemnedAt), at);
    b.writeUInt32LE(p.entries.length, at + 8);
    b.writeUInt32LE(p.flags ?? 0, at + 12);
    at += 16;
    for (const e of p.entries) {
      at += Buffer.from(e.digest, "hex").copy(b, at);
      b.writeUInt32LE(e.offset, at);
      b.writeUInt32LE(e.length, at + 4);
      at += 8;
    }
  }
  return b;
}

/** Parses an index object's plaintext, checking every field; `what` names it in errors. */
export function decodeIndex(b: Buffer, what: string): IndexDocument {
  const bad = (why: string) =>
    new StrataError(ErrorCode.DATA_CORRUPT, `pack index ${what} is damaged: ${why}`);
  if (b.length < HEADER || !b.subarray(0, 8).equals(PACK_INDEX_MAGIC)) throw bad("bad magic");
  const s = b.readUInt32LE(8);
  const p = b.readUInt32LE(12);
  // Every record takes at least its header: counts that can't fit are refused before any loop.
  if (HEADER + s * DIGEST_SIZE + p * RECORD_HEADER > b.length) throw bad("counts exceed its length");
  let at = HEADER;
  const supersedes: string[] = [];
  for (let i = 0; i < s; i++, at += DIGEST_SIZE) supersedes.push(b.toString("hex", at, at + DIGEST_SIZE));
  const packs: PackRecord[] = [];
  for (let i = 0; i < p; i++) {
    if (at + RECORD_HEADER > b.length) throw bad("truncated pack record");
    const id = b.toString("hex", at, at + 16);
    const condemned = b.readBigUInt64LE(at + 16);
    const n = b.readUInt32LE(at + 24);
    const flags = b.readUInt32LE(at + 28);
    if ((flags & ~PACK_FLAG_RECOMPRESSED) !== 0) throw bad(`pack ${id} has unknown flags ${flags}`);
    if (condemned > BigInt(Number.MAX_SAFE_INTEGER)) throw bad("condemned time out of range");
    if (n > PACK_MAX_ENTRIES) throw bad(`pack ${id} has ${n} entries, more than a pack may hold`);
    at += RECORD_HEADER;
    if (at + n * PACK_ENTRY_SIZE > b.length) throw bad("truncated entries");
    const entries: PackEntry[] = [];
    for (let j = 0; j < n; j++, at += PACK_ENTRY_SIZE) {
      const length = b.readUInt32LE(at + 36);
      if (length === 0 || length > MAX_CHUNK_SIZE + 64) throw bad(`entry of pack ${id} has length ${length}`);
      entries.push({
        digest: b.toString("hex", at, at + DIGEST_SIZE),
        offset: b.readUInt32LE(at + 32),
        length,
      });
    }
    packs.push({ id, condemnedAt: Number(condemned), flags, entries });
  }
  if (at !== b.length) throw bad("trailing bytes");
  return { supersedes, packs };
}

/** Where a chunk is stored. */
export interface ChunkLocation {
  pack: string;
  offset: number;
  length: number;
}

/**
 * The repository's pack index as one reader sees it: every index object that is not superseded,
 * merged. Lookups prefer a live pack; a chunk only in condemned packs is still readable.
 */
export class PackIndex {
  /** Pack state, merged over all objects. */
  readonly packs = new Map<string, PackRecord>();
  private readonly live = new Map<string, ChunkLocation>();
  private readonly condemned = new Map<string, ChunkLocation>();
  /** Index objects some other object replaces: leftovers of a gc that stopped before deleting them. */
  readonly superseded: string[];

  /** `objects`: the index objects read (name → document), superseded ones included. */
  constructor(readonly objects: ReadonlyMap<string, IndexDocument>) {
    const superseded = new Set<string>();
    for (const doc of objects.values()) for (const s of doc.supersedes) superseded.add(s);
    this.superseded = [...objects.keys()].filter((n) => superseded.has(n));
    for (const [name, doc] of objects) {
      if (superseded.has(name)) continue;
      for (const p of doc.packs) {
        const known = this.packs.get(p.id);
        // Condemned wins over live (0), and a later condemnation over an earlier one.
        if (!known) this.packs.set(p.id, p);
        else if (p.condemnedAt > known.condemnedAt)
          this.packs.set(p.id, { ...known, condemnedAt: p.condemnedAt });
      }
    }
    for (const p of this.packs.values()) {
      const into = p.condemnedAt === 0 ? this.live : this.condemned;
      for (const e of p.entries) into.set(e.digest, { pack: p.id, offset: e.offset, length: e.length });
    }
  }

  /** True when a writer may reuse the chunk: it is in a live pack. */
  hasLive(hex: string): boolean {
    return this.live.has(hex);
  }

  /** Where to read a chunk, live packs first. */
  locate(hex: string): ChunkLocation | undefined {
    return this.live.get(hex) ?? this.condemned.get(hex);
  }
}
