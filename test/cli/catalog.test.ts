// strata catalog rebuild: restore-point rows recreated from a real repository's manifests, in a
// real SQLite file; a catalog file that is not one is refused, naming it.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { createRequire } from "node:module";
import { join } from "node:path";
import { test } from "node:test";
import type BetterSqlite3 from "better-sqlite3";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const Database = createRequire(import.meta.url)("better-sqlite3") as typeof BetterSqlite3;

async function backup(repo: string, vm: string, image: string): Promise<string> {
  const b = summary(await strataOk(["backup", "--repo", repo, "--vm", vm, "--json", `file:${image}`]));
  return b.id as string;
}

test("catalog rebuild recreates restore points from the manifests, adding and removing rows", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const catalog = join(dir, "var", "catalog.db");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const img = join(dir, "disk.img");
  await fs.writeFile(img, Buffer.alloc(256 * 1024, 7));
  const a = await backup(repo, "web1", img);
  await new Promise((r) => setTimeout(r, 1100)); // restore-point times have one-second resolution
  await fs.appendFile(img, Buffer.alloc(64 * 1024, 9));
  const b = await backup(repo, "web1", img);
  const c = await backup(repo, "db1", img);

  const first = summary(
    await strataOk(["catalog", "rebuild", "--repo", repo, "--catalog", catalog, "--json"]),
  );
  assert.deepEqual([first.restorePoints, first.vms, first.added, first.removed, first.kept], [3, 2, 3, 0, 0]);
  const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
    id: string;
    size: number;
    bytesNew: number;
    consistency: string;
  }>;
  const rows = () => {
    const db = new Database(catalog, { readonly: true });
    try {
      return db
        .prepare("SELECT vm, time, size, bytes_new, consistency, disks FROM restore_points ORDER BY vm, time")
        .all() as Array<{
        vm: string;
        time: string;
        size: number;
        bytes_new: number;
        consistency: string;
        disks: number;
      }>;
    } finally {
      db.close();
    }
  };
  const got = rows();
  assert.deepEqual(
    got.map((r) => `${r.vm}/${r.time}`),
    [c, a, b],
  );
  for (const r of got) {
    const s = snaps.find((x) => x.id === `${r.vm}/${r.time}`)!;
    assert.deepEqual([r.size, r.bytes_new, r.consistency, r.disks], [s.size, s.bytesNew, s.consistency, 1]);
  }

  // A restore point forgotten by hand disappears from the catalog at the next rebuild.
  await strataOk(["forget", "--repo", repo, a]);
  const second = summary(
    await strataOk(["catalog", "rebuild", "--repo", repo, "--catalog", catalog, "--json"]),
  );
  assert.deepEqual([second.added, second.removed, second.kept], [0, 1, 2]);
  assert.deepEqual(
    rows().map((r) => `${r.vm}/${r.time}`),
    [c, b],
  );

  // STRATA_CATALOG names the file too; text output says what happened.
  const text = await strataOk(["catalog", "rebuild", "--repo", repo], { env: { STRATA_CATALOG: catalog } });
  assert.match(text.stdout, /2 restore points of 2 VM\(s\)/);
  assert.match(text.stdout, /0 added, 0 removed, 2 unchanged/);
});

test("a catalog file that is not a database is refused, naming the file, and left untouched", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo]);
  const catalog = join(dir, "catalog.db");
  const garbage = "#!/bin/sh\necho this is a script, not a catalog\n".repeat(50);
  await fs.writeFile(catalog, garbage);
  const r = await strata(["catalog", "rebuild", "--repo", repo, "--catalog", catalog]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(
    r.stderr,
    new RegExp(`catalog ${catalog.replace(/[.*+?^${}()|[\]\\/]/g, "\\$&")} is not an SQLite database`),
  );
  assert.equal(await fs.readFile(catalog, "utf8"), garbage);
  const j = await strata(["catalog", "rebuild", "--repo", repo, "--catalog", catalog, "--json"]);
  assert.equal(JSON.parse(j.stderr.trim()).code, "CATALOG_CORRUPT");
});
