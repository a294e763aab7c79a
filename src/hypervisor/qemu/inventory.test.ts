import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import { loadInventory } from "./inventory.js";

test("an inventory is read against its schema; each mistake names the file, the VM and the key", (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-inventory-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const inv = join(dir, "vms.yaml");
  writeFileSync(
    inv,
    "vms:\n  web1:\n    qmp: /run/web1.qmp\n    qga: /run/web1.qga\n    mode: pause\n    quiesce: off\n    tags: [production, web]\n  db1:\n    qmp: /run/db1.qmp\n",
  );
  assert.deepEqual(Object.fromEntries(loadInventory(inv)), {
    web1: {
      qmp: "/run/web1.qmp",
      qga: "/run/web1.qga",
      mode: "pause",
      quiesce: "off",
      tags: ["production", "web"],
    },
    db1: { qmp: "/run/db1.qmp" },
  });
  const cases: Array<[string, RegExp]> = [
    ["web1:\n  qmp: /x\n  mode: fast\n", /VM "web1": mode must be snapshot, pause or offline/],
    ["web1:\n  qmp: /x\n  quiesce: 1\n", /VM "web1": quiesce must be require, try or off/],
    ["web1:\n  qmp: /x\n  agent: /y\n", /VM "web1": unknown key "agent"/],
    ["web1:\n  qga: /y\n", /VM "web1": "qmp" \(the QMP socket path\) is required/],
    ["web1:\n  qmp: 5\n", /VM "web1": "qmp" \(the QMP socket path\) must be a path/],
    ["web1:\n  qmp: /x\n  qga: [a]\n", /VM "web1": "qga" \(the guest agent socket path\) must be a path/],
    ["web1:\n  qmp: run/web1.qmp\n", /VM "web1": "qmp" must be an absolute path/],
    ["web1:\n  qmp: /run/../etc/x\n", /VM "web1": "qmp" must not have a "\.\." segment/],
    ["web1:\n  qmp: /x\n  tags: prod\n", /VM "web1": tags must be a list of names/],
    ["web1:\n  qmp: /x\n  tags: [a/b]\n", /VM "web1": a tag must be a plain name/],
    ["web1: /x\n", /VM "web1": settings must be a mapping/],
    ["web1:\n  - qmp\n", /VM "web1": settings must be a mapping/],
    ["../evil:\n  qmp: /x\n", /bad VM name "\.\.\/evil"/],
    ["- a\n- b\n", /must map VM names to their settings/],
  ];
  for (const [text, re] of cases) {
    writeFileSync(inv, text);
    assert.throws(
      () => loadInventory(inv),
      (err) => {
        assert.ok(isStrataError(err, ErrorCode.USAGE), String(err));
        assert.match(err.message, new RegExp(`inventory ${inv}`), "the file is named");
        assert.match(err.message, re);
        return true;
      },
      text,
    );
  }
});
