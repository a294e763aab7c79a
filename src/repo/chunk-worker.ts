/**
 * Worker-thread side of the chunk pipeline (see {@link ChunkPool}). Each call moves its buffers
 * in and out without copying.
 */
import { serveWorker, withTransfer } from "../util/workers.js";
import {
  type CodecKeys,
  chunkDigest,
  type DigestKind,
  decodeChunk,
  encodeChunk,
  encodeChunkInto,
} from "./codec.js";

function keysOf(data: unknown): CodecKeys | undefined {
  const d = data as { encKey?: Uint8Array; macKey?: Uint8Array } | undefined;
  if (!d?.encKey || !d.macKey) return undefined;
  return { encKey: Buffer.from(d.encKey), macKey: Buffer.from(d.macKey) };
}

/** The pool's digest kind, from its worker data. */
function kind(data: unknown): DigestKind {
  return (data as { digest?: DigestKind } | undefined)?.digest === "blake3" ? "blake3" : "sha256";
}

let cached: { data: unknown; keys: CodecKeys | undefined } | undefined;
function keys(data: unknown): CodecKeys | undefined {
  const hit: { data: unknown; keys: CodecKeys | undefined } =
    cached !== undefined && cached.data === data ? cached : { data, keys: keysOf(data) };
  cached = hit;
  return hit.keys;
}

/**
 * `b` itself when it owns its whole ArrayBuffer, else a copy that does. Small Buffers share Node's
 * 8 KiB allocation pool: moving that to another thread would pull it from under other Buffers.
 */
function owned(b: Buffer): Buffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength) return b;
  const copy = Buffer.allocUnsafeSlow(b.length);
  b.copy(copy);
  return copy;
}

function view(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

serveWorker({
  /** Digest of a plaintext; hands the plaintext back. */
  hash: (args: { data: Uint8Array }, data) => {
    const digest = chunkDigest(args.data, keys(data), kind(data));
    return withTransfer({ data: args.data, digest }, [args.data.buffer as ArrayBuffer]);
  },
  /** Stored form of a plaintext; hands the plaintext back too, so the caller can reuse its memory. */
  encode: (args: { data: Uint8Array; level?: number }, data) => {
    const blob = owned(encodeChunk(view(args.data), keys(data), args.level));
    return withTransfer({ blob, data: args.data }, [
      blob.buffer as ArrayBuffer,
      args.data.buffer as ArrayBuffer,
    ]);
  },
  /**
   * Stored form of a plaintext written into shared memory at `offset` (`capacity` bytes there);
   * returns its length and hands the plaintext back.
   */
  encodeInto: (
    args: { data: Uint8Array; level?: number; into: SharedArrayBuffer; offset: number; capacity: number },
    data,
  ) => {
    const out = new Uint8Array(args.into, args.offset, args.capacity);
    const length = encodeChunkInto(args.data, out, keys(data), args.level);
    return withTransfer({ length, data: args.data }, [args.data.buffer as ArrayBuffer]);
  },
  /** encodeInto, and the plaintext's digest. */
  hashEncodeInto: (
    args: { data: Uint8Array; level?: number; into: SharedArrayBuffer; offset: number; capacity: number },
    data,
  ) => {
    const digest = chunkDigest(args.data, keys(data), kind(data));
    const out = new Uint8Array(args.into, args.offset, args.capacity);
    const length = encodeChunkInto(args.data, out, keys(data), args.level);
    return withTransfer({ digest, length, data: args.data }, [args.data.buffer as ArrayBuffer]);
  },
  /** Verified plaintext of a stored chunk, decoded into shared memory at `offset`; returns its length. */
  decodeInto: (
    args: {
      stored: Uint8Array;
      digest: Uint8Array;
      what: string;
      into: SharedArrayBuffer;
      offset: number;
      capacity: number;
    },
    data,
  ) => {
    const into = new Uint8Array(args.into, args.offset, args.capacity);
    return decodeChunk(args.stored, args.digest, keys(data), args.what, into, kind(data)).length;
  },
  /** Plaintext of a stored chunk, verified against its digest. */
  decode: (args: { stored: Uint8Array; digest: Uint8Array; what: string }, data) => {
    const plain = decodeChunk(args.stored, args.digest, keys(data), args.what, undefined, kind(data));
    const own = owned(plain);
    return withTransfer(own, [own.buffer as ArrayBuffer]);
  },
});
