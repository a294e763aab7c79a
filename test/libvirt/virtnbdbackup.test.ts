// Strata beside Debian's virtnbdbackup on one domain. What was seen (virtnbdbackup 1.9.15):
// both make libvirt checkpoints whose bitmaps are independent, so Strata's incremental chain is
// unaffected by virtnbdbackup's checkpoints and backups; but virtnbdbackup refuses every backup
// level ("Foreign checkpoint found") while a checkpoint it did not create exists, so once Strata
// has backed a domain up, virtnbdbackup stops working on it. Strata says so in its log. While
// another tool's pull job runs, Strata refuses at once with a clear message instead of blocking
// on libvirt's state lock.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { chown, mkdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { promisify } from "node:util";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import { qemuUser } from "../../src/hypervisor/libvirt/access.js";
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
import { verifyRecords } from "../helpers/records.js";

const run = promisify(execFile);

async function virtnbdbackup(domain: string, level: string, out: string) {
  try {
    const r = await run("virtnbdbackup", ["-d", domain, "-l", level, "-o", out, "-n"], {
      maxBuffer: 1 << 24,
    });
    return { code: 0, text: r.stdout + r.stderr };
  } catch (err) {
    const e = err as { code: number; stdout: string; stderr: string };
    return { code: e.code, text: e.stdout + e.stderr };
  }
}

describe("libvirt: Strata beside virtnbdbackup", { timeout: 300_000 }, () => {
  after(stopLibvirtd);
  test("checkpoints of both tools on one domain, and a foreign job", async (t) => {
    await ensureLibvirtd();
    const { dir, repo } = await libvirtWorkspace(t);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-vnb",
      disks: [{ target: "vda", format: "qcow2", size: "32M" }],
      workload: ["/dev/vda"],
      wlsize: "8M",
    });
    await dom.waitSeq(20);
    const logs: string[] = [];
    const opts = {
      vm: "vnb",
      mode: "snapshot" as const,
      quiesce: "try" as const,
      stateDir: join(dir, "state"),
      log: (m: string) => logs.push(m),
    };

    const v1 = await virtnbdbackup(dom.name, "full", join(dir, "vnb1"));
    assert.equal(v1.code, 0, v1.text.slice(-2000));
    assert.deepEqual(await checkpoints(dom.name), ["virtnbdbackup.0"]);

    const r1 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts);
    assert.ok(
      logs.some((l) => /virtnbdbackup refuses to run/.test(l)),
      logs.join("\n"),
    );
    assert.equal(r1.details.foreignCheckpoints, "virtnbdbackup.0");
    await dom.waitSeq((await dom.seq()) + 30);
    const seq = await dom.seq();
    const r2 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts);
    assert.equal(r2.manifest.disks[0]!.readMode, "changed", r2.manifest.disks[0]!.fullReadReason);
    const cp2 = (r2.manifest.bitmap as { checkpoint: string }).checkpoint;
    assert.deepEqual(
      (await checkpoints(dom.name)).sort(),
      [cp2, "virtnbdbackup.0"].sort(),
      "Strata left virtnbdbackup's checkpoint alone",
    );
    await mkdir(join(dir, "out"));
    const snap = await repo.findSnapshot(r2.id);
    await restoreDiskToFile(repo, snap, "vda", join(dir, "out", "vda.raw"));
    const rec = await verifyRecords(join(dir, "out", "vda.raw"));
    assert.ok(rec.gapFree && rec.lastSeq >= seq, JSON.stringify(rec).slice(0, 300));

    // virtnbdbackup will not run beside a checkpoint it did not make, at any level.
    for (const level of ["inc", "full"]) {
      const v = await virtnbdbackup(dom.name, level, join(dir, `vnb-${level}`));
      assert.notEqual(v.code, 0, `virtnbdbackup -l ${level} ran beside ${cp2}`);
      assert.match(v.text, /Foreign checkpoint found: \[strata-/);
    }

    // Another tool's pull job (what virtnbdbackup runs: backup-begin on its own socket).
    const user = await qemuUser();
    const other = join(dir, "other");
    await mkdir(other);
    await chown(other, user.uid, user.gid);
    await writeFile(
      join(dir, "other.xml"),
      `<domainbackup mode='pull'><server transport='unix' socket='${other}/s.sock'/><disks><disk name='vda' backup='yes' type='file'><scratch file='${other}/scratch.qcow2'/></disk></disks></domainbackup>`,
    );
    await virsh("backup-begin", dom.name, join(dir, "other.xml"));
    const t0 = Date.now();
    await assert.rejects(
      backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts),
      new RegExp(`domain ${dom.name} is running another tool's backup job \\(NBD socket ${other}/s.sock\\)`),
    );
    assert.ok(Date.now() - t0 < 10_000, "refused at once, not after libvirt's 30 s lock timeout");
    assert.equal(await jobType(dom.name), "Unbounded", "the other tool's job was left running");
    await virsh("domjobabort", dom.name);
    const r3 = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), opts);
    assert.equal(r3.manifest.disks[0]!.readMode, "changed");
  });
});
