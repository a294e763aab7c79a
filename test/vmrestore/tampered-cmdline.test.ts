// A restore point's QEMU command line changed in the repository, the way someone who can write
// to an unencrypted repository would: the configuration blob re-encoded with Strata's own codec,
// its checksum put in the manifest and the manifest resealed (an unencrypted repository's seal
// is a plain hash). `verify` finds nothing wrong; the command-line policy does:
//  - a tap whose script= is a shell script that would create a marker file: restore --start
//    (a clone and in place) and instant refuse the configuration when they read it; the script
//    never runs and nothing is written;
//  - options that read as harmless but point outside the VM's own files (an initrd only root may
//    read, a pid file elsewhere): the check of the exact argv right before QEMU is spawned
//    refuses them; QEMU never starts.
// The restore points are made in-process from a small in-memory disk with the configuration a
// QEMU VM records, since no real VM records such a command line.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { chmod, mkdir, readdir, readFile, rm, stat, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { sealJson } from "../../src/repo/sealed-json.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const SIZE = 1 << 20;
const exists = (p: string) =>
  stat(p).then(
    () => true,
    () => false,
  );

/** The configuration a live backup records for a one-disk VM at `vmDir`. */
function vmConfig(vmDir: string) {
  const disk = join(vmDir, "vblk0.raw");
  const run = join(vmDir, "run");
  return {
    kind: "qemu",
    name: "web1",
    uuid: "6f1c1d2e-3b4a-4c5d-8e9f-0a1b2c3d4e5f",
    machine: "q35",
    cpus: 1,
    memoryBytes: 128 * 2 ** 20,
    disks: [{ name: "vblk0", node: "disk0", device: "vblk0", format: "raw", file: disk, size: SIZE }],
    nics: [{ id: "net0", type: "virtio-net-pci", mac: "52:54:00:12:34:56" }],
    firmware: "seabios (default)",
    commandLine: [
      "/usr/bin/qemu-system-x86_64",
      "-name",
      "web1",
      "-machine",
      "q35,accel=tcg",
      "-m",
      "128",
      "-nodefaults",
      "-display",
      "none",
      "-chardev",
      `socket,id=qmp0,path=${run}/qmp.sock,server=on,wait=off`,
      "-mon",
      "chardev=qmp0,mode=control",
      "-chardev",
      `file,id=serial0,path=${run}/console.log`,
      "-serial",
      "chardev:serial0",
      "-blockdev",
      `driver=file,filename=${disk},node-name=disk0-file`,
      "-blockdev",
      "driver=raw,file=disk0-file,node-name=disk0",
      "-device",
      "virtio-blk-pci,drive=disk0,id=vblk0",
      "-netdev",
      "user,id=n0",
      "-device",
      "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56",
    ],
  };
}

async function restorePoint(repoDir: string, config: object): Promise<string> {
  const repo = await Repository.open(new FsStore(repoDir));
  try {
    const data = Buffer.alloc(SIZE, 0x5a);
    const r = await backup(repo, {
      vm: "web1",
      disks: [
        {
          name: "vblk0",
          source: "memory",
          size: SIZE,
          read: async (offset, length) => data.subarray(offset, offset + length),
        },
      ],
      mode: "snapshot",
      consistency: "crash-consistent",
      config: Buffer.from(JSON.stringify(config)),
    });
    return r.id;
  } finally {
    await repo.close();
  }
}

/** Rewrites restore point `id`'s configuration as an attacker would, and reseals its manifest. */
async function tamper(repoDir: string, id: string, edit: (argv: string[]) => string[]): Promise<void> {
  const [vm, time] = id.split("/") as [string, string];
  const manifestPath = join(repoDir, "vms", vm, time, "manifest.json");
  const manifest = JSON.parse(await readFile(manifestPath, "utf8")) as Record<string, unknown> & {
    config: { name: string; size: number; checksum: string };
  };
  const repo = await Repository.open(new FsStore(repoDir));
  try {
    const snap = (await repo.snapshots()).find((s) => s.vm === vm && s.time === time)!;
    const config = JSON.parse((await repo.blob(snap, manifest.config)).toString("utf8")) as {
      commandLine: string[];
    };
    config.commandLine = edit(config.commandLine);
    const blob = Buffer.from(JSON.stringify(config));
    const { blob: stored } = await repo.codec().encode(Buffer.from(blob));
    await writeFile(join(repoDir, "vms", vm, time, manifest.config.name), stored);
    manifest.config = { ...manifest.config, size: blob.length, checksum: repo.blobChecksum(blob) };
  } finally {
    await repo.close();
  }
  delete manifest.seal;
  await writeFile(manifestPath, sealJson(manifest));
}

