// Launcher behaviour that needs a real QEMU but no guest.
import assert from "node:assert/strict";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { launchQemu } from "../../src/hypervisor/qemu/launcher.js";
import { isStrataError } from "../../src/util/errors.js";

let dir: string;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-launch-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

test("QEMU refusing its command line is an EXTERNAL error with QEMU's message", {
  timeout: 60_000,
}, async () => {
  await assert.rejects(
    launchQemu({
      runDir: join(dir, "bad"),
      disks: [{ file: join(dir, "missing.qcow2"), format: "qcow2", nodeName: "d0", id: "v0" }],
    }),
    (err) => {
      assert.ok(isStrataError(err, "EXTERNAL"));
      assert.match(err.message, /exited at start.*missing\.qcow2/s);
      return true;
    },
  );
});

test("the command line is recorded; stop() quits a running VM; a missing binary is EXTERNAL", {
  timeout: 60_000,
}, async () => {
  const runDir = join(dir, "ok");
  const vm = await launchQemu({ runDir, disks: [], guestAgent: false, accel: "tcg" });
  assert.deepEqual(JSON.parse(await readFile(join(runDir, "cmdline.json"), "utf8")), vm.argv);
  assert.equal(vm.accelerator.accel, "tcg");
  assert.throws(
    () => vm.qga(),
    (err) => isStrataError(err, "USAGE"),
  );
  const qmp = await vm.qmp();
  assert.equal((await qmp.execute<{ status: string }>("query-status")).status, "running");
  const result = await vm.stop();
  assert.equal(result.how, "quit");
  assert.equal(vm.running, false);
  assert.equal((await vm.stop()).how, "exited");
  await assert.rejects(
    launchQemu({ runDir: join(dir, "nobin"), disks: [], qemuBinary: join(dir, "no-qemu") }),
    (err) => isStrataError(err, "EXTERNAL"),
  );
});
