// The libvirt adapter through the real CLI, as a user runs it against a real libvirtd and the
// test guest's domain: two backups (the second reads only what changed), the restore points
// listed, a clone restored and defined in libvirt, the domain XML printed, an instantly
// recovered clone started, listed and stopped, and nothing left behind for doctor to find.
import assert from "node:assert/strict";
import { chmod, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { type RunResult, strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import {
  consoleSeq,
  ensureLibvirtd,
  exists,
  removeDomain,
  stopLibvirtd,
  testDomain,
  virsh,
} from "../helpers/libvirt.js";
import { verifyRecords } from "../helpers/records.js";

interface BackupSummary {
  id: string;
  vm: string;
  parent: string | null;
  consistency: string;
  size: number;
  bytesRead: number;
  disks: Array<{ name: string; size: number; bytesRead: number; readMode?: string; fullReadReason?: string }>;
}

interface InstantSummary {
  name: string;
  phase: string;
  adapter: string;
  vm: { pid: number | null; running: boolean; where: string | null; domain?: string; console?: string };
  serve: { pid: number | null; running: boolean; socket: string };
  disks: Array<{ name: string; size: number; overlay: string | null }>;
}

async function until<T>(what: string, ms: number, f: () => Promise<T | undefined>): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = await f();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

const lines = (r: RunResult) => `stdout: ${r.stdout}\nstderr: ${r.stderr}`;

describe("libvirt through the CLI", { timeout: 600_000 }, () => {
  after(stopLibvirtd);
  test("backup, snapshots, restore, config-only, instant, doctor", async (t) => {
    await ensureLibvirtd();
    const dir = tempDir(t);
    // QEMU (libvirt-qemu) reaches the clone's and the instant VM's files below it.
    await chmod(dir, 0o755);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const env = { STRATA_STATE_DIR: state };
    const st = (args: string[]) => strataOk(["--repo", repo, ...args], { env });
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const dom = await testDomain(t, {
      name: "strata-test-cli",
      disks: [
        { target: "vda", format: "qcow2", size: "32M" },
        { target: "vdb", format: "qcow2", size: "16M", fillMiB: 8 },
      ],
      workload: ["/dev/vda"],
      wlsize: "8M",
    });
    const source = `libvirt:${dom.name}`;

    // 1. Two backups: the first reads the disk, the second only what changed since.
    await dom.waitSeq(30);
    let t0 = Date.now();
    const b1 = summary<BackupSummary>(await st(["backup", source, "--json"]));
    t.diagnostic(`first backup ${Date.now() - t0} ms, read ${b1.bytesRead} of ${b1.size}`);
    assert.equal(b1.vm, dom.name, "filed under the domain's name");
    assert.equal(b1.parent, null);
    // A first backup has nothing to compare with: every allocated byte is read.
    assert.deepEqual(
      b1.disks.map((d) => [d.name, d.size, d.readMode]),
      [
        ["vda", 32 << 20, undefined],
        ["vdb", 16 << 20, undefined],
      ],
    );
    assert.ok(b1.disks[0]!.bytesRead > 0);
    assert.equal(b1.disks[1]!.bytesRead, 8 << 20, "vdb's data, not its holes");
    const seq1 = await dom.seq();
    // Reported before the backup, so the restore point holds it.
    const seq2 = await dom.waitSeq(seq1 + 30);
    t0 = Date.now();
    const b2 = summary<BackupSummary>(await st(["backup", source, "--json"]));
    t.diagnostic(`second backup ${Date.now() - t0} ms, read ${b2.bytesRead} of ${b2.size}`);
    assert.equal(b2.parent, b1.id.split("/")[1]);
    assert.deepEqual(
      b2.disks.map((d) => [d.name, d.readMode]),
      [
        ["vda", "changed"],
        ["vdb", "changed"],
      ],
      JSON.stringify(b2.disks),
    );
    assert.ok(b2.disks[0]!.bytesRead > 0, "the workload's writes are read");
    assert.equal(b2.disks[1]!.bytesRead, 0, "vdb did not change");
    // The workload writes only vda's first 8 MiB; how much of it has changed by now depends on the
    // guest's pace, so the bound is the region, and the whole is less than the first backup read.
    assert.ok(b2.disks[0]!.bytesRead <= 8 << 20, `vda incremental read ${b2.disks[0]!.bytesRead}`);
    assert.ok(b2.bytesRead < b1.bytesRead, `incremental read ${b2.bytesRead} of ${b1.bytesRead}`);

    // 2. The restore points, with how each boots.
    const listed = await st(["snapshots"]);
    for (const b of [b1, b2]) assert.match(listed.stdout, new RegExp(`^${b.id} `, "m"));
    const rows = JSON.parse((await st(["snapshots", "--json"])).stdout) as Array<{
      id: string;
      consistency: string;
    }>;
    assert.deepEqual(
      rows.map((r) => r.id),
      [b1.id, b2.id],
    );
    assert.ok(rows.every((r) => r.consistency === b2.consistency));

    // 3. A clone defined in libvirt beside the running original.
    const target = join(dir, "clone");
    const clone = "strata-test-cli-clone";
    t.after(() => removeDomain(clone));
    const restored = summary<{
      scenario: string;
      vm: { name: string; uuid: string };
      disks: Array<{ disk: string; path: string }>;
      definition: string;
    }>(await st(["restore", `${dom.name}/latest`, "--target", target, "--name", clone, "--json"]));
    assert.equal(restored.scenario, "clone");
    assert.equal(restored.vm.name, clone);
    assert.equal(restored.definition, join(target, `${clone}.xml`));
    assert.deepEqual(
      restored.disks.map((d) => [d.disk, d.path]),
      [
        ["vda", join(target, "vda.qcow2")],
        ["vdb", join(target, "vdb.qcow2")],
      ],
    );
    const cloneXml = await virsh("dumpxml", "--inactive", clone);
    assert.match(cloneXml, new RegExp(`<uuid>${restored.vm.uuid}</uuid>`));
    assert.match(cloneXml, new RegExp(`<source file='${join(target, "vda.qcow2")}'`));
    assert.match(cloneXml, new RegExp(`from="${b2.id}"`));
    assert.notEqual((await virsh("domuuid", clone)).trim(), (await virsh("domuuid", dom.name)).trim());
    assert.equal((await virsh("domstate", clone)).trim(), "shut off");
    const r = await verifyRecords(join(target, "vda.qcow2"), { format: "qcow2" });
    assert.ok(r.gapFree && r.lastSeq >= seq2, JSON.stringify(r).slice(0, 300));
    await virsh("undefine", clone);
    assert.doesNotMatch(await virsh("list", "--all", "--name"), new RegExp(`^${clone}$`, "m"));

    // 4. The definition only, as libvirt's own XML.
    const xml = await st(["restore", `${dom.name}/latest`, "--config-only", "--as", "xml"]);
    assert.match(xml.stdout, /^<domain type='qemu'>|^<domain type="qemu">/);
    assert.match(xml.stdout, new RegExp(`<name>${dom.name}</name>`));
    assert.match(xml.stdout, new RegExp(`<source file=.${dom.files.vda}.`));
    const refused = await strata(
      ["--repo", repo, "restore", `${dom.name}/latest`, "--config-only", "--as", "qemu-args"],
      { env },
    );
    assert.equal(refused.code, 2, lines(refused));
    assert.match(refused.stderr, /renders as xml or json, not qemu-args/);

    // 5. Instant recovery: a clone boots from the repository while the original runs on.
    const irName = "strata-test-cli-ir";
    const irDir = join(dir, "ir");
    t.after(async () => {
      await strata(["instant", "stop", irName, "--discard"], { env });
      await removeDomain(irName);
    });
    t0 = Date.now();
    const ir = summary<InstantSummary & { startMs: number }>(
      await st(["instant", `${dom.name}/latest`, "--name", irName, "--target", irDir, "--json"]),
    );
    t.diagnostic(`instant start ${Date.now() - t0} ms (startMs ${ir.startMs})`);
    assert.equal(ir.name, irName);
    assert.equal(ir.adapter, "libvirt");
    assert.equal(ir.phase, "running");
    assert.ok(ir.vm.running && ir.vm.pid && ir.vm.pid > 0, JSON.stringify(ir.vm));
    assert.equal(ir.vm.where, `libvirt domain ${irName}`);
    assert.equal(ir.vm.domain, irName);
    assert.equal(ir.vm.console, join(irDir, "run", "console.log"));
    assert.ok(ir.serve.running);
    assert.deepEqual(
      ir.disks.map((d) => [d.name, d.size, d.overlay]),
      [
        ["vda", 32 << 20, join(irDir, "vda.overlay.qcow2")],
        ["vdb", 16 << 20, join(irDir, "vdb.overlay.qcow2")],
      ],
    );
    assert.match(await virsh("domstate", irName), /running/);
    assert.match(await virsh("dumpxml", irName), /<source protocol='nbd' name='vda'/);
    // The guest boots from the restore point and writes to its overlay.
    await until("the instant clone's workload", 120_000, async () =>
      consoleSeq(await readFile(ir.vm.console!, "utf8").catch(() => "")) > 0 ? true : undefined,
    );
    assert.ok((await stat(join(irDir, "vda.overlay.qcow2"))).size > 0);
    const list = JSON.parse((await st(["instant", "list", "--json"])).stdout) as InstantSummary[];
    assert.deepEqual(
      list.map((s) => [s.name, s.adapter, s.phase, s.vm.running, s.vm.domain]),
      [[irName, "libvirt", "running", true, irName]],
    );
    const listText = (await st(["instant", "list"])).stdout;
    assert.match(listText, new RegExp(`${irName}  running  from ${b2.id}`));
    assert.match(
      listText,
      new RegExp(`libvirt domain ${irName}, console ${join(irDir, "run", "console.log")}`),
    );
    const stopped = summary<{ vm: string; discarded: string[] }>(
      await st(["instant", "stop", irName, "--discard", "--json"]),
    );
    assert.equal(stopped.vm, "quit");
    assert.deepEqual(stopped.discarded, [join(irDir, "vda.overlay.qcow2"), join(irDir, "vdb.overlay.qcow2")]);
    assert.doesNotMatch(await virsh("list", "--all", "--name"), new RegExp(`^${irName}$`, "m"));
    assert.equal(await exists(irDir), false, "the instant directory is gone");
    assert.equal((await st(["instant", "list"])).stdout.trim(), "no instantly recovered VMs");

    // 6. Nothing left behind: not by the backups (their one checkpoint is the next base), not
    // by the restores, not by instant recovery.
    // The whole host: libvirtd is shared, so domains of other tests running meanwhile may show;
    // none of this test's may.
    const all = await strata(["doctor", "--state-dir", state, "--json"]);
    const doctor = summary<{ findings: Array<{ vm: string; owner: string }>; clean: boolean }>(all);
    const ours = doctor.findings.filter((f) => f.vm.startsWith("strata-test-cli"));
    assert.deepEqual(ours, [], lines(all));
    if (doctor.findings.length > 0) t.diagnostic(`doctor, other domains: ${JSON.stringify(doctor.findings)}`);
    else assert.equal(all.code, 0, lines(all));
    const one = await strataOk(["doctor", "--state-dir", state, source, "--json"]);
    assert.deepEqual(summary(one), { type: "summary", findings: [], clean: true });
    assert.equal((await virsh("domstate", dom.name)).trim(), "running", "the original ran throughout");
  });
});
