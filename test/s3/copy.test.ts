// strata copy with an S3 repository (a real Ceph RADOS Gateway) on one side: a local encrypted
// repository copied offsite into a bucket under another password and back into a third
// repository, bit-exact; a second copy that sends nothing (no upload reaches the gateway, counted
// by a proxy in front of it); kill -9 in the middle of a copy (no partial restore point; the rerun
// uploads only the packs that had not landed and verify --read-data passes); the bandwidth limit
// held within 10 %; and gc running on the target beside a copy, which loses nothing.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { createBucket, type Gateway, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { collect, startStrata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { startFaultyProxy } from "../helpers/faulty-proxy.js";

const gateway = gatewayForFile();

const MiB = 1024 * 1024;

interface CopySummary {
  copied: number;
  present: number;
  chunksSent: number;
  bytesSent: number;
  chunksPresent: number;
  renamed: boolean;
  durationMs: number;
}

function storeOf(gw: Gateway, repo: string): S3Store {
  return new S3Store(parseS3Url(repo), {
    credentials: { accessKeyId: gw.accessKeyId, secretAccessKey: gw.secretAccessKey },
  });
}

async function keys(store: S3Store, prefix: string): Promise<string[]> {
  const out: string[] = [];
  for await (const o of store.list(prefix)) out.push(o.key);
  return out.sort();
}

async function restoreSha(repo: string, id: string, dir: string, env: object, pw?: string): Promise<string> {
  const out = join(dir, `out-${Math.random().toString(36).slice(2)}`);
  await strataOk(
    ["restore", "--repo", repo, ...(pw === undefined ? [] : ["--password-file", pw]), id, "--target", out],
    env,
  );
  const sha = await sha256File(join(out, "disk.raw"));
  await fs.rm(out, { recursive: true, force: true });
  return sha;
}

/** A local unencrypted repository with one restore point of `size` bytes of random data. */
async function localSource(dir: string, size: number, seed: string) {
  const repo = join(dir, `src-${seed}`);
  const img = join(dir, `disk-${seed}`, "disk.img");
  await fs.mkdir(join(dir, `disk-${seed}`));
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  // Random: every chunk distinct, none compresses, none all zero.
  await fs.writeFile(img, randomBytes(size));
  const b = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  return { repo, img, id: String(b.id), sha: await sha256File(img) };
}

test("local → S3 under another password and back, bit-exact; a second copy uploads nothing", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const pw1 = join(dir, "pw1");
  const pw2 = join(dir, "pw2");
  await fs.writeFile(pw1, "local secret\n");
  await fs.writeFile(pw2, "offsite secret\n");
  const local = join(dir, "local");
  await strataOk(["init", "--repo", local, "--chunk-size", "256K", "--password-file", pw1]);
  const img = join(dir, "disk.img");
  const sha = await writeSyntheticImage(img, { size: 32 * MiB, seed: "s3-copy", holes: 0.25 });
  const b = summary(
    await strataOk([
      "backup",
      "--repo",
      local,
      "--password-file",
      pw1,
      "--vm",
      "vm1",
      "--json",
      `file:${img}`,
    ]),
  );
  const id = String(b.id);

  const proxy = await startFaultyProxy(gateway().endpoint);
  t.after(() => proxy.close());
  const writes: string[] = [];
  proxy.plan = (_n, method, url) => {
    if (method !== "GET" && method !== "HEAD") writes.push(`${method} ${url}`);
    return undefined;
  };
  const offsite = `s3:${proxy.endpoint}/${await createBucket(gateway())}/offsite`;
  await strataOk(["init", "--repo", offsite, "--chunk-size", "256K", "--password-file", pw2], env);
  const sides = ["--from-password-file", pw1, "--to-password-file", pw2];
  const out = summary<CopySummary>(await strataOk(["copy", local, offsite, ...sides, "--json"], env));
  assert.equal(out.copied, 1);
  assert.equal(out.renamed, true, "different keys: chunks named again");
  assert.ok(out.chunksSent > 0);
  assert.equal(await restoreSha(offsite, id, dir, env, pw2), sha, "bit-exact from the bucket");
  assert.equal(
    summary(
      await strataOk(["verify", "--repo", offsite, "--password-file", pw2, "--read-data", "--json"], env),
    ).ok,
    true,
  );

  writes.length = 0;
  const requests = proxy.requests;
  const again = summary<CopySummary>(await strataOk(["copy", local, offsite, ...sides, "--json"], env));
  assert.equal(again.present, 1);
  assert.equal(again.chunksSent, 0);
  assert.deepEqual(writes, [], "the second copy sent nothing to the gateway");
  t.diagnostic(`second copy: ${proxy.requests - requests} requests, all reads`);

  // And back: S3 → a new local repository with a third password.
  const pw3 = join(dir, "pw3");
  await fs.writeFile(pw3, "third secret\n");
  const back = join(dir, "back");
  await strataOk(["init", "--repo", back, "--chunk-size", "256K", "--password-file", pw3]);
  const home = summary<CopySummary>(
    await strataOk(
      ["copy", offsite, back, "vm1/latest", "--from-password-file", pw2, "--to-password-file", pw3, "--json"],
      env,
    ),
  );
  assert.equal(home.copied, 1);
  assert.equal(await restoreSha(back, id, dir, env, pw3), sha, "bit-exact after the round trip");
});

