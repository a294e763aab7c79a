// A write that fails during a backup is reported for what it is (disk full, read-only
// filesystem), never as a damaged repository, and loses nothing: the restore points before it
// verify and restore. The repository lives on a small tmpfs mounted by the test (tests run as root).
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { runProgram } from "../../src/util/process.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const MiB = 1024 * 1024;

async function randomDisk(path: string, size: number, seed: string): Promise<Buffer> {
  const buf = Buffer.alloc(size);
  fillContent(buf, "random", new Prng(seed));
  await fs.writeFile(path, buf);
  return buf;
}

function errorLine(stderr: string): { code: string; message: string } {
  const line = stderr
    .trim()
    .split("\n")
    .reverse()
    .find((l) => l.includes('"type":"error"'));
  assert.ok(line, `no error line in: ${stderr}`);
  return JSON.parse(line) as { code: string; message: string };
}

test("a full or read-only repository filesystem is reported as such during a backup, and loses nothing", async (t) => {
  const dir = tempDir(t);
  const mnt = join(dir, "tmpfs");
  await fs.mkdir(mnt);
  await runProgram("mount", ["-t", "tmpfs", "-o", "size=8m", "tmpfs", mnt]);
  try {
    const repo = join(mnt, "repo");
    await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
    const small = join(dir, "small.img");
    const smallData = await randomDisk(small, 2 * MiB, "small");
    const first = summary(
      await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${small}`]),
    );

    // 16 MiB of incompressible data into what is left of 8 MiB.
    const big = join(dir, "big.img");
    await randomDisk(big, 16 * MiB, "big");
    const full = await strata(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${big}`]);
    assert.equal(full.code, 1, full.stderr);
    const e = errorLine(full.stderr);
    assert.equal(e.code, "NO_SPACE");
    assert.match(e.message, /no space left on device/);
    assert.doesNotMatch(e.message, /corrupt|damaged/i);

    // Read-only: the same filesystem remounted.
    await runProgram("mount", ["-o", "remount,ro", mnt]);
    const ro = await strata(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${small}`]);
    assert.equal(ro.code, 1);
    const r = errorLine(ro.stderr);
    assert.equal(r.code, "READ_ONLY");
    assert.match(r.message, /read-only filesystem/);
    await runProgram("mount", ["-o", "remount,rw", mnt]);

    // Nothing lost: the first restore point is the only one, and it verifies and restores.
    const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
      id: string;
    }>;
    assert.deepEqual(
      snaps.map((s) => s.id),
      [first.id],
    );
    await strataOk(["verify", "--repo", repo, "--read-data"]);
    const out = join(dir, "out");
    await strataOk(["restore", "--repo", repo, String(first.id), "--target", out]);
    assert.deepEqual(await fs.readFile(join(out, "small.raw")), smallData);
  } finally {
    await runProgram("umount", [mnt]);
  }
});
