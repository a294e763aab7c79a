// Immutable restore points on a bucket with S3 Object Lock (a real Ceph RADOS Gateway): every
// object a restore point needs is stored under a COMPLIANCE retention; a later restore point
// extends the retention of the packs (and pack index objects) it reuses; a direct DeleteObject of
// a locked version is refused even with the bucket owner's credentials; forget and gc keep what is
// locked and say so, and remove it once the retention has passed. A backup-only credential (a
// second gateway user and a bucket policy) can add restore points but not delete anything.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import {
  DeleteObjectCommand,
  GetObjectCommand,
  HeadObjectCommand,
  ListObjectsV2Command,
  ListObjectVersionsCommand,
  PutBucketPolicyCommand,
  PutObjectCommand,
  type S3Client,
} from "@aws-sdk/client-s3";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { Repository } from "../../src/repo/repository.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { createBucket, createUser, gatewayEnv, gatewayForFile, s3Client } from "../helpers/ceph.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { pastGcTimeSlack } from "../helpers/stored.js";

const gateway = gatewayForFile();
const MiB = 1024 * 1024;

async function retentionOf(c: S3Client, bucket: string, key: string) {
  const h = await c.send(new HeadObjectCommand({ Bucket: bucket, Key: key }));
  return { mode: h.ObjectLockMode, until: h.ObjectLockRetainUntilDate?.getTime() ?? 0, version: h.VersionId };
}

async function keysUnder(c: S3Client, bucket: string, prefix: string): Promise<string[]> {
  const out: string[] = [];
  let token: string | undefined;
  do {
    const page = await c.send(
      new ListObjectsV2Command({
        Bucket: bucket,
        Prefix: prefix,
        ...(token ? { ContinuationToken: token } : {}),
      }),
    );
    for (const o of page.Contents ?? []) if (o.Key) out.push(o.Key);
    token = page.IsTruncated ? page.NextContinuationToken : undefined;
  } while (token);
  return out;
}

async function refusal(p: Promise<unknown>): Promise<{ name: string; status: number | undefined }> {
  try {
    await p;
  } catch (err) {
    const e = err as { name: string; $metadata?: { httpStatusCode?: number } };
    return { name: e.name, status: e.$metadata?.httpStatusCode };
  }
  assert.fail("the gateway did what it must refuse");
}

const sleepUntil = (ms: number) => new Promise((r) => setTimeout(r, Math.max(0, ms - Date.now())));

