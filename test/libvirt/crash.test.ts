// A Strata process killed (SIGKILL) while its libvirt backup job runs leaves a state record, the
// pull job and a checkpoint never committed to a restore point. leftovers() reports them and,
// with fix, ends the job and deletes the checkpoint (the previous one stays the base); the next
// backup also cleans up by itself. Other tools' checkpoints are reported, never touched.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { readdir } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { fileURLToPath } from "node:url";
import { backupVm } from "../../src/engine/vm-backup.js";
import { LibvirtAdapter } from "../../src/hypervisor/libvirt/index.js";
import {
  checkpoints,
  ensureLibvirtd,
  jobType,
  libvirtWorkspace,
  stopLibvirtd,
  testDomain,
  virsh,
} from "../helpers/libvirt.js";

const index = fileURLToPath(new URL("../../src/hypervisor/libvirt/index.js", import.meta.url));

/** Starts a process that opens a backup session of `domain` and waits; resolves once it is open. */
async function openAndHang(domain: string, stateDir: string, repository: string) {
  const script = `
    import { LibvirtAdapter } from ${JSON.stringify(index)};
    const h = await new LibvirtAdapter().resolve(${JSON.stringify(`libvirt:${domain}`)});
    await h.openBackup({ repository: ${JSON.stringify(repository)}, mode: "snapshot", quiesce: "try",
      granularity: 262144, stateDir: ${JSON.stringify(stateDir)}, log: () => {} });
    console.log("OPEN");
    setInterval(() => {}, 1000);`;
  const child = spawn(process.execPath, ["--input-type=module", "-e", script], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  let err = "";
  child.stderr.on("data", (d: Buffer) => {
    err += d.toString();
  });
  await new Promise<void>((resolve, reject) => {
    child.stdout.on("data", (d: Buffer) => {
      if (d.toString().includes("OPEN")) resolve();
    });
    child.once("exit", (code) => reject(new Error(`backup process exited ${code}: ${err}`)));
  });
  return child;
}

describe("libvirt: a killed backup", { timeout: 600_000 }, () => {
  after(stopLibvirtd);
  test("leftovers() and the next backup release what a SIGKILLed run left", async (t) => {
    await ensureLibvirtd();
    const { state, repo } = await libvirtWorkspace(t);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-crash",
      disks: [{ target: "vda", format: "qcow2", size: "32M" }],
      workload: ["/dev/vda"],
      wlsize: "8M",
    });
    await dom.waitSeq(20);
    const opts = { vm: "c", mode: "snapshot" as const, quiesce: "try" as const, stateDir: state };
    const r1 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts);
    const base = (r1.manifest.bitmap as { checkpoint: string }).checkpoint;
    // Another tool's checkpoint: reported as foreign, never touched.
    await virsh("checkpoint-create-as", dom.name, "othertool.1", "--diskspec", "vda,checkpoint=bitmap");

    // 1. Killed with the job running: leftovers() finds and fixes it.
    let child = await openAndHang(dom.name, state, repo.config.id);
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    assert.equal(await jobType(dom.name), "Unbounded", "the pull job outlived its process");
    assert.equal((await checkpoints(dom.name)).filter((c) => c.startsWith("strata-")).length, 2);
    const found = await adapter.leftovers(state, false);
    const mine = found.filter((f) => f.vm === dom.name);
    assert.ok(
      mine.some(
        (f) => f.owner === "strata" && /dead run's state: .*checkpoint strata-.*job/.test(f.what) && !f.fixed,
      ),
      JSON.stringify(mine),
    );
    assert.ok(
      mine.some((f) => f.owner === "foreign" && f.what === "checkpoint othertool.1"),
      JSON.stringify(mine),
    );
    assert.equal(
      mine.length,
      2,
      `nothing else is reported (the base checkpoint is no stray): ${JSON.stringify(mine)}`,
    );
    const fixed = await adapter.leftovers(state, true);
    assert.ok(
      fixed.some((f) => f.vm === dom.name && f.owner === "strata" && f.fixed),
      JSON.stringify(fixed),
    );
    assert.equal(await jobType(dom.name), "None");
    assert.deepEqual((await checkpoints(dom.name)).sort(), [base, "othertool.1"].sort());
    assert.deepEqual(await readdir(join(state, "libvirt")), []);

    // 2. Killed again: this time the next backup cleans up first, and is still incremental.
    child = await openAndHang(dom.name, state, repo.config.id);
    child.kill("SIGKILL");
    await new Promise((r) => child.once("exit", r));
    const logs: string[] = [];
    const r2 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), {
      ...opts,
      log: (m) => logs.push(m),
    });
    assert.ok(
      logs.some((l) => /an earlier run on strata-test-crash .* left 3 item\(s\)/.test(l)),
      logs.join("\n"),
    );
    assert.equal(r2.manifest.disks[0]!.readMode, "changed", r2.manifest.disks[0]!.fullReadReason);
    const cp2 = (r2.manifest.bitmap as { checkpoint: string }).checkpoint;
    assert.deepEqual((await checkpoints(dom.name)).sort(), [cp2, "othertool.1"].sort());
    assert.equal(await jobType(dom.name), "None");
    assert.deepEqual(await readdir(join(state, "libvirt")), []);
  });
});
