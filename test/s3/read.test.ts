// Reading restore points straight out of an S3 repository (a real RADOS Gateway), without a full
// restore: single files from an ext4 disk with `files ls`/`files get`, and the disk served over
// NBD with `serve`, read back exactly by qemu-img.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { createBucket, gatewayEnv, gatewayForFile } from "../helpers/ceph.js";
import { strataOk, tempDir } from "../helpers/cli.js";
import { startServe, tool } from "../serve/helpers.js";

const run = promisify(execFile);
const gateway = gatewayForFile();

test("files ls and get, and serve over NBD, read an ext4 disk out of an S3 repository", async (t) => {
  const dir = tempDir(t);
  const env = { env: gatewayEnv(gateway()) };
  const repo = `s3:${gateway().endpoint}/${await createBucket(gateway())}/r`;
  const tree = join(dir, "tree");
  await fs.mkdir(join(tree, "etc"), { recursive: true });
  const blob = randomBytes(3_000_000);
  await fs.writeFile(join(tree, "etc", "motd"), "hello from the bucket\n");
  await fs.writeFile(join(tree, "etc", "blob"), blob);
  const img = join(dir, "fs.img");
  await fs.writeFile(img, "");
  await fs.truncate(img, 64 * 1024 * 1024);
  await run("mkfs.ext4", ["-q", "-d", tree, img]);
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"], env);
  await strataOk(["backup", "--repo", repo, "--vm", "v", `file:${img}`], env);

  const ls = await strataOk(["files", "ls", "--repo", repo, "v/latest", "/etc"], env);
  assert.match(ls.stdout, /3000000 .* blob/);
  assert.match(ls.stdout, /22 .* motd/);
  const out = join(dir, "out");
  await strataOk(["files", "get", "--repo", repo, "v/latest", "/etc/motd", "/etc/blob", "--to", out], env);
  assert.equal(await fs.readFile(join(out, "motd"), "utf8"), "hello from the bucket\n");
  assert.deepEqual(await fs.readFile(join(out, "blob")), blob);

  const socket = join(dir, "s.sock");
  const served = await startServe(t, ["--repo", repo, "v/latest", "--socket", socket], gatewayEnv(gateway()));
  const copy = join(dir, "served.raw");
  await tool("qemu-img", ["convert", "-f", "raw", `nbd+unix:///fs?socket=${socket}`, "-O", "raw", copy]);
  assert.equal(Buffer.compare(await fs.readFile(copy), await fs.readFile(img)), 0, "served bytes = the disk");
  const stopped = await served.stop();
  assert.equal(stopped.code, 0, stopped.stderr);
});
