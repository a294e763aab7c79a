// kill -9 of a backup uploading to S3 (a real RADOS Gateway): only complete restore points show,
// verify --read-data passes, the next backup finishes the work (the dead run's lock does not
// block it), and gc removes the packs the killed run left and its lock. Multipart uploads a dead
// writer left open are aborted by gc's sweep. kill -9 of gc (condemning, repacking, deleting) at
// instants spread over its work: every restore point stays and restores bit-exact, and the next
// runs finish the work (every pack left is named by the index, nothing left to do).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { CreateMultipartUploadCommand, S3Client, UploadPartCommand } from "@aws-sdk/client-s3";
import { fillContent, Prng, sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { loadPackIndex } from "../../src/repo/layout.js";
import { Repository } from "../../src/repo/repository.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { createBucket, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { pastGcTimeSlack } from "../helpers/stored.js";

const gateway = gatewayForFile();

const MiB = 1024 * 1024;

async function keys(store: S3Store, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of store.list(prefix)) out.push(o.key);
  return out.sort();
}

test("kill -9 during a backup's uploads: only complete restore points, the next run and gc finish", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const bucket = await createBucket(gateway());
  const repo = `s3:${gateway().endpoint}/${bucket}/r`;
  const store = new S3Store(parseS3Url(repo), {
    credentials: { accessKeyId: gateway().accessKeyId, secretAccessKey: gateway().secretAccessKey },
  });
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], env);
  const img = join(dir, "disk.img");
  await writeSyntheticImage(img, { size: 32 * MiB, seed: "kill-a", holes: 0 });
  const first = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  const packsBefore = await keys(store, "packs/");
  // Large enough that the run is still uploading when the kill lands (96 MiB once finished
  // between the check for its second pack and the kill).
  await writeSyntheticImage(img, { size: 256 * MiB, seed: "kill-b", holes: 0 });

  const child = startStrata(["backup", "--repo", repo, "--vm", "vm1", `file:${img}`], env);
  const exited = new Promise((r) => child.on("exit", r));
  const deadline = Date.now() + 60_000;
  while ((await keys(store, "packs/")).length < packsBefore.length + 2) {
    assert.ok(Date.now() < deadline, "the backup uploaded no pack within 60 s");
    await new Promise((r) => setTimeout(r, 20));
  }
  child.kill("SIGKILL");
  await exited;
  assert.equal(child.signalCode, "SIGKILL", "the backup was killed, not finished");
  const left = (await keys(store, "packs/")).filter((k) => !packsBefore.includes(k));
  assert.ok(left.length >= 2, `packs the killed run left: ${left.length}`);
  assert.equal((await keys(store, "locks/")).length, 1, "the killed run's lock is left");

  const snaps = summary<{ id: string }[]>(await strataOk(["snapshots", "--repo", repo, "--json"], env));
  assert.deepEqual(
    snaps.map((s) => s.id),
    [first.id],
    "only the complete restore point shows",
  );
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"], env)).ok, true);

  const next = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  assert.equal(next.parent, first.time);
  await pastGcTimeSlack();
  const gc = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env));
  assert.equal(gc.orphansDeleted, left.length, "every pack the killed run left is deleted");
  for (const k of left) assert.equal(await store.stat(k), undefined, `${k} is gone`);
  assert.deepEqual(await keys(store, "locks/"), [], "the dead run's lock is gone");
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out], env);
  assert.equal(await sha256File(join(out, "disk.raw")), await sha256File(img));
});

test("a multipart upload left open by a dead writer is aborted by the sweep, a recent one kept", async () => {
  const bucket = await createBucket(gateway());
  const credentials = { accessKeyId: gateway().accessKeyId, secretAccessKey: gateway().secretAccessKey };
  const store = new S3Store(parseS3Url(`s3:${gateway().endpoint}/${bucket}/r`), { credentials });
  const client = new S3Client({
    endpoint: gateway().endpoint,
    region: "us-east-1",
    forcePathStyle: true,
    credentials,
  });
  const open = await client.send(
    new CreateMultipartUploadCommand({ Bucket: bucket, Key: "r/packs/aa/dead" }),
  );
  await client.send(
    new UploadPartCommand({
      Bucket: bucket,
      Key: "r/packs/aa/dead",
      UploadId: open.UploadId,
      PartNumber: 1,
      Body: randomBytes(5 * MiB),
    }),
  );
  client.destroy();
  assert.equal(await store.stat("packs/aa/dead"), undefined, "a part uploaded is no object");
  assert.equal(await store.sweepTemporary(Date.now() - 3_600_000), 0, "younger than the cutoff: kept");
  assert.equal(await store.sweepTemporary(Date.now() + 60_000), 1, "older than the cutoff: aborted");
  assert.equal(await store.sweepTemporary(Date.now() + 60_000), 0);
});

