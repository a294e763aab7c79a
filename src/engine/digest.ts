/**
 * A chunk's digest as handed to the repository for a read. FixedIndex.digest() is a view into
 * the index's one buffer of all digests, and the repository sends the digest to the worker thread
 * that verifies the chunk: structured cloning sends a view with the whole buffer under it. That
 * was 128 KiB copied and allocated per chunk for a 4 GiB disk of 1 MiB chunks (285 MiB for its
 * restore), and would be 32 MiB per chunk for 1 TiB. A 32-byte copy over memory of its own goes
 * as 32 bytes.
 */
import type { FixedIndex } from "../repo/fixed-index.js";

/** Digest of chunk `i` of `index`, in a buffer that owns all of its memory. */
export function ownDigest(index: FixedIndex, i: number): Buffer {
  const view = index.digest(i);
  const own = Buffer.from(new ArrayBuffer(view.length));
  own.set(view);
  return own;
}
