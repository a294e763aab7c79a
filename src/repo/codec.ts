/**
 * The chunk codec: plaintext ⇄ stored bytes. Pure functions, run in worker threads.
 *
 * encode: digest → zstd (kept raw when that does not shrink it) → AES-256-GCM when a key is
 * given, with the 16-byte header as additional authenticated data. decode reverses it and checks
 * everything: magic, flags, length, GCM tag, and the digest of the plaintext against the name the
 * chunk was asked for. A chunk that fails any check is never returned.
 */
import {
  type Cipher,
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  type Decipher,
  randomBytes,
} from "node:crypto";
import { Blake3Hasher, blake3 } from "@napi-rs/blake-hash";
import zstd, { type CCtx, type DCtx } from "zstd-napi/binding.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { nativeAead } from "./aead.js";
import {
  CHUNK_CRYPTO_SIZE,
  CHUNK_FLAG_ENCRYPTED,
  CHUNK_FLAG_ZSTD,
  CHUNK_HEADER_SIZE,
  CHUNK_MAGIC,
  MAX_CHUNK_SIZE,
} from "./format.js";

export interface CodecKeys {
  /** AES-256-GCM key for chunk payloads. */
  encKey: Buffer;
  /** HMAC-SHA-256 key for digests. */
  macKey: Buffer;
}

/**
 * How chunks are named. Format v1: SHA-256, or HMAC-SHA-256 under the MAC key when encrypted.
 * Format v2: BLAKE3, or BLAKE3 keyed with the MAC key when encrypted: measured here, 1 GiB in
 * 0.12-0.13 s against SHA-256's 0.55-0.67 s with the CPU's SHA instructions, and every chunk is
 * hashed once when it is backed up and once more when it is restored.
 */
export type DigestKind = "sha256" | "blake3";

/** The digest of a plaintext (see {@link DigestKind}). */
export function chunkDigest(data: Uint8Array, keys?: CodecKeys, kind: DigestKind = "sha256"): Buffer {
  if (kind === "blake3")
    return keys
      ? Blake3Hasher.newKeyed(keys.macKey)
          .update(Buffer.from(data.buffer, data.byteOffset, data.byteLength))
          .digestBuffer()
      : blake3(data);
  return keys
    ? createHmac("sha256", keys.macKey).update(data).digest()
    : createHash("sha256").update(data).digest();
}

/**
 * zstd levels. FAST (1) for bulk: on disk images it runs at 200-650 MiB/s per core here.
 * INCREMENTAL (3) for the few chunks an incremental backup adds: 1.5 times level 1's CPU for
 * 5 % less on a day's changed chunks (src/repo/compression.ts). STRONG (11) for recompression
 * when the host is idle (`strata gc --recompress`): 35-45 MiB/s per core, 10-15 % smaller than
 * level 1 (levels 13 and up are 4-10 times slower again for 1 %). Decoding speed is the same for
 * all of them.
 */
export const ZSTD_FAST = 1;
/**
 * A first backup's level while its codec threads are the bottleneck (src/repo/compression.ts),
 * with two of level -3's parameters changed: matches of at least 7 bytes (not 6) and a hash table
 * of 2^12 entries (not 2^13). On the benchmark's Debian disk, one core, 2282 chunks of 1 MiB:
 * level -3 2.81-2.92 s storing 43.9 %, these 2.42-2.51 s storing 46.7 %; level -5 2.62-2.66 s
 * storing 47.4 % (a worse trade). Any zstd decoder reads the result.
 */
export const ZSTD_BULK = -3;
const BULK_MIN_MATCH = 7;
const BULK_HASH_LOG = 12;
export const ZSTD_INCREMENTAL = 2;
export const ZSTD_STRONG = 11;

/** Where a stored chunk's header gives the length of its plaintext (u32, docs/format.md). */
export const CHUNK_PLAIN_LENGTH_AT = 12;

/** Largest stored form of an `n`-byte plaintext: header, crypto fields, and the payload kept raw. */
export function storedSizeBound(n: number): number {
  return CHUNK_HEADER_SIZE + CHUNK_CRYPTO_SIZE + n;
}

/** One compression and one decompression context per thread, reused for every chunk. */
let cctx: CCtx | undefined;
let dctx: DCtx | undefined;
/** The compression context for {@link ZSTD_BULK}, its parameters set once. */
let bulkCctx: CCtx | undefined;

function bulkContext(): CCtx {
  if (!bulkCctx) {
    const c = new zstd.CCtx();
    c.setParameter(zstd.CParameter.compressionLevel, ZSTD_BULK);
    c.setParameter(zstd.CParameter.minMatch, BULK_MIN_MATCH);
    c.setParameter(zstd.CParameter.hashLog, BULK_HASH_LOG);
    bulkCctx = c;
  }
  return bulkCctx;
}

