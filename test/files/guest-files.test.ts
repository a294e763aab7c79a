// strata files on restore points of a running test guest: files the guest itself wrote come back
// exactly, from a filesystem-consistent point (agent freeze) and from a crash-consistent one
// (no agent, journal not replayed on the image), on a whole-disk ext4 and on ext4 and FAT32
// partitions of a GPT disk and of an MBR disk.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { QgaClient } from "../../src/hypervisor/qemu/qga.js";
import { strataOk, summary, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm } from "../helpers/vm.js";

async function guestSh(qga: QgaClient, script: string): Promise<string> {
  const r = await qga.exec("/bin/sh", ["-c", script], { timeoutMs: 60_000 });
  assert.equal(r.exitcode, 0, `guest: ${script}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

async function sums(dir: string): Promise<Record<string, string>> {
  const out: Record<string, string> = {};
  for (const f of (await readdir(dir)).sort()) {
    out[f] = createHash("sha256")
      .update(await readFile(join(dir, f)))
      .digest("hex");
  }
  return out;
}

describe("files written by the guest", { timeout: 300_000 }, () => {
  test("come back exactly from filesystem- and crash-consistent restore points", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const env = { STRATA_STATE_DIR: join(dir, "state") };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "16M" },
        { id: "vblk1", format: "qcow2", size: "64M", ext4: true },
        { id: "vblk2", format: "raw", size: "96M", partitions: "gpt" },
        { id: "vblk3", format: "qcow2", size: "96M", partitions: "mbr" },
      ],
      workload: ["/dev/vda"],
      data: "/dev/vdb",
      rate: 20,
    });
    const qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 30_000 });
    // The guest writes a tree of files into each filesystem and its own checksums of them.
    const writeDocs = async (mnt: string, files: number): Promise<Record<string, string>> => {
      const listing = await guestSh(
        qga,
        `mkdir -p ${mnt}/docs && i=1 && while [ $i -le ${files} ]; do ` +
          `dd if=/dev/urandom of=${mnt}/docs/file$i bs=4096 count=$((i * 7)) 2>/dev/null; i=$((i + 1)); done && ` +
          `echo 'hello from the guest' > ${mnt}/docs/note.txt && sync && cd ${mnt}/docs && sha256sum *`,
      );
      const sums: Record<string, string> = {};
      for (const line of listing.trim().split("\n")) {
        const [hash, name] = line.trim().split(/\s+/);
        sums[name!] = hash!;
      }
      assert.equal(Object.keys(sums).length, files + 1);
      return sums;
    };
    const guestSums = await writeDocs("/mnt/data", 12);
    // Partitions: DISK:PART → the guest's device and filesystem type.
    const partitions: Array<[string, string, string]> = [
      ["vblk2:1", "/dev/vdc1", "ext4"],
      ["vblk2:2", "/dev/vdc2", "vfat"],
      ["vblk3:1", "/dev/vdd1", "ext4"],
      ["vblk3:2", "/dev/vdd2", "vfat"],
    ];
    const partSums = new Map<string, Record<string, string>>();
    for (const [sel, dev, type] of partitions) {
      const mnt = `/mnt/${sel.replace(":", "p")}`;
      // The guest kernel has no nls_ascii (vfat's default charset here): name a loaded one.
      const opts = type === "vfat" ? "-o iocharset=iso8859-1 " : "";
      await guestSh(qga, `mkdir -p ${mnt} && mount -t ${type} ${opts}${dev} ${mnt}`);
      partSums.set(sel, await writeDocs(mnt, 5));
    }
    await qga.close();

    // Filesystem-consistent: frozen through the agent.
    const fsc = summary<{ id: string; consistency: string }>(
      await strataOk(
        ["backup", "--repo", repo, "--vm", "g", "--json", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`],
        { env },
      ),
    );
    assert.equal(fsc.consistency, "filesystem-consistent");
    const ls = JSON.parse(
      (await strataOk(["files", "ls", "--repo", repo, fsc.id, "vblk1", "/docs", "--json"])).stdout,
    ) as { entries: Array<{ name: string; size: number }> };
    assert.equal(ls.entries.length, 13);
    await strataOk([
      "files",
      "get",
      "--repo",
      repo,
      fsc.id,
      "/docs",
      "--disk",
      "vblk1",
      "--to",
      join(dir, "fsc"),
    ]);
    assert.deepEqual(await sums(join(dir, "fsc", "docs")), guestSums);
    const parts = JSON.parse((await strataOk(["files", "ls", "--repo", repo, fsc.id, "--json"])).stdout) as {
      disks: Array<{
        disk: string;
        scheme: string;
        partitions: Array<{ number: number; filesystem: string }>;
      }>;
    };
    const fsOf = (disk: string) =>
      parts.disks.find((d) => d.disk === disk)!.partitions.map((p) => `${p.number}:${p.filesystem}`);
    assert.deepEqual(fsOf("vblk2"), ["1:ext4", "2:vfat"]);
    assert.deepEqual(fsOf("vblk3"), ["1:ext4", "2:vfat"]);
    assert.deepEqual(
      ["vblk2", "vblk3"].map((n) => parts.disks.find((d) => d.disk === n)!.scheme),
      ["gpt", "mbr"],
    );
    for (const [sel] of partitions) {
      const to = join(dir, "fsc", sel.replace(":", "p"));
      await strataOk(["files", "get", "--repo", repo, fsc.id, "/docs", "--disk", sel, "--to", to]);
      assert.deepEqual(await sums(join(to, "docs")), partSums.get(sel), sel);
    }

    // Crash-consistent: no agent, while the guest keeps writing a file it never syncs.
    const qga2 = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 30_000 });
    await qga2.execute("guest-exec", {
      path: "/bin/sh",
      arg: ["-c", "while true; do date >> /mnt/data/unsynced.log; done"],
    });
    await qga2.close();
    const crash = summary<{ id: string; consistency: string }>(
      await strataOk(
        ["backup", "--repo", repo, "--vm", "g", "--quiesce", "off", "--json", `qmp:${g.vm.qmpSocket}`],
        { env },
      ),
    );
    assert.equal(crash.consistency, "crash-consistent");
    await strataOk([
      "files",
      "get",
      "--repo",
      repo,
      crash.id,
      "/docs",
      "--disk",
      "vblk1",
      "--to",
      join(dir, "crash"),
    ]);
    assert.deepEqual(await sums(join(dir, "crash", "docs")), guestSums);
    for (const [sel] of partitions) {
      const to = join(dir, "crash", sel.replace(":", "p"));
      await strataOk(["files", "get", "--repo", repo, crash.id, "/docs", "--disk", sel, "--to", to]);
      assert.deepEqual(await sums(join(to, "docs")), partSums.get(sel), sel);
    }
    await strataOk(["files", "ls", "--repo", repo, crash.id, "vblk1", "/"]);
  });
});
