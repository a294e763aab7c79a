// A repository others can write may hold a tampered VM configuration: restore, restore
// --config-only and instant refuse it through the real CLI, name what is wrong, and write or
// start nothing. The restore points are made in-process (a backup of a small in-memory disk
// with a crafted configuration document), since no real VM records such a configuration.
import assert from "node:assert/strict";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { backup } from "../../src/engine/backup.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { strata, strataOk, tempDir } from "../helpers/cli.js";

const SIZE = 1 << 20;

function config(edit: (c: Record<string, unknown> & { disks: Array<Record<string, unknown>> }) => void) {
  const c = {
    kind: "qemu",
    name: "evil",
    uuid: null,
    machine: null,
    cpus: 1,
    memoryBytes: 128 * 2 ** 20,
    disks: [
      {
        name: "vblk0",
        node: "disk0",
        device: "vblk0",
        format: "raw",
        file: "/vms/evil/vblk0.raw",
        size: SIZE,
      },
    ],
    nics: [],
    firmware: null,
    commandLine: [
      "qemu-system-x86_64",
      "-blockdev",
      "driver=file,filename=/vms/evil/vblk0.raw,node-name=disk0-file",
      "-blockdev",
      "driver=raw,file=disk0-file,node-name=disk0",
      "-device",
      "virtio-blk-pci,drive=disk0,id=vblk0",
    ],
  };
  edit(c);
  return Buffer.from(JSON.stringify(c));
}

async function restorePoint(repoDir: string, vm: string, blob: Buffer): Promise<string> {
  const repo = await Repository.open(new FsStore(repoDir));
  try {
    const data = Buffer.alloc(SIZE, 0x5a);
    const r = await backup(repo, {
      vm,
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
      config: blob,
    });
    return r.id;
  } finally {
    await repo.close();
  }
}

describe("tampered VM configurations", { timeout: 60_000 }, () => {
  test("are refused by restore, config-only and instant, and nothing is written", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo]);
    const cases: Array<[string, Buffer, RegExp]> = [
      [
        "shell",
        config((c) => {
          (c.commandLine as string[])[0] = "/bin/sh";
        }),
        /the command line runs "\/bin\/sh", not a qemu-system-\* binary/,
      ],
      [
        "dotdot",
        config((c) => {
          c.disks[0]!.file = "/vms/evil/../../etc/shadow";
        }),
        /disks\.0\.file: the disk file ".*" has a "\.\." segment/,
      ],
      [
        "name",
        config((c) => {
          c.name = "../../../etc/cron.d/evil";
        }),
        /the VM name ".*" is not a plain name/,
      ],
    ];
    for (const [vm, blob, message] of cases) {
      const id = await restorePoint(repo, vm, blob);
      const target = join(dir, `target-${vm}`);
      for (const args of [
        ["restore", id, "--target", target, "--name", "clone"],
        ["restore", id, "--target", target],
        ["restore", id, "--config-only", "--as", "qemu-args"],
        ["instant", id, "--name", "ir", "--target", target],
      ]) {
        const r = await strata(["--repo", repo, ...args], { env });
        assert.equal(r.code, 3, `${args.join(" ")}: exit ${r.code}, ${r.stderr}`);
        assert.match(r.stderr, /the restore point's QEMU configuration is not usable/);
        assert.match(r.stderr, message);
        assert.equal(r.stdout, "");
      }
      await assert.rejects(readdir(target), /ENOENT/, `nothing is written for ${vm}`);
    }
    assert.deepEqual(await readdir(dir), ["repo"], "no file lands anywhere else either");
    // A configuration no adapter of this build wrote is named, not guessed at.
    const other = await restorePoint(
      repo,
      "other",
      config((c) => (c.kind = "hyperv")),
    );
    const r = await strata(["--repo", repo, "restore", other, "--target", join(dir, "t")], { env });
    assert.equal(r.code, 2);
    assert.match(r.stderr, /no adapter "hyperv" in this build \(known: [a-z, ]*\bqemu\b/);
  });
});
