// Another tool's NBD server in the VM's QEMU (QEMU runs one NBD server at a time): the backup is
// refused, and its cleanup leaves that server running. The cleanup asks whether Strata's own
// server listens (on its socket) before it sends nbd-server-stop, so the record's "nbd-server"
// item, written before nbd-server-start failed, never stops someone else's server. Then
// doctor finds nothing to fix, and once the other tool is done the backup works.
import assert from "node:assert/strict";
import { join } from "node:path";
import { describe, test } from "node:test";
import { NbdClient } from "../../src/nbd/client.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm, leftovers, qmpOnce } from "../helpers/vm.js";

describe("another tool's NBD server in the VM", { timeout: 300_000 }, () => {
  test("the backup is refused and leaves the other server running", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const env = { STRATA_STATE_DIR: state };
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "64M" }],
      workload: ["/dev/vda"],
      wlsize: "4M",
    });
    await g.waitSeq(5);
    const other = join(g.dir, "other-tool.sock");
    await qmpOnce(g.vm.qmpSocket, "nbd-server-start", { addr: { type: "unix", data: { path: other } } });
    await qmpOnce(g.vm.qmpSocket, "block-export-add", {
      type: "nbd",
      id: "other-export",
      "node-name": "disk0",
      name: "other",
      writable: false,
    });
    const src = `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;
    const r = await strata(["backup", "--repo", repo, "--vm", "k", src], { env });
    assert.equal(r.code, 1, r.stderr);
    assert.match(r.stderr, /cannot start QEMU's NBD server for the backup .*GenericError/);
    assert.doesNotMatch(r.stderr, /cleanup/, "the cleanup itself went through");

    // The other tool's server and export are untouched; nothing of Strata's is left.
    assert.deepEqual(
      (await NbdClient.listExports({ path: other })).map((e) => e.name),
      ["other"],
    );
    const l = await leftovers(g.vm, state);
    assert.deepEqual(l.exports, ["other-export"]);
    assert.deepEqual([l.nodes, l.jobs, l.files], [[], [], []]);
    assert.deepEqual(l.bitmaps.disk0, []);
    assert.equal(l.status, "running");
    const report = summary<{ clean: boolean }>(
      await strataOk(["doctor", "--json", "--vm", "k", `qmp:${g.vm.qmpSocket}`], { env }),
    );
    assert.equal(report.clean, true);
    assert.equal((await NbdClient.listExports({ path: other })).length, 1, "doctor left it too");

    // Once the other tool is done, the backup works.
    await qmpOnce(g.vm.qmpSocket, "nbd-server-stop");
    const b = summary<{ disks: Array<{ name: string }> }>(
      await strataOk(["backup", "--repo", repo, "--vm", "k", "--json", src], { env }),
    );
    assert.deepEqual(
      b.disks.map((d) => d.name),
      ["vblk0"],
    );
  });
});