test("kill -9 during a copy to S3: no partial restore point; the rerun sends only what had not landed", async (t) => {
  const dir = tempDir(t);
  const env = gatewayEnv(gateway());
  const src = await localSource(dir, 96 * MiB, "kill-copy");
  const target = `s3:${gateway().endpoint}/${await createBucket(gateway())}/offsite`;
  await strataOk(["init", "--repo", target, "--chunk-size", "256K"], { env });
  const store = storeOf(gateway(), target);
  // Slow enough to be killed mid-way; a checkpoint every half second.
  const copyEnv = { env: { ...env, STRATA_TEST_COPY_CHECKPOINT_MS: "500" } };
  const child = startStrata(["copy", src.repo, target, "--bandwidth", "16M"], copyEnv);
  const exited = new Promise((r) => child.on("exit", r));
  const deadline = Date.now() + 60_000;
  while ((await keys(store, "index/")).length === 0) {
    assert.ok(Date.now() < deadline, "the copy made no pack findable within 60 s");
    assert.equal(child.exitCode, null, "the copy ended before it could be killed");
    await sleep(50);
  }
  child.kill("SIGKILL");
  await exited;
  assert.equal(child.signalCode, "SIGKILL");
  // A pack whose body had reached the gateway still lands after the kill: wait until the listing
  // holds still, or that pack would count as the rerun's.
  let packsAtKill = await keys(store, "packs/");
  const listed = packsAtKill.length;
  for (;;) {
    await sleep(1000);
    const now = await keys(store, "packs/");
    if (now.join() === packsAtKill.join()) break;
    packsAtKill = now;
  }
  t.diagnostic(`packs stored when killed: ${listed}, once the gateway was done: ${packsAtKill.length}`);
  const snaps = summary<unknown[]>(await strataOk(["snapshots", "--repo", target, "--json"], { env }));
  assert.deepEqual(snaps, [], "no partial restore point shows");

  const rerun = summary<CopySummary>(await strataOk(["copy", src.repo, target, "--json"], { env }));
  assert.equal(rerun.copied, 1);
  assert.ok(rerun.chunksPresent > 0, "the chunks that landed before the kill were not sent again");
  const total = rerun.chunksPresent + rerun.chunksSent;
  assert.equal(total, 96 * 4, "every chunk of the disk is accounted for");
  // What the rerun uploaded: the packs that were not there at the kill, and their bytes. How many
  // packs that is depends on where the kill fell (a checkpoint cuts a pack short), their bytes do not.
  const uploaded: number[] = [];
  for await (const o of store.list("packs/")) if (!packsAtKill.includes(o.key)) uploaded.push(o.size);
  const uploadedBytes = uploaded.reduce((a, b) => a + b, 0);
  t.diagnostic(
    `rerun: ${rerun.chunksSent} chunks sent, ${rerun.chunksPresent} found; packs ${packsAtKill.length} at kill, ${uploaded.length} (${uploadedBytes} B) uploaded by the rerun`,
  );
  // Random data does not compress: each chunk sent is 256 KiB in a pack, plus its header and the
  // pack's index, well under 1 %.
  assert.ok(
    uploadedBytes >= rerun.chunksSent * 256 * 1024,
    "every chunk sent is in a pack the rerun uploaded",
  );
  assert.ok(
    uploadedBytes < rerun.chunksSent * 256 * 1024 * 1.01,
    "the rerun's packs hold only the chunks it sent",
  );
  assert.ok(uploadedBytes < 96 * MiB, "the rerun uploaded less than a full copy");
  assert.equal(
    summary(await strataOk(["verify", "--repo", target, "--read-data", "--json"], { env })).ok,
    true,
  );
  assert.equal(await restoreSha(target, src.id, dir, { env }), src.sha);
  // The dead run's lock and its packs no index names are gc's to remove.
  await strataOk(["gc", "--repo", target, "--grace", "0s"], { env });
  assert.deepEqual(await keys(store, "locks/"), []);
  assert.equal(await restoreSha(target, src.id, dir, { env }), src.sha);
});

