// Restore sinks through the real CLI: sparse qcow2 images and block devices (loop devices).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { imageInfo } from "../../src/image/qemu-img.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { backedUpImage, CHUNK, tool, zeroChunks } from "../serve/helpers.js";

test("--format qcow2 writes an identical, clean, sparse qcow2", async (t) => {
  const dir = tempDir(t);
  const size = 32 * 1024 * 1024;
  const b = await backedUpImage(dir, { size, seed: "qcow2 sink", holes: 0.75 });
  const out = join(dir, "out");
  const r = summary<{ disks: Array<{ path: string; size: number; bytesWritten: number }> }>(
    await strataOk(["restore", "--repo", b.repo, b.id, "--target", out, "--format", "qcow2", "--json"]),
  );
  const q = join(out, "root.qcow2");
  assert.equal(r.disks[0]!.path, q);
  assert.deepEqual(await fs.readdir(out), ["root.qcow2"], "no temporary file left");
  await tool("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", q, b.image]);
  await tool("qemu-img", ["check", "-f", "qcow2", q]);
  const info = await imageInfo(q, { format: "qcow2" });
  assert.equal(info.format, "qcow2");
  assert.equal(info.virtualSize, size);
  const data = (await zeroChunks(b.image)).filter((z) => !z).length * CHUNK;
  assert.equal(r.disks[0]!.bytesWritten, data);
  // Only the data chunks are allocated: about a quarter of the disk, plus metadata.
  assert.ok(info.actualSize < data + 2 * 1024 * 1024, `actual ${info.actualSize}, data ${data}`);
  assert.ok(info.actualSize < size / 2, `actual ${info.actualSize} of ${size}`);
  const map = JSON.parse(await tool("qemu-img", ["map", "--output=json", "-f", "qcow2", q])) as Array<{
    start: number;
    length: number;
    data: boolean;
  }>;
  const allocated = map.filter((e) => e.data).reduce((n, e) => n + e.length, 0);
  assert.equal(allocated, data);

  // An existing file is replaced only with --force.
  const again = await strata(["restore", "--repo", b.repo, b.id, "--target", out, "--format", "qcow2"]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /exists \(use --force to replace it\)/);
  await strataOk(["restore", "--repo", b.repo, b.id, "--target", out, "--format", "qcow2", "--force"]);
  await tool("qemu-img", ["compare", "-f", "qcow2", "-F", "raw", q, b.image]);
});

/** A loop device over a new file of `size` bytes filled with random data; detached after the test. */
async function loopDevice(t: TestContext, dir: string, name: string, size: number): Promise<string> {
  const file = join(dir, name);
  await fs.writeFile(file, randomBytes(size));
  const dev = (await tool("losetup", ["-f", "--show", file])).trim();
  assert.match(dev, /^\/dev\/loop\d+$/);
  t.after(() => tool("losetup", ["-d", dev]).then(() => undefined));
  return dev;
}

async function readDevice(dev: string, length: number): Promise<Buffer> {
  const fh = await fs.open(dev, "r");
  try {
    const buf = Buffer.alloc(length);
    let off = 0;
    while (off < length) {
      const { bytesRead } = await fh.read(buf, off, length - off, off);
      if (bytesRead === 0) break;
      off += bytesRead;
    }
    return buf.subarray(0, off);
  } finally {
    await fh.close();
  }
}

test("--device restores onto a loop device: zero chunks overwritten, the rest of the device kept", async (t) => {
  const dir = tempDir(t);
  const size = 8 * 1024 * 1024 + 3 * 4096;
  const b = await backedUpImage(dir, { size, seed: "device sink", holes: 0.5 });
  // Larger than the disk, and full of old data that must not show through the zero chunks.
  const dev = await loopDevice(t, dir, "dev.img", 9 * 1024 * 1024);
  const before = await readDevice(dev, 9 * 1024 * 1024);

  const refused = await strata(["restore", "--repo", b.repo, b.id, "--disk", "root", "--device", dev]);
  assert.equal(refused.code, 1);
  assert.match(refused.stderr, /destroys everything on it: add --force/);
  assert.ok((await readDevice(dev, before.length)).equals(before), "untouched without --force");

  const r = summary<{ disks: Array<{ bytesWritten: number; bytesZeroed: number; deviceSize: number }> }>(
    await strataOk([
      "restore",
      "--repo",
      b.repo,
      b.id,
      "--disk",
      "root",
      "--device",
      dev,
      "--force",
      "--json",
    ]),
  );
  const zeros = await zeroChunks(b.image);
  assert.ok(zeros.some((z) => z) && zeros.some((z) => !z));
  assert.equal(r.disks[0]!.deviceSize, 9 * 1024 * 1024);
  assert.equal(r.disks[0]!.bytesWritten + r.disks[0]!.bytesZeroed, size);
  const after = await readDevice(dev, before.length);
  assert.ok(after.subarray(0, size).equals(await fs.readFile(b.image)), "device holds the disk");
  assert.ok(after.subarray(size).equals(before.subarray(size)), "bytes past the disk are untouched");
});

test("--device refuses a too-small device, a regular file, and missing --disk", async (t) => {
  const dir = tempDir(t);
  const b = await backedUpImage(dir, { size: 2 * 1024 * 1024, seed: "device refusals" });
  const small = await loopDevice(t, dir, "small.img", 1024 * 1024);
  const before = await readDevice(small, 1024 * 1024);
  const cases: Array<[string[], number, RegExp]> = [
    [["--disk", "root", "--device", small, "--force"], 1, /too small for disk root/],
    [["--disk", "root", "--device", b.image, "--force"], 1, /is not a block device/],
    [["--device", small, "--force"], 2, /--device needs --disk NAME/],
    [
      ["--disk", "root", "--device", small, "--target", dir],
      2,
      /exactly one of --target DIR or --device PATH/,
    ],
    [["--disk", "root", "--device", small, "--format", "qcow2"], 2, /--format does not apply to --device/],
    [["--target", dir, "--format", "vmdk"], 2, /--format vmdk/],
    [["--disk", "nope", "--device", small, "--force"], 1, /has no disk "nope"/],
  ];
  for (const [args, code, message] of cases) {
    const r = await strata(["restore", "--repo", b.repo, b.id, ...args]);
    assert.equal(r.code, code, `${args.join(" ")}: ${r.stderr}`);
    assert.match(r.stderr, message);
  }
  assert.ok((await readDevice(small, before.length)).equals(before), "small device untouched");
});
