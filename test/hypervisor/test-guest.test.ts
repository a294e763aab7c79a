// Boots the busybox test guest under real QEMU (TCG on machines without vmx/svm) and exercises
// the launcher, the QMP client and the guest-agent client against it; then checks the records
// the guest's workload wrote. One VM at a time in this file.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { promisify } from "node:util";
import { chooseAccelerator, launchQemu, type QemuVm } from "../../src/hypervisor/qemu/launcher.js";
import { QemuCommandError } from "../../src/hypervisor/qemu/wire.js";
import { type TestGuest, testGuest } from "../helpers/guest.js";
import { parseLatencySummaries, verifyRecords } from "../helpers/records.js";

const run = promisify(execFile);
let dir: string;
let guest: TestGuest;

before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-guest-"));
  guest = await testGuest();
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

/** A fresh qcow2 workload disk and a qcow2 data disk holding an empty ext4. */
async function makeDisks(name: string): Promise<{ workload: string; data: string }> {
  const workload = join(dir, `${name}-workload.qcow2`);
  const dataRaw = join(dir, `${name}-data.raw`);
  const data = join(dir, `${name}-data.qcow2`);
  await run("qemu-img", ["create", "-q", "-f", "qcow2", workload, "64M"]);
  await run("qemu-img", ["create", "-q", "-f", "raw", dataRaw, "32M"]);
  await run("mkfs.ext4", ["-q", "-F", dataRaw]);
  await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", dataRaw, data]);
  await rm(dataRaw);
  return { workload, data };
}

async function bootGuest(name: string, disks: { workload: string; data: string }): Promise<QemuVm> {
  return launchQemu({
    runDir: join(dir, name),
    name,
    disks: [
      { file: disks.workload, format: "qcow2", nodeName: "disk0", id: "vblk0" },
      { file: disks.data, format: "qcow2", nodeName: "disk1", id: "vblk1" },
    ],
    kernel: {
      kernel: guest.kernel,
      initrd: guest.initrd,
      append:
        "console=ttyS0 quiet panic=-1 strata.workload=/dev/vda strata.rate=50 strata.report=100 strata.data=/dev/vdb",
    },
    noReboot: true,
  });
}

async function ext4State(qcow2: string): Promise<string> {
  const raw = `${qcow2}.raw`;
  await run("qemu-img", ["convert", "-f", "qcow2", "-O", "raw", qcow2, raw]);
  try {
    const { stdout } = await run("dumpe2fs", ["-h", raw]);
    return /^Filesystem state:\s*(.*)$/m.exec(stdout)?.[1]?.trim() ?? "unknown";
  } finally {
    await rm(raw, { force: true });
  }
}