test("kill -9 during gc on S3: only complete restore points, nothing lost, the next runs finish", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const repo = `s3:${gateway().endpoint}/${await createBucket(gateway())}/gc`;
  const store = new S3Store(parseS3Url(repo), {
    credentials: { accessKeyId: gateway().accessKeyId, secretAccessKey: gateway().secretAccessKey },
  });
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], env);
  const CHUNK = 256 * 1024;
  const SIZE = 24 * MiB;
  const img = join(dir, "disk.img");
  const disk = Buffer.alloc(SIZE);
  fillContent(disk, "random", new Prng("gc kill base"));
  const expected = new Map<string, string>();
  let version = 0;
  /** A restore point in which three chunks of four changed; older ones forgotten: garbage for gc. */
  const makeGarbage = async () => {
    version++;
    for (let i = 0; i < SIZE / CHUNK; i++)
      if ((i + version) % 4 !== 0)
        fillContent(
          disk.subarray(i * CHUNK, (i + 1) * CHUNK),
          "random",
          new Prng(`gc kill v${version} ${i}`),
        );
    await fs.writeFile(img, disk);
    const b = summary(
      await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
    );
    expected.set(String(b.id), await sha256File(img));
    await strataOk(["forget", "--repo", repo, "--keep-last", "2"], env);
  };
  const snapshots = async () =>
    summary<{ id: string }[]>(await strataOk(["snapshots", "--repo", repo, "--json"], env)).map((s) => s.id);
  const gcArgs = ["gc", "--repo", repo, "--grace", "0s", "--repack-unused", "10", "--json"];
  /** Starts gc; resolves once its lock shows (its work begins), with how to wait for its end. */
  const startGc = async () => {
    const child = startStrata(gcArgs, env);
    const exited = new Promise<void>((r) => child.on("exit", () => r()));
    const deadline = Date.now() + 60_000;
    while ((await keys(store, "locks/")).length === 0 && child.exitCode === null) {
      assert.ok(Date.now() < deadline, "gc took no lock within 60 s");
      await sleep(5);
    }
    return { child, exited, locked: Date.now() };
  };
  await makeGarbage();
  await makeGarbage();
  await makeGarbage();
  // One unkilled run to learn how long gc's work takes, from its lock to its end.
  const measured = await startGc();
  await measured.exited;
  assert.equal(measured.child.exitCode, 0);
  let window = Date.now() - measured.locked;
  t.diagnostic(`unkilled gc: ${window} ms of work`);

  const objects = async () => [...(await keys(store, "packs/")), ...(await keys(store, "index/"))].join("\n");
  // Kills at fractions of the unkilled run's time, and two as soon as the run has changed packs or
  // indexes (its writes come late in its work, and a loaded host stretches the time before them).
  const fractions: Array<number | "changed"> = [0.1, "changed", 0.5, "changed", 0.9];
  let kills = 0;
  let changed = 0;
  let attempts = 0;
  while (kills < fractions.length) {
    assert.ok(attempts++ < 3 * fractions.length, `only ${kills} of ${attempts} gc runs could be killed`);
    await makeGarbage();
    const before = await snapshots();
    const objectsBefore = await objects();
    const run = await startGc();
    const at = fractions[kills]!;
    if (at === "changed") {
      while (run.child.exitCode === null && (await objects()) === objectsBefore) await sleep(2);
    } else await sleep(Math.round(window * at));
    if (run.child.exitCode !== null) {
      assert.equal(run.child.exitCode, 0, "gc ended with an error before it could be killed");
      if (at !== "changed") {
        // It ended sooner than the window allowed for (the machine got less busy): aim earlier.
        window = Math.max(1, Math.min(window, Date.now() - run.locked) * 0.8);
        t.diagnostic(`gc ended before the kill; window now ${Math.round(window)} ms`);
      } else t.diagnostic("gc ended between its first change and the kill");
      continue;
    }
    run.child.kill("SIGKILL");
    await run.exited;
    kills++;
    if ((await objects()) !== objectsBefore) changed++;
    assert.deepEqual(await snapshots(), before, "gc never adds or removes a restore point");
    const v = summary(await strataOk(["verify", "--repo", repo, "--json"], env));
    assert.equal(v.ok, true, `verify after kill ${kills}`);
    const latest = before.at(-1)!;
    const out = join(dir, `out-${kills}`);
    await strataOk(["restore", "--repo", repo, latest, "--target", out], env);
    assert.equal(await sha256File(join(out, "disk.raw")), expected.get(latest), `${latest} after a kill`);
    await fs.rm(out, { recursive: true, force: true });
  }
  t.diagnostic(`${kills} gc runs killed, ${changed} after they had changed packs or indexes`);
  assert.ok(changed >= 1, "at least one kill landed after gc had changed the repository");

  // The next runs finish the work: nothing left to condemn, delete or repack.
  await pastGcTimeSlack();
  await strataOk(gcArgs, env);
  await strataOk(gcArgs, env);
  const last = summary(await strataOk(gcArgs, env));
  assert.equal(last.packsDeleted, 0, JSON.stringify(last));
  assert.equal(last.orphansDeleted, 0, JSON.stringify(last));
  assert.equal(last.packsCondemned, 0, JSON.stringify(last));
  const opened = await Repository.open(store);
  try {
    const index = await loadPackIndex(store, opened.codec());
    const named = new Set([...index.packs.keys()].map((id) => `packs/${id.slice(0, 2)}/${id}`));
    assert.deepEqual(
      (await keys(store, "packs/")).filter((k) => !named.has(k)),
      [],
      "every pack left is named by the index",
    );
  } finally {
    await opened.close();
  }
  assert.deepEqual(await keys(store, "locks/"), [], "no lock is left");
  assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"], env)).ok, true);
  for (const id of await snapshots()) {
    const out = join(dir, "final");
    await strataOk(["restore", "--repo", repo, id, "--target", out], env);
    assert.equal(await sha256File(join(out, "disk.raw")), expected.get(id), `${id} restores bit-exact`);
    await fs.rm(out, { recursive: true, force: true });
  }
});
