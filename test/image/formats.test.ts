// Image-file sources: every format QEMU reads backs up and restores byte-identical to
// `qemu-img convert -O raw` of the source; sparse images cost what they hold, not their size.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { StorageDaemon } from "../../src/image/storage-daemon.js";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { runProgram } from "../../src/util/process.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const MiB = 1024 * 1024;

test("raw, qcow2, vmdk, vhdx, vpc and vdi images restore identical to qemu-img's raw conversion", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  const raw = join(dir, "src.raw");
  await writeSyntheticImage(raw, { size: 48 * MiB + 4096, seed: "formats", holes: 0.4 });
  const formats = ["qcow2", "vmdk", "vhdx", "vpc", "vdi"];
  const sources = [`file:${raw},name=raw`];
  for (const f of formats) {
    const p = join(dir, `src.${f}`);
    await runProgram("qemu-img", ["convert", "-f", "raw", "-O", f, raw, p]);
    sources.push(`file:${p},name=${f},format=${f}`);
  }
  const b = summary(await strataOk(["backup", "--repo", repo, "--vm", "fmt", "--json", ...sources]));
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, b.id as string, "--target", out]);
  for (const f of ["raw", ...formats]) {
    const src = f === "raw" ? raw : join(dir, `src.${f}`);
    const expected = join(dir, `expected-${f}.raw`);
    await runProgram("qemu-img", ["convert", "-O", "raw", src, expected]);
    assert.equal(await sha256File(join(out, `${f}.raw`)), await sha256File(expected), f);
    await fs.rm(expected);
  }
  // The same content in six formats is stored once: every format after the first reuses it.
  const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
    bytesNew: number;
  }>;
  assert.ok(snaps[0]!.bytesNew < 50 * MiB, `stored ${snaps[0]!.bytesNew} new bytes for six copies`);
});

test("a 64 GiB sparse image with 100 MiB of data reads only its data", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo]);
  const raw = join(dir, "big.raw");
  const fh = await fs.open(raw, "w");
  await fh.truncate(64 * 1024 * MiB);
  const data = Buffer.alloc(MiB, "strata sparse test data ");
  for (let i = 0; i < 100; i++) await fh.write(data, 0, MiB, i * 613 * MiB + 4096);
  await fh.close();
  const qcow = join(dir, "big.qcow2");
  await runProgram("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", raw, qcow]);
  for (const src of [raw, `${qcow},format=qcow2`]) {
    const b = summary(await strataOk(["backup", "--repo", repo, "--vm", "sparse", "--json", `file:${src}`]));
    assert.equal(b.size, 64 * 1024 * MiB);
    // 100 regions of 1 MiB, each touching at most two 4 MiB chunks.
    assert.ok((b.bytesRead as number) <= 200 * 4 * MiB, `${src}: read ${b.bytesRead} bytes`);
    assert.ok((b.bytesRead as number) >= 100 * MiB);
  }
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "sparse/latest", "--target", out]);
  const restored = join(out, "big.raw");
  assert.equal((await fs.stat(restored)).size, 64 * 1024 * MiB);
  assert.ok((await fs.stat(restored)).blocks * 512 < 1024 * MiB, "the restored file is sparse");
  const cmp = await runProgram("qemu-img", ["compare", "-f", "raw", "-F", "raw", raw, restored]);
  assert.match(cmp, /Images are identical/);
});

