import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import { parseQmpSpec, QemuAdapter } from "./adapter.js";
import { LineSplitter } from "./wire.js";

const usageError = (re: RegExp) => (err: unknown) => {
  assert.ok(isStrataError(err, ErrorCode.USAGE), String(err));
  assert.match((err as Error).message, re);
  return true;
};

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-qemu-adapter-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("qmp: sources: the socket, qga=, and the sibling agent socket of X.qmp", (t) => {
  const dir = tempDir(t);
  assert.deepEqual(parseQmpSpec("qmp:/run/x.sock"), { qmp: "/run/x.sock" });
  assert.deepEqual(parseQmpSpec("qmp:/run/x.sock,qga=/run/g.sock"), {
    qmp: "/run/x.sock",
    qga: "/run/g.sock",
  });
  writeFileSync(join(dir, "100.qga"), "");
  assert.deepEqual(parseQmpSpec(`qmp:${dir}/100.qmp`), { qmp: `${dir}/100.qmp`, qga: `${dir}/100.qga` });
  assert.deepEqual(parseQmpSpec(`qmp:${dir}/101.qmp`), { qmp: `${dir}/101.qmp` });
  assert.throws(() => parseQmpSpec("qmp:"), usageError(/names no QMP socket/));
  assert.throws(
    () => parseQmpSpec("qmp:/x,agent=/y"),
    usageError(/unknown option "agent=\/y".*known: qga=PATH/),
  );
  assert.throws(() => parseQmpSpec("vm:x"), usageError(/not a QMP source/));
});

test("vm: sources come from the inventory; its mode and quiesce are the handle's defaults", async (t) => {
  const dir = tempDir(t);
  const inv = join(dir, "vms.yaml");
  writeFileSync(join(dir, "100.qga"), "");
  writeFileSync(
    inv,
    `vms:\n  web1:\n    qmp: ${dir}/100.qmp\n    mode: pause\n    quiesce: off\n  db1:\n    qmp: ${dir}/db1.sock\n    qga: ${dir}/db1-agent.sock\n`,
  );
  const a = new QemuAdapter(inv);
  assert.equal(a.id, "qemu");
  assert.deepEqual(a.schemes, ["qmp", "vm"]);
  const web1 = await a.resolve("vm:web1");
  assert.equal(web1.defaultName, "web1");
  assert.equal(web1.source, "vm:web1");
  assert.deepEqual(web1.defaults, { mode: "pause", quiesce: "off" });
  assert.equal(typeof web1.leftovers, "function");
  const db1 = await a.resolve("vm:db1");
  assert.deepEqual(db1.defaults, {});
  const bare = await a.resolve(`qmp:${dir}/db1.sock`);
  assert.equal(bare.defaultName, undefined, "a qmp: source needs --vm");
  assert.equal(bare.defaults, undefined);
  await assert.rejects(
    a.resolve("vm:nope"),
    usageError(new RegExp(`VM "nope" is not in the inventory ${inv}`)),
  );
  await assert.rejects(
    new QemuAdapter(join(dir, "missing.yaml")).resolve("vm:web1"),
    usageError(/cannot read the inventory/),
  );
  writeFileSync(inv, "vms:\n  web1:\n    qmp: /x\n    mode: fast\n");
  await assert.rejects(a.resolve("vm:web1"), usageError(/mode must be snapshot, pause or offline/));
});

/** A fake QEMU monitor answering query-status with `status`. */
async function fakeMonitor(path: string, status: { status: string; running: boolean }): Promise<Server> {
  const server = createServer((sock) => {
    sock.write(
      '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 8}, "package": ""}, "capabilities": []}}\r\n',
    );
    const split = new LineSplitter();
    sock.on("data", (chunk: Buffer) => {
      for (const line of split.push(chunk)) {
        const cmd = JSON.parse(line) as { execute: string; id?: unknown };
        const value = cmd.execute === "query-status" ? status : {};
        sock.write(`${JSON.stringify({ return: value, id: cmd.id })}\r\n`);
      }
    });
    sock.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  return server;
}

test("list(): the inventory's VMs and whether QEMU answers for each", async (t) => {
  const dir = tempDir(t);
  assert.deepEqual(await new QemuAdapter(join(dir, "none.yaml")).list(), [], "no inventory, no VMs");
  const inv = join(dir, "vms.yaml");
  const up = await fakeMonitor(join(dir, "up.sock"), { status: "running", running: true });
  const paused = await fakeMonitor(join(dir, "paused.sock"), { status: "paused", running: false });
  t.after(() => {
    up.close();
    paused.close();
  });
  writeFileSync(
    inv,
    `web1:\n  qmp: ${dir}/up.sock\nweb2:\n  qmp: ${dir}/paused.sock\nweb3:\n  qmp: ${dir}/gone.sock\n`,
  );
  const list = await new QemuAdapter(inv).list();
  assert.deepEqual(
    list.map((v) => [v.adapter, v.source, v.name, v.state]),
    [
      ["qemu", "vm:web1", "web1", "running"],
      ["qemu", "vm:web2", "web2", "paused"],
      ["qemu", "vm:web3", "web3", "shut off"],
    ],
  );
});
