// The daemon backs up to an S3 repository (a real Ceph RADOS Gateway) with its policy's
// immutability: a configuration naming the bucket by url, its credentials by a file (the test
// process has none in its environment for the daemon to fall back on), a policy with
// `immutable: { for: 20s, mode: governance }`. The daemon's run of an image-file VM's backup makes
// a restore point whose manifest records GOVERNANCE retention 20 s after its backup, whose objects
// the gateway keeps under that retention (a DeleteObject of the manifest's version is refused,
// even for the bucket's owner), and whose catalog row names the run. A policy asking immutability
// of a bucket without Object Lock fails its run with an error saying so, and writes nothing; a
// credentials file without keys fails its run naming the repository and the file.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { DeleteObjectCommand, HeadObjectCommand, ListObjectsV2Command } from "@aws-sdk/client-s3";
import { Catalog } from "../../src/catalog/catalog.js";
import { ImageFileAdapter } from "../../src/hypervisor/images/adapter.js";
import { AdapterRegistry } from "../../src/hypervisor/registry.js";
import { Repository } from "../../src/repo/repository.js";
import { parseS3Url, S3Store } from "../../src/repo/s3-store.js";
import { checkConfig } from "../../src/server/config.js";
import { createJobRunner } from "../../src/server/runner.js";
import { Daemon } from "../../src/server/service.js";
import { createBucket, gatewayForFile, s3Client } from "../helpers/ceph.js";
import { tempDir } from "../helpers/cli.js";
import { writeImage } from "../server/helpers.js";

const gateway = gatewayForFile();

test("the daemon's backup to an S3 Object Lock bucket keeps the restore point immutable as its policy says", async (t) => {
  const gw = gateway();
  assert.equal(process.env.AWS_ACCESS_KEY_ID, undefined, "credentials come from the configured file only");
  const dir = tempDir(t);
  const admin = await s3Client(gw);
  t.after(() => admin.destroy());
  const locked = await createBucket(gw, undefined, { objectLock: true });
  const plain = await createBucket(gw);
  const credentials = { accessKeyId: gw.accessKeyId, secretAccessKey: gw.secretAccessKey };
  for (const bucket of [locked, plain])
    await Repository.init(new S3Store(parseS3Url(`s3:${gw.endpoint}/${bucket}`), { credentials }), {
      chunkSize: 64 << 10,
    });
  const credFile = join(dir, "s3.cred");
  await fs.writeFile(
    credFile,
    `[default]\naws_access_key_id = ${gw.accessKeyId}\naws_secret_access_key = ${gw.secretAccessKey}\n`,
    { mode: 0o600 },
  );
  await fs.writeFile(join(dir, "empty.cred"), "[default]\n");
  const image = join(dir, "vm1.img");
  writeImage(image, 4);

  const checked = checkConfig(
    `state-dir: ${dir}/state
api: { socket: ${dir}/strata.sock }
vms:
  vm1: { sources: ["file:${image}"] }
repositories:
  off:
    url: s3:${gw.endpoint}/${locked}
    credentials-file: ${credFile}
    cache-dir: ${dir}/cache
  nolock: { url: "s3:${gw.endpoint}/${plain}", credentials-file: ${credFile}, cache-size: 0 }
  nokeys: { url: "s3:${gw.endpoint}/${plain}", credentials-file: ${dir}/empty.cred }
policies:
  offsite:
    repository: off
    vms: all
    schedule: every 1h
    immutable: { for: 20s, mode: governance }
  wrong:
    repository: nolock
    vms: all
    schedule: every 1h
    immutable: { for: 20s }
  keyless:
    repository: nokeys
    vms: all
    schedule: every 1h
`,
    join(dir, "strata.yaml"),
  );
  assert.deepEqual(checked.problems, []);
  const config = checked.config!;
  const catalog = Catalog.open(join(dir, "catalog.db"));
  t.after(() => catalog.close());
  const d = new Daemon({
    config,
    catalog,
    runner: createJobRunner({
      registry: new AdapterRegistry().register(new ImageFileAdapter()),
      catalog,
      stateDir: join(dir, "state"),
    }),
    listVms: async () => ({ vms: [], unreachable: [] }),
    timers: false,
  });
  t.after(() => d.stop());
  await d.start();
  const job = (policy: string) => catalog.jobs().find((j) => j.kind === "backup" && j.policy === policy)!;

  const t0 = Date.now();
  const started = d.runNow(job("offsite").id);
  assert.equal(started.status, "started");
  await d.idle();
  const run = catalog.lastRun(job("offsite").id)!;
  assert.equal(run.outcome, "success", `${run.errorCode}: ${run.error}`);
  assert.match(run.restorePoint ?? "", /^vm1\//);
  const time = run.restorePoint!.slice("vm1/".length);

  // The manifest records the retention the policy asked for.
  const repo = await Repository.open(new S3Store(parseS3Url(`s3:${gw.endpoint}/${locked}`), { credentials }));
  const snap = await repo.findSnapshot(run.restorePoint!);
  await repo.close();
  assert.equal(snap.manifest.immutable?.mode, "GOVERNANCE");
  const until = Date.parse(snap.manifest.immutable!.until);
  assert.ok(
    until >= t0 + 20_000 && until <= Date.now() + 20_000,
    `locked until ${snap.manifest.immutable!.until}`,
  );

  // The gateway holds the manifest's version under that retention and refuses to delete it.
  const manifestKey = `vms/vm1/${time}/manifest.json`;
  const head = await admin.send(new HeadObjectCommand({ Bucket: locked, Key: manifestKey }));
  assert.equal(head.ObjectLockMode, "GOVERNANCE");
  assert.ok(Math.abs((head.ObjectLockRetainUntilDate?.getTime() ?? 0) - until) < 1000);
  const refused = await admin
    .send(new DeleteObjectCommand({ Bucket: locked, Key: manifestKey, VersionId: head.VersionId }))
    .then(
      () => assert.fail("the gateway deleted a version under retention"),
      (err: { name: string; $metadata?: { httpStatusCode?: number } }) => ({
        name: err.name,
        status: err.$metadata?.httpStatusCode,
      }),
    );
  assert.deepEqual(refused, { name: "AccessDenied", status: 403 });

  // The catalog row of the restore point, made by the run.
  const rows = catalog.restorePoints({ vm: "vm1" });
  assert.deepEqual(
    rows.map((r) => [r.time, r.runId]),
    [[time, run.id]],
  );
  assert.equal(rows[0]!.repository, catalog.repositoryAt(`s3:${gw.endpoint}/${locked}`));

  // Immutability asked of a bucket without Object Lock: the run fails saying why, nothing is written.
  d.runNow(job("wrong").id);
  await d.idle();
  const wrong = catalog.lastRun(job("wrong").id)!;
  assert.equal(wrong.outcome, "failed");
  assert.match(wrong.error ?? "", new RegExp(`${plain}.*can't keep restore points immutable`));
  const listed = await admin.send(new ListObjectsV2Command({ Bucket: plain, Prefix: "vms/" }));
  assert.equal(listed.KeyCount ?? 0, 0);

  // A credentials file without keys: the run fails naming the repository and the file.
  d.runNow(job("keyless").id);
  await d.idle();
  const keyless = catalog.lastRun(job("keyless").id)!;
  assert.equal(keyless.outcome, "failed");
  assert.match(
    keyless.error ?? "",
    /^repository nokeys: S3 credentials file \S+empty\.cred has no aws_access_key_id and aws_secret_access_key in \[default\]/,
  );
});