describe("a tampered QEMU command line", { timeout: 120_000 }, () => {
  test("a tap script is refused when the configuration is read: it never runs", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo]);
    const vmDir = join(dir, "vm");
    const id = await restorePoint(repo, vmConfig(vmDir));
    // The untampered configuration is usable.
    const args = await strataOk(["--repo", repo, "restore", id, "--config-only", "--as", "qemu-args"]);
    assert.match(args.stdout, /^\/usr\/bin\/qemu-system-x86_64 -name web1 /);

    const evil = join(dir, "x", "evil.sh");
    const marker = join(dir, "x", "marker");
    await mkdir(join(dir, "x"));
    await writeFile(evil, `#!/bin/sh\ntouch ${marker}\n`, { mode: 0o755 });
    // The script works: run by hand, it leaves the marker (then removed again).
    execFileSync(evil);
    assert.ok(await exists(marker));
    await rm(marker);

    await tamper(repo, id, (argv) => [...argv, "-netdev", `tap,id=n1,script=${evil}`]);
    // Nothing in the repository gives the change away.
    const v = summary<{ ok: boolean }>(await strataOk(["--repo", repo, "verify", "--read-data", "--json"]));
    assert.equal(v.ok, true);

    const clone = join(dir, "clone");
    const ir = join(dir, "ir");
    for (const cmd of [
      ["restore", id, "--target", clone, "--name", "web1b", "--start"],
      ["restore", id, "--force", "--start"],
      ["restore", id, "--config-only", "--as", "qemu-args"],
      ["instant", id, "--name", "web1-ir", "--target", ir],
    ]) {
      const r = await strata(["--repo", repo, ...cmd], { env });
      assert.equal(r.code, 3, `${cmd.join(" ")}: exit ${r.code}: ${r.stderr}`);
      assert.match(r.stderr, /the restore point's QEMU configuration is not usable/);
      assert.match(
        r.stderr,
        new RegExp(`-netdev tap: script=${evil.replaceAll("/", "\\/")} runs a host program`),
      );
      assert.equal(r.stdout, "");
    }
    assert.equal(await exists(marker), false, "the script never ran");
    for (const p of [clone, ir, vmDir]) assert.equal(await exists(p), false, `nothing written at ${p}`);
  });

  test("what passes when read but points outside the VM's files is refused right before QEMU starts", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo]);
    const vmDir = join(dir, "vm");
    const secret = join(dir, "secret.key");
    await writeFile(secret, "only root may read this\n", { mode: 0o600 });
    await chmod(dir, 0o755);
    const id = await restorePoint(repo, vmConfig(vmDir));
    await tamper(repo, id, (argv) => [...argv, "-initrd", secret]);

    // A clone: its disk is restored, but QEMU would have shown root's secret to the guest.
    const clone = join(dir, "clone");
    const r = await strata(["--repo", repo, "restore", id, "--target", clone, "--name", "web1b", "--start"], {
      env,
    });
    assert.equal(r.code, 3, r.stderr);
    assert.match(
      r.stderr,
      new RegExp(
        `refusing to run QEMU: -initrd: -initrd=${secret} is not readable by every user of this host`,
      ),
    );
    assert.deepEqual((await readdir(clone)).sort(), ["run", "vblk0.raw", "web1b.json"]);
    assert.deepEqual(await readdir(join(clone, "run")), [], "QEMU never started");

    // Instant recovery: the same check, on the argv with its NBD backing.
    const ir = join(dir, "ir");
    const i = await strata(["--repo", repo, "instant", id, "--name", "web1-ir", "--target", ir], { env });
    assert.equal(i.code, 3, i.stderr);
    assert.match(i.stderr, /refusing to run QEMU: -initrd: .* is not readable by every user of this host/);
    assert.equal(await exists(join(ir, "run", "qemu.log")), false, "QEMU never started");
    const list = await strataOk(["--repo", repo, "instant", "list", "--json"], { env });
    assert.deepEqual(JSON.parse(list.stdout), []);

    // In place: a pid file outside the VM's run directory.
    const id2 = await restorePoint(repo, vmConfig(vmDir));
    const pid = join(dir, "elsewhere", "evil.pid");
    await tamper(repo, id2, (argv) => [...argv, "-pidfile", pid]);
    const p = await strata(["--repo", repo, "restore", id2, "--start"], { env });
    assert.equal(p.code, 3, p.stderr);
    assert.match(
      p.stderr,
      new RegExp(
        `refusing to run QEMU: -pidfile: -pidfile=${pid} is outside the run directory \\(${vmDir}/run\\)`,
      ),
    );
    assert.equal(await exists(pid), false);
    assert.equal(await exists(join(vmDir, "run", "qemu.log")), false, "QEMU never started");
  });
});
