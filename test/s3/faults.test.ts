// Faults between Strata and a real RADOS Gateway, injected by a proxy: 503 SlowDown answers,
// response bodies cut short, reset connections and uploads damaged on the way are retried and a
// backup, verify and restore come out exact; a store that keeps failing ends with a clear error.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { Repository } from "../../src/repo/repository.js";
import { parseS3Url, S3Store, type S3StoreOptions } from "../../src/repo/s3-store.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { createBucket, type Gateway, processesUsing, startGateway } from "../helpers/ceph.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";
import { type FaultyProxy, startFaultyProxy } from "../helpers/faulty-proxy.js";

let gw: Gateway;
let proxy: FaultyProxy;
before(async () => {
  gw = await startGateway();
  proxy = await startFaultyProxy(gw.endpoint);
});
after(async () => {
  await proxy.close();
  await gw.stop();
  assert.deepEqual(await processesUsing(gw.dir), [], "nothing of the cluster is left running");
});

async function viaProxy(options: S3StoreOptions = {}): Promise<S3Store> {
  const bucket = await createBucket(gw);
  return new S3Store(parseS3Url(`s3:${proxy.endpoint}/${bucket}/repo`), {
    credentials: { accessKeyId: gw.accessKeyId, secretAccessKey: gw.secretAccessKey },
    backoffMs: 5,
    requestTimeoutMs: 5000,
    ...options,
  });
}

test("every Nth request failing (503, cut bodies, resets, damaged uploads) is survived with retries", async (t) => {
  const dir = tempDir(t);
  // Four object GETs in ten fail here, far more than any real store: six attempts (the default)
  // all failed for one of the few hundred GETs in about one run in ten. Ten make that ~1e-4.
  const store = await viaProxy({ attempts: 10 });
  // Objects are under /bucket/repo/...; bucket-level requests (list) only get 503s and resets.
  proxy.plan = (n, method, url) => {
    const object = url.split("?")[0]!.split("/").length > 3;
    if (n % 7 === 0) return "503";
    if (n % 11 === 0) return "reset";
    if (object && method === "GET" && n % 5 === 0) return "truncate";
    if (object && method === "PUT" && n % 3 === 0) return "corrupt-upload";
    return undefined;
  };
  t.after(() => {
    proxy.plan = () => undefined;
  });
  const chunk = 64 * 1024;
  await Repository.init(store, { chunkSize: chunk });
  const repo = await Repository.open(store, { threads: 1, packTarget: 4 * chunk });
  t.after(() => repo.close());
  const data = Buffer.alloc(48 * chunk);
  fillContent(data, "random", new Prng("faults"));
  const s = await backup(repo, {
    vm: "vm",
    disks: [memoryDisk(data)],
    mode: "file",
    consistency: "crash-consistent",
  });
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  const out = join(dir, "out.raw");
  await restoreDiskToFile(repo, await repo.findSnapshot(s.id), "disk", out);
  assert.deepEqual(await fs.readFile(out), data, "restored bit-exact");
  const big = randomBytes(11 * 1024 * 1024);
  const multipart = await viaProxy({ multipartThreshold: 6 * 1024 * 1024, partSize: 5 * 1024 * 1024 });
  await multipart.put("packs/big", big);
  assert.deepEqual(await multipart.get("packs/big"), big);
  console.log(
    `injected ${JSON.stringify(proxy.injected)}; retried ${store.retries + multipart.retries} requests`,
  );
  for (const fault of ["503", "truncate", "reset", "corrupt-upload"] as const)
    assert.ok(proxy.injected[fault] > 0, `${fault} was injected`);
  assert.ok(store.retries >= proxy.injected["503"] / 2, "the store retried");
  assert.equal(proxy.uploadsWithoutMd5, 0, "every upload carried Content-MD5");
});

test("a store that keeps failing ends with an error naming the key and the last failure", async (t) => {
  const store = await viaProxy({ attempts: 3 });
  proxy.plan = () => "503";
  t.after(() => {
    proxy.plan = () => undefined;
  });
  await assert.rejects(
    store.put("index/abc", Buffer.from("x")),
    (e) =>
      e instanceof StrataError &&
      e.code === ErrorCode.IO_ERROR &&
      /put strata-\w+\/repo\/index\/abc failed 3 times, the last: HTTP 503 SlowDown/.test(e.message),
  );
  assert.equal(store.retries, 2);
});

test("no more requests are in flight than the store's concurrency", async () => {
  const store = await viaProxy({ concurrency: 3 });
  proxy.maxInFlight = 0;
  await Promise.all(Array.from({ length: 40 }, (_, i) => store.put(`packs/${i}`, randomBytes(64 * 1024))));
  const got = await Promise.all(Array.from({ length: 40 }, (_, i) => store.getRange(`packs/${i}`, 10, 100)));
  assert.equal(got.length, 40);
  assert.ok(proxy.maxInFlight <= 3, `${proxy.maxInFlight} requests were in flight at once`);
  assert.ok(proxy.maxInFlight >= 2, "requests did run side by side");
});

test("a gateway that stops answering is given up on after the request timeout and asked again", async (t) => {
  const store = await viaProxy({ requestTimeoutMs: 300 });
  proxy.stallMs = 3000;
  proxy.plan = (n) => (n % 3 === 0 ? "stall" : undefined);
  t.after(() => {
    proxy.plan = () => undefined;
  });
  const before = proxy.injected.stall;
  const t0 = Date.now();
  const data = randomBytes(200_000);
  for (let i = 0; i < 6; i++) await store.put(`packs/s${i}`, data);
  for (let i = 0; i < 6; i++)
    assert.deepEqual(await store.getRange(`packs/s${i}`, 1000, 1000), data.subarray(1000, 2000));
  const stalls = proxy.injected.stall - before;
  assert.ok(stalls >= 3, `${stalls} requests stalled`);
  assert.ok(store.retries >= stalls, `${store.retries} retries for ${stalls} stalls`);
  assert.ok(Date.now() - t0 < stalls * 1500, `no stall was waited out: ${Date.now() - t0} ms for ${stalls}`);
});

test("a multipart completion whose answer is lost is asked again and recognised as done", async (t) => {
  const store = await viaProxy({ multipartThreshold: 6 * 1024 * 1024, partSize: 5 * 1024 * 1024 });
  proxy.plan = (_n, method, url) => (method === "POST" && /uploadId=/.test(url) ? "lose-answer" : undefined);
  t.after(() => {
    proxy.plan = () => undefined;
  });
  const before = proxy.injected["lose-answer"];
  const data = randomBytes(11 * 1024 * 1024);
  // Never an answer: a clear error, after the store's tries.
  await assert.rejects(
    store.put("packs/lost", data),
    /complete multipart upload of strata-\w+\/repo\/packs\/lost failed 6 times/,
  );
  assert.ok(proxy.injected["lose-answer"] - before >= 1);
  // Only the first answer is lost: the retry finds the upload completed (RGW answers a repeated
  // completion with success; services that answer NoSuchUpload are checked by HEAD instead).
  let lost = 0;
  proxy.plan = (_n, method, url) =>
    method === "POST" && /uploadId=/.test(url) && lost++ === 0 ? "lose-answer" : undefined;
  await store.put("packs/once", data);
  assert.equal(lost, 2, "completion was asked twice");
  assert.deepEqual(await store.get("packs/once"), data);
});
