// QMP client against a fake QMP server on a unix socket. The fake stands in for QEMU only for
// what a real QEMU does not produce on demand: malformed lines, missing ids, silence, replies out
// of order, lines split across reads. Everything else is tested against real QEMU in
// test/hypervisor/.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isStrataError } from "../../util/errors.js";
import { QmpClient } from "./qmp.js";
import { LineSplitter, QemuCommandError } from "./wire.js";

const GREETING =
  '{"QMP": {"version": {"qemu": {"micro": 0, "minor": 2, "major": 7}, "package": ""}, "capabilities": []}}';

let dir: string;
let n = 0;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-qmp-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

type Handler = (cmd: { execute: string; id?: unknown; arguments?: unknown }, sock: Socket) => void;

/** A fake QMP server: greets, accepts qmp_capabilities, then hands other commands to `handler`. */
async function fakeQmp(
  handler: Handler,
  greeting = GREETING,
): Promise<{ path: string; server: Server; sockets: Socket[] }> {
  const path = join(dir, `qmp${n++}.sock`);
  const sockets: Socket[] = [];
  const server = createServer((sock) => {
    sockets.push(sock);
    sock.write(`${greeting}\r\n`);
    const split = new LineSplitter();
    sock.on("data", (chunk: Buffer) => {
      for (const line of split.push(chunk)) {
        const cmd = JSON.parse(line) as { execute: string; id?: unknown };
        if (cmd.execute === "qmp_capabilities")
          sock.write(`${JSON.stringify({ return: {}, id: cmd.id })}\r\n`);
        else handler(cmd, sock);
      }
    });
    sock.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  server.unref(); // a failed assertion must not leave the test process hanging on the listener
  return { path, server, sockets };
}

function reply(sock: Socket, id: unknown, value: unknown): void {
  sock.write(`${JSON.stringify({ return: value, id })}\r\n`);
}

describe("QMP client against a fake peer", { timeout: 30_000 }, () => {
  test("replies are matched by id, events go to listeners, lines may arrive in pieces", async () => {
    let held: Array<{ id: unknown; name: string }> = [];
    const { path, server } = await fakeQmp((cmd, sock) => {
      held.push({ id: cmd.id, name: cmd.execute });
      if (held.length === 2) {
        // Answer in reverse order, with an event between, split mid-line and byte by byte.
        const text =
          `${JSON.stringify({ return: "second", id: held[1]!.id })}\r\n` +
          `{"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 2}}\n` +
          `${JSON.stringify({ return: "first", id: held[0]!.id })}\r\n`;
        for (const ch of text) sock.write(ch);
        held = [];
      }
    });
    const qmp = await QmpClient.connect(path);
    const events: string[] = [];
    qmp.on("event", (e) => events.push(e.event));
    const stop = qmp.waitForEvent("STOP", undefined, 5000);
    const [a, b] = await Promise.all([qmp.execute("one"), qmp.execute("two")]);
    assert.deepEqual([a, b], ["first", "second"]);
    assert.deepEqual((await stop).timestamp, { seconds: 1, microseconds: 2 });
    assert.deepEqual(events, ["STOP"]);
    assert.equal(qmp.greeting.version.qemu.major, 7);
    await qmp.close();
    assert.equal(qmp.closed, true);
    server.close();
  });

  test("a QMP error carries its class and description", async () => {
    const { path, server } = await fakeQmp((cmd, sock) => {
      sock.write(`${JSON.stringify({ error: { class: "DeviceNotFound", desc: "no disk9" }, id: cmd.id })}\n`);
    });
    const qmp = await QmpClient.connect(path);
    await assert.rejects(qmp.execute("x"), (err) => {
      assert.ok(err instanceof QemuCommandError);
      assert.deepEqual(
        [err.code, err.errorClass, err.desc, err.command],
        ["EXTERNAL", "DeviceNotFound", "no disk9", "x"],
      );
      return true;
    });
    await qmp.close();
    server.close();
  });

  test("a command without a reply times out; the late reply is dropped and the connection stays usable", async () => {
    const late: unknown[] = [];
    const { path, server } = await fakeQmp((cmd, sock) => {
      if (cmd.execute === "slow") late.push(cmd.id);
      else {
        for (const id of late) reply(sock, id, "too late");
        reply(sock, cmd.id, "fast");
      }
    });
    const qmp = await QmpClient.connect(path);
    await assert.rejects(qmp.execute("slow", undefined, { timeoutMs: 100 }), (err) =>
      isStrataError(err, "TIMEOUT"),
    );
    assert.equal(await qmp.execute("quick"), "fast");
    assert.equal(qmp.closed, false);
    await qmp.close();
    server.close();
  });

  for (const [what, line] of [
    ["a line that is not JSON", "{not json"],
    ["a JSON value that is not an object", "[1, 2]"],
    ["a reply without an id", '{"return": {}}'],
    ["an object that is neither reply nor event", '{"hello": 1}'],
  ] as const) {
    test(`${what} is a PROTOCOL error and closes the connection`, async () => {
      const { path, server } = await fakeQmp((_cmd, sock) => sock.write(`${line}\n`));
      const qmp = await QmpClient.connect(path);
      let closedWith: unknown;
      qmp.on("close", (err) => {
        closedWith = err;
      });
      const waiting = qmp.waitForEvent("NEVER", undefined, 5000);
      await assert.rejects(qmp.execute("x"), (err) => isStrataError(err, "PROTOCOL"));
      await assert.rejects(waiting, (err) => isStrataError(err, "EXTERNAL"));
      assert.equal(qmp.closed, true);
      assert.ok(isStrataError(closedWith, "PROTOCOL"));
      await assert.rejects(qmp.execute("y"), (err) => isStrataError(err, "EXTERNAL"));
      await qmp.close();
      server.close();
    });
  }

  test("an event left over for the monitor's previous client, before the greeting, is skipped", async () => {
    const leftover = '{"timestamp": {"seconds": 1795973840, "microseconds": 575790}, "event": "RESUME"}';
    const { path, server } = await fakeQmp(() => {}, `${leftover}\r\n${GREETING}`);
    const qmp = await QmpClient.connect(path);
    assert.equal(qmp.greeting.version.qemu.major, 7);
    await qmp.close();
    server.close();
  });

  test("a wrong greeting fails the connect with PROTOCOL", async () => {
    const { path, server } = await fakeQmp(() => {}, '{"return": {}}');
    await assert.rejects(QmpClient.connect(path), (err) => isStrataError(err, "PROTOCOL"));
    server.close();
  });

  test("no greeting, or no socket at all, fails the connect with TIMEOUT", async () => {
    const path = join(dir, "silent.sock");
    const server = createServer(() => {});
    await new Promise<void>((resolve) => server.listen(path, resolve));
    server.unref(); // a failed assertion must not leave the test process hanging on the listener
    await assert.rejects(QmpClient.connect(path, { connectTimeoutMs: 200 }), (err) =>
      isStrataError(err, "TIMEOUT"),
    );
    server.close();
    await assert.rejects(QmpClient.connect(join(dir, "absent.sock"), { connectTimeoutMs: 200 }), (err) =>
      isStrataError(err, "TIMEOUT"),
    );
  });

  test("QEMU going away rejects pending commands with EXTERNAL", async () => {
    const { path, server, sockets } = await fakeQmp(() => {
      for (const s of sockets) s.destroy();
    });
    const qmp = await QmpClient.connect(path);
    await assert.rejects(qmp.execute("x"), (err) => isStrataError(err, "EXTERNAL"));
    assert.equal(qmp.closed, true);
    server.close();
  });

  test("waitForEvent honours its predicate and its deadline", async () => {
    const { path, server } = await fakeQmp((cmd, sock) => {
      for (const job of ["a", "b"]) {
        sock.write(
          `${JSON.stringify({ event: "JOB_STATUS_CHANGE", data: { id: job, status: "concluded" } })}\n`,
        );
      }
      reply(sock, cmd.id, {});
    });
    const qmp = await QmpClient.connect(path);
    const b = qmp.waitForEvent("JOB_STATUS_CHANGE", (e) => e.data["id"] === "b", 5000);
    const never = qmp.waitForEvent("JOB_STATUS_CHANGE", (e) => e.data["id"] === "c", 100);
    await qmp.execute("go");
    assert.equal((await b).data["id"], "b");
    await assert.rejects(never, (err) => isStrataError(err, "TIMEOUT"));
    await qmp.close();
    server.close();
  });

  test("LineSplitter strips CR and, for the agent, leading 0xFF bytes", () => {
    const s = new LineSplitter(true);
    assert.deepEqual(s.push(Buffer.from([0xff, 0x7b, 0x7d, 0x0d, 0x0a, 0x61])), ["{}"]);
    assert.deepEqual(s.push(Buffer.from("b\n")), ["ab"]);
  });
});
