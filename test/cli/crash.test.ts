// kill -9 at several moments of a backup: no half restore point ever shows, the repository stays
// consistent, the next backup works, and gc clears what the dead run left.
import assert from "node:assert/strict";
import { existsSync, promises as fs, readdirSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fillContent, Prng, sha256File } from "../../src/image/synthetic.js";
import { startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";

function countChunks(repo: string): number {
  const dir = join(repo, "chunks");
  if (!existsSync(dir)) return 0;
  let n = 0;
  for (const d of readdirSync(dir)) n += readdirSync(join(dir, d)).length;
  return n;
}

async function waitFor(cond: () => boolean, what: string, ms = 30_000): Promise<void> {
  const end = Date.now() + ms;
  while (!cond()) {
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await sleep(5);
  }
}

test("kill -9 mid-backup leaves a consistent repository", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const img = join(dir, "disk.img");
  const size = 96 * 1024 * 1024;
  const buf = Buffer.alloc(size);
  fillContent(buf, "random", new Prng("crash"));
  await fs.writeFile(img, buf);
  const first = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  // New content for the killed runs, so they have chunks to write.
  fillContent(buf, "random", new Prng("crash 2"));
  await fs.writeFile(img, buf);
  const base = countChunks(repo);

  const killPoints: Array<[string, () => boolean]> = [
    ["lock taken", () => existsSync(join(repo, "locks")) && readdirSync(join(repo, "locks")).length > 0],
    ["some chunks written", () => countChunks(repo) >= base + 100],
    ["most chunks written", () => countChunks(repo) >= base + 1200],
  ];
  for (const [label, cond] of killPoints) {
    const child = startStrata(["backup", "--repo", repo, "--vm", "vm1", `file:${img}`]);
    const exited = new Promise((r) => child.on("exit", r));
    await waitFor(cond, label);
    child.kill("SIGKILL");
    await exited;
    const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
      id: string;
    }>;
    assert.deepEqual(
      snaps.map((s) => s.id),
      [first.id],
      `after kill at "${label}" only the complete restore point shows`,
    );
    const v = summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"]));
    assert.equal(v.ok, true, label);
  }
  // The dead runs' locks don't block anything: their PIDs are gone.
  const next = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  assert.equal(next.parent, first.time);
  const gc = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"]));
  // The killed runs' chunks are the same content the last backup stored: reused, so all in use.
  assert.equal(gc.chunksReferenced, countChunks(repo));
  assert.equal(readdirSync(join(repo, "locks")).length, 0, "stale locks are gone");
  const folders = readdirSync(join(repo, "vms", "vm1")).sort();
  assert.deepEqual(folders, [first.time, next.time].sort());
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out]);
  assert.equal(await sha256File(join(out, "disk.raw")), await sha256File(img));
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"])).ok, true);
});
