// The README's first command runs `strata demo`: its disk cycle and its live VM cycle work.
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { strataOk, summary, tempDir } from "../helpers/cli.js";

test("strata demo: disk backup, verify, restore identical; a demo VM backed up live", {
  timeout: 300_000,
}, async (t) => {
  const dir = tempDir(t);
  const r = await strataOk(["demo", "--dir", join(dir, "demo"), "--size", "64M", "--json"]);
  const s = summary<{ verified: boolean; identical: boolean; vm: string[]; marker: string }>(r);
  assert.equal(s.verified, true);
  assert.equal(s.identical, true);
  assert.equal(s.vm.length, 2);
  assert.equal(s.marker, "written by the test guest at boot");
});
