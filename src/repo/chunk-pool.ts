/**
 * The chunk pipeline's CPU work (digest, compress, encrypt, and the reverse with verification)
 * on worker threads. Buffers passed in are moved to the worker: the caller must not touch them
 * after the call, and gets them (or their replacement) back in the result.
 *
 * Small objects (a pack's directory, an index object, a configuration) are done on the calling
 * thread instead: they take microseconds, and a backup keeps every worker's queue full of chunks.
 * Queued behind them, a pack's directory held its pack buffer for 10-30 ms, long enough to stop
 * the next pack from opening (measured on a full backup of the benchmark's Debian disk: the two
 * pack buffers were both taken a third of the time, and the chunks waited).
 */
import { defaultWorkerCount, WorkerPool } from "../util/workers.js";
import {
  CHUNK_PLAIN_LENGTH_AT,
  type CodecKeys,
  chunkDigest,
  type DigestKind,
  decodeChunk,
  encodeChunk,
  storedSizeBound,
} from "./codec.js";
import { CHUNK_HEADER_SIZE, MIN_CHUNK_SIZE } from "./format.js";

/**
 * Objects up to this size are hashed, encoded and decoded on the calling thread. Below the
 * smallest chunk size, so that no chunk of a disk is ever done there.
 */
export const INLINE_MAX = MIN_CHUNK_SIZE / 2;

/** `capacity` bytes of shared memory at `offset`, where a worker writes its result. */
export interface SharedSlot {
  memory: SharedArrayBuffer;
  offset: number;
  capacity: number;
}

export class ChunkPool {
  private readonly pool: WorkerPool;

  constructor(
    private readonly keys: CodecKeys | undefined,
    threads: number = defaultWorkerCount(),
    readonly digest: DigestKind = "sha256",
    nice?: number,
  ) {
    this.pool = new WorkerPool(
      new URL("./chunk-worker.js", import.meta.url),
      threads,
      { ...keys, digest },
      nice === undefined ? {} : { nice },
    );
  }

  get threads(): number {
    return this.pool.size;
  }

  /**
   * Every thread has a call running and more wait behind them: the work in flight is bound by
   * CPU, not by the disk that feeds it.
   */
  get saturated(): boolean {
    return this.pool.pending > this.pool.size;
  }

  /** Digest of `data`; `data` is moved to the worker and comes back in the result. */
  async hash(data: Buffer): Promise<{ data: Buffer; digest: Buffer }> {
    if (data.length <= INLINE_MAX) return { data, digest: chunkDigest(data, this.keys, this.digest) };
    const r = await this.pool.run<{ data: Uint8Array; digest: Uint8Array }>("hash", { data }, [
      ownBuffer(data),
    ]);
    return { data: toBuffer(r.data), digest: toBuffer(r.digest) };
  }

  /**
   * Stored form of `data` (zstd `level`, default fast); `data` is moved to the worker and comes
   * back in the result.
   */
  async encode(data: Buffer, level?: number): Promise<{ blob: Buffer; data: Buffer }> {
    if (data.length <= INLINE_MAX) return { blob: encodeChunk(data, this.keys, level), data };
    const r = await this.pool.run<{ blob: Uint8Array; data: Uint8Array }>("encode", { data, level }, [
      ownBuffer(data),
    ]);
    return { blob: toBuffer(r.blob), data: toBuffer(r.data) };
  }

  /**
   * Like {@link encode}, but the worker writes the stored form into shared memory `into` at
   * `offset` (at least storedSizeBound(data.length) bytes there); returns its length.
   */
  async encodeInto(
    data: Buffer,
    level: number | undefined,
    into: SharedSlot,
  ): Promise<{ length: number; data: Buffer }> {
    const { memory, offset, capacity } = into;
    const r = await this.pool.run<{ length: number; data: Uint8Array }>(
      "encodeInto",
      { data, level, into: memory, offset, capacity },
      [ownBuffer(data)],
    );
    return { length: r.length, data: toBuffer(r.data) };
  }

  /**
   * {@link hash} and {@link encodeInto} in one call: the digest of `data`, and its stored form
   * written into `into`.
   */
  async hashEncodeInto(
    data: Buffer,
    level: number | undefined,
    into: SharedSlot,
  ): Promise<{ digest: Buffer; length: number; data: Buffer }> {
    const { memory, offset, capacity } = into;
    const r = await this.pool.run<{ digest: Uint8Array; length: number; data: Uint8Array }>(
      "hashEncodeInto",
      { data, level, into: memory, offset, capacity },
      [ownBuffer(data)],
    );
    return { digest: toBuffer(r.digest), length: r.length, data: toBuffer(r.data) };
  }

  /** Verified plaintext of a stored chunk (moved to the worker unless it is shared memory). */
  async decode(stored: Buffer, digest: Buffer, what: string): Promise<Buffer> {
    // Small by both its sizes: what it says its plaintext is (decodeChunk checks that) and its own.
    if (stored.length <= storedSizeBound(INLINE_MAX) && stored.length >= CHUNK_HEADER_SIZE) {
      if (stored.readUInt32LE(CHUNK_PLAIN_LENGTH_AT) <= INLINE_MAX)
        return decodeChunk(stored, digest, this.keys, what, undefined, this.digest);
    }
    return toBuffer(
      await this.pool.run<Uint8Array>("decode", { stored, digest: ownBytes(digest), what }, [
        ownBuffer(stored),
      ]),
    );
  }

  /**
   * Verified plaintext of a stored chunk (moved to the worker unless it is shared memory, which
   * it only reads), written by the worker into `into` at `offset`; returns its length. A
   * plaintext longer than `capacity` is an error.
   */
  decodeInto(stored: Buffer, digest: Buffer, what: string, into: SharedSlot): Promise<number> {
    const { memory, offset, capacity } = into;
    return this.pool.run<number>(
      "decodeInto",
      { stored, digest: ownBytes(digest), what, into: memory, offset, capacity },
      [ownBuffer(stored)],
    );
  }

  close(): Promise<void> {
    return this.pool.close();
  }
}

/**
 * `b`, or a copy of it over memory of its own when it is a view into something larger. A digest
 * from FixedIndex.digest() is a view into the index's one buffer of all digests, and structured
 * cloning sends a view to the worker with all the memory under it: 128 KiB per chunk for a 4 GiB
 * disk of 1 MiB chunks (285 MiB for its restore), 32 MiB per chunk for 1 TiB.
 */
export function ownBytes(b: Buffer): Buffer {
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength) return b;
  const own = Buffer.from(new ArrayBuffer(b.length));
  own.set(b);
  return own;
}

/**
 * The ArrayBuffer to move, when `b` owns all of it; otherwise nothing is moved (it is copied, or,
 * for shared memory, shared).
 */
function ownBuffer(b: Buffer): ArrayBuffer {
  if (b.buffer instanceof SharedArrayBuffer) return new ArrayBuffer(0);
  if (b.byteOffset === 0 && b.byteLength === b.buffer.byteLength) return b.buffer as ArrayBuffer;
  return new ArrayBuffer(0);
}

function toBuffer(u: Uint8Array): Buffer {
  return Buffer.from(u.buffer, u.byteOffset, u.byteLength);
}