describe("test guest under QEMU", { timeout: 240_000 }, () => {
  test("boots, answers QMP and the agent, freezes, writes records, shuts down through the agent", async (t) => {
    const disks = await makeDisks("a");
    const t0 = performance.now();
    const vm = await bootGuest("a", disks);
    try {
      const expected = await chooseAccelerator();
      assert.equal(vm.accelerator.accel, expected.accel);
      assert.ok(vm.argv.includes(`file,id=serial0,path=${join(dir, "a", "console.log")}`));
      t.diagnostic(`accelerator: ${vm.accelerator.accel} (${vm.accelerator.reason})`);

      await vm.waitForConsole(/STRATA-GUEST-READY/, 90_000);
      t.diagnostic(`boot to READY: ${((performance.now() - t0) / 1000).toFixed(1)} s`);

      // QMP: status, block devices by node-name and qdev path.
      const qmp = await vm.qmp();
      assert.equal(qmp.greeting.version.qemu.major >= 7, true);
      const status = await qmp.execute<{ running: boolean; status: string }>("query-status");
      assert.deepEqual([status.running, status.status], [true, "running"]);
      const block =
        await qmp.execute<Array<{ qdev: string; inserted?: { "node-name": string; drv: string } }>>(
          "query-block",
        );
      const byQdev = new Map(block.map((b) => [b.qdev, b.inserted?.["node-name"]]));
      assert.equal(byQdev.get("/machine/peripheral/vblk0/virtio-backend"), "disk0");
      assert.equal(byQdev.get("/machine/peripheral/vblk1/virtio-backend"), "disk1");
      const nodes =
        await qmp.execute<Array<{ "node-name": string; drv: string; file: string }>>(
          "query-named-block-nodes",
        );
      const drv = new Map(nodes.map((n) => [n["node-name"], n.drv]));
      assert.deepEqual(
        ["disk0", "disk0-file", "disk1", "disk1-file"].map((n) => drv.get(n)),
        ["qcow2", "file", "qcow2", "file"],
      );
      // QMP errors keep QEMU's class and description.
      await assert.rejects(qmp.execute("no-such-command"), (err) => {
        assert.ok(err instanceof QemuCommandError);
        assert.equal(err.errorClass, "CommandNotFound");
        assert.equal(err.code, "EXTERNAL");
        return true;
      });
      await assert.rejects(qmp.execute("blockdev-del", { "node-name": "nope" }), (err) => {
        assert.ok(err instanceof QemuCommandError);
        assert.match(err.desc, /nope/);
        return true;
      });

      // Guest agent: ping, info, freeze/thaw of the mounted ext4 data disk.
      const qga = vm.qga();
      await qga.waitUntilReady(30_000);
      await qga.ping();
      const info = await qga.info();
      assert.match(info.version, /^\d+\.\d+/);
      assert.ok(info.supported_commands.some((c) => c.name === "guest-fsfreeze-freeze" && c.enabled));
      assert.equal(await qga.fsfreezeStatus(), "thawed");
      let t1 = performance.now();
      assert.equal(await qga.fsfreezeFreeze(), 1, "exactly the ext4 data disk freezes");
      const freezeMs = performance.now() - t1;
      assert.equal(await qga.fsfreezeStatus(), "frozen");
      t1 = performance.now();
      assert.equal(await qga.fsfreezeThaw(), 1);
      const thawMs = performance.now() - t1;
      assert.equal(await qga.fsfreezeStatus(), "thawed");
      t.diagnostic(`fsfreeze ${freezeMs.toFixed(0)} ms, thaw ${thawMs.toFixed(0)} ms`);
      // While frozen, a guest write to the data disk blocks and nothing reaches the host's disk1.
      // Device-level write counts of disk1 (accounting lives on the device's BlockBackend).
      const writes = async () => {
        const stats =
          await qmp.execute<Array<{ qdev?: string; stats: { wr_operations: number } }>>("query-blockstats");
        return stats.find((x) => x.qdev === "/machine/peripheral/vblk1/virtio-backend")!.stats.wr_operations;
      };
      // A guest process writes to the data disk every 50 ms (started before the freeze: a frozen
      // agent refuses guest-exec). While frozen its writes block and none reaches disk1.
      await qga.execute("guest-exec", {
        path: "/bin/sh",
        arg: ["-c", "i=0; while [ $i -lt 60 ]; do echo $i > /mnt/data/f; sync; i=$((i+1)); sleep 0.05; done"],
      });
      const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));
      const start = await writes();
      await sleep(500);
      assert.ok((await writes()) > start, "the guest's writer reaches disk1");
      assert.equal(await qga.fsfreezeFreezeList(["/mnt/data"]), 1);
      assert.equal(await qga.fsfreezeStatus(), "frozen");
      const before = await writes();
      await sleep(1000);
      assert.equal(await writes(), before, "no write reached disk1 while frozen");
      assert.equal(await qga.fsfreezeThaw(), 1);
      await sleep(500);
      assert.ok((await writes()) > before, "the guest's writes resume after the thaw");
      await assert.rejects(qga.execute("guest-no-such-command"), (err) => {
        assert.ok(err instanceof QemuCommandError);
        assert.equal(err.errorClass, "CommandNotFound");
        return true;
      });
      assert.equal(await qga.fsfreezeStatus(), "thawed");
      const marker = await qga.exec("/bin/cat", ["/mnt/data/boot-marker"]);
      assert.deepEqual([marker.exitcode, marker.stdout], [0, "written by the test guest at boot\n"]);
      // A new connection synchronises again before its first command.
      await qga.close();
      await qga.ping();

      // Let the workload write a few hundred records, then shut down through the agent.
      await vm.waitForConsole(/STRATA-WORKLOAD stats seq=200 /, 30_000);
      const shutdown = qmp.waitForEvent("SHUTDOWN", (e) => e.data["guest"] === true, 60_000);
      await qga.shutdown();
      await shutdown;
      // QEMU exits by itself after the guest's poweroff (-no-reboot), with status 0.
      assert.deepEqual(await vm.exited, { code: 0, signal: null });
      assert.equal((await vm.stop()).how, "exited");

      const console = await vm.console();
      assert.match(console, /STRATA-GUEST-POWEROFF/);
      const sums = parseLatencySummaries(console);
      const final = sums.find((s) => s.final);
      assert.ok(final, "the workload printed its final summary");
      for (const s of sums) {
        t.diagnostic(`workload: seq=${s.seq} n=${s.n} p50=${s.p50Us}us p99=${s.p99Us}us max=${s.maxUs}us`);
      }

      // The workload disk holds every record from 1 up to the last one the guest wrote.
      const scan = await verifyRecords(disks.workload, { format: "qcow2" });
      assert.deepEqual(scan.badRecords, []);
      assert.equal(scan.gapFree, true);
      assert.equal(scan.firstSeq, 1);
      assert.equal(scan.lastSeq, final.seq);
      assert.ok(scan.lastSeq >= 200);
      // The data disk was unmounted cleanly.
      assert.equal(await ext4State(disks.data), "clean");
    } finally {
      await vm.stop({ timeoutMs: 5000 });
    }
  });

  test("after QEMU is killed mid-write the disk still holds a gap-free prefix", async () => {
    const disks = await makeDisks("k");
    const vm = await bootGuest("k", disks);
    try {
      const m = await vm.waitForConsole(/STRATA-WORKLOAD stats seq=(100) /, 90_000);
      const result = await vm.stop({ mode: "kill" });
      assert.deepEqual([result.how, result.signal], ["killed", "SIGKILL"]);
      // Every write the guest saw complete (O_DSYNC) is in the image; the rest is simply absent.
      const scan = await verifyRecords(disks.workload, { format: "qcow2" });
      assert.deepEqual(scan.badRecords, []);
      assert.equal(scan.gapFree, true);
      assert.equal(scan.firstSeq, 1);
      assert.ok(scan.lastSeq >= Number(m[1]), `lastSeq ${scan.lastSeq} < ${m[1]} reported by the guest`);
    } finally {
      await vm.stop({ timeoutMs: 5000 });
    }
  });

  test("the ACPI power button shuts the guest down cleanly", async () => {
    const disks = await makeDisks("b");
    const vm = await bootGuest("b", disks);
    try {
      await vm.waitForConsole(/STRATA-WORKLOAD start/, 90_000);
      const result = await vm.stop({ mode: "powerdown", timeoutMs: 30_000 });
      assert.equal(result.how, "powerdown");
      assert.match(await vm.console(), /STRATA-GUEST-POWEROFF/);
      const scan = await verifyRecords(disks.workload, { format: "qcow2" });
      assert.equal(scan.gapFree, true);
      assert.equal(await ext4State(disks.data), "clean");
    } finally {
      await vm.stop({ timeoutMs: 5000 });
    }
  });
});