/**
 * Writes the stored form of `plain` into `out` (at least {@link storedSizeBound} long) and returns
 * its length. Unencrypted, zstd writes straight into `out`, so a caller that hands in page-aligned
 * memory can give the result to the disk without another copy.
 */
export function encodeChunkInto(
  plain: Uint8Array,
  out: Uint8Array,
  keys?: CodecKeys,
  level: number = ZSTD_FAST,
): number {
  if (plain.length > MAX_CHUNK_SIZE)
    throw new StrataError(ErrorCode.INTERNAL, "chunk larger than the format allows");
  if (out.length < storedSizeBound(plain.length))
    throw new StrataError(ErrorCode.INTERNAL, "chunk output buffer too small");
  const o = Buffer.from(out.buffer, out.byteOffset, out.byteLength);
  const start = CHUNK_HEADER_SIZE + (keys ? CHUNK_CRYPTO_SIZE : 0);
  // Room for no more than the plaintext: whatever does not shrink fails here and is kept raw.
  const dst = o.subarray(start, start + plain.length);
  let packed = 0;
  try {
    if (level === ZSTD_BULK) packed = bulkContext().compress2(dst, plain);
    else {
      cctx ??= new zstd.CCtx();
      packed = cctx.compress(dst, plain, level);
    }
  } catch {
    packed = 0;
  }
  const useZstd = packed > 0 && packed < plain.length;
  const payloadLength = useZstd ? packed : plain.length;
  if (!useZstd) o.set(plain, start);
  o.fill(0, 0, CHUNK_HEADER_SIZE);
  CHUNK_MAGIC.copy(o, 0);
  o[8] = (useZstd ? CHUNK_FLAG_ZSTD : 0) | (keys ? CHUNK_FLAG_ENCRYPTED : 0);
  o.writeUInt32LE(plain.length, CHUNK_PLAIN_LENGTH_AT);
  if (!keys) return start + payloadLength;
  const nonce = randomBytes(12);
  const payload = o.subarray(start, start + payloadLength);
  const aead = nativeAead();
  if (aead) {
    // In place, the tag straight into its field.
    const tag = o.subarray(CHUNK_HEADER_SIZE + 12, CHUNK_HEADER_SIZE + CHUNK_CRYPTO_SIZE);
    aead.seal(keys.encKey, nonce, o.subarray(0, CHUNK_HEADER_SIZE), payload, tag);
  } else {
    const cipher = createCipheriv("aes-256-gcm", keys.encKey, nonce);
    cipher.setAAD(o.subarray(0, CHUNK_HEADER_SIZE));
    gcmPieces(cipher, payload, payload);
    cipher.getAuthTag().copy(o, CHUNK_HEADER_SIZE + 12);
  }
  nonce.copy(o, CHUNK_HEADER_SIZE);
  return start + payloadLength;
}

/** Bytes GCM encrypts or decrypts per call in {@link gcmPieces}. */
const GCM_PIECE = 64 * 1024;

/**
 * Encrypts or decrypts `src` into `dst` (as long; the same memory encrypts in place) with GCM, a
 * stream cipher whose output is as long as its input, then finishes (a decipher checks its tag
 * there and throws on a mismatch). In pieces, each copied to `dst`: Node's ciphers return every
 * output in new memory, and an encoding's worth of it per chunk left ~70 MiB more resident per
 * backup until the collector ran; small ones reuse the heap.
 */
function gcmPieces(cipher: Cipher | Decipher, src: Buffer, dst: Buffer): void {
  for (let off = 0; off < src.length; off += GCM_PIECE) {
    const out = cipher.update(src.subarray(off, Math.min(src.length, off + GCM_PIECE)));
    if (out.length !== Math.min(GCM_PIECE, src.length - off))
      throw new StrataError(ErrorCode.INTERNAL, "AES-GCM returned a different length than it was given");
    out.copy(dst, off);
  }
  if (cipher.final().length !== 0)
    throw new StrataError(ErrorCode.INTERNAL, "AES-GCM returned bytes at its end");
}

/**
 * `sealed` decrypted with one call, in new memory, once its tag checked out. For a compressed
 * payload, which zstd reads from there: decrypting in pieces back into the stored bytes cost a
 * copy of every payload (measured on the benchmark's encrypted restore: 2.30-2.50 s of user CPU
 * this way, 2.60-2.84 s in pieces, resident memory within 5 MiB).
 */
function gcmOpen(decipher: Decipher, sealed: Buffer): Buffer {
  const plain = decipher.update(sealed);
  if (plain.length !== sealed.length || decipher.final().length !== 0)
    throw new StrataError(ErrorCode.INTERNAL, "AES-GCM returned a different length than it was given");
  return plain;
}

/** Where the addon decrypts a compressed payload for zstd to read (this thread's; grown to the largest). */
let scratch: Buffer | undefined;

