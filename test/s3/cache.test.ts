// The local read cache in front of an S3 repository (a real Ceph RADOS Gateway): pack ranges are
// read from the bucket once and then from the cache directory; the directory stays under its cap
// (least recently used entries go); an entry that was changed on disk is caught by its hash and
// read again from the bucket. Through the CLI, a second restore reads no pack from the bucket.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { sha256File } from "../../src/image/synthetic.js";
import { CACHE_BLOCK, CachedStore } from "../../src/repo/cached-store.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { createBucket, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { strataOk, tempDir } from "../helpers/cli.js";
import { startFaultyProxy } from "../helpers/faulty-proxy.js";

const gateway = gatewayForFile();
const MiB = 1024 * 1024;

async function files(dir: string): Promise<Array<{ path: string; size: number }>> {
  const out: Array<{ path: string; size: number }> = [];
  const walk = async (d: string): Promise<void> => {
    for (const e of await fs.readdir(d, { withFileTypes: true }).catch(() => [])) {
      const p = join(d, e.name);
      if (e.isDirectory()) await walk(p);
      else out.push({ path: p, size: (await fs.stat(p)).size });
    }
  };
  await walk(dir);
  return out;
}

test("ranges come from the cache once read; the cap holds; a changed entry is read again", async (t) => {
  const gw = gateway();
  const dir = tempDir(t);
  const s3 = new S3Store(parseS3Url(`s3:${gw.endpoint}/${await createBucket(gw)}`), { credentials: gw });
  const key = `packs/ab/${"ab".repeat(16)}`;
  const data = randomBytes(3 * MiB + 12345);
  await s3.put(key, data);
  const cacheDir = join(dir, "cache");
  const cache = new CachedStore(s3, cacheDir, 10 * MiB);

  const ranges: Array<[number, number]> = [
    [100, 5000],
    [MiB - 10, 20],
    [2 * MiB + 7, MiB + 12345 - 7],
    [0, data.length],
  ];
  for (const [o, l] of ranges) assert.deepEqual(await cache.getRange(key, o, l), data.subarray(o, o + l));
  // Blocks 0, 1, 2 and 3 each fetched once; every later read of them a hit.
  assert.equal(cache.stats.misses, 4);
  assert.equal(cache.stats.hits, 1 + 4);
  const fresh = new CachedStore(s3, cacheDir, 10 * MiB);
  for (const [o, l] of ranges) assert.deepEqual(await fresh.getRange(key, o, l), data.subarray(o, o + l));
  assert.deepEqual(
    { misses: fresh.stats.misses, hits: fresh.stats.hits },
    { misses: 0, hits: 1 + 2 + 2 + 4 },
  );
  // Past the end: the store's own error; the last block's entry is not taken for damaged.
  await assert.rejects(fresh.getRange(key, data.length - 10, 20), /ends before byte/);
  assert.equal(fresh.stats.corrupt, 0);

  // A byte changed in an entry: caught by its hash, removed, read again from the bucket.
  const entries = await files(cacheDir);
  assert.equal(entries.length, 4);
  const victim = entries.find((e) => e.path.endsWith("-1"))!;
  const bytes = await fs.readFile(victim.path);
  bytes[100]! ^= 0x40;
  await fs.writeFile(victim.path, bytes);
  const third = new CachedStore(s3, cacheDir, 10 * MiB);
  assert.deepEqual(await third.getRange(key, MiB, 1000), data.subarray(MiB, MiB + 1000));
  assert.deepEqual({ corrupt: third.stats.corrupt, misses: third.stats.misses }, { corrupt: 1, misses: 1 });
  // An entry swapped for another one's (a valid entry under the wrong name), and one cut short.
  const e0 = entries.find((e) => e.path.endsWith("-0"))!;
  const e2 = entries.find((e) => e.path.endsWith("-2"))!;
  await fs.copyFile(e0.path, e2.path);
  await fs.truncate(e0.path, 1000);
  assert.deepEqual(await third.getRange(key, 0, 3 * MiB), data.subarray(0, 3 * MiB));
  assert.equal(third.stats.corrupt, 3);
  // A symlink in place of an entry is not followed.
  const secret = join(dir, "secret");
  await fs.writeFile(secret, Buffer.alloc(CACHE_BLOCK + 32, 1));
  const e3 = entries.find((e) => e.path.endsWith("-3"))!;
  await fs.rm(e3.path);
  await fs.symlink(secret, e3.path);
  const fourth = new CachedStore(s3, cacheDir, 10 * MiB);
  assert.deepEqual(await fourth.getRange(key, 3 * MiB, 12345), data.subarray(3 * MiB));
  assert.equal(fourth.stats.misses, 1);

  // A cap of 2.5 blocks: never more than that on disk; the least recently used go first.
  const small = join(dir, "small");
  const cap = 2.5 * (CACHE_BLOCK + 32);
  const capped = new CachedStore(s3, small, cap);
  for (let b = 0; b < 3; b++) await capped.getRange(key, b * MiB, 10);
  let on = await files(small);
  assert.equal(on.length, 2);
  assert.ok(on.reduce((n, e) => n + e.size, 0) <= cap);
  assert.equal(capped.stats.evicted, 1);
  await capped.getRange(key, MiB, 10); // block 1: now the most recent
  await capped.getRange(key, 0, 10); // block 0 again: evicts block 2, the least recent
  on = await files(small);
  assert.deepEqual(on.map((e) => e.path.slice(e.path.lastIndexOf("-") + 1)).sort(), ["0", "1"]);
  assert.deepEqual({ hits: capped.stats.hits, evicted: capped.stats.evicted }, { hits: 1, evicted: 2 });
});

