// kill -9 at several moments of a backup: no half restore point ever shows, the repository stays
// consistent, the next backup works, and gc clears what the dead run left (packs that no index
// names, since a killed backup never stores its index).
import assert from "node:assert/strict";
import { existsSync, promises as fs, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { fillContent, Prng, sha256File } from "../../src/image/synthetic.js";
import { startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { chunkRegions, pastGcTimeSlack, storedBytes, storedFiles } from "../helpers/stored.js";

const MiB = 1024 * 1024;

/** Stored packs that the pack index names. */
async function indexedPacks(repo: string): Promise<string[]> {
  return [...new Set((await chunkRegions(repo)).map((c) => c.path))].sort();
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
  let base = storedBytes(repo);
  assert.deepEqual(await indexedPacks(repo), storedFiles(repo), "the first backup's packs are indexed");

  // Packs of ~16 MiB are stored whole: the 96 MiB of new content make six of them.
  const killPoints: Array<[string, () => boolean]> = [
    ["lock taken", () => existsSync(join(repo, "locks")) && readdirSync(join(repo, "locks")).length > 0],
    ["some chunks written", () => storedBytes(repo) >= base + 1],
    ["most chunks written", () => storedBytes(repo) >= base + 64 * MiB],
  ];
  for (const [label, cond] of killPoints) {
    base = storedBytes(repo);
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
  // The killed runs stored packs but never the index that names them: no backup reuses them.
  const indexed = new Set(await indexedPacks(repo));
  const orphans = storedFiles(repo).filter((f) => !indexed.has(f));
  assert.ok(orphans.length >= 5, `packs left by the killed runs: ${orphans.length}`);
  // The dead runs' locks don't block anything: their PIDs are gone.
  const next = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  assert.equal(next.parent, first.time);
  assert.ok(
    Number(next.chunksNew) >= 1536,
    `the killed runs' chunks are stored again: ${String(next.chunksNew)}`,
  );
  const orphanBytes = orphans.reduce((n, f) => n + statSync(f).size, 0);
  await pastGcTimeSlack();
  const gc = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"]));
  assert.equal(gc.orphansDeleted, orphans.length, "every pack the killed runs left is deleted");
  assert.equal(gc.bytesFreed, orphanBytes);
  for (const f of orphans) assert.equal(existsSync(f), false, `${f} is gone`);
  // What is left is exactly what the index names, and every indexed chunk is in use.
  assert.deepEqual(storedFiles(repo), await indexedPacks(repo));
  assert.equal(gc.chunksReferenced, new Set((await chunkRegions(repo)).map((c) => c.digest)).size);
  assert.equal(readdirSync(join(repo, "locks")).length, 0, "stale locks are gone");
  const folders = readdirSync(join(repo, "vms", "vm1")).sort();
  assert.deepEqual(folders, [first.time, next.time].sort());
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out]);
  assert.equal(await sha256File(join(out, "disk.raw")), await sha256File(img));
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"])).ok, true);
});