function openScratch(length: number): Buffer {
  if (!scratch || scratch.length < length) scratch = Buffer.allocUnsafeSlow(Math.max(length, 1 << 20));
  return scratch.subarray(0, length);
}

/** The stored form of `plain` in a buffer of its own. */
export function encodeChunk(plain: Uint8Array, keys?: CodecKeys, level: number = ZSTD_FAST): Buffer {
  const out = Buffer.allocUnsafe(storedSizeBound(plain.length));
  return out.subarray(0, encodeChunkInto(plain, out, keys, level));
}

/**
 * Decodes a stored chunk and verifies it against `expected` (the digest it is stored under).
 * `stored` is left as it was. `what` names the chunk in error messages. The plaintext goes into
 * `into` when given (a chunk longer than it is damaged) and is returned as a view of it; else
 * into a new buffer, or (unencrypted and uncompressed) is a view of `stored`.
 */
export function decodeChunk(
  stored: Uint8Array,
  expected: Uint8Array,
  keys: CodecKeys | undefined,
  what: string,
  into?: Uint8Array,
  kind: DigestKind = "sha256",
): Buffer {
  const buf = Buffer.from(stored.buffer, stored.byteOffset, stored.byteLength);
  const bad = (why: string) => new StrataError(ErrorCode.DATA_CORRUPT, `chunk ${what} is damaged: ${why}`);
  if (buf.length < CHUNK_HEADER_SIZE || !buf.subarray(0, 8).equals(CHUNK_MAGIC)) throw bad("bad magic");
  const flags = buf[8]!;
  if (
    (flags & ~(CHUNK_FLAG_ZSTD | CHUNK_FLAG_ENCRYPTED)) !== 0 ||
    buf[9] !== 0 ||
    buf[10] !== 0 ||
    buf[11] !== 0
  ) {
    throw bad("unknown flags");
  }
  const length = buf.readUInt32LE(CHUNK_PLAIN_LENGTH_AT);
  if (length > MAX_CHUNK_SIZE) throw bad("length out of range");
  const encrypted = (flags & CHUNK_FLAG_ENCRYPTED) !== 0;
  if (encrypted !== (keys !== undefined)) {
    throw bad(
      encrypted
        ? "encrypted chunk in an unencrypted repository"
        : "unencrypted chunk in an encrypted repository",
    );
  }
  if (into && length > into.length) throw bad(`longer than its place (${length} bytes)`);
  if (keys && buf.length < CHUNK_HEADER_SIZE + CHUNK_CRYPTO_SIZE) throw bad("truncated");
  const sealed = buf.subarray(CHUNK_HEADER_SIZE + (keys ? CHUNK_CRYPTO_SIZE : 0));
  /** The payload decrypted into `to`, else into memory of its own (the addon: this thread's scratch). */
  const open = (k: CodecKeys, to?: Buffer): Buffer => {
    const nonce = buf.subarray(CHUNK_HEADER_SIZE, CHUNK_HEADER_SIZE + 12);
    const tag = buf.subarray(CHUNK_HEADER_SIZE + 12, CHUNK_HEADER_SIZE + CHUNK_CRYPTO_SIZE);
    const aad = buf.subarray(0, CHUNK_HEADER_SIZE);
    const aead = nativeAead();
    if (aead) {
      const dst = to ?? openScratch(sealed.length);
      if (!aead.open(k.encKey, nonce, aad, sealed, dst, tag)) throw bad("authentication failed");
      return dst;
    }
    const d = createDecipheriv("aes-256-gcm", k.encKey, nonce);
    d.setAAD(aad);
    d.setAuthTag(tag);
    try {
      if (!to) return gcmOpen(d, sealed);
      gcmPieces(d, sealed, to);
      return to;
    } catch {
      throw bad("authentication failed");
    }
  };
  let plain: Buffer;
  if (flags & CHUNK_FLAG_ZSTD) {
    const payload = keys ? open(keys) : sealed;
    const out = into ? Buffer.from(into.buffer, into.byteOffset, length) : Buffer.allocUnsafe(length);
    dctx ??= new zstd.DCtx();
    let n: number;
    try {
      // A frame that says it holds more than the header's length fails here ("too small").
      n = dctx.decompress(out, payload);
    } catch {
      throw bad("zstd payload does not decompress to its length");
    }
    plain = out.subarray(0, n);
  } else {
    if (sealed.length !== length) throw bad(`length ${sealed.length}, header says ${length}`);
    const out = into ? Buffer.from(into.buffer, into.byteOffset, length) : undefined;
    if (keys) plain = open(keys, out ?? Buffer.allocUnsafe(length));
    else if (out) {
      out.set(sealed);
      plain = out;
    } else plain = sealed;
  }
  if (plain.length !== length) throw bad(`length ${plain.length}, header says ${length}`);
  if (!chunkDigest(plain, keys, kind).equals(expected)) throw bad("digest mismatch");
  return plain;
}
