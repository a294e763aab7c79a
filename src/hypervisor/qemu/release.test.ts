// release() against a fake QMP server. The fake is here because a real QEMU never sends what
// these tests need: an error whose text says "not found" (or "does not exist", "has no bitmap")
// for an object that is still there, i.e. a real failure worded like "already gone". QEMU 7.2
// sends most errors as GenericError, so only asking QEMU what exists can tell the two apart;
// this checks that release() does so, and that such an error is reported, never swallowed.
// The NBD server the record names is Strata's own NBD server on a unix socket (a real one).
// doctor's own scan is held to the same rule. release() and doctor against a real QEMU are run by test/live/ (kill -9, doctor --fix, live backups).
// whilePaused's timing is checked here too: it needs a `stop` whose drain takes a known time,
// which a real QEMU does not offer on demand.
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { createServer, type Server } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { MemorySource } from "../../nbd/memory-source.js";
import { NbdServer } from "../../nbd/server.js";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import { inspectVm } from "./doctor.js";
import { release, whilePaused } from "./live.js";
import { QmpClient } from "./qmp.js";
import { type StateItem, StateRecord } from "./state.js";
import { LineSplitter, QemuCommandError } from "./wire.js";

/** What the fake QEMU holds. */
interface FakeVm {
  status: "running" | "paused";
  exports: Set<string>;
  jobs: Map<string, string>;
  nodes: Map<string, Set<string>>;
  nbd: NbdServer | undefined;
}

type Failure = { class: string; desc: string };

/**
 * A fake QEMU monitor over `vm`: the queries release() asks, and the commands it sends, which
 * change `vm` — unless `failures` names the command, which then answers with that error and
 * changes nothing. Every command is logged in `sent`.
 */
