// strata verify --read-data-subset N/T through the CLI: the two halves read every chunk once;
// a malformed part and --read-data beside it are usage errors (exit 2) naming what is wrong.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { writeFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

test("verify --read-data-subset: halves read every chunk once; bad parts refused", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const image = join(dir, "disk.img");
  writeFileSync(image, randomBytes(4 << 20));
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  await strataOk(["backup", "--repo", repo, "--vm", "v", `file:${image}`]);
  let read = 0;
  for (const part of ["1/2", "2/2"]) {
    const s = summary<{ ok: boolean; chunksChecked: number; chunksRead: number }>(
      await strataOk(["verify", "--repo", repo, "--read-data-subset", part, "--json"]),
    );
    assert.equal(s.ok, true);
    assert.equal(s.chunksChecked, 16);
    read += s.chunksRead;
  }
  assert.equal(read, 16);
  const text = await strataOk(["verify", "--repo", repo, "--read-data-subset", "1/2"]);
  assert.match(text.stdout, /16 chunks checked, \d+ of them read \(part 1\/2\)/);
  const bad = await strata(["verify", "--repo", repo, "--read-data-subset", "3/2"]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /"3\/2" is not a part of the chunks: give N\/T/);
  const both = await strata(["verify", "--repo", repo, "--read-data", "--read-data-subset", "1/2"]);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /--read-data reads every chunk: leave out --read-data-subset/);
});
