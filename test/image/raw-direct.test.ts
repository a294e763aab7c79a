// Backups of raw images read around the page cache (O_DIRECT): a backup of an image that is not
// cached leaves it uncached (the host's page cache is not flooded), restores bit-exact, and an
// image whose size is not whole 4 KiB blocks still reads its tail.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promises as fs, statSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { strataOk, tempDir } from "../helpers/cli.js";
import { chunkRegions, storedFiles } from "../helpers/stored.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;

/** Pages of `path` in the page cache (fincore, util-linux). */
async function cachedPages(path: string): Promise<number> {
  return Number((await run("fincore", ["--noheadings", "--raw", "--output", "PAGES", path])).stdout.trim());
}

test("a backup reads a raw image around the page cache and restores it exactly", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const image = join(dir, "disk.raw");
  const data = Buffer.alloc(24 * MiB + 1234);
  fillContent(data, "text", new Prng("direct read"));
  await fs.writeFile(image, data);
  // Write it out, then drop its pages (GNU dd: nocache with count=0 advises the whole file).
  await run("sync", ["-f", image]);
  await run("dd", [`if=${image}`, "iflag=nocache", "count=0", "status=none"]);
  assert.ok((await cachedPages(image)) <= 1, `pages cached before the backup: ${await cachedPages(image)}`);

  await strataOk(["init", "--repo", repo, "--chunk-size", "1M"]);
  await strataOk(["backup", "--repo", repo, "--vm", "d", `file:${image},name=disk`]);
  // Only the short last chunk (1234 bytes past whole blocks, with a little readahead) and the
  // format probe's first sectors went through the page cache: not the 6,145 pages of the image.
  const pages = await cachedPages(image);
  assert.ok(pages < 64, `pages of the image cached after the backup: ${pages}`);

  // The chunks were written around the page cache too: only the last block of each pack stays
  // cached (a file cut back to its length with ftruncate reads that block).
  const chunks = await chunkRegions(repo);
  assert.ok(chunks.length >= 20, `chunks stored: ${chunks.length}`);
  const files = storedFiles(repo);
  assert.deepEqual([...new Set(chunks.map((c) => c.path))].sort(), files, "every stored file holds chunks");
  const storedPages = files.reduce((n, f) => n + Math.ceil(statSync(f).size / 4096), 0);
  const cachedChunkPages = await cachedPagesOf(files);
  assert.ok(
    cachedChunkPages <= files.length,
    `pages of ${files.length} stored file(s) (${storedPages} pages) cached after the backup: ${cachedChunkPages}`,
  );

  for (const f of files) await run("dd", [`if=${f}`, "iflag=nocache", "count=0", "status=none"]);
  await strataOk(["restore", "--repo", repo, "d/latest", "--target", join(dir, "out")]);
  assert.ok((await fs.readFile(join(dir, "out", "disk.raw"))).equals(data));
  // A restore reads the chunks around the page cache.
  const afterRestore = await cachedPagesOf(files);
  assert.ok(afterRestore <= 2, `stored pages cached after the restore: ${afterRestore}`);
});

async function cachedPagesOf(paths: string[]): Promise<number> {
  let n = 0;
  for (const p of paths) n += await cachedPages(p);
  return n;
}
