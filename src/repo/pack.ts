/**
 * Packs (format v2): many stored chunks in one object, written once, never changed.
 *
 *   0   8  magic PACK_MAGIC
 *   8   8  reserved, zero
 *  16   …  stored chunks, each exactly as a v1 chunk object (header, crypto, payload), each after
 *          0-7 zero bytes that put its payload on a multiple of 8 ({@link payloadPad})
 *       …  the directory, stored like a chunk: its plaintext is
 *            0  8  magic PACK_DIRECTORY_MAGIC
 *            8  4  u32 E: entries
 *           12  4  reserved, zero
 *           16  40×E entries: digest(32) offset u32 stored length u32
 *  end-48  32  digest of the directory plaintext (keyed when encrypted)
 *  end-16   4  u32 stored length of the directory
 *  end-12   4  reserved, zero
 *  end-8    8  magic PACK_MAGIC
 *
 * The pack index (pack-index.ts) says the same as the directories, in one place; the directories
 * let an index be rebuilt from the packs alone and let verify check a pack by itself.
 *
 * {@link PackWriter} fills page-aligned buffers and hands each full one to the store in one put
 * (around the page cache, one fsync), while the next fills: at most two packs in memory.
 */
import { randomBytes } from "node:crypto";
import { AlignedSlots } from "../util/aligned.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ChunkPool } from "./chunk-pool.js";
import { storedSizeBound } from "./codec.js";
import {
  CHUNK_CRYPTO_SIZE,
  CHUNK_FLAG_ENCRYPTED,
  CHUNK_HEADER_SIZE,
  DIGEST_SIZE,
  keys,
  PACK_DIRECTORY_MAGIC,
  PACK_ENTRY_SIZE,
  PACK_MAGIC,
  PACK_MAX_ENTRIES,
  PACK_TARGET_SIZE,
  PACK_TRAILER_SIZE,
} from "./format.js";
import type { PackEntry, PackRecord } from "./pack-index.js";
import type { Retention, Store } from "./store.js";

export const PACK_HEADER_SIZE = 16;

/**
 * A pack's chunk payloads start on multiples of this. The stored bytes are copied from shared
 * memory (where a worker encoded them) into shared memory (the pack's buffer), and V8 copies
 * between shared buffers 8 bytes at a time only when both sides are equally aligned, else byte by
 * byte: measured here, 17 GB/s against 3 GB/s, and 9 % of an encrypted full backup's CPU time
 * went to such copies (the worker's too: it puts the cipher's output, in memory malloc aligned,
 * after the chunk's 44 bytes of header and crypto fields).
 */
export const PAYLOAD_ALIGN = 8;

/** Where a stored chunk's payload starts: after its header, and its crypto fields when encrypted. */
function payloadStart(encrypted: boolean): number {
  return CHUNK_HEADER_SIZE + (encrypted ? CHUNK_CRYPTO_SIZE : 0);
}

/**
 * Zero bytes to put before a chunk at `at` so its payload starts on a multiple of
 * {@link PAYLOAD_ALIGN}; with `at` 0, where in an aligned slot a chunk to be packed is best
 * encoded.
 */
export function payloadPad(at: number, encrypted: boolean): number {
  return (PAYLOAD_ALIGN - ((at + payloadStart(encrypted)) % PAYLOAD_ALIGN)) % PAYLOAD_ALIGN;
}

export function encodeDirectory(entries: readonly PackEntry[]): Buffer {
  const b = Buffer.alloc(16 + entries.length * PACK_ENTRY_SIZE);
  PACK_DIRECTORY_MAGIC.copy(b, 0);
  b.writeUInt32LE(entries.length, 8);
  let at = 16;
  for (const e of entries) {
    at += Buffer.from(e.digest, "hex").copy(b, at);
    b.writeUInt32LE(e.offset, at);
    b.writeUInt32LE(e.length, at + 4);
    at += 8;
  }
  return b;
}

/** Parses a directory plaintext; every entry must lie inside the pack's chunk area. */
export function decodeDirectory(b: Buffer, chunkAreaEnd: number, what: string): PackEntry[] {
  const bad = (why: string) => new StrataError(ErrorCode.DATA_CORRUPT, `pack ${what} is damaged: ${why}`);
  if (b.length < 16 || !b.subarray(0, 8).equals(PACK_DIRECTORY_MAGIC)) throw bad("bad directory magic");
  const n = b.readUInt32LE(8);
  if (b.readUInt32LE(12) !== 0) throw bad("reserved directory bytes set");
  if (n > PACK_MAX_ENTRIES || b.length !== 16 + n * PACK_ENTRY_SIZE) throw bad("directory length");
  const out: PackEntry[] = [];
  for (let i = 0, at = 16; i < n; i++, at += PACK_ENTRY_SIZE) {
    const offset = b.readUInt32LE(at + 32);
    const length = b.readUInt32LE(at + 36);
    if (offset < PACK_HEADER_SIZE || length === 0 || offset + length > chunkAreaEnd)
      throw bad(`entry ${i} lies outside the pack's chunks`);
    out.push({ digest: b.toString("hex", at, at + DIGEST_SIZE), offset, length });
  }
  return out;
}

/** Where a pack's stored directory is, from its last 48 bytes. */
export function parseTrailer(
  tail: Buffer,
  packSize: number,
  what: string,
): { digest: Buffer; offset: number; length: number } {
  const bad = (why: string) => new StrataError(ErrorCode.DATA_CORRUPT, `pack ${what} is damaged: ${why}`);
  if (tail.length !== PACK_TRAILER_SIZE || !tail.subarray(40, 48).equals(PACK_MAGIC))
    throw bad("bad trailer");
  const length = tail.readUInt32LE(32);
  if (tail.readUInt32LE(36) !== 0) throw bad("reserved trailer bytes set");
  const offset = packSize - PACK_TRAILER_SIZE - length;
  if (length === 0 || offset < PACK_HEADER_SIZE) throw bad("directory length out of range");
  return { digest: Buffer.from(tail.subarray(0, 32)), offset, length };
}

