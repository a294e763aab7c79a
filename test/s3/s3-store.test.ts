// The Store contract on S3 against a real Ceph RADOS Gateway: the shared suite (with and
// without multipart uploads; more objects than one list answer holds), the multipart checks,
// missing keys and buckets, refused credentials, format v1 refused; and the whole
// backup/incremental/forget/gc/verify/restore cycle through nothing but object-store operations.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { backup, type DiskSource } from "../../src/engine/backup.js";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { forgetIds, gc } from "../../src/repo/prune.js";
import { Repository } from "../../src/repo/repository.js";
import { parseS3Url, S3Store, type S3StoreOptions, s3Credentials } from "../../src/repo/s3-store.js";
import { verifyRepository } from "../../src/repo/verify.js";
import { ErrorCode, StrataError } from "../../src/util/errors.js";
import { createBucket, type Gateway, processesUsing, startGateway } from "../helpers/ceph.js";
import { tempDir } from "../helpers/cli.js";
import { memoryDisk } from "../helpers/disks.js";
import { ObjectStoreOnly } from "../helpers/object-store-only.js";
import { storeContract } from "../helpers/store-contract.js";

let gw: Gateway;
before(async () => {
  gw = await startGateway();
  console.log(`gateway started in ${gw.startMs} ms`);
});
after(async () => {
  await gw.stop();
  assert.deepEqual(await processesUsing(gw.dir), [], "nothing of the cluster is left running");
});

async function s3(options: S3StoreOptions = {}, prefix = "repo"): Promise<S3Store> {
  const bucket = await createBucket(gw);
  return new S3Store(parseS3Url(`s3:${gw.endpoint}/${bucket}/${prefix}`), {
    credentials: { accessKeyId: gw.accessKeyId, secretAccessKey: gw.secretAccessKey },
    ...options,
  });
}

test("s3: URLs name endpoint, bucket and prefix; malformed ones are refused with the reason", () => {
  assert.deepEqual(parseS3Url("s3:https://s3.example.org:8443/backups/site-a/host1"), {
    endpoint: "https://s3.example.org:8443",
    bucket: "backups",
    prefix: "site-a/host1/",
  });
  assert.deepEqual(parseS3Url("s3:http://127.0.0.1:7480/b12"), {
    endpoint: "http://127.0.0.1:7480",
    bucket: "b12",
    prefix: "",
  });
  assert.throws(() => parseS3Url("s3:ftp://h/b"), /scheme must be http or https/);
  assert.throws(() => parseS3Url("s3:http://h"), /no bucket/);
  assert.throws(() => parseS3Url("s3:http://key:secret@h/bucket"), /credentials do not belong in the URL/);
  assert.throws(() => parseS3Url("s3:http://h/Bad_Bucket"), /not a valid bucket name/);
});

test("credentials come from the environment, else from the credentials file's profile", async (t) => {
  const dir = tempDir(t);
  const file = join(dir, "credentials");
  await fs.writeFile(
    file,
    "[default]\naws_access_key_id = A1\naws_secret_access_key = S1\n[profile other]\naws_access_key_id=A2\naws_secret_access_key=S2\n",
  );
  assert.deepEqual(s3Credentials({ AWS_ACCESS_KEY_ID: "E", AWS_SECRET_ACCESS_KEY: "F" }, dir), {
    accessKeyId: "E",
    secretAccessKey: "F",
  });
  assert.deepEqual(s3Credentials({ STRATA_S3_CREDENTIALS: file }, dir), {
    accessKeyId: "A1",
    secretAccessKey: "S1",
  });
  assert.deepEqual(s3Credentials({ STRATA_S3_CREDENTIALS: file, AWS_PROFILE: "other" }, dir), {
    accessKeyId: "A2",
    secretAccessKey: "S2",
  });
  assert.throws(() => s3Credentials({}, dir), /no S3 credentials: set AWS_ACCESS_KEY_ID/);
  assert.throws(() => s3Credentials({ STRATA_S3_CREDENTIALS: file, AWS_PROFILE: "none" }, dir), /\[none\]/);
});

storeContract("s3", () => s3());
storeContract("s3, multipart above 6 MiB", () =>
  s3({ multipartThreshold: 6 * 1024 * 1024, partSize: 5 * 1024 * 1024 }),
);

