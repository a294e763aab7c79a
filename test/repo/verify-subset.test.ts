// verify --read-data-subset N/T: the T parts split the chunks by digest into T sets that hold each
// chunk once; a damaged chunk is found by the part it falls in, and only checked for presence by
// the others. The daemon's rotating sample (`read-data: 1/T`) reads part k mod T + 1 on its k-th
// completed run (src/server/runner.ts).
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { inSubset, parseDataSubset, verifyRepository } from "../../src/repo/verify.js";
import { isStrataError } from "../../src/util/errors.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";
import { chunkRegions, flipChunkByte } from "../helpers/stored.js";

const CHUNK = 64 * 1024;

test("the parts of --read-data-subset read every chunk once; a damaged one is found by its part alone", async (t) => {
  const dir = tempDir(t);
  const path = join(dir, "repo");
  await Repository.init(new FsStore(path), { chunkSize: CHUNK });
  let repo = await Repository.open(new FsStore(path), { threads: 1 });
  const disk = Buffer.alloc(CHUNK * 48);
  fillContent(disk, "random", new Prng("subset"));
  await backup(repo, { vm: "a", mode: "file", consistency: "crash-consistent", disks: [memoryDisk(disk)] });
  await repo.close();
  const regions = await chunkRegions(path);
  assert.equal(regions.length, 48);

  repo = await Repository.open(new FsStore(path), { threads: 1 });
  t.after(() => repo.close());
  const T = 4;
  let read = 0;
  for (let part = 1; part <= T; part++) {
    const r = await verifyRepository(repo, { readDataSubset: { part, of: T } });
    assert.equal(r.ok, true);
    assert.equal(r.chunksChecked, 48);
    assert.equal(r.chunksRead, regions.filter((c) => inSubset(c.digest, { part, of: T })).length);
    read += r.chunksRead;
  }
  assert.equal(read, 48, "the parts together read every chunk once");

  // Damage one chunk's payload: a presence check passes, its part's read finds it.
  const victim = regions[17]!;
  await flipChunkByte(victim, -1);
  const mine = [1, 2, 3, 4].find((part) => inSubset(victim.digest, { part, of: T }))!;
  for (let part = 1; part <= T; part++) {
    const r = await verifyRepository(repo, { readDataSubset: { part, of: T } });
    if (part === mine) {
      assert.equal(r.ok, false);
      assert.deepEqual(
        r.damagedChunks.map((c) => c.digest),
        [victim.digest],
      );
    } else assert.equal(r.ok, true, `part ${part} reads only its own chunks`);
  }
});

test("a subset is N/T with 1 <= N <= T <= 10000", () => {
  assert.deepEqual(parseDataSubset("3/7"), { part: 3, of: 7 });
  for (const bad of ["0/7", "8/7", "1/0", "a/b", "1/10001", "1/2/3", "1"])
    assert.throws(
      () => parseDataSubset(bad),
      (e) => isStrataError(e, "USAGE") && e.message.includes(bad),
    );
});
