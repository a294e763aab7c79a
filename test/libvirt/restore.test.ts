// Whole-domain restores from a libvirt backup: a clone (new name, UUID, MAC, disk and console
// paths) defined and booted beside the running original, and an in-place restore of the
// original, after which the next backup reads everything because the restored images have no
// checkpoint bitmaps (and says so). Disks are written by the engine's restore sinks as the plan
// says; the adapter plans, defines and starts.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { restoreDiskToQcow2 } from "../../src/engine/restore-sinks.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import type { RestorePlan, VmConfigDocument } from "../../src/hypervisor/adapter.js";
import { cloneFacts, LibvirtAdapter } from "../../src/hypervisor/libvirt/index.js";
import type { Repository, SnapshotRef } from "../../src/repo/repository.js";
import {
  consoleSeq,
  ensureLibvirtd,
  libvirtWorkspace,
  removeDomain,
  stopLibvirtd,
  testDomain,
  virsh,
} from "../helpers/libvirt.js";
import { verifyRecords } from "../helpers/records.js";

async function writeDisks(repo: Repository, snap: SnapshotRef, plan: RestorePlan, force = false) {
  for (const d of plan.disks) {
    if (d.format === "qcow2") await restoreDiskToQcow2(repo, snap, d.name, d.path, { force });
    else await restoreDiskToFile(repo, snap, d.name, d.path, { force });
  }
}

async function waitConsole(file: string, re: RegExp, ms: number): Promise<string> {
  const end = Date.now() + ms;
  for (;;) {
    const text = await readFile(file, "utf8").catch(() => "");
    if (re.test(text)) return text;
    if (Date.now() > end) throw new Error(`${file} did not show ${re}:\n${text.slice(-1500)}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("libvirt restores", { timeout: 600_000 }, () => {
  after(stopLibvirtd);
  test("a clone boots beside the original; in place, the next backup is full", async (t) => {
    await ensureLibvirtd();
    const { dir, state, repo } = await libvirtWorkspace(t);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-rs",
      disks: [
        { target: "vda", format: "qcow2", size: "32M" },
        { target: "vdb", format: "raw", size: "16M" },
      ],
      workload: ["/dev/vda", "/dev/vdb"],
      wlsize: "8M",
    });
    const seq = await dom.waitSeq(30);
    const opts = { vm: "rs", mode: "snapshot" as const, quiesce: "try" as const, stateDir: state };
    const r1 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts);
    const snap = await repo.findSnapshot(r1.id);
    const config = JSON.parse((await repo.blob(snap, snap.manifest.config!)).toString()) as VmConfigDocument;
    const available = snap.manifest.disks.map((d) => ({ name: d.name, size: d.size }));
    const restorePoint = { vm: snap.vm, time: snap.time, consistency: snap.manifest.consistency };

    // The configuration renders as the domain XML; other syntaxes are refused clearly.
    assert.equal(adapter.renderConfig(config, "xml"), config.xml);
    assert.throws(() => adapter.renderConfig(config, "qemu-args"), /renders as xml or json/);
    // A tampered document is refused, not half-used.
    assert.throws(
      () =>
        adapter.parseConfig({ ...config, xml: String(config.xml).replace(/<name>[^<]*</, "<name>../x<") }),
      /domain name "..\/x" is not one Strata handles/,
    );

    // 1. A clone beside the running original.
    const target = join(dir, "clone");
    const cloneName = "strata-test-rs-clone";
    t.after(() => removeDomain(cloneName));
    const plan = await adapter.planRestore(config, { target, name: cloneName, available, restorePoint });
    const orig = cloneFacts(String(config.xml));
    const facts = cloneFacts(plan.definition.text);
    assert.equal(facts.name, cloneName);
    assert.notEqual(facts.uuid, orig.uuid);
    assert.match(facts.uuid, /^[0-9a-f-]{36}$/);
    assert.equal(facts.macs.length, 1);
    assert.notEqual(facts.macs[0], orig.macs[0]);
    for (const f of facts.files.filter((x) => !/kernel|initrd/.test(x)))
      assert.ok(f.startsWith(`${target}/`), `clone file ${f} is in the target directory`);
    assert.deepEqual(
      plan.disks.map((d) => [d.name, d.format, d.path]),
      [
        ["vda", "qcow2", join(target, "vda.qcow2")],
        ["vdb", "raw", join(target, "vdb.raw")],
      ],
    );
    await assert.rejects(adapter.define!(plan, false), /disk vda is not restored yet/);
    await writeDisks(repo, snap, plan);
    for (const d of plan.disks) {
      const r = await verifyRecords(d.path, { format: d.format });
      assert.ok(r.gapFree && r.lastSeq >= seq, `${d.name}: ${JSON.stringify(r).slice(0, 300)}`);
    }
    await adapter.define!(plan, false);
    await assert.rejects(adapter.define!(plan, false), /is defined: --force replaces/);
    const started = await adapter.start!(plan);
    assert.equal(started.where, `libvirt domain ${cloneName}`);
    assert.ok(started.pid && started.pid > 0);
    assert.equal(started.details?.console, join(target, "run", "console.log"));
    assert.match(
      await virsh("dumpxml", cloneName),
      new RegExp(
        `<strata:restore xmlns:strata="urn:strata:restore:1" from="rs/${snap.time}" consistency="${snap.manifest.consistency}"`,
      ),
      "the restore point is named in the defined domain's metadata",
    );
    await waitConsole(join(target, "run", "console.log"), /STRATA-GUEST-READY/, 120_000);
    assert.equal((await virsh("domstate", dom.name)).trim(), "running", "the original runs on");
    const before = await dom.seq();
    await dom.waitSeq(before + 10);
    await virsh("destroy", cloneName);

    // 2. In place: refused while the original runs, then restored over its own disks.
    const inPlace = await adapter.planRestore(config, { available, restorePoint });
    assert.equal(inPlace.clone, false);
    assert.deepEqual(
      inPlace.disks.map((d) => d.path),
      [dom.files.vda, dom.files.vdb],
    );
    await assert.rejects(adapter.refuseIfRunning!(inPlace), /strata-test-rs is running: shut it down first/);
    await virsh("destroy", dom.name);
    await writeDisks(repo, snap, inPlace, true);
    await assert.rejects(adapter.define!(inPlace, false), /--force replaces its definition/);
    await adapter.define!(inPlace, true);
    await dom.start();
    assert.ok(consoleSeq(await dom.console()) < seq, "the workload starts again on the restored disks");
    await dom.waitSeq(20);
    const logs: string[] = [];
    const r2 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), {
      ...opts,
      log: (m) => logs.push(m),
    });
    const vda = r2.manifest.disks.find((d) => d.name === "vda")!;
    assert.equal(vda.readMode, "full");
    assert.match(vda.fullReadReason ?? "", /libvirt refused an incremental .* missing or broken bitmap/);
  });
});