test("the bandwidth limit is held within 10 %", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const src = await localSource(dir, 80 * MiB, "bandwidth");
  const proxy = await startFaultyProxy(gateway().endpoint);
  t.after(() => proxy.close());
  const target = `s3:${proxy.endpoint}/${await createBucket(gateway())}/limited`;
  await strataOk(["init", "--repo", target, "--chunk-size", "256K"], env);
  // When each pack's upload reached the gateway (its whole body read by the proxy), and its size.
  const uploads: Array<{ at: number; bytes: number }> = [];
  proxy.plan = (_n, method, url, bytes) => {
    if (method === "PUT" && url.includes("/packs/")) uploads.push({ at: performance.now(), bytes });
    return undefined;
  };
  const limit = 4 * MiB;
  const r = summary<CopySummary>(
    await strataOk(["copy", src.repo, target, "--bandwidth", "4M", "--json"], env),
  );
  assert.ok(r.bytesSent >= 80 * MiB, "random data: every byte sent");
  // The rate on the wire from the first pack's arrival to the last's: the limit over the run,
  // without the process's start and the last upload's own time.
  assert.ok(uploads.length >= 4, `${uploads.length} pack uploads`);
  const first = uploads[0]!;
  const last = uploads.at(-1)!;
  const bytes = uploads.slice(1).reduce((n, u) => n + u.bytes, 0);
  const wire = bytes / ((last.at - first.at) / 1000);
  const overall = r.bytesSent / (r.durationMs / 1000);
  t.diagnostic(
    `${uploads.length} packs; on the wire ${(wire / MiB).toFixed(2)} MiB/s, over the whole copy ${(overall / MiB).toFixed(2)} MiB/s (${r.bytesSent} bytes in ${r.durationMs} ms), limit 4 MiB/s`,
  );
  assert.ok(
    Math.abs(wire - limit) <= limit * 0.1,
    `on the wire ${(wire / MiB).toFixed(2)} MiB/s: within 10 % of 4 MiB/s`,
  );
  assert.ok(
    overall <= limit * 1.1,
    `over the whole copy ${(overall / MiB).toFixed(2)} MiB/s: never above the limit`,
  );
  assert.equal(await restoreSha(target, src.id, dir, env), src.sha);
});

test("gc on the target beside a running copy loses nothing", async (t) => {
  const dir = tempDir(t);
  const env = gatewayEnv(gateway());
  const src = await localSource(dir, 96 * MiB, "gc-beside");
  const target = `s3:${gateway().endpoint}/${await createBucket(gateway())}/offsite`;
  await strataOk(["init", "--repo", target, "--chunk-size", "256K"], { env });
  const store = storeOf(gateway(), target);
  const child = startStrata(["copy", src.repo, target, "--bandwidth", "6M", "--json"], {
    env: { ...env, STRATA_TEST_COPY_CHECKPOINT_MS: "500" },
  });
  const copy = collect(child);
  const deadline = Date.now() + 60_000;
  while ((await keys(store, "index/")).length === 0) {
    assert.ok(Date.now() < deadline, "the copy made no pack findable within 60 s");
    await sleep(50);
  }
  // The copy's packs are findable but no restore point uses them yet: gc condemns them, and a
  // second gc must not delete them while the copy runs.
  const gc1 = summary(await strataOk(["gc", "--repo", target, "--grace", "0s", "--json"], { env }));
  const gc2 = summary(await strataOk(["gc", "--repo", target, "--grace", "0s", "--json"], { env }));
  t.diagnostic(`gc beside the copy: ${JSON.stringify(gc1)} then ${JSON.stringify(gc2)}`);
  assert.equal(child.exitCode, null, "both gc runs ended while the copy was still running");
  assert.ok(Number(gc1.packsCondemned) >= 1, "gc saw the copy's packs as unused");
  assert.equal(gc2.packsDeleted, 0, "and did not delete them under the running copy");
  const r = await copy.result;
  assert.equal(r.code, 0, r.stderr);
  assert.equal(summary(r).copied, 1);
  assert.equal(
    summary(await strataOk(["verify", "--repo", target, "--read-data", "--json"], { env })).ok,
    true,
  );
  // Later gc runs keep the packs the restore point uses (needed again, no longer condemned).
  await strataOk(["gc", "--repo", target, "--grace", "0s"], { env });
  await strataOk(["gc", "--repo", target, "--grace", "0s"], { env });
  assert.equal(
    summary(await strataOk(["verify", "--repo", target, "--read-data", "--json"], { env })).ok,
    true,
  );
  assert.equal(await restoreSha(target, src.id, dir, { env }), src.sha);
});
