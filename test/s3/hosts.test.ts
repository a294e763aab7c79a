// Several writers on one bucket, no shared file system: two strata processes on two "hosts"
// (their own UTS namespaces, so their own host names) back up into one S3 repository while a
// third host runs gc again and again. The backups reuse chunks of a forgotten restore point,
// whose packs gc wants to condemn; afterwards every restore point verifies and restores
// bit-exact, also after more gc runs.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { basename, join } from "node:path";
import { after, before, test } from "node:test";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { createBucket, type Gateway, gatewayEnv, processesUsing, startGateway } from "../helpers/ceph.js";
import { collect, type RunOptions, startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";

let gw: Gateway;
before(async () => {
  gw = await startGateway();
});
after(async () => {
  await gw.stop();
  assert.deepEqual(await processesUsing(gw.dir), [], "nothing of the cluster is left running");
});

const MiB = 1024 * 1024;

/** Runs strata as if on host `name`: a UTS namespace of its own with that host name. */
function on(name: string): RunOptions {
  return {
    env: gatewayEnv(gw),
    prefix: ["unshare", "--uts", "sh", "-c", `hostname ${name} && exec "$@"`, "sh"],
  };
}

test("two hosts back up into one bucket while a third runs gc: everything verifies and restores", async (t) => {
  const dir = tempDir(t);
  const repo = `s3:${gw.endpoint}/${await createBucket(gw)}`;
  const a = join(dir, "a.img");
  const b = join(dir, "b.img");
  await writeSyntheticImage(a, { size: 48 * MiB, seed: "host-a", holes: 0 });
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], on("host-a"));
  const old = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${a}`], on("host-a")),
  );
  await strataOk(["forget", "--repo", repo, old.id as string], on("host-c"));
  // b shares its first half with a: both backups reuse chunks of the forgotten restore point.
  await fs.copyFile(a, b);
  const fh = await fs.open(b, "r+");
  const { randomBytes } = await import("node:crypto");
  await fh.write(randomBytes(24 * MiB), 0, 24 * MiB, 24 * MiB);
  await fh.close();

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
  assert.ok(seen.condemned > 0, "gc condemned the forgotten restore point's packs, which the backups reuse");

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
  console.log(`gc ran ${gcRuns} times beside the two backups: ${JSON.stringify(seen)}`);
});
