// The stored chunks themselves show the level: a first backup's new chunks are zstd at the fast
// level (at the bulk level while the codec threads are saturated), an incremental's at the middle
// one (the stored size is the codec's for that level).
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { encodeChunk, ZSTD_BULK, ZSTD_FAST, ZSTD_INCREMENTAL } from "../../src/repo/codec.js";
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

  // One chunk at a time: the thread is never saturated.
  await backup(repo, { ...opts, disks: [memoryDisk(day0)], inflight: 1 });
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

test("a first backup whose codec threads are saturated stores its chunks at the bulk level", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const disk = Buffer.alloc(CHUNK * 16);
  fillContent(disk, "text", new Prng("bulk"));
  // Sixteen chunks read at once for one thread: hashes and encodes queue behind each other.
  await backup(repo, {
    vm: "b",
    mode: "file",
    consistency: "crash-consistent",
    disks: [memoryDisk(disk)],
    inflight: 16,
  });
  const [snap] = await repo.snapshots("b", () => {});
  const index = await repo.index(snap!, "disk");
  let bulk = 0;
  for (let c = 0; c < 16; c++) {
    const plain = disk.subarray(c * CHUNK, (c + 1) * CHUNK);
    const sizes = {
      fast: encodeChunk(plain, undefined, ZSTD_FAST).length,
      bulk: encodeChunk(plain, undefined, ZSTD_BULK).length,
    };
    assert.notEqual(sizes.fast, sizes.bulk, `chunk ${c}: the two levels differ on text`);
    const got = await storedSize(dir, index.digest(c).toString("hex"));
    assert.ok(got === sizes.fast || got === sizes.bulk, `chunk ${c}: ${got} bytes, neither level's size`);
    if (got === sizes.bulk) bulk++;
  }
  assert.ok(bulk >= 8, `only ${bulk} of 16 chunks at the bulk level`);
  const out = join(dir, "b.raw");
  await restoreDiskToFile(repo, snap!, "disk", out);
  assert.ok((await fs.readFile(out)).equals(disk));
});