test("a missing key's error names bucket and key", async () => {
  const s = await s3();
  await assert.rejects(
    s.get("packs/ab/none"),
    (e) => s.isNotFound(e) && /strata-\w+\/repo\/packs\/ab\/none does not exist/.test(String(e)),
  );
});

test("large objects go up in checked parts and come back whole; ranges across parts", async () => {
  const s = await s3({ multipartThreshold: 6 * 1024 * 1024, partSize: 5 * 1024 * 1024 });
  const data = randomBytes(12 * 1024 * 1024 + 17);
  await s.put("packs/big", data);
  assert.deepEqual(await s.get("packs/big"), data);
  const at = 5 * 1024 * 1024 - 10;
  assert.deepEqual(await s.getRange("packs/big", at, 20), data.subarray(at, at + 20));
  assert.equal((await s.stat("packs/big"))?.size, data.length);
  assert.equal(await s.sweepTemporary(Date.now() + 60_000), 0, "no upload is left open");
});

test("a missing bucket, wrong credentials and format v1 end with clear errors", async () => {
  const missing = new S3Store(parseS3Url(`s3:${gw.endpoint}/strata-no-such-bucket`), {
    credentials: { accessKeyId: gw.accessKeyId, secretAccessKey: gw.secretAccessKey },
  });
  await assert.rejects(
    missing.get("config"),
    (e) =>
      e instanceof StrataError &&
      e.code === ErrorCode.REPO_NOT_FOUND &&
      /strata-no-such-bucket does not exist/.test(e.message),
  );
  const bucket = await createBucket(gw);
  const wrong = new S3Store(parseS3Url(`s3:${gw.endpoint}/${bucket}`), {
    credentials: { accessKeyId: gw.accessKeyId, secretAccessKey: "wrong" },
  });
  await assert.rejects(
    wrong.put("x", Buffer.from("x")),
    (e) =>
      e instanceof StrataError &&
      e.code === ErrorCode.PERMISSION_DENIED &&
      /refused the S3 credentials/.test(e.message),
  );
  assert.equal(wrong.retries, 0, "a permanent failure is not retried");
  const s = await s3();
  await assert.rejects(
    Repository.init(s, { formatVersion: 1 }),
    (e) => e instanceof StrataError && e.code === ErrorCode.REPO_VERSION && /only format v2/.test(e.message),
  );
});

const CHUNK = 64 * 1024;
function image(seed: string): Buffer {
  const b = Buffer.alloc(CHUNK * 32);
  fillContent(b, "random", new Prng(seed));
  return b;
}
const take = (repo: Repository, disk: DiskSource) =>
  backup(repo, { vm: "vm", disks: [disk], mode: "file", consistency: "crash-consistent" });

test("backup, incremental, forget, gc, verify and restore on S3 use only object-store operations", async (t) => {
  const dir = tempDir(t);
  const store = new ObjectStoreOnly(await s3());
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 1, packTarget: 4 * CHUNK });
  t.after(() => repo.close());
  const day0 = image("day0");
  const day1 = Buffer.from(day0);
  fillContent(day1.subarray(5 * CHUNK, 9 * CHUNK), "random", new Prng("day1"));
  const s0 = await take(repo, memoryDisk(day0));
  const s1 = await take(repo, memoryDisk(day1));
  assert.equal(s1.manifest.disks[0]!.chunksNew, 4);
  await forgetIds(repo, [s0.id]);
  const first = await gc(repo, { graceMs: 0 });
  const second = await gc(repo, { graceMs: 0 });
  assert.ok((first.packsCondemned ?? 0) + (first.packsRepacked ?? 0) > 0, JSON.stringify(first));
  assert.ok((second.packsDeleted ?? 0) > 0, JSON.stringify(second));
  assert.equal((await verifyRepository(repo, { readData: true })).ok, true);
  const out = join(dir, "out.raw");
  await restoreDiskToFile(repo, await repo.findSnapshot(s1.id), "disk", out);
  assert.deepEqual(await fs.readFile(out), day1);
  assert.ok((store.calls.get("getRange") ?? 0) > 0, "chunks are read as ranges of packs");
});