test("restore points are locked; reused packs are locked longer; forget and gc keep what is locked until it passes", async (t) => {
  const gw = gateway();
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gw) };
  const admin = await s3Client(gw);
  t.after(() => admin.destroy());
  const bucket = await createBucket(gw, undefined, { objectLock: true });
  const repo = `s3:${gw.endpoint}/${bucket}`;
  const img = join(dir, "disk.img");
  // Random bytes: they don't compress, so 48 MiB take three packs.
  await fs.writeFile(img, randomBytes(48 * MiB));

  const init = await strataOk(
    ["init", "--repo", repo, "--chunk-size", "256K", "--immutable-for", "20s"],
    env,
  );
  assert.match(init.stdout, /restore points immutable \(COMPLIANCE\) for 20 s after their backup/);

  const a = summary<{ id: string; time: string; immutable: { mode: string; until: string } }>(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  const aUntil = Date.parse(a.immutable.until);
  assert.equal(a.immutable.mode, "COMPLIANCE");
  const manifestKey = `vms/vm1/${a.time}/manifest.json`;
  const m = await retentionOf(admin, bucket, manifestKey);
  assert.equal(m.mode, "COMPLIANCE");
  assert.ok(
    Math.abs(m.until - aUntil) < 1000,
    `manifest locked until ${m.until}, restore point says ${aUntil}`,
  );
  const aPacks = await keysUnder(admin, bucket, "packs/");
  const aIndexes = await keysUnder(admin, bucket, "index/");
  assert.ok(aPacks.length >= 3, `48 MiB in ${aPacks.length} pack(s)`);
  for (const key of [...aPacks, ...aIndexes, `vms/vm1/${a.time}/disk.fidx`]) {
    const r = await retentionOf(admin, bucket, key);
    assert.equal(r.mode, "COMPLIANCE", key);
    assert.ok(Math.abs(r.until - aUntil) < 1000, `${key} locked until ${r.until}`);
  }

  // The bucket owner's own credentials can't delete a locked version.
  const denied = await refusal(
    admin.send(new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: m.version })),
  );
  assert.deepEqual(denied, { name: "AccessDenied", status: 403 });
  const packVersion = (await retentionOf(admin, bucket, aPacks[0]!)).version;
  assert.equal(
    (
      await refusal(
        admin.send(new DeleteObjectCommand({ Bucket: bucket, Key: aPacks[0], VersionId: packVersion })),
      )
    ).status,
    403,
  );

  // forget leaves a locked restore point and says so.
  const f1 = summary<{ remove: string[]; locked: { id: string; until: string }[] }>(
    await strataOk(["forget", "--repo", repo, "--json", a.id], env),
  );
  assert.deepEqual(f1.remove, []);
  assert.deepEqual(
    f1.locked.map((l) => l.id),
    [a.id],
  );
  const f1text = await strataOk(["forget", "--repo", repo, a.id], env);
  assert.match(f1text.stdout, new RegExp(`locked ${a.id}  \\(immutable until .*: kept\\)`));
  const snaps = summary<{ id: string }[]>(await strataOk(["snapshots", "--repo", repo, "--json"], env));
  assert.deepEqual(
    snaps.map((s) => s.id),
    [a.id],
  );

  // A second restore point, locked longer, rewrites the first 32 MiB and reuses the rest: the
  // packs it reuses, and the index objects naming them, are now locked as long as it is.
  const fh = await fs.open(img, "r+");
  await fh.write(randomBytes(32 * MiB), 0, 32 * MiB, 0);
  await fh.close();
  const b = summary<{ id: string; immutable: { until: string }; chunksReused: number }>(
    await strataOk(
      ["backup", "--repo", repo, "--vm", "vm1", "--json", "--immutable-for", "300s", `file:${img}`],
      env,
    ),
  );
  const bUntil = Date.parse(b.immutable.until);
  assert.ok(b.chunksReused >= 60, `reused ${b.chunksReused} chunks`);
  let extended = 0;
  let kept = 0;
  for (const key of aPacks) {
    const r = await retentionOf(admin, bucket, key);
    if (r.until >= bUntil - 1000) extended++;
    else if (Math.abs(r.until - aUntil) < 1000) kept++;
  }
  assert.ok(extended >= 1, `${extended} of the first restore point's packs extended`);
  assert.ok(kept >= 1, `${kept} of its packs (only its own chunks) not extended`);
  for (const key of aIndexes) assert.ok((await retentionOf(admin, bucket, key)).until >= bUntil - 1000, key);

  // An interrupted backup leaves packs no index names, locked like any other: gc keeps them.
  const before = new Set(await keysUnder(admin, bucket, "packs/"));
  const s3 = new S3Store(parseS3Url(repo), { credentials: gw });
  const lib = await Repository.open(s3, { packTarget: 256 * 1024 });
  try {
    const w = await lib.startBackup("vm2", "an interrupted backup");
    for (let i = 0; i < 4; i++) {
      const data = randomBytes(256 * 1024);
      await w.putChunk(Buffer.from(lib.blobChecksum(data), "hex"), data);
    }
    await w.abort();
  } finally {
    await lib.close();
  }
  const orphans = (await keysUnder(admin, bucket, "packs/")).filter((k) => !before.has(k));
  assert.ok(orphans.length >= 1, "the interrupted backup stored packs");
  const orphanUntil = Math.max(
    ...(await Promise.all(orphans.map(async (k) => (await retentionOf(admin, bucket, k)).until))),
  );
  // Old enough that gc takes them for a dead writer's (it allows stored times a little slack).
  await pastGcTimeSlack();
  const g1 = summary<{ locked: string[]; orphansDeleted: number }>(
    await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env),
  );
  assert.equal(g1.orphansDeleted, 0);
  assert.ok(
    g1.locked.some((l) => /^packs\/[0-9a-f]{2}\/[0-9a-f]{32} \(until \d{4}-.*Z\)$/.test(l)),
    `gc names the locked packs it kept: ${JSON.stringify(g1.locked)}`,
  );
  const g1text = await strataOk(["gc", "--repo", repo, "--grace", "0s"], env);
  assert.match(
    g1text.stdout,
    /\d+ object\(s\) locked \(S3 Object Lock\), kept until their retention passes:\n {2}packs\//,
  );

  // Once the retention has passed, forget and gc remove what no restore point needs.
  await sleepUntil(Math.max(aUntil, orphanUntil) + 1500);
  const f2 = summary<{ remove: string[]; locked: unknown[] }>(
    await strataOk(["forget", "--repo", repo, "--json", a.id], env),
  );
  assert.deepEqual(f2.remove, [a.id]);
  assert.deepEqual(f2.locked, []);
  const g2 = summary<{ orphansDeleted: number; packsCondemned: number; packsRepacked: number }>(
    await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env),
  );
  assert.ok(g2.orphansDeleted >= 1, `gc after the retention: ${JSON.stringify(g2)}`);
  assert.ok(g2.packsCondemned + g2.packsRepacked >= 1, `gc after the retention: ${JSON.stringify(g2)}`);
  const g3 = summary<{ packsDeleted: number }>(
    await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env),
  );
  assert.ok(g3.packsDeleted >= 1, `second gc: ${JSON.stringify(g3)}`);
  // Deleted means every version gone, not hidden behind a delete marker.
  const versions = await admin.send(new ListObjectVersionsCommand({ Bucket: bucket, Prefix: "packs/" }));
  const live = new Set(await keysUnder(admin, bucket, "packs/"));
  assert.deepEqual(
    (versions.Versions ?? []).map((v) => v.Key).filter((k) => !live.has(k!)),
    [],
    "no version of a deleted pack is left",
  );
  await strataOk(["verify", "--repo", repo, "--read-data"], env);
  const out = join(dir, "r");
  await strataOk(["restore", "--repo", repo, b.id, "--target", out], env);
  assert.equal(await sha256File(join(out, "disk.raw")), await sha256File(img));
});

