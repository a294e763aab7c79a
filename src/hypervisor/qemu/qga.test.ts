// Guest-agent client against a fake agent on a unix socket. The fake stands in for qemu-ga only
// for cases a real agent does not produce on demand: stale lines before the sync reply, silence,
// late replies, garbage, dropped connections. The real agent is exercised in test/hypervisor/.
import assert from "node:assert/strict";
import { mkdtemp, rm } from "node:fs/promises";
import { createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { isStrataError } from "../../util/errors.js";
import { QgaClient } from "./qga.js";
import { LineSplitter, QemuCommandError } from "./wire.js";

let dir: string;
let n = 0;
before(async () => {
  dir = await mkdtemp(join(tmpdir(), "strata-qga-"));
});
after(async () => {
  await rm(dir, { recursive: true, force: true });
});

interface Cmd {
  execute: string;
  arguments?: Record<string, unknown>;
}

/**
 * A fake agent. It answers guest-sync-delimited like qemu-ga (0xFF, then the id), first writing
 * `staleBeforeSync` lines; other commands go to `handler`. It records what it received.
 */
async function fakeAgent(
  handler: (cmd: Cmd, sock: Socket) => void,
  staleBeforeSync: string[] = [],
): Promise<{ path: string; server: Server; received: string[]; connections: Socket[] }> {
  const path = join(dir, `qga${n++}.sock`);
  const received: string[] = [];
  const connections: Socket[] = [];
  const server = createServer((sock) => {
    connections.push(sock);
    const split = new LineSplitter(true); // the client's 0xFF arrives glued to the next line
    sock.on("data", (chunk: Buffer) => {
      for (const line of split.push(chunk)) {
        const cmd = JSON.parse(line) as Cmd;
        received.push(cmd.execute);
        if (cmd.execute === "guest-sync-delimited") {
          for (const s of staleBeforeSync) sock.write(`${s}\n`);
          sock.write(
            Buffer.concat([Buffer.from([0xff]), Buffer.from(`{"return": ${cmd.arguments?.["id"]}}\n`)]),
          );
        } else handler(cmd, sock);
      }
    });
    sock.on("error", () => {});
  });
  await new Promise<void>((resolve) => server.listen(path, resolve));
  server.unref(); // a failed assertion must not leave the test process hanging on the listener
  return { path, server, received, connections };
}

describe("guest-agent client against a fake peer", { timeout: 30_000 }, () => {
  test("sync discards stale lines and fragments, then commands get their replies", async () => {
    const { path, server, received } = await fakeAgent(
      (cmd, sock) => {
        if (cmd.execute === "guest-fsfreeze-status") sock.write('{"return": "thawed"}\n');
        else if (cmd.execute === "guest-fsfreeze-freeze-list")
          sock.write(`{"return": ${JSON.stringify(cmd.arguments)}}\n`);
        else sock.write('{"return": {}}\n');
      },
      [
        'ment of a line meant for an earlier client"}}',
        '{"error": {"class": "GenericError", "desc": "JSON parse error, stray \'\\ufffd\'"}}',
        '{"return": 12345}',
      ],
    );
    const qga = new QgaClient(path);
    await qga.ping();
    assert.equal(await qga.fsfreezeStatus(), "thawed");
    assert.deepEqual(await qga.fsfreezeFreezeList(["/mnt/data"]), { mountpoints: ["/mnt/data"] });
    assert.deepEqual(received, [
      "guest-sync-delimited",
      "guest-ping",
      "guest-fsfreeze-status",
      "guest-fsfreeze-freeze-list",
    ]);
    await qga.close();
    server.close();
  });

  test("agent errors keep their class; a timeout forces a new sync that drops the late reply", async () => {
    let slow: Socket | undefined;
    const { path, server, received } = await fakeAgent((cmd, sock) => {
      if (cmd.execute === "guest-fsfreeze-freeze") {
        slow = sock; // answer later, after the caller gave up
      } else if (cmd.execute === "guest-fsfreeze-thaw") {
        sock.write('{"return": 1}\n');
      } else {
        sock.write(
          '{"error": {"class": "CommandNotFound", "desc": "The command guest-x has not been found"}}\n',
        );
      }
    });
    const qga = new QgaClient(path);
    await assert.rejects(
      qga.execute("guest-x"),
      (err) => err instanceof QemuCommandError && err.errorClass === "CommandNotFound",
    );
    await assert.rejects(qga.fsfreezeFreeze({ timeoutMs: 100 }), (err) => isStrataError(err, "TIMEOUT"));
    slow!.write('{"return": 2}\n'); // the freeze's late answer must not become the thaw's
    assert.equal(await qga.fsfreezeThaw(), 1);
    assert.deepEqual(received.slice(-2), ["guest-sync-delimited", "guest-fsfreeze-thaw"]);
    await qga.close();
    server.close();
  });

  test("a dropped connection is reopened and synchronised again", async () => {
    const { path, server, received, connections } = await fakeAgent((_cmd, sock) =>
      sock.write('{"return": {}}\n'),
    );
    const qga = new QgaClient(path);
    await qga.ping();
    connections[0]!.destroy();
    await new Promise((r) => setTimeout(r, 50));
    await qga.ping();
    assert.equal(connections.length, 2);
    assert.deepEqual(received, ["guest-sync-delimited", "guest-ping", "guest-sync-delimited", "guest-ping"]);
    await qga.close();
    server.close();
  });

  test("garbage is a PROTOCOL error; the next call reconnects", async () => {
    let first = true;
    const { path, server, connections } = await fakeAgent((_cmd, sock) => {
      sock.write(first ? "this is not json\n" : '{"return": {}}\n');
      first = false;
    });
    const qga = new QgaClient(path);
    await assert.rejects(qga.ping(), (err) => isStrataError(err, "PROTOCOL"));
    await qga.ping();
    assert.equal(connections.length, 2);
    await qga.close();
    server.close();
  });

  test("no agent behind the socket: the sync times out", async () => {
    const path = join(dir, "mute.sock");
    const server = createServer((s) => s.on("error", () => {}));
    await new Promise<void>((resolve) => server.listen(path, resolve));
    server.unref(); // a failed assertion must not leave the test process hanging on the listener
    const qga = new QgaClient(path, { syncTimeoutMs: 150 });
    await assert.rejects(qga.ping(), (err) => isStrataError(err, "TIMEOUT"));
    await assert.rejects(qga.waitUntilReady(400), (err) => isStrataError(err, "TIMEOUT"));
    await qga.close();
    server.close();
  });

  test("shutdown does not wait for a reply (the agent sends none on success)", async () => {
    const { path, server, received } = await fakeAgent(() => {});
    const qga = new QgaClient(path, { timeoutMs: 100 });
    await qga.shutdown();
    for (let i = 0; i < 100 && received.length < 2; i++) await new Promise((r) => setTimeout(r, 10));
    assert.deepEqual(received, ["guest-sync-delimited", "guest-shutdown"]);
    await qga.close();
    server.close();
  });
});
