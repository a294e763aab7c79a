// What a restore or a backup reads before its first chunk: "VM/latest" (and a backup's parent)
// reads the newest restore point's manifest and no other (the next older one when that is
// damaged, for a backup), and prepareReads() has the pack index on its way while the restore
// point is being found, read once for the whole restore.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import type { Store } from "../../src/repo/store.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";

const CHUNK = 64 * 1024;

/** `inner`, with the key of every get recorded in `gets`. */
function recording(inner: Store): { store: Store; gets: string[] } {
  const gets: string[] = [];
  const store = new Proxy(inner, {
    get(target, prop, receiver) {
      const value = Reflect.get(target, prop, receiver);
      if (typeof value !== "function") return value;
      if (prop === "get")
        return (key: string) => {
          gets.push(key);
          return target.get(key);
        };
      return value.bind(target);
    },
  });
  return { store, gets };
}

async function repoWithPoints(t: TestContext, points: number) {
  const dir = tempDir(t, "strata-read-start-");
  const { store, gets } = recording(new FsStore(join(dir, "repo")));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  const times: string[] = [];
  for (let i = 0; i < points; i++) {
    const data = Buffer.alloc(CHUNK * 8);
    fillContent(data, "random", new Prng(`point ${i}`));
    const r = await backup(repo, {
      vm: "vm1",
      disks: [memoryDisk(data)],
      mode: "file",
      consistency: "crash-consistent",
    });
    times.push(r.id.split("/")[1]!);
  }
  return { dir, repo, gets, times };
}

async function restoredBytes(repo: Repository, id: string, dir: string): Promise<Buffer> {
  const out = join(dir, "restored.raw");
  await restoreDiskToFile(repo, await repo.findSnapshot(id), "disk", out, { force: true });
  return fs.readFile(out);
}

const manifests = (gets: string[]) => gets.filter((k) => k.endsWith("/manifest.json"));

test("VM/latest reads the newest manifest only, and finds it past a damaged older one", async (t) => {
  const { dir, repo, gets, times } = await repoWithPoints(t, 3);
  await fs.writeFile(join(dir, "repo", "vms", "vm1", times[0]!, "manifest.json"), "damaged");
  gets.length = 0;
  const snap = await repo.findSnapshot("vm1/latest");
  assert.equal(snap.time, times[2]);
  assert.deepEqual(manifests(gets), [`vms/vm1/${times[2]}/manifest.json`]);
  // Listing every restore point still reads (and checks) them all.
  await assert.rejects(repo.snapshots("vm1"), /manifest of vm1\/.* is damaged/);
});

test("VM/latest names a damaged newest manifest instead of falling back to an older point", async (t) => {
  const { dir, repo, times } = await repoWithPoints(t, 2);
  await fs.writeFile(join(dir, "repo", "vms", "vm1", times[1]!, "manifest.json"), "damaged");
  await assert.rejects(repo.findSnapshot("vm1/latest"), new RegExp(`manifest of vm1/${times[1]} is damaged`));
});

test("the newest intact restore point: damaged newer ones are reported and passed over", async (t) => {
  const { dir, repo, gets, times } = await repoWithPoints(t, 3);
  await fs.writeFile(join(dir, "repo", "vms", "vm1", times[2]!, "manifest.json"), "damaged");
  gets.length = 0;
  const damaged: string[] = [];
  const snap = await repo.latestSnapshot("vm1", (vm, time) => damaged.push(`${vm}/${time}`));
  assert.equal(snap?.time, times[1]);
  assert.deepEqual(damaged, [`vm1/${times[2]}`]);
  // Newest first, and no further than the first intact one.
  assert.deepEqual(manifests(gets), [
    `vms/vm1/${times[2]}/manifest.json`,
    `vms/vm1/${times[1]}/manifest.json`,
  ]);
  await assert.rejects(repo.latestSnapshot("vm1"), /is damaged/);
  assert.equal(await repo.latestSnapshot("vm2"), undefined);
  // A backup's parent is that restore point: its next backup reads only what changed since.
  const next = await backup(repo, {
    vm: "vm1",
    disks: [memoryDisk(await restoredBytes(repo, `vm1/${times[1]}`, dir))],
    mode: "file",
    consistency: "crash-consistent",
  });
  assert.equal(next.manifest.parent, times[1]);
});

test("prepareReads starts reading the pack index before the restore asks, and it is read once", async (t) => {
  const { dir, gets } = await repoWithPoints(t, 1);
  // A repository opened afresh, as a restore command opens it.
  const { store, gets: fresh } = recording(new FsStore(join(dir, "repo")));
  const reader = await Repository.open(store, { threads: 1 });
  t.after(() => reader.close());
  const packIndexes = () => fresh.filter((k) => k.startsWith("index/")).length;
  assert.equal(packIndexes(), 0);
  reader.prepareReads();
  const until = Date.now() + 5000;
  while (packIndexes() === 0 && Date.now() < until) await new Promise((r) => setTimeout(r, 5));
  assert.ok(packIndexes() > 0, "the pack index was not read after prepareReads()");
  const loaded = packIndexes();
  const out = join(dir, "out.raw");
  await restoreDiskToFile(reader, await reader.findSnapshot("vm1/latest"), "disk", out);
  assert.equal(packIndexes(), loaded, "the restore read the pack index again");
  assert.equal((await fs.stat(out)).size, CHUNK * 8);
  assert.ok(gets.length > 0);
});
