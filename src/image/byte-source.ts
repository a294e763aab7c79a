/**
 * The narrow read interface that partition tables and filesystem readers need: a random-access,
 * read-only byte range. A restore point's disk (`RestorePointSource` in the engine) satisfies it
 * as is; {@link slice} narrows one to a partition.
 */

/** Random-access read-only bytes. `read` must return exactly `length` bytes within `size`. */
export interface ByteSource {
  readonly size: number;
  read(offset: number, length: number): Promise<Buffer>;
}

/** The bytes `[start, start + size)` of `source`, as a source of its own. */
export function slice(source: ByteSource, start: number, size: number): ByteSource {
  if (start < 0 || size < 0 || start + size > source.size)
    throw new RangeError(`slice ${start}+${size} beyond a source of ${source.size} bytes`);
  if (start === 0 && size === source.size) return source;
  return {
    size,
    read(offset, length) {
      if (offset < 0 || length < 0 || offset + length > size)
        throw new RangeError(`read ${offset}+${length} beyond a slice of ${size} bytes`);
      return source.read(start + offset, length);
    },
  };
}

/** Reads `length` bytes at `offset`, zero-filling whatever lies beyond the end of the source. */
export async function readPadded(source: ByteSource, offset: number, length: number): Promise<Buffer> {
  const avail = Math.max(0, Math.min(length, source.size - offset));
  if (avail === length) return source.read(offset, length);
  const out = Buffer.alloc(length);
  if (avail > 0) (await source.read(offset, avail)).copy(out);
  return out;
}
