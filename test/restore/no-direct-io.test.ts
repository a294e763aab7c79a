// A repository and a restore target on a filesystem that refuses O_DIRECT (ramfs: opening with
// O_DIRECT fails with EINVAL) work through the page cache instead: backup, verify and restore
// give back exactly the bytes, encrypted or not. Needs root, to mount ramfs.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { strataOk, tempDir } from "../helpers/cli.js";

const run = promisify(execFile);
const MiB = 1024 * 1024;

test("a repository and a restore target without O_DIRECT (ramfs) fall back to the page cache", async (t) => {
  const dir = tempDir(t);
  const mnt = join(dir, "ramfs");
  await fs.mkdir(mnt);
  await run("mount", ["-t", "ramfs", "ramfs", mnt]);
  try {
    await backupAndRestore(dir, mnt);
  } finally {
    await run("umount", [mnt]);
  }
});

async function backupAndRestore(dir: string, mnt: string): Promise<void> {
  // The premise: this filesystem refuses O_DIRECT.
  await assert.rejects(
    fs.open(join(mnt, "probe"), fs.constants.O_WRONLY | fs.constants.O_CREAT | fs.constants.O_DIRECT),
    (e: NodeJS.ErrnoException) => e.code === "EINVAL",
  );

  const image = join(dir, "disk.raw");
  const data = Buffer.alloc(9 * MiB + 777);
  fillContent(data.subarray(0, 3 * MiB), "text", new Prng("ramfs text"));
  fillContent(data.subarray(5 * MiB), "random", new Prng("ramfs random"));
  await fs.writeFile(image, data);
  for (const password of [undefined, "ramfs password"]) {
    const env = { STRATA_PASSWORD: password };
    const repo = join(mnt, password ? "enc" : "plain");
    await strataOk(["init", "--repo", repo, "--chunk-size", "1M"], { env });
    await strataOk(["backup", "--repo", repo, "--vm", "r", `file:${image},name=disk`], { env });
    await strataOk(["verify", "--repo", repo, "--read-data"], { env });
    const target = join(mnt, `out-${password ? "enc" : "plain"}`);
    await strataOk(["restore", "--repo", repo, "r/latest", "--target", target], { env });
    assert.ok((await fs.readFile(join(target, "disk.raw"))).equals(data), `restored (${repo})`);
    const leftovers = (await fs.readdir(repo, { recursive: true })).filter((n) =>
      String(n).includes(".tmp-"),
    );
    assert.deepEqual(leftovers, [], "no temporary objects left");
  }
}
