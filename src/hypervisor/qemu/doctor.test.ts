import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { strayFiles } from "./doctor.js";

test("a state file half-rewritten by a killed run is found, and removed with fix", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-doctor-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  writeFileSync(join(dir, "web1.json.tmp-0a1b2c3d"), '{"vm":"web1","items":[');
  writeFileSync(join(dir, "strata-fleece-web1-vda.qcow2"), "");
  const found = await strayFiles(dir, false);
  assert.deepEqual(
    found.map((f) => f.fixed),
    [false, false],
  );
  assert.equal(readdirSync(dir).length, 2);
  const fixed = await strayFiles(dir, true);
  assert.equal(fixed.length, 2);
  assert.ok(fixed.some((f) => f.what.includes("unfinished state file")));
  assert.deepEqual(readdirSync(dir), []);
});
