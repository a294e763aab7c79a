// strata vms: every VM the adapters see, with the source to back it up; a platform that can't be
// asked is a warning, not a failure. The inventory's VM here has no QEMU behind its socket, so it
// is listed as shut off; one that answers QMP (a fake monitor, greeting and query-status only:
// a real QEMU is started by the live tests) is listed as running.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { createServer } from "node:net";
import { join } from "node:path";
import { test } from "node:test";
import { strataOk, tempDir } from "../helpers/cli.js";

test("strata vms lists the inventory's VMs with their state and source", async (t) => {
  const dir = tempDir(t);
  const live = join(dir, "live.qmp");
  const server = createServer((sock) => {
    sock.on("error", () => {});
    sock.write(`${JSON.stringify({ QMP: { version: {}, capabilities: [] } })}\r\n`);
    sock.on("data", (d) => {
      for (const line of d
        .toString()
        .split("\n")
        .filter((l) => l.trim() !== "")) {
        const { execute, id } = JSON.parse(line) as { execute: string; id?: unknown };
        const ret = execute === "query-status" ? { status: "running", running: true } : {};
        sock.write(`${JSON.stringify({ return: ret, ...(id === undefined ? {} : { id }) })}\r\n`);
      }
    });
  });
  await new Promise<void>((r) => server.listen(live, r));
  t.after(() => server.close());
  const inventory = join(dir, "vms.yaml");
  await fs.writeFile(
    inventory,
    `vms:\n  web1:\n    qmp: ${join(dir, "nothing.qmp")}\n  db1:\n    qmp: ${live}\n`,
  );
  const r = await strataOk(["vms", "--inventory", inventory, "--json"]);
  const doc = JSON.parse(r.stdout) as {
    vms: Array<{ source: string; name: string; state: string; adapter: string }>;
    unreachable: Array<{ adapter: string; error: string }>;
  };
  const mine = doc.vms.filter((v) => v.adapter === "qemu");
  assert.deepEqual(mine.map((v) => [v.source, v.name, v.state]).sort(), [
    ["vm:db1", "db1", "running"],
    ["vm:web1", "web1", "shut off"],
  ]);
  for (const u of doc.unreachable) assert.ok(u.error.length > 0, `${u.adapter} says why it can't be asked`);
  const text = await strataOk(["vms", "--inventory", inventory]);
  assert.match(text.stdout, /^SOURCE\s+NAME\s+STATE\s+ADAPTER$/m);
  assert.match(text.stdout, /^vm:web1\s+web1\s+shut off\s+qemu$/m);
});
