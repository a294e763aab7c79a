// A guest writes its raw disk, so it can make the disk begin like an image header that names a
// host file: a qcow2 header with an external data file, a VMDK descriptor with a FLAT extent.
// Probed, QEMU would read that host file instead of the disk. `backup file:` must never copy the
// host file into the repository: read as raw by default (with a warning), refused with format=.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { runProgram } from "../../src/util/process.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { storedFiles } from "../helpers/stored.js";

const MiB = 1024 * 1024;
const MARKER = Buffer.from("HOST-SECRET-MARKER-5c1e0b7d");

/** A host file the guest must not reach: 1 MiB of MARKER repeated. */
async function hostSecret(path: string): Promise<void> {
  const buf = Buffer.alloc(MiB);
  for (let off = 0; off + MARKER.length <= buf.length; off += MARKER.length) MARKER.copy(buf, off);
  await fs.writeFile(path, buf);
}

/** A raw "guest disk" of 2 MiB whose first bytes are `head`. */
async function guestDisk(path: string, head: Buffer): Promise<void> {
  const buf = Buffer.alloc(2 * MiB, 0x5a);
  head.copy(buf, 0);
  await fs.writeFile(path, buf);
}

/** The disks' bytes restored from restore point `id` (one file per disk). */
async function restoredBytes(repo: string, id: string, out: string): Promise<Buffer[]> {
  await strataOk(["restore", "--repo", repo, id, "--target", out]);
  return Promise.all((await fs.readdir(out)).sort().map((f) => fs.readFile(join(out, f))));
}

async function repoHasMarker(repo: string): Promise<boolean> {
  // The repository is unencrypted: a stored copy of the secret would show (zstd keeps one literal).
  const files = storedFiles(repo, { temporaries: true });
  assert.ok(files.length > 0, "stored chunks to search");
  for (const f of files) if ((await fs.readFile(f)).includes(MARKER)) return true;
  return false;
}

test("a raw disk holding a qcow2 header with an external data file, or a VMDK FLAT extent, never reads the host file", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const secret = join(dir, "host-secret.bin");

  // The qcow2 header a guest would write: an image whose data lives in the host file.
  const made = join(dir, "made.qcow2");
  await runProgram("qemu-img", [
    "create",
    "-f",
    "qcow2",
    "-o",
    `data_file=${secret},data_file_raw=on`,
    made,
    "1M",
  ]);
  // qemu-img create empties the data file; the secret is written after it. With data_file_raw
  // the image reads as whatever the host file holds.
  await hostSecret(secret);
  const qcowDisk = join(dir, "qcow-guest.img");
  await guestDisk(qcowDisk, await fs.readFile(made));
  const vmdkDisk = join(dir, "vmdk-guest.img");
  await guestDisk(
    vmdkDisk,
    Buffer.from(
      `# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType="monolithicFlat"\n\nRW 2048 FLAT "${secret}" 0\n\nddb.adapterType = "ide"\n`,
    ),
  );
  // The trap is real: probed, QEMU reads the secret through either disk.
  for (const [disk, fmt] of [
    [qcowDisk, "qcow2"],
    [vmdkDisk, "vmdk"],
  ] as const) {
    const probed = join(dir, `probed-${fmt}.raw`);
    await runProgram("qemu-img", ["convert", "-O", "raw", disk, probed]);
    assert.ok((await fs.readFile(probed)).includes(MARKER), `${fmt}: QEMU's probe reads the host file`);
    await fs.rm(probed);
  }

  // Without format=: read as raw, with a warning that names the format it looks like.
  const r = await strataOk([
    "backup",
    "--repo",
    repo,
    "--vm",
    "guest",
    "--json",
    `file:${qcowDisk},name=qcow`,
    `file:${vmdkDisk},name=vmdk`,
  ]);
  assert.match(r.stderr, /qcow-guest\.img begins like a qcow2 image but is read as raw .*,format=qcow2/);
  assert.match(r.stderr, /vmdk-guest\.img begins like a vmdk image but is read as raw .*,format=vmdk/);
  const id = summary(r).id as string;
  const restored = await restoredBytes(repo, id, join(dir, "out"));
  assert.deepEqual(
    restored,
    [await fs.readFile(qcowDisk), await fs.readFile(vmdkDisk)],
    "the disks as the guest wrote them",
  );
  for (const b of restored) assert.ok(!b.includes(MARKER));
  assert.equal(await repoHasMarker(repo), false);

  // With format=: refused before QEMU opens the host file.
  for (const [disk, fmt, why] of [
    [qcowDisk, "qcow2", /refers to another file: an external data file/],
    [vmdkDisk, "vmdk", /refers to another file: an extent in file ".*host-secret\.bin"/],
  ] as const) {
    const bad = await strata(["backup", "--repo", repo, "--vm", `as-${fmt}`, `file:${disk},format=${fmt}`]);
    assert.equal(bad.code, 1, bad.stderr);
    assert.match(bad.stderr, why);
  }
  assert.equal(await repoHasMarker(repo), false);
  const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as unknown[];
  assert.equal(snaps.length, 1, "the refused backups left no restore point");
});

test("images that refer to other files are refused with format=, also when only qemu-img sees it", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const secret = join(dir, "host-secret.bin");
  await hostSecret(secret);
  // A real monolithicFlat VMDK (descriptor + extent file) and a sparse VMDK whose embedded
  // descriptor names a parent.
  const flat = join(dir, "flat.vmdk");
  await runProgram("qemu-img", ["create", "-f", "vmdk", "-o", "subformat=monolithicFlat", flat, "1M"]);
  const base = join(dir, "base.vmdk");
  await runProgram("qemu-img", ["create", "-f", "vmdk", base, "1M"]);
  const child = join(dir, "child.vmdk");
  await runProgram("qemu-img", ["create", "-f", "vmdk", "-b", base, "-F", "vmdk", child]);
  // A qcow2 whose backing file is the secret, read as raw through it.
  const overlay = join(dir, "overlay.qcow2");
  await runProgram("qemu-img", ["create", "-f", "qcow2", "-b", secret, "-F", "raw", overlay]);
  for (const [image, fmt, why] of [
    [flat, "vmdk", /an extent in file "flat-flat\.vmdk"/],
    [child, "vmdk", /a parent \(backing\) file/],
    [overlay, "qcow2", /a backing file/],
  ] as const) {
    const r = await strata(["backup", "--repo", repo, "--vm", "x", `file:${image},format=${fmt}`]);
    assert.equal(r.code, 1, `${image}: ${r.stderr}`);
    assert.match(r.stderr, why);
  }
  // A plain sparse VMDK and qcow2 with nothing outside them back up.
  await runProgram("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", secret, join(dir, "self.qcow2")]);
  await strataOk([
    "backup",
    "--repo",
    repo,
    "--vm",
    "ok",
    `file:${base},format=vmdk`,
    `file:${join(dir, "self.qcow2")},format=qcow2`,
  ]);
});
