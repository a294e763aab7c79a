// XFS, which Strata does not read in-process, through libguestfs (an appliance VM against the
// restore point served over NBD). The image is populated without root by mkfs.xfs's protofile.
// Slow: the appliance boots in ~15-25 s under TCG, so this is the one libguestfs test.
import assert from "node:assert/strict";
import { createHash, randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { strataOk, tempDir } from "../helpers/cli.js";
import { sh } from "./images.js";

test("files ls and get read XFS through libguestfs, with modes, owners, times and symlinks", async (t) => {
  const dir = tempDir(t, "strata-xfs-");
  const repo = join(dir, "repo");
  const payload = randomBytes(700 * 1024);
  await fs.writeFile(join(dir, "hello"), "hello from xfs\n");
  await fs.writeFile(join(dir, "payload"), payload);
  // Protofile: "name type+mode uid gid [source|target]"; "$" ends a directory.
  await fs.writeFile(
    join(dir, "proto"),
    [
      "/dev/null",
      "0 0",
      "d--755 0 0",
      `hello.txt ---640 1000 1001 ${join(dir, "hello")}`,
      "sub d--750 0 0",
      `data.bin ---600 0 0 ${join(dir, "payload")}`,
      "$",
      "link l--777 0 0 sub/data.bin",
      "$",
      "",
    ].join("\n"),
  );
  const image = join(dir, "xfs.img");
  await fs.writeFile(image, "");
  await fs.truncate(image, 320 * 1024 * 1024); // mkfs.xfs wants at least 300 MiB
  await sh("mkfs.xfs", ["-q", "-p", join(dir, "proto"), image]);
  await strataOk(["init", "--repo", repo, "--chunk-size", "1M"]);
  await strataOk(["backup", "--repo", repo, "--vm", "x", `file:${image},name=data`]);

  const ls = JSON.parse((await strataOk(["files", "ls", "--repo", repo, "x/latest", "--json"])).stdout) as {
    disks: Array<{ partitions: Array<{ filesystem: string }> }>;
  };
  assert.equal(ls.disks[0]!.partitions[0]!.filesystem, "xfs");

  const out = join(dir, "out");
  const r = await strataOk([
    "files",
    "get",
    "--repo",
    repo,
    "x/latest",
    "/",
    "--to",
    out,
    "--json",
    ...(process.getuid?.() === 0 ? ["--same-owner"] : []),
  ]);
  const s = JSON.parse(r.stdout.trim().split("\n").at(-1)!) as Record<string, number>;
  assert.deepEqual([s.files, s.directories, s.symlinks], [2, 2, 1]);
  assert.equal(await fs.readFile(join(out, "hello.txt"), "utf8"), "hello from xfs\n");
  const data = await fs.readFile(join(out, "sub/data.bin"));
  assert.equal(
    createHash("sha256").update(data).digest("hex"),
    createHash("sha256").update(payload).digest("hex"),
  );
  assert.equal(await fs.readlink(join(out, "link")), "sub/data.bin");
  const hello = await fs.stat(join(out, "hello.txt"));
  assert.equal(hello.mode & 0o7777, 0o640);
  assert.equal((await fs.stat(join(out, "sub"))).mode & 0o7777, 0o750);
  if (process.getuid?.() === 0) assert.deepEqual([hello.uid, hello.gid], [1000, 1001]);
});
