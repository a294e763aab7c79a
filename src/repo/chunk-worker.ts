/**
 * Worker-thread side of the chunk pipeline (see {@link ChunkPool}). Each call moves its buffers
 * in and out without copying.
 */
import { serveWorker, withTransfer } from "../util/workers.js";
import { type CodecKeys, chunkDigest, decodeChunk, encodeChunk } from "./codec.js";

function keysOf(data: unknown): CodecKeys | undefined {
  const d = data as { encKey?: Uint8Array; macKey?: Uint8Array } | undefined;
  if (!d?.encKey || !d.macKey) return undefined;
  return { encKey: Buffer.from(d.encKey), macKey: Buffer.from(d.macKey) };
}

let cached: { data: unknown; keys: CodecKeys | undefined } | undefined;
function keys(data: unknown): CodecKeys | undefined {
  const hit: { data: unknown; keys: CodecKeys | undefined } =
    cached !== undefined && cached.data === data ? cached : { data, keys: keysOf(data) };
  cached = hit;
  return hit.keys;
}

function view(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}

serveWorker({
  /** Digest of a plaintext; hands the plaintext back. */
  hash: (args: { data: Uint8Array }, data) => {
    const digest = chunkDigest(args.data, keys(data));
    return withTransfer({ data: args.data, digest }, [args.data.buffer as ArrayBuffer]);
  },
  /** Stored form of a plaintext. */
  encode: (args: { data: Uint8Array }, data) => {
    const blob = encodeChunk(view(args.data), keys(data));
    return withTransfer(blob, [blob.buffer as ArrayBuffer]);
  },
  /** Plaintext of a stored chunk, verified against its digest. */
  decode: (args: { stored: Uint8Array; digest: Uint8Array; what: string }, data) => {
    const plain = decodeChunk(args.stored, args.digest, keys(data), args.what);
    // A Buffer from decompress may share a pooled ArrayBuffer: copy into one of its own to move it.
    const own =
      plain.byteOffset === 0 && plain.byteLength === plain.buffer.byteLength ? plain : Buffer.from(plain);
    return withTransfer(own, [own.buffer as ArrayBuffer]);
  },
});
