// The stored chunks themselves show the level: a first backup's new chunks are zstd at the fast
// level, an incremental's at the middle one (the stored size is the codec's for that level).
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { encodeChunk, ZSTD_FAST, ZSTD_INCREMENTAL } from "../../src/repo/codec.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";
import { chunkRegion } from "../helpers/stored.js";

const CHUNK = 64 * 1024;

async function storedSize(dir: string, hex: string): Promise<number> {
  return (await chunkRegion(join(dir, "repo"), hex)).length;
}

test("a first backup stores chunks at the fast zstd level, an incremental's new chunks at the middle one", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const day0 = Buffer.alloc(CHUNK * 8);
  fillContent(day0, "text", new Prng("day0"));
  const day1 = Buffer.from(day0);
  fillContent(day1.subarray(3 * CHUNK, 4 * CHUNK), "text", new Prng("day1"));
  const opts = { vm: "a", mode: "file" as const, consistency: "crash-consistent" as const };

  await backup(repo, { ...opts, disks: [memoryDisk(day0)] });
  const s1 = await backup(repo, { ...opts, disks: [memoryDisk(day1)] });
  const snaps = await repo.snapshots("a", () => {});
  const [i0, i1] = [await repo.index(snaps[0]!, "disk"), await repo.index(snaps[1]!, "disk")];
  assert.equal(s1.manifest.disks[0]!.chunksNew, 1);
  for (let c = 0; c < 8; c++) {
    const plain = day0.subarray(c * CHUNK, (c + 1) * CHUNK);
    const fast = encodeChunk(plain, undefined, ZSTD_FAST).length;
    assert.equal(await storedSize(dir, i0.digest(c).toString("hex")), fast, `chunk ${c} of day 0`);
  }
  const changed = day1.subarray(3 * CHUNK, 4 * CHUNK);
  const strong = encodeChunk(changed, undefined, ZSTD_INCREMENTAL).length;
  assert.ok(strong < encodeChunk(changed, undefined, ZSTD_FAST).length, "the middle level is smaller here");
  assert.equal(await storedSize(dir, i1.digest(3).toString("hex")), strong);

  // Both levels restore the same bytes.
  const out = join(dir, "day1.raw");
  await restoreDiskToFile(repo, snaps[1]!, "disk", out);
  assert.ok((await fs.readFile(out)).equals(day1));
});
