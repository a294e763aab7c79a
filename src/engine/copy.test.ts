// copySnapshots in-process on local repositories: format 1 (SHA-256 names) into format 2 (BLAKE3
// names) gives the same bytes under new names; a copy stopped mid-way (its signal aborted after
// some packs were checkpointed) leaves no restore point, and the rerun sends only what the
// stopped one had not made findable; a copy keeps chunk names where both repositories name
// chunks alike.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { FsStore } from "../repo/fs-store.js";
import { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { backup, type DiskSource } from "./backup.js";
import { copySnapshots, sameChunkNames } from "./copy.js";

const CHUNK = 64 * 1024;

function memoryDisk(name: string, data: Buffer): DiskSource {
  return {
    name,
    source: `memory:${name}`,
    size: data.length,
    read: async (offset, length) => Buffer.from(data.subarray(offset, offset + length)),
  };
}

async function repoAt(
  t: { after: (fn: () => void) => void },
  init: Parameters<typeof Repository.init>[1],
  open: Parameters<typeof Repository.open>[1] = {},
): Promise<Repository> {
  const dir = mkdtempSync(join(tmpdir(), "strata-copy-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  await Repository.init(new FsStore(dir), { chunkSize: CHUNK, kdfCost: { N: 1024, r: 8, p: 1 }, ...init });
  const repo = await Repository.open(new FsStore(dir), { threads: 1, ...open });
  t.after(() => void repo.close());
  return repo;
}

/** The disk's bytes as the repository restores them (every chunk verified). */
async function restored(repo: Repository, vm: string, disk: string): Promise<Buffer> {
  const snap = (await repo.snapshots(vm)).at(-1)!;
  const index = await repo.index(snap, disk);
  const out = Buffer.alloc(index.size);
  for (let i = 0; i < index.count; i++)
    if (!index.isZero(i)) (await repo.readChunk(index.digest(i))).copy(out, i * CHUNK);
  return out;
}

test("format 1 into format 2: same bytes under new names; names kept where they agree", async (t) => {
  const v1 = await repoAt(t, { formatVersion: 1 });
  const v2 = await repoAt(t, {});
  const v2b = await repoAt(t, {});
  const data = Buffer.concat([randomBytes(20 * CHUNK), Buffer.alloc(4 * CHUNK), randomBytes(CHUNK / 2)]);
  await backup(v1, {
    vm: "vm1",
    disks: [memoryDisk("d", data)],
    mode: "file",
    consistency: "crash-consistent",
  });
  assert.equal(sameChunkNames(v1, v2), false);
  assert.equal(sameChunkNames(v2, v2b), true);
  const r = await copySnapshots(v1, v2, await v1.snapshots());
  assert.equal(r.renamed, true);
  assert.equal(r.chunksSent, 21);
  assert.equal(r.points[0]!.chunksZero, 4);
  assert.deepEqual(await restored(v2, "vm1", "d"), data);
  const [a] = await v1.snapshots();
  const [b] = await v2.snapshots();
  assert.notDeepEqual((await v1.index(a!, "d")).digest(0), (await v2.index(b!, "d")).digest(0));
  assert.equal(b!.manifest.host, a!.manifest.host, "the restore point keeps its host");
  const r2 = await copySnapshots(v2, v2b, await v2.snapshots());
  assert.equal(r2.renamed, false);
  assert.deepEqual(
    (await v2b.index((await v2b.snapshots())[0]!, "d")).digest(0),
    (await v2.index(b!, "d")).digest(0),
  );
});

test("a copy stopped mid-way leaves no restore point; the rerun sends only what was not findable", async (t) => {
  const from = await repoAt(t, {});
  // Small packs, so that several are stored and checkpointed before the stop.
  const to = await repoAt(t, { password: "target" }, { password: "target", packTarget: 4 * CHUNK });
  const data = randomBytes(64 * CHUNK);
  await backup(from, {
    vm: "vm1",
    disks: [memoryDisk("d", data)],
    mode: "file",
    consistency: "crash-consistent",
  });
  const ac = new AbortController();
  let seen = 0;
  const stopped = copySnapshots(from, to, await from.snapshots(), {
    signal: ac.signal,
    inflight: 2,
    checkpointMs: 0,
    progress: {
      emit: (e) => {
        if (e.type === "progress" && ++seen === 40) ac.abort(new StrataError(ErrorCode.ABORTED, "stopped"));
      },
    },
  });
  await assert.rejects(stopped, /stopped/);
  assert.deepEqual(await to.snapshots(), [], "no partial restore point");
  const rerun = await copySnapshots(from, to, await from.snapshots(), { inflight: 2 });
  assert.equal(rerun.chunksSent + rerun.chunksPresent, 64);
  assert.ok(rerun.chunksPresent >= 24, `found ${rerun.chunksPresent} chunks the stopped copy stored`);
  assert.deepEqual(await restored(to, "vm1", "d"), data);
  const again = await copySnapshots(from, to, await from.snapshots());
  assert.equal(again.present, 1);
  assert.equal(again.chunksSent, 0);
});
