// The engine's instant-recovery record: written and read back whole (the adapter's part checked
// by the adapter), a version 1 record (written before adapters) refused with what to do by hand,
// a damaged one named by `list`. The adapter is a stand-in with the one method a record needs:
// this tests the engine's envelope, and the QEMU adapter's part has its own test.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { mkdir, writeFile } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import type { InstantRuntime, InstantVm, VmAdapter } from "../../hypervisor/adapter.js";
import { AdapterRegistry } from "../../hypervisor/registry.js";
import { type InstantRecord, listInstantRecords, loadInstantRecord, saveInstantRecord } from "./state.js";

const checked: InstantVm[] = [];
const instant = {
  checkRecord: (vm: InstantVm) => {
    checked.push(vm);
    if (vm.data.ok !== true) throw new Error("the stand-in adapter refuses this record");
    return vm;
  },
} as unknown as InstantRuntime;
const adapter: VmAdapter = {
  id: "standin",
  schemes: [],
  usage: "",
  resolve: () => Promise.reject(new Error("not used")),
  instant,
};
const adapters = new AdapterRegistry().register(adapter);

function record(): InstantRecord {
  return {
    format: "strata-instant",
    version: 2,
    name: "ir",
    restorePoint: "web1/2026-11-29T10:00:00Z",
    repo: "/backup/repo",
    clone: true,
    dir: "/srv/ir",
    socket: "/srv/ir/run/nbd.sock",
    reconnectDelay: 300,
    phase: "running",
    serve: { pid: 100, log: "/srv/ir/run/serve.log", command: ["node", "strata", "serve"] },
    exports: [{ name: "vblk0", size: 1 << 20, socket: "/srv/ir/run/nbd.sock", exportName: "vblk0" }],
    adapter: "standin",
    vm: {
      adapter: "standin",
      name: "ir",
      where: "somewhere",
      pid: 101,
      disks: [{ name: "vblk0", overlay: "/srv/ir/vblk0.overlay" }],
      data: { ok: true },
      details: {},
      warnings: [],
    },
    created: "2026-11-29T10:00:00.000Z",
  };
}

test("a record comes back as saved, its VM part checked by its adapter", async (t) => {
  const stateDir = mkdtempSync(join(tmpdir(), "strata-instant-state-"));
  t.after(() => rmSync(stateDir, { recursive: true, force: true }));
  await saveInstantRecord(record(), stateDir);
  checked.length = 0;
  assert.deepEqual(await loadInstantRecord("ir", stateDir, adapters), record());
  assert.deepEqual(checked, [record().vm]);
  await assert.rejects(
    loadInstantRecord("nope", stateDir, adapters),
    /no instantly recovered VM named "nope"/,
  );
});

test("version 1, damaged and refused records are named, not used", async (t) => {
  const stateDir = mkdtempSync(join(tmpdir(), "strata-instant-state-"));
  t.after(() => rmSync(stateDir, { recursive: true, force: true }));
  const dir = join(stateDir, "instant");
  await mkdir(dir, { recursive: true });
  await writeFile(
    join(dir, "old.json"),
    JSON.stringify({
      format: "strata-instant",
      version: 1,
      name: "old",
      dir: "/srv/old",
      qemu: { pid: 7 },
      serve: { pid: 8 },
    }),
  );
  await assert.rejects(loadInstantRecord("old", stateDir, adapters), (err: Error & { code?: string }) => {
    assert.equal(err.code, "REPO_VERSION");
    assert.match(
      err.message,
      /old\.json was written by an earlier Strata \(record version 1\).*stop its QEMU \(pid 7\) and NBD server \(pid 8\).*\/srv\/old/,
    );
    return true;
  });
  const bad = { ...record(), name: "bad", dir: "/srv/../etc" };
  await writeFile(join(dir, "bad.json"), JSON.stringify(bad));
  await assert.rejects(
    loadInstantRecord("bad", stateDir, adapters),
    /bad\.json is damaged: dir: the directory "\/srv\/..\/etc" is not an absolute path/,
  );
  const refused = record();
  refused.name = "refused";
  refused.vm!.data = { ok: false };
  await saveInstantRecord(refused, stateDir);
  await assert.rejects(loadInstantRecord("refused", stateDir, adapters), /the stand-in adapter refuses/);
  await saveInstantRecord(record(), stateDir);
  const { records, unreadable } = await listInstantRecords(stateDir, adapters);
  assert.deepEqual(
    records.map((r) => r.name),
    ["ir"],
  );
  assert.deepEqual(
    unreadable.map((u) => u.file),
    ["bad.json", "old.json", "refused.json"].map((f) => join(dir, f)),
  );
});
