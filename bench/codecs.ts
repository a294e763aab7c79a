/**
 * Per-core speed and stored size of candidate chunk codecs on a disk image's chunks, one thread,
 * data in memory: what a backup's CPU work would cost with each, without changing the
 * repository format. Usage: node dist/bench/codecs.js IMAGE [CHUNK_KIB=1024] [SAMPLE_MIB=768]
 *
 * Each figure is the best of three runs, in CPU time. The image's non-zero chunks are sampled evenly (zero chunks are never stored). Stored bytes
 * count a chunk kept raw when the codec does not shrink it, as Strata's codec does. lz4 is
 * measured when lz4-napi can be imported (it is not a dependency): install it anywhere and set
 * LZ4_NAPI to its entry file (e.g. /tmp/x/node_modules/lz4-napi/index.js).
 */
import { createCipheriv, createHash, randomBytes } from "node:crypto";
import { closeSync, openSync, readSync, statSync } from "node:fs";
import zstd from "zstd-napi/binding.js";

const MiB = 1024 * 1024;
const image = process.argv[2];
if (!image) throw new Error("usage: codecs.js IMAGE [CHUNK_KIB] [SAMPLE_MIB]");
const chunkSize = Number(process.argv[3] ?? 1024) * 1024;
const sampleBytes = Number(process.argv[4] ?? 768) * MiB;

function loadChunks(): Buffer[] {
  const fd = openSync(image!, "r");
  const size = statSync(image!).size;
  const all: number[] = [];
  const buf = Buffer.alloc(chunkSize);
  for (let off = 0; off < size; off += chunkSize) {
    const n = readSync(fd, buf, 0, chunkSize, off);
    if (buf.subarray(0, n).some((b) => b !== 0)) all.push(off);
  }
  const stride = Math.max(1, (all.length * chunkSize) / sampleBytes);
  const chunks: Buffer[] = [];
  for (let i = 0; i < all.length; i += stride) {
    const c = Buffer.alloc(chunkSize);
    readSync(fd, c, 0, chunkSize, all[Math.floor(i)]!);
    chunks.push(c);
  }
  closeSync(fd);
  console.log(
    `${image}: ${all.length} non-zero chunks of ${chunkSize / 1024} KiB (${((all.length * chunkSize) / MiB).toFixed(0)} MiB); sample ${chunks.length} chunks`,
  );
  return chunks;
}

const chunks = loadChunks();
const total = chunks.length * chunkSize;
const out = Buffer.alloc(chunkSize + 1024);
const cctx = new zstd.CCtx();
const dctx = new zstd.DCtx();

/**
 * CPU seconds of `fn`, best of `ROUNDS` runs: on a shared machine CPU time moves far less than
 * wall time (a run that waits for a core is not slower), and the fastest run is the least disturbed.
 */
const ROUNDS = 3;
function timeIt(fn: () => number): { secs: number; stored: number } {
  let best = { secs: Number.POSITIVE_INFINITY, stored: 0 };
  for (let i = 0; i < ROUNDS; i++) {
    const t = process.cpuUsage();
    const stored = fn();
    const used = process.cpuUsage(t);
    const secs = (used.user + used.system) / 1e6;
    if (secs < best.secs) best = { secs, stored };
  }
  return best;
}

function report(name: string, r: { secs: number; stored: number }, note = ""): void {
  console.log(
    `| ${name} | ${(total / MiB / r.secs).toFixed(0)} | ${r.stored ? ((100 * r.stored) / total).toFixed(1) : "—"} | ${note} |`,
  );
}

/** zstd at `level` into `out` (no bigger than the chunk); 0 when it did not shrink. */
function zstdInto(c: Buffer, level: number, dst: Buffer = out.subarray(0, c.length)): number {
  try {
    const n = cctx.compress(dst, c, level);
    return n < c.length ? n : 0;
  } catch {
    return 0;
  }
}

console.log("\n| candidate | MiB per CPU-second | stored % of sampled bytes | note |\n|---|---|---|---|");
report(
  "SHA-256 (node:crypto)",
  timeIt(() => {
    for (const c of chunks) createHash("sha256").update(c).digest();
    return 0;
  }),
);
const key = randomBytes(32);
report(
  "AES-256-GCM (node:crypto)",
  timeIt(() => {
    for (const c of chunks) {
      const g = createCipheriv("aes-256-gcm", key, randomBytes(12));
      g.update(c);
      g.final();
    }
    return 0;
  }),
);
const rawCount = chunks.filter((c) => zstdInto(c, 1) === 0).length;
for (const level of [3, 1, -1, -3, -5, -10]) {
  report(
    `zstd ${level}`,
    timeIt(() => {
      let stored = 0;
      for (const c of chunks) stored += zstdInto(c, level) || c.length;
      return stored;
    }),
    level === 1 ? `current FAST level; ${rawCount} of ${chunks.length} chunks do not shrink` : "",
  );
}

// Early incompressibility check: four 16 KiB probes at level 1; a chunk whose probes shrink by
// less than `keep` is stored raw without compressing the rest.
for (const [probeLevel, keep] of [
  [1, 0.97],
  [1, 0.9],
  [-5, 0.97],
] as const) {
  let skipped = 0;
  const r = timeIt(() => {
    let stored = 0;
    skipped = 0;
    const probe = 16 * 1024;
    const probeOut = Buffer.alloc(probe + 1024);
    for (const c of chunks) {
      let packed = 0;
      for (let k = 0; k < 4; k++) {
        const at = Math.floor((k * (c.length - probe)) / 3);
        packed += zstdInto(c.subarray(at, at + probe), probeLevel, probeOut) || probe;
      }
      if (packed >= keep * 4 * probe) {
        skipped++;
        stored += c.length;
      } else stored += zstdInto(c, 1) || c.length;
    }
    return stored;
  });
  report(
    `zstd 1 + probe (4×16 KiB at ${probeLevel}, raw if ≥ ${keep * 100} %)`,
    r,
    `${skipped} chunks skipped`,
  );
}

// Decoding (restore's CPU work) at the levels a repository holds.
for (const level of [1, -5]) {
  const packed = chunks.map((c) => {
    const n = zstdInto(c, level);
    return n ? Buffer.from(out.subarray(0, n)) : undefined;
  });
  const plain = Buffer.alloc(chunkSize);
  report(
    `zstd ${level} decompress`,
    timeIt(() => {
      for (const p of packed) if (p) dctx.decompress(plain, p);
      return 0;
    }),
    "speed per plaintext byte, raw chunks counted as free",
  );
}

interface Lz4 {
  compressSync(data: Buffer): Buffer;
  uncompressSync(data: Buffer): Buffer;
}
let lz4: Lz4 | undefined;
try {
  const mod = (await import(process.env.LZ4_NAPI ?? "lz4-napi")) as Lz4 & { default?: Lz4 };
  lz4 = mod.default ?? mod;
} catch {
  console.log("\n(lz4-napi not installed: lz4 not measured)");
}
if (lz4) {
  const l = lz4;
  const packed: Buffer[] = [];
  report(
    "lz4 block (lz4-napi)",
    timeIt(() => {
      let stored = 0;
      packed.length = 0;
      for (const c of chunks) {
        const p = l.compressSync(c);
        packed.push(p);
        stored += Math.min(p.length, c.length);
      }
      return stored;
    }),
  );
  report(
    "lz4 block decompress",
    timeIt(() => {
      for (const p of packed) l.uncompressSync(p);
      return 0;
    }),
  );
}
