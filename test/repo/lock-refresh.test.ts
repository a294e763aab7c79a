// A backup whose lock can no longer be refreshed stops: after 30 minutes without a refresh,
// another host's gc takes a lock for dead and would sweep chunks the backup still counts on.
// The backup is held at a gate while its lock goes bad (the locks folder made read-only with a
// bind mount, since the tests run as root; or the lock object removed, as a gc that judged it
// stale would), then let go: it fails with LOCK_LOST and leaves no restore point.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { runProgram } from "../../src/util/process.js";
import { tempDir } from "../helpers/cli.js";
import { gatedDisk } from "../helpers/disks.js";

const CHUNK = 64 * 1024;
const CHUNKS = 16;
const REFRESH_MS = 100;

/** A disk of random data whose reads from chunk `gateAt` on wait until the gate opens. */
function lockedDisk(gateAt: number) {
  const data = Buffer.alloc(CHUNK * CHUNKS);
  fillContent(data, "random", new Prng("lock refresh"));
  return gatedDisk(data, gateAt * CHUNK);
}

/** Runs `fn` until it stops failing with "busy" (a file briefly open in the mount), up to 5 s. */
async function retryBusy(fn: () => Promise<unknown>): Promise<void> {
  for (let i = 0; ; i++) {
    try {
      await fn();
      return;
    } catch (err) {
      if (i >= 100 || !/busy/i.test(String(err))) throw err;
      await new Promise((r) => setTimeout(r, 50));
    }
  }
}

for (const how of ["the locks folder becomes read-only", "the lock object is removed"] as const) {
  test(`a backup stops with LOCK_LOST when ${how}, and leaves no restore point`, async (t) => {
    const dir = tempDir(t);
    const root = join(dir, "repo");
    const store = new FsStore(root);
    await Repository.init(store, { chunkSize: CHUNK });
    const repo = await Repository.open(store, { threads: 1, lockRefreshMs: REFRESH_MS });
    t.after(() => repo.close());
    const g = lockedDisk(CHUNKS / 2);
    const running = backup(repo, {
      vm: "vm1",
      disks: [g.disk],
      mode: "file",
      consistency: "crash-consistent",
      inflight: 1,
    });
    running.catch(() => {});
    await g.atGate;
    const locks = join(root, "locks");
    const [lockFile] = await fs.readdir(locks);
    assert.ok(lockFile, "the backup holds a lock");
    let mounted = false;
    try {
      if (how === "the locks folder becomes read-only") {
        await runProgram("mount", ["--bind", locks, locks]);
        mounted = true;
        // EBUSY while a refresh has a file open for writing in it: try again.
        await retryBusy(() => runProgram("mount", ["-o", "remount,bind,ro", locks]));
      } else {
        // A refresh between its check and its write puts the object back once: remove it until
        // it stays gone for two refresh periods.
        const path = join(locks, lockFile);
        let goneSince = Date.now();
        await fs.rm(path);
        while (Date.now() - goneSince < REFRESH_MS * 2) {
          await new Promise((r) => setTimeout(r, REFRESH_MS / 4));
          const back = await fs.access(path).then(
            () => true,
            () => false,
          );
          if (back) {
            await fs.rm(path, { force: true });
            goneSince = Date.now();
          }
        }
      }
      // A few refresh periods: the failure is noticed by the timer, not by luck.
      await new Promise((r) => setTimeout(r, REFRESH_MS * 4));
      g.open();
      await assert.rejects(running, (err: Error & { code?: string }) => {
        assert.equal(err.code, "LOCK_LOST");
        assert.match(
          err.message,
          /lost the repository lock of backup .*vm1.*stopping, since another host's gc could now take it for dead/,
        );
        assert.match(
          err.message,
          how === "the locks folder becomes read-only" ? /read-only filesystem/ : /lock object was removed/,
        );
        return true;
      });
    } finally {
      if (mounted) await retryBusy(() => runProgram("umount", [locks]));
    }
    // Nothing half-visible: no restore point, no index or folder of one.
    assert.deepEqual(await repo.snapshots(), []);
    const vmDir = join(root, "vms", "vm1");
    const left = await fs.readdir(vmDir).catch(() => []);
    for (const d of left) assert.deepEqual(await fs.readdir(join(vmDir, d)), [], `vms/vm1/${d} is empty`);
  });
}
