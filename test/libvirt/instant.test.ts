// Instant recovery of a libvirt domain: the restore point is served by Strata's NBD server (in
// this process), the adapter starts a transient clone domain on local qcow2 overlays backed by
// the exports, the guest boots and writes, then every disk is copied to production storage with
// `virsh blockcopy` and pivoted while it runs; after that the server can go away.
import assert from "node:assert/strict";
import { mkdir, readFile, stat } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { serveRestorePoint } from "../../src/engine/serve.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import type { InstantVm, VmConfigDocument } from "../../src/hypervisor/adapter.js";
import { LibvirtAdapter } from "../../src/hypervisor/libvirt/index.js";
import {
  consoleSeq,
  ensureLibvirtd,
  libvirtWorkspace,
  removeDomain,
  stopLibvirtd,
  testDomain,
  virsh,
} from "../helpers/libvirt.js";

async function waitSeq(file: string, n: number, ms: number): Promise<number> {
  const end = Date.now() + ms;
  for (;;) {
    const s = consoleSeq(await readFile(file, "utf8").catch(() => ""));
    if (s >= n) return s;
    if (Date.now() > end) throw new Error(`${file}: workload did not reach ${n} (at ${s})`);
    await new Promise((r) => setTimeout(r, 200));
  }
}

describe("libvirt instant recovery", { timeout: 300_000 }, () => {
  after(stopLibvirtd);
  test("boots a clone from the repository over NBD and migrates it live", async (t) => {
    await ensureLibvirtd();
    const { dir, repo } = await libvirtWorkspace(t);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-ir",
      disks: [{ target: "vda", format: "qcow2", size: "64M" }],
      workload: ["/dev/vda"],
      wlsize: "16M",
    });
    await dom.waitSeq(30);
    const r = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), {
      vm: "ir",
      mode: "snapshot",
      quiesce: "try",
      stateDir: join(dir, "state"),
    });
    const snap = await repo.findSnapshot(r.id);
    const config = JSON.parse((await repo.blob(snap, snap.manifest.config!)).toString()) as VmConfigDocument;
    // The VM itself (not a clone) while the original runs: refused before anything exists.
    await mkdir(join(dir, "serve"));
    const socket = join(dir, "serve", "nbd.sock");
    const served = await serveRestorePoint(repo, snap, { listen: { path: socket } });
    t.after(() => served.close());
    const exports = served.exports.map((d) => ({ name: d.name, size: d.size, socket, exportName: d.name }));
    const refusedDir = join(dir, "refused");
    await mkdir(refusedDir);
    let recordedEarly = 0;
    await assert.rejects(
      adapter.instant.start(config, {
        name: dom.name,
        clone: false,
        dir: refusedDir,
        disks: exports,
        reconnectDelay: 10,
        stateDir: join(dir, "state"),
        log: () => {},
        record: async () => {
          recordedEarly++;
        },
      }),
      new RegExp(`domain ${dom.name} is running: run it as a clone`),
    );
    assert.equal(recordedEarly, 0);
    assert.equal(await stat(join(refusedDir, "vda.overlay.qcow2")).catch(() => undefined), undefined);
    // One VM at a time on this machine: the original goes before the clone boots.
    await virsh("destroy", dom.name);
    const name = "strata-test-ir-clone";
    t.after(() => removeDomain(name));
    const irDir = join(dir, "ir");
    await mkdir(irDir);
    const logs: string[] = [];
    // What the engine would save: the record before anything exists, then after every change.
    const recorded: Array<{ pid: number | null; overlays: boolean[]; production: number }> = [];
    const record = async (v: InstantVm) => {
      adapter.instant.checkRecord(structuredClone(v));
      recorded.push({
        pid: v.pid,
        overlays: await Promise.all(
          v.disks.map((d) =>
            stat(d.overlay).then(
              () => true,
              () => false,
            ),
          ),
        ),
        production: v.disks.filter((d) => d.production).length,
      });
    };
    const t0 = Date.now();
    const vm = await adapter.instant.start(config, {
      name,
      clone: true,
      dir: irDir,
      disks: exports,
      reconnectDelay: 10,
      stateDir: join(dir, "state"),
      log: (m) => logs.push(m),
      record,
    });
    assert.equal(vm.name, name);
    assert.deepEqual(
      recorded[0],
      { pid: null, overlays: [false], production: 0 },
      "recorded before the overlays",
    );
    assert.equal(recorded.at(-1)!.pid, vm.pid);
    assert.ok(vm.pid && vm.pid > 0);
    assert.equal(vm.details.domain, name);
    assert.equal(vm.details.console, join(irDir, "run", "console.log"));
    assert.deepEqual(adapter.instant.checkRecord(structuredClone(vm)), vm);
    assert.ok(await adapter.instant.running(vm));
    const consoleLog = join(irDir, "run", "console.log");
    await waitSeq(consoleLog, 1, 120_000);
    t.diagnostic(`instant recovery: started ${logs.join("; ")}, guest writing after ${Date.now() - t0} ms`);
    const live = await virsh("dumpxml", name);
    assert.match(
      live,
      /<backingStore type='network'[^>]*>\s*<format type='raw'\/>\s*<source protocol='nbd' name='vda'/,
    );
    assert.ok((await stat(vm.disks[0]!.overlay)).size > 0);

    // Migrate while the guest writes, with a bandwidth limit.
    const seq = await waitSeq(consoleLog, 50, 60_000);
    const t1 = Date.now();
    const progress: Array<[string, number, number]> = [];
    recorded.length = 0;
    const { vm: moved, disks: migrated } = await adapter.instant.migrate(vm, {
      target: join(dir, "prod"),
      format: "qcow2",
      limitBytes: 32 * 1024 * 1024,
      active: false,
      progress: (disk, done, total) => progress.push([disk, done, total]),
      log: (m) => logs.push(m),
      record,
    });
    t.diagnostic(`migrated 64 MiB at 32 MiB/s in ${Date.now() - t1} ms`);
    assert.deepEqual(moved.disks[0]!.production, { path: join(dir, "prod", "vda.qcow2"), format: "qcow2" });
    assert.equal(recorded.length, 1, "recorded once the disk moved");
    assert.equal(recorded[0]!.production, 1);
    assert.equal(migrated.length, 1);
    const m = migrated[0]!;
    assert.deepEqual(
      [m.disk, m.path, m.format, m.size, m.skipped],
      ["vda", join(dir, "prod", "vda.qcow2"), "qcow2", 64 << 20, false],
    );
    assert.ok(m.copied >= 64 << 20 && m.readyMs > 0 && m.pivotMs >= m.readyMs, JSON.stringify(m));
    // Progress in the disk's bytes; done === total only once it has moved, and last.
    assert.ok(progress.length > 2);
    assert.ok(progress.every(([d, , total]) => d === "vda" && total === 64 << 20));
    assert.deepEqual(progress.at(-1), ["vda", 64 << 20, 64 << 20]);
    assert.equal(progress.filter(([, done, total]) => done === total).length, 1);
    // Run again: the moved disk is skipped.
    const again = await adapter.instant.migrate(moved, {
      target: join(dir, "prod"),
      format: "qcow2",
      limitBytes: null,
      active: false,
      log: (m) => logs.push(m),
      record,
    });
    assert.equal(again.disks[0]!.skipped, true);
    const after1 = await virsh("dumpxml", name);
    assert.match(after1, new RegExp(`<source file='${join(dir, "prod", "vda.qcow2")}'`));
    assert.doesNotMatch(after1, /protocol='nbd'/);
    await assert.rejects(stat(vm.disks[0]!.overlay), "the overlay is gone");
    // The server goes away; the guest does not notice.
    await served.close();
    await waitSeq(consoleLog, seq + 100, 60_000);
    assert.equal((await virsh("domstate", name)).trim(), "running");
    assert.match(await virsh("list", "--all", "--persistent", "--name"), new RegExp(`^${name}$`, "m"));
    assert.equal(await adapter.instant.stop(moved, 0), "quit");
    assert.equal(await adapter.instant.running(moved), false);
    assert.equal(await adapter.instant.stop(moved, 0), "not running");
  });
});