/**
 * Bytes a pack buffer needs: the target, one more chunk past it (and its padding), the largest
 * directory, header, trailer.
 */
function packCapacity(chunkSize: number): number {
  return (
    PACK_HEADER_SIZE +
    PACK_TARGET_SIZE +
    PAYLOAD_ALIGN +
    storedSizeBound(chunkSize) +
    storedSizeBound(16 + PACK_MAX_ENTRIES * PACK_ENTRY_SIZE) +
    PACK_TRAILER_SIZE
  );
}

interface OpenPack {
  slot: number;
  id: string;
  length: number;
  entries: PackEntry[];
}

/** Writes one session's chunks into packs. Not safe for concurrent {@link add} of the same digest. */
export class PackWriter {
  private readonly buffers: AlignedSlots;
  private open: OpenPack | undefined;
  private opening: Promise<OpenPack> | undefined;
  private readonly writes = new Set<Promise<void>>();
  private failed: unknown;
  /** Packs stored so far. */
  readonly written: PackRecord[] = [];

  constructor(
    private readonly store: Store,
    private readonly codec: ChunkPool,
    chunkSize: number,
    /** Seals a pack once its chunks reach this many bytes (tests make it small). */
    private readonly target: number = PACK_TARGET_SIZE,
    /** Flags of the packs written (pack-index.ts). */
    private readonly flags = 0,
    /** Retention every pack is stored under (an immutable restore point's). */
    private readonly retain?: Retention,
  ) {
    this.buffers = new AlignedSlots(2, packCapacity(chunkSize));
  }

  /** Appends a stored chunk (copied); resolves once it is in a pack buffer (not yet durable). */
  async add(digest: string, stored: Uint8Array): Promise<void> {
    this.throwIfFailed();
    // Another chunk may fill and seal the pack this one waited for: use whichever is open now.
    while (!this.open) await this.startPack();
    this.throwIfFailed();
    const pack = this.open;
    const view = this.buffers.view(pack.slot);
    const pad = payloadPad(pack.length, ((stored[8] ?? 0) & CHUNK_FLAG_ENCRYPTED) !== 0);
    view.fill(0, pack.length, pack.length + pad);
    const at = pack.length + pad;
    view.set(stored, at);
    pack.length = at + stored.length;
    pack.entries.push({ digest, offset: at, length: stored.length });
    if (pack.length - PACK_HEADER_SIZE >= this.target || pack.entries.length >= PACK_MAX_ENTRIES) this.seal();
  }

  /** Seals the open pack and waits until every pack is stored; returns the records of all packs. */
  async finish(): Promise<PackRecord[]> {
    if (this.open) this.seal();
    while (this.writes.size > 0) await Promise.allSettled([...this.writes]);
    this.throwIfFailed();
    return this.written;
  }

  /** Waits for writes under way, ignoring their outcome (after a failure elsewhere). */
  async abandon(): Promise<void> {
    this.open = undefined;
    while (this.writes.size > 0) await Promise.allSettled([...this.writes]);
  }

  private throwIfFailed(): void {
    if (this.failed !== undefined) throw this.failed;
  }

  private startPack(): Promise<OpenPack> {
    // Chunks arrive concurrently: all of them wait for the same free buffer.
    this.opening ??= (async () => {
      const slot = await this.buffers.take();
      const pack: OpenPack = {
        slot,
        id: randomBytes(16).toString("hex"),
        length: PACK_HEADER_SIZE,
        entries: [],
      };
      const view = this.buffers.view(slot);
      view.fill(0, 0, PACK_HEADER_SIZE);
      view.set(PACK_MAGIC, 0);
      this.open = pack;
      this.opening = undefined;
      return pack;
    })();
    return this.opening;
  }

  private seal(): void {
    const pack = this.open;
    if (!pack) return;
    this.open = undefined;
    // The buffer is free once the store has the bytes: a local store's write returns well before
    // its sync and rename, and the next pack may fill it meanwhile (with two buffers, waiting for
    // the whole put held up the chunks behind it: the put took 40 ms, filling a pack 37 ms).
    let given = false;
    const release = () => {
      if (given) return;
      given = true;
      this.buffers.give(pack.slot);
    };
    const write = this.store_(pack, release).then(
      () => {
        this.written.push({ id: pack.id, condemnedAt: 0, flags: this.flags, entries: pack.entries });
      },
      (err: unknown) => {
        this.failed ??= err;
      },
    );
    const tracked = write.finally(() => {
      this.writes.delete(tracked);
      release();
    });
    this.writes.add(tracked);
  }

  /** Appends directory and trailer, then stores the pack in one put. */
  private async store_(pack: OpenPack, written: () => void): Promise<void> {
    const view = this.buffers.view(pack.slot);
    const plain = encodeDirectory(pack.entries);
    const { digest } = await this.codec.hash(Buffer.from(plain));
    const { blob } = await this.codec.encode(plain);
    view.set(blob, pack.length);
    let at = pack.length + blob.length;
    const trailer = Buffer.alloc(PACK_TRAILER_SIZE);
    digest.copy(trailer, 0);
    trailer.writeUInt32LE(blob.length, 32);
    PACK_MAGIC.copy(trailer, 40);
    view.set(trailer, at);
    at += PACK_TRAILER_SIZE;
    await this.store.put(keys.pack(pack.id), view.subarray(0, at), {
      aligned: true,
      written,
      ...(this.retain ? { retain: this.retain } : {}),
    });
  }
}