test("a backup-only credential adds restore points but can't delete; immutability needs Object Lock", async (t) => {
  const gw = gateway();
  const dir = tempDir(t);
  const admin = await s3Client(gw);
  t.after(() => admin.destroy());
  const bucket = await createBucket(gw, undefined, { objectLock: true });
  const repo = `s3:${gw.endpoint}/${bucket}/r`;
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K", "--immutable-for", "1h"], {
    env: gatewayEnv(gw),
  });
  const bk = await createUser(gw, "backup-only");
  const who = { AWS: [`arn:aws:iam:::user/${bk.uid}`] };
  await admin.send(
    new PutBucketPolicyCommand({
      Bucket: bucket,
      Policy: JSON.stringify({
        Version: "2012-10-17",
        Statement: [
          {
            Effect: "Allow",
            Principal: who,
            Action: [
              "s3:GetObject",
              "s3:PutObject",
              "s3:ListBucket",
              "s3:GetObjectRetention",
              "s3:PutObjectRetention",
              "s3:GetBucketVersioning",
              "s3:GetBucketObjectLockConfiguration",
              "s3:ListBucketMultipartUploads",
              "s3:AbortMultipartUpload",
            ],
            Resource: [`arn:aws:s3:::${bucket}`, `arn:aws:s3:::${bucket}/*`],
          },
          // Objects belong to the user who put them: the owner's own user is granted the bucket's
          // objects (to read them, and to forget and gc with its own credentials).
          {
            Effect: "Allow",
            Principal: { AWS: ["arn:aws:iam:::user/strata"] },
            Action: ["s3:*"],
            Resource: [`arn:aws:s3:::${bucket}`, `arn:aws:s3:::${bucket}/*`],
          },
          // Its own lock objects: released by a delete (a delete marker in this versioned bucket).
          {
            Effect: "Allow",
            Principal: who,
            Action: ["s3:DeleteObject"],
            Resource: [`arn:aws:s3:::${bucket}/r/locks/*`],
          },
        ],
      }),
    }),
  );
  const env = { env: { AWS_ACCESS_KEY_ID: bk.accessKeyId, AWS_SECRET_ACCESS_KEY: bk.secretAccessKey } };
  const img = join(dir, "disk.img");
  await writeSyntheticImage(img, { size: 8 * MiB, seed: "backup-only", holes: 0 });
  const first = summary<{ id: string; time: string }>(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  const fh = await fs.open(img, "r+");
  await fh.write(randomBytes(MiB), 0, MiB, 0);
  await fh.close();
  // The second reuses chunks: extending their packs' retention is allowed to this user too.
  const second = summary<{ id: string; chunksReused: number }>(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  assert.ok(second.chunksReused > 0);
  assert.deepEqual(await keysUnder(admin, bucket, "r/locks/"), [], "its locks are released");
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, second.id, "--target", out], env);
  assert.equal(await sha256File(join(out, "disk.raw")), await sha256File(img));

  for (const args of [
    ["forget", "--repo", repo, first.id],
    ["forget", "--repo", repo, "--keep-last", "1"],
    ["gc", "--repo", repo],
  ]) {
    const r = await strata(args, env);
    assert.equal(r.code, 1, `${args[0]}: ${r.stderr}`);
    assert.match(
      r.stderr,
      new RegExp(
        `the S3 credentials may not delete objects in bucket ${bucket} \\(s3:DeleteObject is refused\\)`,
      ),
    );
  }
  assert.deepEqual(
    summary<{ id: string }[]>(await strataOk(["snapshots", "--repo", repo, "--json"], env)).map((s) => s.id),
    [first.id, second.id],
  );

  // GOVERNANCE for one backup: the owner's delete of a version is refused too (no bypass asked).
  const gov = summary<{ time: string; immutable: { mode: string } }>(
    await strataOk(
      [
        "backup",
        "--repo",
        repo,
        "--vm",
        "vm1",
        "--json",
        "--immutable-for",
        "1h",
        "--immutable-mode",
        "governance",
        `file:${img}`,
      ],
      { env: gatewayEnv(gw) },
    ),
  );
  assert.equal(gov.immutable.mode, "GOVERNANCE");
  const govManifest = await retentionOf(admin, bucket, `r/vms/vm1/${gov.time}/manifest.json`);
  assert.equal(govManifest.mode, "GOVERNANCE");
  assert.equal(
    (
      await refusal(
        admin.send(
          new DeleteObjectCommand({
            Bucket: bucket,
            Key: `r/vms/vm1/${gov.time}/manifest.json`,
            VersionId: govManifest.version,
          }),
        ),
      )
    ).status,
    403,
  );

  const user = await s3Client(gw, bk);
  t.after(() => user.destroy());
  const manifestKey = `r/vms/vm1/${first.time}/manifest.json`;
  const original = await retentionOf(admin, bucket, manifestKey);
  assert.equal(
    (await refusal(user.send(new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey })))).status,
    403,
  );
  assert.equal(
    (
      await refusal(
        user.send(new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.version })),
      )
    ).status,
    403,
  );
  // S3 has no "put only if absent" in a versioned bucket: a put over the manifest makes a new
  // version; the locked one stays, unchanged and undeletable, for a restore to go back to.
  const bytes = await (
    await admin.send(new GetObjectCommand({ Bucket: bucket, Key: manifestKey }))
  ).Body!.transformToByteArray();
  await user.send(new PutObjectCommand({ Bucket: bucket, Key: manifestKey, Body: "overwritten" }));
  const kept = await admin.send(
    new GetObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.version }),
  );
  assert.deepEqual(Buffer.from(await kept.Body!.transformToByteArray()), Buffer.from(bytes));
  assert.equal(
    (
      await refusal(
        admin.send(
          new DeleteObjectCommand({ Bucket: bucket, Key: manifestKey, VersionId: original.version }),
        ),
      )
    ).status,
    403,
  );

  // Immutability where it can't be kept: refused with the reason.
  const plain = `s3:${gw.endpoint}/${await createBucket(gw)}`;
  const r = await strata(["init", "--repo", plain, "--immutable-for", "1d"], { env: gatewayEnv(gw) });
  assert.equal(r.code, 2, r.stderr);
  assert.match(r.stderr, /can't keep restore points immutable: only an S3 bucket created with Object Lock/);
  const local = await strata(["init", "--repo", join(dir, "local"), "--immutable-for", "1d"]);
  assert.match(local.stderr, /can't keep restore points immutable/);
});
