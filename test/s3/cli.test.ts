// The strata CLI on an S3 repository (a real Ceph RADOS Gateway): init, backup of a file: image,
// snapshots, bit-exact restores, verify --read-data, forget and gc, with credentials from the
// environment only; and the errors for no credentials, a missing bucket and a v1 repository.
// Prints backup and restore throughput to S3 beside a local repository in the same run.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { createBucket, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const gateway = gatewayForFile();

const MiB = 1024 * 1024;

test("init, backup, snapshots, restore bit-exact, verify --read-data, forget, gc on s3:", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const repo = `s3:${gateway().endpoint}/${await createBucket(gateway())}/site-a/host1`;
  const img = join(dir, "disk.img");
  const size = 64 * MiB;
  await writeSyntheticImage(img, { size, seed: "s3-cli", holes: 0 });
  const init = await strataOk(["init", "--repo", repo, "--chunk-size", "256K"], env);
  assert.match(init.stdout, new RegExp(`created repository \\w+ at ${repo.replace(/[.:/]/g, "\\$&")}`));
  const again = await strata(["init", "--repo", repo], env);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /a repository already exists at s3:/);

  let t0 = performance.now();
  const first = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  const backupS = (performance.now() - t0) / 1000;
  const firstSha = await sha256File(img);
  const fh = await fs.open(img, "r+");
  // Half the disk rewritten: whole packs of the first backup become garbage once it is forgotten.
  await fh.write(randomBytes(32 * MiB), 0, 32 * MiB, 16 * MiB);
  await fh.close();
  const second = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], env),
  );
  assert.equal(second.parent, first.time);
  const bytesNew = second.bytesNew as number;
  assert.ok(
    bytesNew >= 32 * MiB && bytesNew <= 33 * MiB,
    `incremental stored ${bytesNew} bytes for 32 MiB changed`,
  );

  const snaps = summary<{ id: string }[]>(await strataOk(["snapshots", "--repo", repo, "--json"], env));
  assert.deepEqual(
    snaps.map((s) => s.id),
    [first.id, second.id],
  );

  const out1 = join(dir, "r1");
  t0 = performance.now();
  await strataOk(["restore", "--repo", repo, first.id as string, "--target", out1], env);
  const restoreS = (performance.now() - t0) / 1000;
  assert.equal(await sha256File(join(out1, "disk.raw")), firstSha);
  const out2 = join(dir, "r2");
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out2], env);
  assert.equal(await sha256File(join(out2, "disk.raw")), await sha256File(img));

  await strataOk(["verify", "--repo", repo, "--read-data"], env);
  await strataOk(["forget", "--repo", repo, first.id as string], env);
  const gc1 = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env));
  const gc2 = summary(await strataOk(["gc", "--repo", repo, "--grace", "0s", "--json"], env));
  assert.ok(
    ((gc1.packsCondemned as number) ?? 0) + ((gc1.packsRepacked as number) ?? 0) > 0,
    `first gc: ${JSON.stringify(gc1)}`,
  );
  assert.ok(((gc2.packsDeleted as number) ?? 0) > 0, `second gc: ${JSON.stringify(gc2)}`);
  await strataOk(["verify", "--repo", repo, "--read-data"], env);
  const out3 = join(dir, "r3");
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out3], env);
  assert.equal(await sha256File(join(out3, "disk.raw")), await sha256File(img));

  // The same image into a local repository, in the same run, for comparison.
  const local = join(dir, "local");
  await strataOk(["init", "--repo", local, "--chunk-size", "256K"]);
  const img0 = join(dir, "disk0.img");
  await writeSyntheticImage(img0, { size, seed: "s3-cli", holes: 0 });
  t0 = performance.now();
  await strataOk(["backup", "--repo", local, "--vm", "vm1", `file:${img0}`]);
  const localBackupS = (performance.now() - t0) / 1000;
  t0 = performance.now();
  await strataOk(["restore", "--repo", local, "vm1/latest", "--target", join(dir, "r4")]);
  const localRestoreS = (performance.now() - t0) / 1000;
  const rate = (s: number) => `${(size / MiB / s).toFixed(1)} MiB/s`;
  console.log(
    `64 MiB of random data (whole command, process start included): backup to S3 ${rate(backupS)}, restore from S3 ${rate(restoreS)}; ` +
      `local repository: backup ${rate(localBackupS)}, restore ${rate(localRestoreS)}`,
  );
});

test("no credentials, a missing bucket, wrong keys and no gateway end with errors that say so", async (t) => {
  const dir = tempDir(t);
  const bucket = await createBucket(gateway());
  const none = await strata(["init", "--repo", `s3:${gateway().endpoint}/${bucket}`], {
    env: {
      AWS_ACCESS_KEY_ID: undefined,
      AWS_SECRET_ACCESS_KEY: undefined,
      STRATA_S3_CREDENTIALS: join(dir, "none"),
      HOME: dir,
    },
  });
  assert.notEqual(none.code, 0);
  assert.match(none.stderr, /no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY/);

  const missing = await strata(["snapshots", "--repo", `s3:${gateway().endpoint}/strata-missing-bucket`], {
    env: gatewayEnv(gateway()),
  });
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /bucket strata-missing-bucket does not exist/);

  const creds = join(dir, "credentials");
  await fs.writeFile(
    creds,
    `[default]\naws_access_key_id = ${gateway().accessKeyId}\naws_secret_access_key = wrong\n`,
  );
  const wrong = await strata(["init", "--repo", `s3:${gateway().endpoint}/${bucket}`], {
    env: { AWS_ACCESS_KEY_ID: undefined, AWS_SECRET_ACCESS_KEY: undefined, STRATA_S3_CREDENTIALS: creds },
  });
  assert.notEqual(wrong.code, 0);
  assert.match(
    wrong.stderr,
    /access denied \(HTTP 403\) to stat strata-\w+\/config .*: the S3 credentials are wrong/,
  );

  // --s3-credentials names the file to use, before the environment and STRATA_S3_CREDENTIALS.
  const good = join(dir, "good.credentials");
  await fs.writeFile(
    good,
    `[default]\naws_access_key_id = ${gateway().accessKeyId}\naws_secret_access_key = ${gateway().secretAccessKey}\n`,
  );
  await strataOk(["init", "--repo", `s3:${gateway().endpoint}/${bucket}`, "--s3-credentials", good], {
    env: { AWS_ACCESS_KEY_ID: "wrong", AWS_SECRET_ACCESS_KEY: "wrong", STRATA_S3_CREDENTIALS: creds },
  });

  // Nothing listens: retried with backoff (a gateway restarting), then named.
  const refused = await strata(["snapshots", "--repo", "s3:http://127.0.0.1:1/bucket"], {
    env: gatewayEnv(gateway()),
  });
  assert.notEqual(refused.code, 0);
  assert.match(
    refused.stderr,
    /^strata: get bucket\/config failed 6 times, the last: connect ECONNREFUSED 127\.0\.0\.1:1$/m,
  );

  const help = await strataOk(["init", "--help"]);
  assert.match(help.stdout, /s3:https:\/\/HOST\[:PORT\]\/BUCKET\[\/PREFIX\]/);
});
