import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import { STATE_LIMITS, StateRecord } from "./state.js";

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-state-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("a record round-trips; what it names is kept exactly", async (t) => {
  const dir = tempDir(t);
  const rec = await StateRecord.create(dir, "web1", "/run/web1.qmp", "/run/web1.qga");
  await rec.add({ kind: "file", path: join(dir, "strata-fleece-web1-vda.qcow2") });
  await rec.add({ kind: "node", node: "strata-fleece-vda" });
  await rec.add({ kind: "bitmap", node: "#block123", name: "strata-tmp" });
  await rec.add({ kind: "nbd-server", socket: join(dir, "strata-nbd-web1.sock") });
  await rec.add({ kind: "restart", argv: ["qemu-system-x86_64", "-m", "256"] });
  const back = await StateRecord.load(rec.path);
  assert.deepEqual(back?.data, rec.data);
  await assert.rejects(
    rec.add({ kind: "file", path: "relative/x.qcow2" }),
    (err) => isStrataError(err, ErrorCode.INTERNAL) && /items?|path/.test(err.message),
    "a run never writes a record it would refuse to read",
  );
});

test("a tampered record is refused, naming the file and the first bad field", async (t) => {
  const dir = tempDir(t);
  const rec = await StateRecord.create(dir, "web1", "/run/web1.qmp");
  await rec.add({ kind: "file", path: join(dir, "strata-fleece-web1-vda.qcow2") });
  const good = JSON.parse(readFileSync(rec.path, "utf8")) as Record<string, unknown>;
  const cases: Array<[string, unknown, RegExp]> = [
    ["an item kind that does not exist", { ...good, items: [{ kind: "format-disk" }] }, /items\.0\.kind/],
    [
      "a relative path",
      { ...good, items: [{ kind: "file", path: "etc/shadow" }] },
      /items\.0\.path: not an absolute path/,
    ],
    [
      "a path with ..",
      { ...good, items: [{ kind: "file", path: `${dir}/../../etc/shadow` }] },
      /items\.0\.path: has a "\.\." segment/,
    ],
    [
      "a huge array",
      { ...good, items: Array.from({ length: STATE_LIMITS.items + 1 }, () => ({ kind: "freeze" })) },
      /items: .*4096/,
    ],
    ["a relative QMP socket", { ...good, qmp: "web1.qmp" }, /qmp: not an absolute path/],
    ["a negative pid", { ...good, pid: -1 }, /pid: /],
    ["a pid that is text", { ...good, pid: "1" }, /pid: /],
    [
      "a node name QEMU never makes",
      { ...good, items: [{ kind: "node", node: "x; rm -rf /" }] },
      /items\.0\.node: not a QEMU node-name/,
    ],
    ["a restart with no program", { ...good, items: [{ kind: "restart", argv: [] }] }, /items\.0\.argv/],
    ["another VM's record", { ...good, vm: "db1" }, /vm: "db1" is not the VM the file is named after/],
    ["not an object", ["web1"], /document: /],
  ];
  for (const [what, doc, re] of cases) {
    writeFileSync(rec.path, JSON.stringify(doc));
    await assert.rejects(
      StateRecord.load(rec.path),
      (err) => {
        assert.ok(isStrataError(err, ErrorCode.DATA_CORRUPT), `${what}: ${String(err)}`);
        assert.ok(err.message.includes(rec.path), `${what}: names the file: ${err.message}`);
        assert.match(err.message, re, what);
        return true;
      },
      what,
    );
  }
  writeFileSync(rec.path, '{"vm": "web1", "items": [');
  await assert.rejects(StateRecord.load(rec.path), /not JSON/);
  writeFileSync(rec.path, " ".repeat(STATE_LIMITS.fileBytes + 1));
  await assert.rejects(StateRecord.load(rec.path), /more than a record holds/);
  // The original record still loads.
  writeFileSync(rec.path, JSON.stringify(good));
  assert.equal((await StateRecord.load(rec.path))?.items.length, 1);
});

test("a protect keeps a record of its own beside a backup's; a record in the other's name is refused", async (t) => {
  const dir = tempDir(t);
  const protect = await StateRecord.create(dir, "web1", "/run/web1.qmp", undefined, "protect");
  assert.equal(protect.path, join(dir, "web1.protect.json"));
  const backup = await StateRecord.create(dir, "web1", "/run/web1.qmp");
  assert.equal(backup.path, join(dir, "web1.json"));
  await protect.add({ kind: "job", id: "strata-cdp-vda" });
  assert.deepEqual((await StateRecord.load(protect.path))?.items, [{ kind: "job", id: "strata-cdp-vda" }]);
  assert.equal((await StateRecord.all(dir)).length, 2);
  await assert.rejects(
    StateRecord.create(dir, "web1", "/run/web1.qmp", undefined, "protect"),
    /an earlier run/,
  );
  // The backup's record renamed to the protect's name (or the other way round) does not fit.
  writeFileSync(
    join(dir, "web2.protect.json"),
    readFileSync(backup.path, "utf8").replace('"web1"', '"web2"'),
  );
  await assert.rejects(
    StateRecord.load(join(dir, "web2.protect.json")),
    /not the VM the file is named after/,
  );
});
