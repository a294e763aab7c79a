/**
 * Where a local repository keeps its chunks, in either format: v1 has one file per chunk under
 * chunks/, v2 packs under packs/ found through the pack index. Tests that damage, count or search
 * stored chunks go through these instead of knowing the layout.
 */
import { existsSync, promises as fs, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { FsStore } from "../../src/repo/fs-store.js";
import { PackLayout } from "../../src/repo/layout.js";
import { Repository } from "../../src/repo/repository.js";
import { STORE_TIME_SLACK_MS } from "../../src/repo/store.js";

/**
 * Waits until what was stored before the call is older than gc's slack for stored times
 * (store.ts): a gc with no grace then takes what killed runs left for a dead writer's.
 */
export async function pastGcTimeSlack(): Promise<void> {
  await new Promise((r) => setTimeout(r, STORE_TIME_SLACK_MS + 500));
}

/**
 * Files holding stored chunks: chunk files (v1) or packs (v2), sorted. `temporaries` adds files
 * still being written (or left by a killed writer) beside them.
 */
export function storedFiles(repo: string, options: { temporaries?: boolean } = {}): string[] {
  const out: string[] = [];
  for (const top of ["chunks", "packs"]) {
    const dir = join(repo, top);
    if (!existsSync(dir)) continue;
    for (const d of readdirSync(dir))
      for (const f of readdirSync(join(dir, d)))
        if (options.temporaries === true || !f.includes(".tmp-")) out.push(join(dir, d, f));
  }
  return out.sort();
}

/** Bytes of all stored chunk files and packs. */
export function storedBytes(repo: string): number {
  return storedFiles(repo).reduce((n, f) => n + statSync(f).size, 0);
}

export interface ChunkRegion {
  digest: string;
  path: string;
  offset: number;
  length: number;
}

/** Every stored chunk and where its bytes are, sorted by digest. */
export async function chunkRegions(repo: string, password?: string): Promise<ChunkRegion[]> {
  const r = await Repository.open(
    new FsStore(repo),
    password === undefined ? { threads: 1 } : { password, threads: 1 },
  );
  try {
    const out: ChunkRegion[] = [];
    if (r.layout instanceof PackLayout) {
      const index = await r.layout.packIndex(true);
      for (const p of index.packs.values())
        for (const e of p.entries)
          out.push({
            digest: e.digest,
            path: join(repo, "packs", p.id.slice(0, 2), p.id),
            offset: e.offset,
            length: e.length,
          });
    } else {
      for (const path of storedFiles(repo))
        out.push({
          digest: path.slice(path.lastIndexOf("/") + 1),
          path,
          offset: 0,
          length: statSync(path).size,
        });
    }
    return out.sort((a, b) => a.digest.localeCompare(b.digest));
  } finally {
    await r.close();
  }
}

/** Where chunk `hex` is stored. */
export async function chunkRegion(repo: string, hex: string, password?: string): Promise<ChunkRegion> {
  const found = (await chunkRegions(repo, password)).find((c) => c.digest === hex);
  if (!found) throw new Error(`chunk ${hex} is not stored in ${repo}`);
  return found;
}

/** Flips bits (`mask`, default the lowest) of a stored chunk's byte `at` (negative: from its end). */
export async function flipChunkByte(region: ChunkRegion, at: number, mask = 0x01): Promise<void> {
  const buf = await fs.readFile(region.path);
  const pos = region.offset + (at < 0 ? region.length + at : at);
  buf[pos]! ^= mask;
  await fs.writeFile(region.path, buf);
}
