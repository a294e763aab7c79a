// Live backups of a real running VM (the test guest under QEMU, TCG here) whose workload writes
// sequence-numbered, checksummed records to two disks: every restore point restores to disks
// whose records are a gap-free prefix, both disks cut at the same instant, incremental backups
// read only what changed, and nothing is left on the VM.
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import type { VmConfig } from "../../src/hypervisor/qemu/live.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";
import { bootWorkloadVm, leftovers, qmpOnce } from "../helpers/vm.js";

interface Summary {
  id: string;
  mode: string;
  consistency: string;
  bytesRead: number;
  size: number;
  quiescedMs: number;
  disks: Array<{ name: string; bytesRead: number; readMode?: string; fullReadReason?: string }>;
}

function clean(l: Awaited<ReturnType<typeof leftovers>>, checkpoint: number) {
  assert.deepEqual(l.nodes, [], "no fleecing nodes");
  assert.deepEqual(l.exports, [], "no exports");
  assert.deepEqual(l.jobs, [], "no jobs");
  assert.equal(l.status, "running");
  assert.ok(l.frozen === "thawed" || l.frozen === "no agent", `guest is ${l.frozen}`);
  assert.deepEqual(l.files, [], "state directory is empty");
  for (const [node, names] of Object.entries(l.bitmaps)) {
    const ours = names.filter((n) => n.startsWith("strata-"));
    if (node === "disk1") continue; // the ext4 data disk has a bitmap too; checked with the rest
    assert.equal(ours.length, checkpoint, `${node} holds ${ours.join(", ")}`);
    assert.ok(!ours.includes("strata-tmp"));
  }
}

async function restoreAndVerify(repo: string, id: string, out: string, seqBefore: number) {
  await strataOk(["restore", "--repo", repo, id, "--target", out, "--format", "raw"]);
  const a = await verifyRecords(join(out, "vblk0.raw"));
  const c = await verifyRecords(join(out, "vblk2.raw"));
  for (const [name, r] of [
    ["vblk0", a],
    ["vblk2", c],
  ] as const) {
    assert.ok(
      r.gapFree,
      `${name}: records not gap-free: missing ${r.missing.slice(0, 5)}, bad ${JSON.stringify(r.badRecords.slice(0, 2))}`,
    );
    assert.ok(
      r.lastSeq >= seqBefore,
      `${name}: last seq ${r.lastSeq} is before the backup started (${seqBefore})`,
    );
  }
  // Both disks cut at one instant: each record goes to vda, then vdc, one at a time.
  assert.ok(
    a.lastSeq - c.lastSeq === 0 || a.lastSeq - c.lastSeq === 1,
    `vda at ${a.lastSeq}, vdc at ${c.lastSeq}`,
  );
  return { a, c };
}

