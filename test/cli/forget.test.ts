// forget through the CLI: --dry-run shows and keeps, a policy removes what it doesn't keep, ids
// remove exactly those, and gc then frees the space: in packs (format 2) over two runs, the first
// condemning the packs no restore point needs, the second deleting them.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { storedBytes, storedFiles } from "../helpers/stored.js";

test("forget by policy and by id, dry run first, then gc frees space", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const img = join(dir, "d.img");
  const ids: string[] = [];
  for (let i = 0; i < 4; i++) {
    const b = Buffer.alloc(4 * 65536);
    fillContent(b, "random", new Prng(`v${i}`));
    await fs.writeFile(img, b);
    ids.push(
      summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]))
        .id as string,
    );
  }
  await strataOk(["backup", "--repo", repo, "--vm", "vm2", `file:${img}`]);

  const noPolicy = await strata(["forget", "--repo", repo]);
  assert.equal(noPolicy.code, 2);
  assert.match(noPolicy.stderr, /no keep policy given/);

  const dry = summary<{ keep: Array<{ id: string; reasons: string[] }>; remove: string[] }>(
    await strataOk(["forget", "--repo", repo, "--keep-last", "2", "--dry-run", "--json"]),
  );
  assert.deepEqual(dry.remove.sort(), ids.slice(0, 2).sort());
  assert.equal(dry.keep.length, 3, "two of vm1 and the one of vm2");
  const text = await strataOk(["forget", "--repo", repo, "--keep-last", "2", "--dry-run"]);
  assert.match(text.stdout, /would remove vm1\//);
  let listed = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as unknown[];
  assert.equal(listed.length, 5, "dry run removed nothing");

  await strataOk(["forget", "--repo", repo, "--keep-last", "2", "--vm", "vm1"]);
  listed = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as unknown[];
  assert.equal(listed.length, 3);
  await strataOk(["forget", "--repo", repo, ids[2]!]);
  const left = (
    JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{ id: string }>
  ).map((s) => s.id);
  assert.equal(left.length, 2);
  assert.ok(left.includes(ids[3]!));
  const gone = await strata(["forget", "--repo", repo, ids[0]!]);
  assert.equal(gone.code, 1);
  assert.match(gone.stderr, /no restore point/);

  // One pack per version (vm2's backup stored nothing new): three of them are no longer needed.
  assert.equal(storedFiles(repo).length, 4);
  const before = storedBytes(repo);
  const first = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"]));
  assert.equal(first.packsCondemned, 3, "the three removed versions' packs");
  assert.equal(first.packsDeleted, 0);
  assert.equal(first.chunksRemoved, 0, "condemned packs stay until a later gc");
  assert.equal(first.bytesFreed, 0);
  assert.equal(first.chunksReferenced, 4);
  assert.equal(storedBytes(repo), before, "the first gc frees nothing yet");
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"])).ok, true);

  const gc = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"]));
  assert.equal(gc.packsDeleted, 3);
  assert.equal(gc.packsCondemned, 0);
  assert.equal(gc.chunksRemoved, 12, "the three removed versions' chunks");
  assert.equal(gc.chunksReferenced, 4);
  assert.ok(Number(gc.bytesFreed) > 12 * 65536, `bytes freed: ${String(gc.bytesFreed)}`);
  assert.equal(storedBytes(repo), before - Number(gc.bytesFreed), "the second gc frees the space");
  assert.equal(storedFiles(repo).length, 1);
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"])).ok, true);
});
