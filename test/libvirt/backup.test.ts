// Backups of a libvirt domain (the test guest, type 'qemu' under TCG, started by a real libvirtd)
// through libvirt's own pull-mode backup API, driven through the engine's backupVm: full, then
// incremental reading only what changed, filesystem-consistent through the agent, restored disks
// gap-free; and the chain across everything that breaks it: a failed backup, destroy + start,
// a SIGKILLed QEMU, undefine + define, a checkpoint deleted by someone. Nothing is left behind.
import assert from "node:assert/strict";
import { chmod, mkdir, readdir, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { after, describe, test } from "node:test";
import { restoreDiskToFile } from "../../src/engine/restore.js";
import { backupVm, type VmBackupResult } from "../../src/engine/vm-backup.js";
import { LibvirtAdapter, type LibvirtCheckpointRecord } from "../../src/hypervisor/libvirt/index.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { tempDir } from "../helpers/cli.js";
import {
  checkpoints,
  ensureLibvirtd,
  jobType,
  stopLibvirtd,
  type TestDomain,
  testDomain,
  virsh,
} from "../helpers/libvirt.js";
import { verifyRecords } from "../helpers/records.js";

const CHUNK = 256 * 1024;

async function openRepo(t: { after: (fn: () => Promise<void>) => void }, dir: string): Promise<Repository> {
  const store = new FsStore(join(dir, "repo"));
  await Repository.init(store, { chunkSize: CHUNK });
  const repo = await Repository.open(store, { threads: 1 });
  t.after(() => repo.close());
  return repo;
}

function disk(r: VmBackupResult, name: string) {
  const d = r.manifest.disks.find((x) => x.name === name);
  assert.ok(d, `restore point has disk ${name}`);
  return d;
}

/** Restores `names` of restore point `id` as raw files and checks the workload's records. */
async function restoreAndVerify(
  repo: Repository,
  id: string,
  out: string,
  names: string[],
  seqBefore: number,
) {
  const snap = await repo.findSnapshot(id);
  const last: number[] = [];
  await mkdir(out, { recursive: true });
  for (const n of names) {
    const file = join(out, `${n}.raw`);
    await restoreDiskToFile(repo, snap, n, file);
    const r = await verifyRecords(file);
    assert.ok(
      r.gapFree,
      `${id} ${n}: records not gap-free: missing ${r.missing.slice(0, 5)}, bad ${JSON.stringify(r.badRecords.slice(0, 2))}`,
    );
    assert.ok(
      r.lastSeq >= seqBefore,
      `${id} ${n}: last seq ${r.lastSeq} is before the backup started (${seqBefore})`,
    );
    last.push(r.lastSeq);
  }
  // All disks cut at one instant: each record goes to vda, then vdc.
  if (last.length === 2)
    assert.ok(last[0]! - last[1]! === 0 || last[0]! - last[1]! === 1, `vda ${last[0]}, vdc ${last[1]}`);
}

async function clean(
  dom: TestDomain,
  state: string,
  repoId: string,
  expectCheckpoint: string,
  logs: string[],
) {
  assert.equal(await jobType(dom.name), "None", "no backup job left");
  const ours = (await checkpoints(dom.name)).filter((c) => c.startsWith("strata-"));
  assert.deepEqual(
    ours,
    [expectCheckpoint],
    `exactly the newest checkpoint of this repository; log: ${logs.join("\n")}`,
  );
  assert.ok(expectCheckpoint.startsWith(`strata-${repoId.slice(0, 12)}-`));
  const left = await readdir(join(state, "libvirt")).catch(() => [] as string[]);
  assert.deepEqual(left, [], "state directory is empty");
}

describe("libvirt backups", { timeout: 900_000 }, () => {
  after(stopLibvirtd);
  test("full, incremental, and every way the chain breaks", async (t) => {
    await ensureLibvirtd();
    const dir = tempDir(t);
    await chmod(dir, 0o755); // QEMU (libvirt-qemu) reaches the socket and scratch files in state/
    const state = join(dir, "state");
    const repo = await openRepo(t, dir);
    const adapter = new LibvirtAdapter();
    const dom = await testDomain(t, {
      name: "strata-test-bk",
      disks: [
        { target: "vda", format: "qcow2", size: "64M" },
        { target: "vdb", format: "qcow2", size: "32M", ext4: true },
        { target: "vdc", format: "raw", size: "32M" },
      ],
      workload: ["/dev/vda", "/dev/vdc"],
      data: "/dev/vdb",
      wlsize: "16M",
    });
    const logs: string[] = [];
    const run = async (mode: "snapshot" | "pause" = "snapshot") => {
      const t0 = Date.now();
      const r = await backupVm(repo, await adapter.resolve(`libvirt:${dom.name}`), {
        vm: "bk",
        mode,
        quiesce: "try",
        stateDir: state,
        log: (m) => logs.push(m),
      });
      t.diagnostic(
        `${r.id}: ${r.manifest.consistency}, ${Date.now() - t0} ms, backup-begin ${r.details.backupBeginMs} ms, ` +
          `quiesced ${r.details.quiescedMs} ms, ` +
          r.manifest.disks.map((d) => `${d.name} ${d.readMode ?? "-"} read ${d.bytesRead}`).join(", "),
      );
      return r;
    };
    const cp = (r: VmBackupResult) => (r.manifest.bitmap as LibvirtCheckpointRecord).checkpoint;

    // The inventory sees the domain.
    const listed = await adapter.list();
    assert.deepEqual(
      listed.find((v) => v.name === dom.name),
      { adapter: "libvirt", source: `libvirt:${dom.name}`, name: dom.name, state: "running" },
    );

    // 1. Full.
    const seq1 = await dom.waitSeq(40);
    const r1 = await run();
    assert.equal(r1.manifest.mode, "snapshot");
    assert.equal(r1.manifest.consistency, "filesystem-consistent");
    assert.equal(r1.details.frozen, 1, "the agent froze the ext4 data disk");
    assert.deepEqual(
      r1.manifest.disks.map((d) => d.name),
      ["vda", "vdb", "vdc"],
    );
    const rec1 = r1.manifest.bitmap as LibvirtCheckpointRecord;
    assert.equal(rec1.kind, "libvirt-checkpoint");
    assert.equal(rec1.repository, repo.config.id);
    assert.deepEqual(
      rec1.disks.map((d) => d.name),
      ["vda", "vdb"],
      "the raw disk has no checkpoint bitmap",
    );
    assert.match(rec1.xml ?? "", /<domaincheckpoint>/);
    await clean(dom, state, repo.config.id, cp(r1), logs);
    // The configuration went with the restore point.
    const snap1 = await repo.findSnapshot(r1.id);
    const config = JSON.parse((await repo.blob(snap1, snap1.manifest.config!)).toString()) as Record<
      string,
      unknown
    >;
    assert.equal(config.kind, "libvirt");
    assert.equal(config.name, dom.name);
    assert.deepEqual(
      (config.disks as Array<{ name: string; format: string; size: number }>).map((d) => [
        d.name,
        d.format,
        d.size,
      ]),
      [
        ["vda", "qcow2", 64 << 20],
        ["vdb", "qcow2", 32 << 20],
        ["vdc", "raw", 32 << 20],
      ],
    );
    assert.deepEqual(
      (config.nics as Array<{ mac: string }>).map((n) => n.mac),
      ["52:54:00:5a:7a:01"],
    );
    assert.match(String(config.xml), /<domain type='qemu'>/);
    assert.ok(!/<seclabel|<domain [^>]*id=/.test(String(config.xml)), "the persistent XML, not the live one");

    // 2. Incremental: only what changed.
    await dom.waitSeq((await dom.seq()) + 40);
    const seq2 = await dom.seq();
    const r2 = await run();
    assert.equal(disk(r2, "vda").readMode, "changed", disk(r2, "vda").fullReadReason);
    assert.equal(disk(r2, "vdb").readMode, "changed");
    assert.equal(disk(r2, "vdc").readMode, "full");
    assert.match(disk(r2, "vdc").fullReadReason ?? "", /no checkpoint bitmap on a raw disk/);
    assert.ok(disk(r2, "vda").bytesRead <= 16 * CHUNK, `vda incremental read ${disk(r2, "vda").bytesRead}`);
    assert.ok(disk(r2, "vdb").bytesRead <= 4 * CHUNK, `vdb incremental read ${disk(r2, "vdb").bytesRead}`);
    await clean(dom, state, repo.config.id, cp(r2), logs);
    await restoreAndVerify(repo, r1.id, join(dir, "r1"), ["vda", "vdc"], seq1);
    await restoreAndVerify(repo, r2.id, join(dir, "r2"), ["vda", "vdc"], seq2);

    // 3. A backup that fails after its view was cut: its checkpoint goes, the previous one stays
    // the base and still holds every change since it was made.
    const handle = await adapter.resolve(`libvirt:${dom.name}`);
    const prev = (await repo.snapshots("bk", () => {})).at(-1)!;
    const failed = await handle.openBackup({
      vm: "bk",
      repository: repo.config.id,
      mode: "snapshot",
      quiesce: "try",
      previous: { time: prev.time, checkpoint: prev.manifest.bitmap as LibvirtCheckpointRecord },
      granularity: CHUNK,
      stateDir: state,
      log: () => {},
    });
    assert.equal((await checkpoints(dom.name)).filter((c) => c.startsWith("strata-")).length, 2);
    // libvirt 9.0 keeps every checkpoint's bitmap recording: the older one sees the writes made
    // after the newer one was created, so deleting the newer needs no merge into its parent.
    const dirtyBytes = async (cp: string) =>
      [
        ...(await virsh("checkpoint-dumpxml", dom.name, cp, "--size", "--no-domain")).matchAll(
          /size='(\d+)'/g,
        ),
      ]
        .map((m) => Number(m[1]))
        .reduce((a, b) => a + b, 0);
    const newest = (await checkpoints(dom.name)).filter((c) => c.startsWith("strata-") && c !== cp(r2))[0]!;
    const olderBefore = await dirtyBytes(cp(r2));
    await dom.waitSeq((await dom.seq()) + 30);
    assert.ok((await dirtyBytes(newest)) > 0, "the new checkpoint's bitmap records");
    assert.ok((await dirtyBytes(cp(r2))) > olderBefore, "the older checkpoint's bitmap records too");
    await failed.finish(false);
    await clean(dom, state, repo.config.id, cp(r2), logs);
    await dom.waitSeq((await dom.seq()) + 20);
    const seq3 = await dom.seq();
    const r3 = await run();
    assert.equal(disk(r3, "vda").readMode, "changed");
    await restoreAndVerify(repo, r3.id, join(dir, "r3"), ["vda", "vdc"], seq3);

    // 4. destroy + start: QEMU stores its bitmaps on the way out; still incremental.
    await virsh("destroy", dom.name);
    await dom.start();
    await dom.waitSeq(20);
    const seq4 = await dom.seq();
    const r4 = await run();
    assert.equal(disk(r4, "vda").readMode, "changed", disk(r4, "vda").fullReadReason);
    await restoreAndVerify(repo, r4.id, join(dir, "r4"), ["vda", "vdc"], seq4);

    // 5. QEMU killed: the bitmaps are lost; libvirt refuses the incremental, Strata reads all.
    process.kill(await dom.pid(), "SIGKILL");
    for (let i = 0; i < 100 && (await virsh("domstate", dom.name)).trim() !== "shut off"; i++)
      await new Promise((r) => setTimeout(r, 100));
    await dom.start();
    await dom.waitSeq(20);
    const seq5 = await dom.seq();
    const r5 = await run();
    assert.equal(disk(r5, "vda").readMode, "full");
    assert.match(disk(r5, "vda").fullReadReason ?? "", /libvirt refused an incremental/);
    assert.ok(logs.some((l) => /deleting that checkpoint and reading every disk/.test(l)));
    await clean(dom, state, repo.config.id, cp(r5), logs);
    await restoreAndVerify(repo, r5.id, join(dir, "r5"), ["vda", "vdc"], seq5);

    // 6. undefine + define: libvirt forgets its checkpoints, the bitmaps stay in the images;
    // Strata redefines the checkpoint from the restore point and goes on incrementally.
    await writeFile(join(dom.dir, "saved.xml"), await virsh("dumpxml", "--inactive", dom.name));
    await virsh("destroy", dom.name);
    await virsh("undefine", dom.name, "--checkpoints-metadata");
    await virsh("define", join(dom.dir, "saved.xml"));
    assert.deepEqual(await checkpoints(dom.name), []);
    await dom.start();
    await dom.waitSeq(20);
    const seq6 = await dom.seq();
    const r6 = await run();
    assert.equal(disk(r6, "vda").readMode, "changed", disk(r6, "vda").fullReadReason);
    assert.ok(logs.some((l) => /redefined it from the restore point/.test(l)));
    await clean(dom, state, repo.config.id, cp(r6), logs);
    await restoreAndVerify(repo, r6.id, join(dir, "r6"), ["vda", "vdc"], seq6);

    // 7. Someone deletes the checkpoint on the running domain: its bitmap goes with it.
    await virsh("checkpoint-delete", dom.name, cp(r6));
    await dom.waitSeq((await dom.seq()) + 20);
    const seq7 = await dom.seq();
    const r7 = await run("pause");
    assert.equal(r7.manifest.consistency, "paused");
    assert.equal(disk(r7, "vda").readMode, "full");
    assert.match(disk(r7, "vda").fullReadReason ?? "", /checkpoint|bitmap/);
    await clean(dom, state, repo.config.id, cp(r7), logs);
    await restoreAndVerify(repo, r7.id, join(dir, "r7"), ["vda", "vdc"], seq7);
    assert.equal((await virsh("domstate", dom.name)).trim(), "running");
  });
});
