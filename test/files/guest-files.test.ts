// strata files on restore points of a running test guest: files the guest itself wrote come back
// exactly, from a filesystem-consistent point (agent freeze) and from a crash-consistent one
// (no agent, journal not replayed on the image).
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
  assert.equal(r.exitcode, 0, `guest: ${script}\n${r.stderr}`);
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
      ],
      workload: ["/dev/vda"],
      data: "/dev/vdb",
      rate: 20,
    });
    const qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 30_000 });
    // The guest writes a tree of files and its own checksums of them.
    const listing = await guestSh(
      qga,
      "mkdir -p /mnt/data/docs && i=1 && while [ $i -le 12 ]; do " +
        "dd if=/dev/urandom of=/mnt/data/docs/file$i bs=4096 count=$((i * 7)) 2>/dev/null; i=$((i + 1)); done && " +
        "echo 'hello from the guest' > /mnt/data/docs/note.txt && sync && cd /mnt/data/docs && sha256sum *",
    );
    await qga.close();
    const guestSums: Record<string, string> = {};
    for (const line of listing.trim().split("\n")) {
      const [hash, name] = line.trim().split(/\s+/);
      guestSums[name!] = hash!;
    }
    assert.equal(Object.keys(guestSums).length, 13);

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
    await strataOk(["files", "ls", "--repo", repo, crash.id, "vblk1", "/"]);
  });
});
