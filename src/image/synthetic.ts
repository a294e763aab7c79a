/**
 * Synthetic disk images with the mix real ones have: holes, text, compressible binary,
 * repeated blocks and incompressible random data. Deterministic for a seed, so tests and
 * benchmarks can make the same image again and derive "next day" versions of it.
 */
import { createCipheriv, createHash } from "node:crypto";
import { promises as fs } from "node:fs";

/** A fast deterministic number stream (xorshift128), seeded from a string. */
export class Prng {
  private x: number;
  private y: number;
  private z: number;
  private w: number;
  constructor(seed: string) {
    const h = createHash("sha256").update(seed).digest();
    this.x = h.readUInt32LE(0) | 1;
    this.y = h.readUInt32LE(4) | 1;
    this.z = h.readUInt32LE(8) | 1;
    this.w = h.readUInt32LE(12) | 1;
  }
  /** Unsigned 32-bit integer. */
  next(): number {
    const t = this.x ^ (this.x << 11);
    this.x = this.y;
    this.y = this.z;
    this.z = this.w;
    this.w = this.w ^ (this.w >>> 19) ^ (t ^ (t >>> 8));
    return this.w >>> 0;
  }
  /** Integer in [0, n). */
  below(n: number): number {
    return this.next() % n;
  }
  /** Fills `buf` with incompressible bytes: an AES-128-CTR keystream keyed from this generator. */
  fill(buf: Buffer): void {
    const key = Buffer.alloc(16);
    const iv = Buffer.alloc(16);
    for (let i = 0; i < 16; i += 4) {
      key.writeUInt32LE(this.next(), i);
      iv.writeUInt32LE(this.next(), i);
    }
    const ks = createCipheriv("aes-128-ctr", key, iv).update(Buffer.alloc(buf.length));
    ks.copy(buf);
  }
}

let TEXT_LINES: Buffer[] | undefined;
/** A fixed pool of log-like lines that text regions are made of. */
function textLines(): Buffer[] {
  if (TEXT_LINES) return TEXT_LINES;
  const rng = new Prng("strata text lines");
  TEXT_LINES = Array.from({ length: 8192 }, () =>
    Buffer.from(
      `${Array.from({ length: 4 + rng.below(12) }, () => WORDS[rng.below(WORDS.length)]).join(" ")} ${rng.below(100000)}\n`,
    ),
  );
  return TEXT_LINES;
}

const WORDS = (
  "the of and to in is was for on that with as by at from this be are or it an have which not but has " +
  "kernel block device mount filesystem inode journal backup restore chunk index manifest qemu virtual " +
  "machine disk snapshot bitmap export server client request reply error warning info debug log"
).split(" ");

/** Fills `buf` with one kind of content. */
export function fillContent(buf: Buffer, kind: "zero" | "text" | "binary" | "random", rng: Prng): void {
  switch (kind) {
    case "zero":
      buf.fill(0);
      return;
    case "random":
      rng.fill(buf);
      return;
    case "text": {
      const lines = textLines();
      let off = 0;
      while (off < buf.length) off += lines[rng.below(lines.length)]!.copy(buf, off);
      return;
    }
    case "binary": {
      // Structured binary: mostly small values and zero bytes; compresses like executables (~2-3x).
      const tmp = Buffer.alloc(buf.length + 3 - ((buf.length + 3) % 4));
      rng.fill(tmp);
      const words = new Uint32Array(tmp.buffer, tmp.byteOffset, tmp.length / 4);
      for (let i = 0; i < words.length; i++) if (words[i]! % 7 !== 0) words[i] = words[i]! & 0x00ff000f;
      tmp.copy(buf, 0, 0, buf.length);
      return;
    }
  }
}

export interface SyntheticOptions {
  size: number;
  seed: string;
  /** Fraction of the image left as holes (never written). Default 0.5. */
  holes?: number;
  /** Size of each content run. Default 1 MiB. */
  runSize?: number;
}

/**
 * Writes a sparse synthetic image: runs of holes, text, binary, duplicates of earlier runs and
 * random data. Returns the SHA-256 of the whole image as it reads back.
 */
export async function writeSyntheticImage(path: string, options: SyntheticOptions): Promise<string> {
  const rng = new Prng(options.seed);
  const runSize = options.runSize ?? 1024 * 1024;
  const holes = options.holes ?? 0.5;
  const fh = await fs.open(path, "w");
  const hash = createHash("sha256");
  const saved: Buffer[] = [];
  try {
    await fh.truncate(options.size);
    for (let off = 0; off < options.size; off += runSize) {
      const len = Math.min(runSize, options.size - off);
      const buf = Buffer.alloc(len);
      const roll = rng.below(1000) / 1000;
      if (roll < holes) {
        hash.update(buf);
        continue;
      }
      const kind = rng.below(10);
      if (kind < 4) fillContent(buf, "text", rng);
      else if (kind < 7) fillContent(buf, "binary", rng);
      else if (kind < 8 && saved.length > 0) saved[rng.below(saved.length)]!.copy(buf);
      else fillContent(buf, "random", rng);
      if (saved.length < 16 && rng.below(4) === 0) saved.push(Buffer.from(buf));
      await fh.write(buf, 0, len, off);
      hash.update(buf);
    }
  } finally {
    await fh.close();
  }
  return hash.digest("hex");
}

/**
 * Changes about `fraction` of an image in place (scattered 4 KiB..64 KiB writes of fresh
 * content), the way a day of guest activity does.
 */
export async function mutateImage(path: string, fraction: number, seed: string): Promise<number> {
  const rng = new Prng(seed);
  const fh = await fs.open(path, "r+");
  try {
    const size = (await fh.stat()).size;
    let changed = 0;
    const target = size * fraction;
    while (changed < target) {
      const len = Math.min(4096 * (1 + rng.below(16)), size);
      const off = Math.floor(rng.below(Math.max(1, Math.floor((size - len) / 4096)))) * 4096;
      const buf = Buffer.alloc(len);
      fillContent(buf, rng.below(2) === 0 ? "text" : "random", rng);
      await fh.write(buf, 0, len, off);
      changed += len;
    }
    return changed;
  } finally {
    await fh.close();
  }
}

/** SHA-256 of a file's bytes. */
export async function sha256File(path: string): Promise<string> {
  const hash = createHash("sha256");
  const fh = await fs.open(path, "r");
  try {
    const buf = Buffer.allocUnsafe(4 * 1024 * 1024);
    for (let pos = 0; ; ) {
      const { bytesRead } = await fh.read(buf, 0, buf.length, pos);
      if (bytesRead === 0) break;
      hash.update(buf.subarray(0, bytesRead));
      pos += bytesRead;
    }
  } finally {
    await fh.close();
  }
  return hash.digest("hex");
}