test("an image a running VM holds open is refused; an overlay is refused, read as raw unless stated", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo]);
  const img = join(dir, "busy.qcow2");
  await runProgram("qemu-img", ["create", "-f", "qcow2", img, "16M"]);
  // A writable qemu-storage-daemon stands in for the VM: it takes the same image locks QEMU does.
  const vm = await StorageDaemon.start([{ path: img, format: "qcow2", name: "busy", writable: true }]);
  t.after(() => vm.stop());
  const r = await strata(["backup", "--repo", repo, "--vm", "busy", `file:${img},format=qcow2`]);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /in use by a running VM/);
  await vm.stop();
  await strataOk(["backup", "--repo", repo, "--vm", "busy", `file:${img},format=qcow2`]);

  // An overlay refers to its backing file: refused as qcow2; without a format it is read as raw
  // (its own bytes, header included), with a warning.
  const overlay = join(dir, "overlay.qcow2");
  await runProgram("qemu-img", ["create", "-f", "qcow2", "-b", img, "-F", "qcow2", overlay]);
  const stated = await strata(["backup", "--repo", repo, "--vm", "ov", `file:${overlay},format=qcow2`]);
  assert.equal(stated.code, 1);
  assert.match(stated.stderr, /refers to another file: a backing file/);
  const raw = await strataOk(["backup", "--repo", repo, "--vm", "ov", "--json", `file:${overlay}`]);
  assert.match(raw.stderr, /begins like a qcow2 image but is read as raw/);
  assert.equal(summary(raw).size, (await fs.stat(overlay)).size);
  const badFormat = await strata(["backup", "--repo", repo, "--vm", "ov", `file:${overlay},format=qcow3`]);
  assert.equal(badFormat.code, 2);
});

/** A stopped QEMU (-S: no guest runs) with `disk` on a virtio-blk device, as a VM holds its disk. */
async function vmHolding(
  t: TestContext,
  disk: string,
  driver: "file" | "host_device",
): Promise<() => Promise<void>> {
  const qemu = spawn(
    "qemu-system-x86_64",
    [
      ...["-M", "q35", "-S", "-nodefaults", "-display", "none", "-accel", "tcg"],
      ...["-blockdev", `driver=${driver},filename=${disk},node-name=f0`],
      ...["-blockdev", "driver=raw,file=f0,node-name=d0", "-device", "virtio-blk-pci,drive=d0"],
    ],
    { stdio: "ignore" },
  );
  const exited = new Promise((res) => qemu.on("exit", res));
  const stop = async () => {
    qemu.kill("SIGKILL");
    await exited;
  };
  t.after(stop);
  // QEMU has taken its locks once a write-lock probe fails.
  for (let i = 0; i < 200; i++) {
    const probe = await runProgram("qemu-io", ["-f", "raw", "-c", "quit", disk]).then(
      () => "free",
      (e: Error) => e.message,
    );
    if (/lock/.test(probe)) return stop;
    await sleep(25);
  }
  throw new Error(`QEMU did not lock ${disk}`);
}

test("a raw image or block device a running VM writes is refused, though Strata reads it itself", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo]);
  const img = join(dir, "busy.raw");
  await fs.writeFile(img, Buffer.alloc(4 * 1024 * 1024, 7));
  const mtime = (await fs.stat(img)).mtimeMs;
  let stop = await vmHolding(t, img, "file");
  const r = await strata(["backup", "--repo", repo, "--vm", "busy", `file:${img}`]);
  assert.equal(r.code, 1, r.stderr);
  assert.match(r.stderr, /in use by a running VM/);
  await stop();
  await strataOk(["backup", "--repo", repo, "--vm", "busy", `file:${img}`]);
  assert.equal((await fs.stat(img)).mtimeMs, mtime, "the check wrote nothing");

  // The same disk as a block device (a loop device; the tests run as root), as a VM on LVM or a
  // SAN volume holds it.
  const loop = (await runProgram("losetup", ["--find", "--show", img])).trim();
  t.after(() => runProgram("losetup", ["-d", loop]).catch(() => {}));
  stop = await vmHolding(t, loop, "host_device");
  const b = await strata(["backup", "--repo", repo, "--vm", "dev", `file:${loop}`]);
  assert.equal(b.code, 1, b.stderr);
  assert.match(b.stderr, /in use by a running VM/);
  await stop();
  await strataOk(["backup", "--repo", repo, "--vm", "dev", `file:${loop}`]);
});
