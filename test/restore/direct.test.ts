// Raw-file restores write around the page cache (O_DIRECT) where the filesystem allows it, and
// through it otherwise: both give the same sparse bytes, including a last chunk that is not a
// whole number of blocks. fincore (util-linux) shows which path ran: direct writes leave no
// pages of the file in the page cache.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { backup, type DiskSource } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { tempDir } from "../helpers/cli.js";

const run = promisify(execFile);
const CHUNK = 256 * 1024;

/** Pages of `path` in the page cache. */
async function cachedPages(path: string): Promise<number> {
  const out = (await run("fincore", ["--bytes", "--noheadings", "--raw", "--output", "PAGES", path])).stdout;
  return Number(out.trim());
}

test("restores write around the page cache where they can, and give the same sparse bytes either way", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store);
  t.after(() => repo.close());
  // 40 chunks and 1000 bytes: random, text and zero chunks, and a short last chunk.
  const disk = Buffer.alloc(40 * CHUNK + 1000);
  for (let c = 0; c < 40; c += 2) {
    fillContent(
      disk.subarray(c * CHUNK, (c + 1) * CHUNK),
      c % 4 === 0 ? "random" : "text",
      new Prng(`c${c}`),
    );
  }
  fillContent(disk.subarray(40 * CHUNK), "random", new Prng("tail"));
  const source: DiskSource = {
    name: "disk",
    source: "memory",
    size: disk.length,
    read: async (o, l) => Buffer.from(disk.subarray(o, o + l)),
  };
  await backup(repo, { vm: "d", disks: [source], mode: "file", consistency: "crash-consistent" });
  const [snap] = await repo.snapshots("d", () => {});

  const direct = join(dir, "direct.raw");
  const r = await restoreDiskToFile(repo, snap!, "disk", direct);
  assert.equal(r.bytesWritten, 20 * CHUNK + 1000);
  // Only the short last chunk went through the page cache (checked before anything reads it).
  const pages = await cachedPages(direct);
  assert.ok(pages <= 1, `pages cached after a direct restore: ${pages}`);
  assert.ok((await fs.readFile(direct)).equals(disk));

  const buffered = join(dir, "buffered.raw");
  await restoreDiskToFile(repo, snap!, "disk", buffered, { direct: false });
  assert.ok((await cachedPages(buffered)) > 20 * 64, "a buffered restore leaves its pages cached");
  assert.ok((await fs.readFile(buffered)).equals(disk));

  // Both are sparse: the 20 zero chunks are holes.
  for (const f of [direct, buffered]) {
    const st = await fs.stat(f);
    assert.ok(st.blocks * 512 < 21 * CHUNK + 8192, `${f}: ${st.blocks * 512} bytes allocated`);
  }
});