test("restore from S3 twice: the second reads no pack from the bucket; a small cap is kept", async (t) => {
  const gw = gateway();
  const dir = tempDir(t);
  const proxy = await startFaultyProxy(gw.endpoint);
  t.after(() => proxy.close());
  let packGets = 0;
  proxy.plan = (_n, method, url) => {
    if ((method === "GET" || method === "HEAD") && /\/packs\//.test(url)) packGets++;
    return undefined;
  };
  const bucket = await createBucket(gw);
  const repo = `s3:${proxy.endpoint}/${bucket}`;
  const env = { env: gatewayEnv(gw) };
  const img = join(dir, "disk.img");
  await fs.writeFile(img, randomBytes(24 * MiB));
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], env);
  await strataOk(["backup", "--repo", repo, "--vm", "v", `file:${img}`], env);
  const want = await sha256File(img);
  const cacheDir = join(dir, "cache");
  const restore = async (target: string, ...flags: string[]) => {
    packGets = 0;
    await strataOk(
      [
        "restore",
        "--repo",
        repo,
        "--s3-cache-dir",
        cacheDir,
        ...flags,
        "v/latest",
        "--target",
        join(dir, target),
      ],
      env,
    );
    assert.equal(await sha256File(join(dir, target, "disk.raw")), want);
    return packGets;
  };
  const first = await restore("r1");
  assert.ok(first >= 24, `first restore: ${first} pack requests`);
  assert.equal(await restore("r2"), 0, "second restore: every pack block from the cache");
  const cached = (await files(cacheDir)).reduce((n, e) => n + e.size, 0);
  assert.ok(cached >= 24 * MiB && cached <= 25 * MiB, `${cached} bytes cached`);

  // A cap of 4 MiB: the same restore, the directory trimmed to it.
  assert.ok((await restore("r3", "--s3-cache-size", "4M")) > 0);
  const capped = (await files(cacheDir)).reduce((n, e) => n + e.size, 0);
  assert.ok(capped <= 4 * MiB, `${capped} bytes cached under a 4 MiB cap`);
  // STRATA_S3_CACHE_DIR names the directory too; --s3-cache-size 0 turns the cache off.
  const envDir = join(dir, "env-cache");
  await strataOk(["restore", "--repo", repo, "v/latest", "--target", join(dir, "r4")], {
    env: { ...gatewayEnv(gw), STRATA_S3_CACHE_DIR: envDir },
  });
  assert.ok((await files(envDir)).length >= 24);
  packGets = 0;
  await strataOk(
    ["restore", "--repo", repo, "--s3-cache-size", "0", "v/latest", "--target", join(dir, "r5")],
    {
      env: { ...gatewayEnv(gw), STRATA_S3_CACHE_DIR: envDir },
    },
  );
  assert.ok(packGets > 0, "no cache: packs read from the bucket");
});