async function fakeQemu(
  t: TestContext,
  dir: string,
  vm: FakeVm,
  failures: Record<string, Failure> = {},
  /** Milliseconds a command takes before it answers (a `stop` draining the guest's requests). */
  delays: Record<string, number> = {},
) {
  const path = join(dir, "qmp.sock");
  const sent: string[] = [];
  const run = async (cmd: string, a: Record<string, unknown>): Promise<unknown> => {
    switch (cmd) {
      case "query-status":
        return { status: vm.status, running: vm.status === "running" };
      case "query-block-exports":
        return [...vm.exports].map((id) => ({ id, type: "nbd", "node-name": "x", "shutting-down": false }));
      case "query-jobs":
        return [...vm.jobs].map(([id, status]) => ({ id, type: "backup", status }));
      case "query-block":
        return [];
      case "query-named-block-nodes":
        return [...vm.nodes].map(([name, bitmaps]) => ({
          "node-name": name,
          file: join(dir, `${name}.qcow2`),
          image: { "actual-size": 4096 },
          "dirty-bitmaps": [...bitmaps].map((b) => ({ name: b, granularity: 65536 })),
        }));
    }
    const fail = failures[cmd];
    if (fail) return { error: fail };
    await new Promise((r) => setTimeout(r, delays[cmd] ?? 0));
    switch (cmd) {
      case "stop":
        vm.status = "paused";
        break;
      case "cont":
        vm.status = "running";
        break;
      case "block-export-del":
        vm.exports.delete(a.id as string);
        break;
      case "nbd-server-stop":
        await vm.nbd?.close();
        vm.nbd = undefined;
        break;
      case "block-job-cancel":
        vm.jobs.delete(a.device as string);
        break;
      case "blockdev-del":
        vm.nodes.delete(a["node-name"] as string);
        break;
      case "block-dirty-bitmap-remove":
        vm.nodes.get(a.node as string)?.delete(a.name as string);
        break;
      default:
        return { error: { class: "CommandNotFound", desc: `The command ${cmd} has not been found` } };
    }
    return {};
  };
  const server: Server = createServer((sock) => {
    sock.on("error", () => {});
    sock.write(
      '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}}, "capabilities": []}}\r\n',
    );
    const split = new LineSplitter();
    sock.on("data", async (chunk: Buffer) => {
      for (const line of split.push(chunk)) {
        const c = JSON.parse(line) as { execute: string; id?: unknown; arguments?: Record<string, unknown> };
        if (c.execute === "qmp_capabilities") {
          sock.write(`${JSON.stringify({ return: {}, id: c.id })}\r\n`);
          continue;
        }
        if (!c.execute.startsWith("query-")) sent.push(c.execute);
        const r = await run(c.execute, c.arguments ?? {});
        const isError = typeof r === "object" && r !== null && "error" in r;
        sock.write(`${JSON.stringify(isError ? { ...r, id: c.id } : { return: r, id: c.id })}\r\n`);
      }
    });
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  server.unref();
  const qmp = await QmpClient.connect(path);
  t.after(async () => {
    await qmp.close().catch(() => {});
    server.close();
    await vm.nbd?.close();
  });
  return { qmp, sent, path };
}

async function setup(t: TestContext) {
  const dir = mkdtempSync(join(tmpdir(), "strata-release-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const socket = join(dir, "strata-nbd-web1.sock");
  const rec = await StateRecord.create(dir, "web1", join(dir, "qmp.sock"));
  const items: StateItem[] = [
    { kind: "paused" },
    { kind: "export", id: "strata-export-vda" },
    { kind: "nbd-server", socket },
    { kind: "job", id: "strata-job-vda" },
    { kind: "node", node: "strata-fleece-vda" },
    { kind: "bitmap", node: "disk0", name: "strata-tmp" },
    { kind: "bitmap", node: "disk0", name: "strata-new" },
  ];
  for (const i of items) await rec.add(i);
  return { dir, socket, rec };
}

/** A VM holding everything the record lists, with the NBD server listening on `socket`. */
async function everything(socket: string): Promise<FakeVm> {
  const nbd = new NbdServer({ exports: { vda: { source: new MemorySource(1 << 20, 65536) } } });
  await nbd.listen({ path: socket });
  return {
    status: "paused",
    exports: new Set(["strata-export-vda", "other-tool-export"]),
    jobs: new Map([["strata-job-vda", "running"]]),
    nodes: new Map([
      ["disk0", new Set(["strata-tmp", "strata-new", "strata-old"])],
      ["strata-fleece-vda", new Set<string>()],
    ]),
    nbd,
  };
}

test("what QEMU no longer holds is struck off without a command", async (t) => {
  const { dir, rec } = await setup(t);
  // The NBD socket does not exist: no server is listening there.
  const vm: FakeVm = {
    status: "running",
    exports: new Set(["other-tool-export"]),
    jobs: new Map(),
    nodes: new Map([["disk0", new Set(["strata-old"])]]),
    nbd: undefined,
  };
  const { qmp, sent } = await fakeQemu(t, dir, vm);
  await release(qmp, undefined, rec, () => {}, { success: false });
  assert.deepEqual(sent, [], "only queries were sent");
  assert.equal(await StateRecord.load(rec.path), undefined, "the record is finished");
});

test("what QEMU holds is removed, in order; the other tool's export and the old bitmap stay", async (t) => {
  const { dir, socket, rec } = await setup(t);
  const vm = await everything(socket);
  const { qmp, sent } = await fakeQemu(t, dir, vm);
  await release(qmp, undefined, rec, () => {}, { success: false });
  assert.deepEqual(sent, [
    "cont",
    "block-export-del",
    "nbd-server-stop",
    "block-job-cancel",
    "blockdev-del",
    "block-dirty-bitmap-remove",
    "block-dirty-bitmap-remove",
  ]);
  assert.equal(vm.status, "running");
  assert.deepEqual([...vm.exports], ["other-tool-export"]);
  assert.equal(vm.nbd, undefined);
  assert.deepEqual([...vm.nodes.keys()], ["disk0"]);
  assert.deepEqual([...vm.nodes.get("disk0")!], ["strata-old"]);
  assert.equal(await StateRecord.load(rec.path), undefined);
});

test("a failure worded like 'already gone' is reported with QEMU's class and desc, and stays recorded", async (t) => {
  const { dir, socket, rec } = await setup(t);
  const vm = await everything(socket);
  const { qmp } = await fakeQemu(t, dir, vm, {
    "block-export-del": { class: "GenericError", desc: "Export 'strata-export-vda' is not found" },
    "blockdev-del": { class: "GenericError", desc: "Failed to find node with node-name='strata-fleece-vda'" },
    "block-dirty-bitmap-remove": { class: "GenericError", desc: "Dirty bitmap 'strata-tmp' not found" },
    "block-job-cancel": { class: "DeviceNotFound", desc: "Block job 'strata-job-vda' does not exist" },
  });
  const err = await release(qmp, undefined, rec, () => {}, { success: false }).then(
    () => assert.fail("release() swallowed the errors"),
    (e: unknown) => e,
  );
  assert.ok(isStrataError(err, ErrorCode.EXTERNAL), String(err));
  const msg = (err as Error).message;
  assert.match(
    msg,
    /export strata-export-vda: .*block-export-del failed: GenericError: Export 'strata-export-vda' is not found/,
  );
  assert.match(
    msg,
    /job strata-job-vda: .*block-job-cancel failed: DeviceNotFound: Block job 'strata-job-vda' does not exist/,
  );
  assert.match(msg, /node strata-fleece-vda: .*blockdev-del failed: GenericError: Failed to find node/);
  assert.match(msg, /bitmap strata-tmp on disk0: .*GenericError: Dirty bitmap 'strata-tmp' not found/);
  const cause = (err as Error).cause;
  assert.ok(cause instanceof QemuCommandError);
  assert.deepEqual([cause.errorClass, cause.command], ["GenericError", "block-export-del"]);
  // What failed stays in the record for the next run or doctor; what went is struck off.
  const left = await StateRecord.load(rec.path);
  assert.deepEqual(left?.items.map((i) => i.kind).sort(), ["bitmap", "bitmap", "export", "job", "node"]);
  assert.equal(vm.status, "running");
  assert.equal(vm.nbd, undefined, "the NBD server was stopped");
  assert.ok(vm.exports.has("strata-export-vda"), "nothing was removed behind the error");
});

test("doctor --fix: a leftover whose removal fails stays unfixed and says why", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-release-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const vm: FakeVm = {
    status: "running",
    exports: new Set(["strata-export-vda"]),
    jobs: new Map(),
    nodes: new Map([["strata-fleece-vda", new Set<string>()]]),
    nbd: undefined,
  };
  const { path } = await fakeQemu(t, dir, vm, {
    "block-export-del": { class: "GenericError", desc: "Export 'strata-export-vda' does not exist" },
    "nbd-server-stop": { class: "GenericError", desc: "NBD server not running" },
  });
  writeFileSync(join(dir, "strata-fleece-vda.qcow2"), "");
  const found = await inspectVm({ vm: "web1", qmp: path }, true, dir);
  const byWhat = (re: RegExp) => found.find((f) => re.test(f.what));
  const exp = byWhat(/^NBD export strata-export-vda/);
  assert.equal(exp?.fixed, false, JSON.stringify(found));
  assert.match(exp.what, /not removed: .*GenericError: Export 'strata-export-vda' does not exist/);
  assert.equal(byWhat(/NBD server/)?.fixed, false);
  assert.equal(byWhat(/^fleecing node strata-fleece-vda/)?.fixed, true);
  assert.deepEqual([...vm.nodes.keys()], []);
  assert.equal(existsSync(join(dir, "strata-fleece-vda.qcow2")), false, "its image went too");
});

test("whilePaused reports the guest's whole pause, the drain inside `stop` included", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-release-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const rec = await StateRecord.create(dir, "web1", join(dir, "qmp.sock"));
  const vm: FakeVm = {
    status: "running",
    exports: new Set(),
    jobs: new Map(),
    nodes: new Map(),
    nbd: undefined,
  };
  const { qmp, sent } = await fakeQemu(t, dir, vm, {}, { stop: 300 });
  const paused = { ms: 0 };
  const during = await whilePaused(
    qmp,
    rec,
    async () => {
      await new Promise((r) => setTimeout(r, 100));
      return { status: vm.status, items: (await StateRecord.load(rec.path))?.data.items };
    },
    paused,
  );
  assert.deepEqual(during, { status: "paused", items: [{ kind: "paused" }] });
  assert.ok(paused.ms >= 390, `the pause counted ${paused.ms} ms of the 300 ms drain and 100 ms cut`);
  assert.deepEqual(sent, ["stop", "cont"]);
  assert.equal(vm.status, "running");
  assert.deepEqual((await StateRecord.load(rec.path))?.data.items, [], "the pause is struck off the record");

  // A VM that was already paused stays so; the time reported is fn's.
  vm.status = "paused";
  const before = { ms: 0 };
  await whilePaused(qmp, rec, () => new Promise((r) => setTimeout(r, 100)), before);
  assert.deepEqual(sent, ["stop", "cont"], "no stop or cont for a VM that was not running");
  assert.equal(vm.status, "paused");
  assert.ok(before.ms >= 90 && before.ms < 5000, `${before.ms} ms`);
});
