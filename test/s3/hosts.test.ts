// Several writers on one bucket, no shared file system: two strata processes on two "hosts"
// (their own UTS namespaces, so their own host names) back up into one S3 repository while a
// third host runs gc again and again. The backups reuse chunks of a forgotten restore point,
// whose packs gc wants to condemn; afterwards every restore point verifies and restores
// bit-exact, also after more gc runs.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { basename, join } from "node:path";
import { test } from "node:test";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { Lock } from "../../src/repo/locks.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { systemClock } from "../../src/util/clock.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { createBucket, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { collect, type RunOptions, startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";

const gateway = gatewayForFile();

const MiB = 1024 * 1024;

/** Runs strata as if on host `name`: a UTS namespace of its own with that host name. */
function on(name: string): RunOptions {
  return {
    env: gatewayEnv(gateway()),
    prefix: ["unshare", "--uts", "sh", "-c", `hostname ${name} && exec "$@"`, "sh"],
  };
}

test("two hosts back up into one bucket while a third runs gc: everything verifies and restores", async (t) => {
  const dir = tempDir(t);
  const repo = `s3:${gateway().endpoint}/${await createBucket(gateway())}`;
  const a = join(dir, "a.img");
  const b = join(dir, "b.img");
  await writeSyntheticImage(a, { size: 48 * MiB, seed: "host-a", holes: 0 });
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], on("host-a"));
  const old = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${a}`], on("host-a")),
  );
  await strataOk(["forget", "--repo", repo, old.id as string], on("host-c"));
  // b shares its first half with a: both backups reuse chunks of the forgotten restore point
  // first, then upload 64 MiB of new data each, so that gc usually marks before they commit.
  await fs.copyFile(a, b);
  const { randomBytes } = await import("node:crypto");
  const fb = await fs.open(b, "r+");
  await fb.write(randomBytes(24 * MiB), 0, 24 * MiB, 24 * MiB);
  await fb.write(randomBytes(64 * MiB), 0, 64 * MiB, 48 * MiB);
  await fb.close();
  const fa = await fs.open(a, "r+");
  await fa.write(randomBytes(64 * MiB), 0, 64 * MiB, 48 * MiB);
  await fa.close();

  const runA = collect(
    startStrata(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${a}`], on("host-a")),
  );
  const runB = collect(
    startStrata(["backup", "--repo", repo, "--vm", "vm2", "--json", `file:${b}`], on("host-b")),
  );
  let done = false;
  const both = Promise.all([runA.result, runB.result]).finally(() => {
    done = true;
  });
  let gcRuns = 0;
  const seen = { condemned: 0, waiting: 0 };
  while (!done) {
    const r = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], on("host-c")));
    seen.condemned += Number(r.packsCondemned ?? 0);
    seen.waiting += Number(r.packsWaiting ?? 0);
    gcRuns++;
    if (gcRuns > 200) assert.fail(`gc ran 200 times; last: ${JSON.stringify(r)}`);
  }
  const [ra, rb] = await both;
  assert.equal(ra.code, 0, ra.stderr);
  assert.equal(rb.code, 0, rb.stderr);
  assert.ok(gcRuns >= 1, "gc ran while the backups did");

  const check = async (label: string) => {
    assert.equal(
      summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"], on("host-c"))).ok,
      true,
      label,
    );
    for (const [vm, img] of [
      ["vm1", a],
      ["vm2", b],
    ] as const) {
      const out = join(dir, `${label}-${vm}`);
      await strataOk(["restore", "--repo", repo, `${vm}/latest`, "--target", out], on("host-c"));
      assert.equal(
        await sha256File(join(out, `${basename(img, ".img")}.raw`)),
        await sha256File(img),
        `${label}: ${vm} bit-exact`,
      );
      await fs.rm(out, { recursive: true });
    }
  };
  await check("after the concurrent run");
  for (let i = 0; i < 2; i++) await strataOk(["gc", "--repo", repo, "--grace", "0s"], on("host-c"));
  await check("after two more gc runs");
  // Whether a gc marked before a backup committed depends on timing: reported, not asserted.
  console.log(`gc ran ${gcRuns} times beside the two backups: ${JSON.stringify(seen)}`);
});

test("another host's lock on S3 holds while refreshed and is taken for dead once not refreshed for 30 min", async () => {
  const store = new S3Store(parseS3Url(`s3:${gateway().endpoint}/${await createBucket(gateway())}`), {
    credentials: { accessKeyId: gateway().accessKeyId, secretAccessKey: gateway().secretAccessKey },
  });
  const theirs = (minutesAgo: number) => {
    const at = Date.now() - minutesAgo * 60_000;
    return Buffer.from(
      JSON.stringify({
        id: "elsewhere-1",
        kind: "exclusive",
        host: "host-elsewhere",
        // A PID alive here: on another host it must not count.
        pid: process.pid,
        pidStart: "1",
        started: at,
        refreshed: at,
        what: "gc on host-elsewhere",
      }),
    );
  };
  await store.put("locks/elsewhere-1", theirs(1));
  await assert.rejects(
    Lock.acquire(store, systemClock, "exclusive", "gc"),
    (e) => e instanceof StrataError && e.code === ErrorCode.LOCKED && /host-elsewhere/.test(e.message),
  );
  await store.put("locks/elsewhere-1", theirs(31));
  const mine = await Lock.acquire(store, systemClock, "exclusive", "gc");
  assert.equal(await store.stat("locks/elsewhere-1"), undefined, "the dead host's lock is removed");
  await mine.release();
  assert.equal(await store.stat(`locks/${mine.info.id}`), undefined);
});