describe("live backup of a running QEMU VM", { timeout: 400_000 }, () => {
  test("snapshot mode with the agent: consistent, one instant, incremental, nothing left behind", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const env = { STRATA_STATE_DIR: state };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "qcow2", size: "64M" },
        { id: "vblk1", format: "qcow2", size: "32M", ext4: true },
        { id: "vblk2", format: "raw", size: "64M" },
      ],
      workload: ["/dev/vda", "/dev/vdc"],
      data: "/dev/vdb",
      wlsize: "16M",
      // A NIC (isolated: restrict=on) so that the configuration capture has a MAC to record.
      extraArgs: [
        "-netdev",
        "user,id=n0,restrict=on",
        "-device",
        "virtio-net-pci,netdev=n0,id=net0,mac=52:54:00:12:34:56",
      ],
    });
    const src = `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;
    const seq1 = await g.waitSeq(40);
    const consoleBefore = (await g.vm.console()).length;
    const r1 = summary<Summary>(
      await strataOk(["backup", "--repo", repo, "--vm", "live", "--json", src], { env }),
    );
    // The guest's write latency while the backup ran (workload summaries every 20 records).
    const during = parseLatencySummaries((await g.vm.console()).slice(consoleBefore));
    const idle = parseLatencySummaries((await g.vm.console()).slice(0, consoleBefore)).slice(1);
    const worst = (xs: typeof during, k: "p50Us" | "p99Us" | "maxUs") => Math.max(...xs.map((x) => x[k]));
    t.diagnostic(
      `guest write latency, idle: p50 ${worst(idle, "p50Us")} us, p99 ${worst(idle, "p99Us")} us, max ${worst(idle, "maxUs")} us; ` +
        `during backup: p50 ${worst(during, "p50Us")} us, p99 ${worst(during, "p99Us")} us, max ${worst(during, "maxUs")} us`,
    );
    assert.ok(during.length > 0, "the workload kept reporting during the backup");
    assert.ok(worst(during, "maxUs") < 5_000_000, "no guest write waited 5 s during the backup");
    // The configuration went with the restore point.
    const repoObj = await Repository.open(new FsStore(repo));
    const snap = await repoObj.findSnapshot(r1.id);
    const config = JSON.parse((await repoObj.blob(snap, snap.manifest.config!)).toString()) as VmConfig;
    await repoObj.close();
    assert.equal(config.kind, "qemu");
    assert.equal(config.name, "live");
    assert.match(config.uuid ?? "", /^[0-9a-f-]{36}$/);
    assert.ok(config.cpus >= 1 && config.memoryBytes > 0);
    assert.match(config.machine ?? "", /q35|pc/);
    assert.deepEqual(
      config.nics.map((n) => n.mac),
      ["52:54:00:12:34:56"],
    );
    assert.deepEqual(
      config.disks.map((d) => [d.name, d.format]),
      [
        ["vblk0", "qcow2"],
        ["vblk1", "qcow2"],
        ["vblk2", "raw"],
      ],
    );
    assert.equal(config.firmware, "direct kernel boot");
    assert.ok(config.commandLine?.includes("-blockdev"));
    assert.equal(r1.mode, "snapshot");
    assert.equal(r1.consistency, "filesystem-consistent");
    assert.ok(r1.quiescedMs < 5000);
    assert.deepEqual(r1.disks.map((d) => d.name).sort(), ["vblk0", "vblk1", "vblk2"]);
    for (const d of r1.disks) assert.equal(d.readMode, "full");
    clean(await leftovers(g.vm, state), 1);
    // The guest kept writing through the backup.
    await g.waitSeq((await g.seq()) + 40);

    const seq2 = await g.seq();
    const r2 = summary<Summary>(
      await strataOk(["backup", "--repo", repo, "--vm", "live", "--json", src], { env }),
    );
    for (const d of r2.disks) assert.equal(d.readMode, "changed", `${d.name}: ${d.fullReadReason}`);
    // A few seconds of 4 KiB records: a handful of 256 KiB chunks per disk, not the disks.
    assert.ok(r2.bytesRead <= 24 * 256 * 1024, `incremental read ${r2.bytesRead} bytes of ${r2.size}`);
    clean(await leftovers(g.vm, state), 1);

    await restoreAndVerify(repo, r1.id, join(dir, "r1"), seq1);
    await restoreAndVerify(repo, r2.id, join(dir, "r2"), seq2);

    // Without its bitmap, the next backup reads everything, says why, and is still right.
    const blocks = await qmpOnce<
      Array<{ inserted?: { "node-name": string; "dirty-bitmaps"?: Array<{ name: string }> } }>
    >(g.vm.qmpSocket, "query-block");
    const disk0 = blocks.find((b) => b.inserted?.["node-name"] === "disk0")!.inserted!;
    await qmpOnce(g.vm.qmpSocket, "block-dirty-bitmap-remove", {
      node: "disk0",
      name: disk0["dirty-bitmaps"]![0]!.name,
    });
    const seq3 = await g.seq();
    const r3 = await strataOk(["backup", "--repo", repo, "--vm", "live", "--json", src], { env });
    const s3 = summary<Summary>(r3);
    const d0 = s3.disks.find((d) => d.name === "vblk0")!;
    assert.equal(d0.readMode, "full");
    assert.match(d0.fullReadReason ?? "", /missing/);
    assert.match(r3.stderr, /vblk0: reading the whole disk: checkpoint bitmap .* is missing/);
    assert.equal(s3.disks.find((d) => d.name === "vblk2")!.readMode, "changed");
    await restoreAndVerify(repo, s3.id, join(dir, "r3"), seq3);
    assert.equal(summary(await strataOk(["verify", "--repo", repo, "--read-data", "--json"])).ok, true);
  });

  test("pause mode, a raw disk's bitmap lost to a restart, and no agent", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const env = { STRATA_STATE_DIR: state };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [
        { id: "vblk0", format: "raw", size: "32M" },
        { id: "vblk1", format: "qcow2", size: "16M" },
        { id: "vblk2", format: "qcow2", size: "32M" },
      ],
      workload: ["/dev/vda", "/dev/vdc"],
      wlsize: "8M",
      agent: false,
    });
    const src = `qmp:${g.vm.qmpSocket}`;
    const seq1 = await g.waitSeq(30);
    const r1 = summary<Summary>(
      await strataOk(["backup", "--repo", repo, "--vm", "p", "--mode", "pause", "--json", src], { env }),
    );
    assert.equal(r1.consistency, "paused");
    assert.ok(r1.quiescedMs < 5000, `paused for ${r1.quiescedMs} ms`);
    clean(await leftovers(g.vm, state), 1);
    await restoreAndVerify(repo, r1.id, join(dir, "r1"), seq1);

    // No agent: snapshot mode is crash-consistent under "try" and refused under "require".
    const seq2 = await g.waitSeq((await g.seq()) + 20);
    const r2 = await strataOk(["backup", "--repo", repo, "--vm", "p", "--json", src], { env });
    assert.equal(summary<Summary>(r2).consistency, "crash-consistent");
    assert.match(r2.stderr, /no guest agent/);
    await restoreAndVerify(repo, summary<Summary>(r2).id, join(dir, "r2"), seq2);
    const req = await strata(["backup", "--repo", repo, "--vm", "p", "--quiesce", "require", src], { env });
    assert.equal(req.code, 2);
    assert.match(req.stderr, /--quiesce require needs the guest agent/);
    clean(await leftovers(g.vm, state), 1);

    // A restart loses the raw disk's in-memory bitmap; the qcow2 ones persist.
    await g.restart();
    await g.waitSeq(20);
    const seq3 = await g.seq();
    const r3 = await strataOk(
      ["backup", "--repo", repo, "--vm", "p", "--mode", "pause", "--json", `qmp:${g.vm.qmpSocket}`],
      { env },
    );
    const s3 = summary<Summary>(r3);
    const raw = s3.disks.find((d) => d.name === "vblk0")!;
    assert.equal(raw.readMode, "full");
    assert.match(raw.fullReadReason ?? "", /live in QEMU's memory and the VM was restarted/);
    assert.equal(s3.disks.find((d) => d.name === "vblk2")!.readMode, "changed");
    await restoreAndVerify(repo, s3.id, join(dir, "r3"), seq3);
  });
});
