// The real daemon under a stand-in for systemd: $NOTIFY_SOCKET is a unix datagram socket that a
// python3 receiver reads (what PID 1 does), so READY=1, STATUS=, RELOADING=1 and STOPPING=1 are
// the datagrams the daemon really sends through systemd-notify. READY=1 comes only once the API
// answers; SIGHUP with a broken file logs each problem with its line and keeps the running
// configuration (the API still lists the old jobs); SIGHUP with a good file takes it (a policy
// added, a schedule changed); SIGTERM says STOPPING=1 and exits 0.
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import { test } from "node:test";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { collect, startStrata, tempDir } from "../helpers/cli.js";
import { writeImage } from "./helpers.js";

const RECEIVER = `
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.bind(sys.argv[1])
print("bound", flush=True)
while True:
    # recv, not recvmsg: the barrier's file descriptor is dropped (closed), which releases
    # systemd-notify, as PID 1 does once it has processed the message.
    data = s.recv(65536)
    print(data.decode().replace("\\n", "|"), flush=True)
`;

/** The datagrams received so far, one string each ("READY=1|STATUS=..."). */
function receiver(
  t: import("node:test").TestContext,
  path: string,
): Promise<{ lines: string[]; child: ChildProcess }> {
  const child = spawn("python3", ["-c", RECEIVER, path], { stdio: ["ignore", "pipe", "inherit"] });
  t.after(() => child.kill("SIGKILL"));
  const lines: string[] = [];
  return new Promise((resolve, reject) => {
    let buf = "";
    child.stdout!.setEncoding("utf8");
    child.stdout!.on("data", (d: string) => {
      buf += d;
      for (let i = buf.indexOf("\n"); i >= 0; i = buf.indexOf("\n")) {
        const line = buf.slice(0, i);
        buf = buf.slice(i + 1);
        if (line === "bound") resolve({ lines, child });
        else lines.push(line);
      }
    });
    child.on("error", reject);
    child.on("exit", (code) => reject(new Error(`the receiver exited (${code})`)));
  });
}

async function until<T>(what: string, ms: number, fn: () => T | undefined, why = () => ""): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}\n${why()}`);
    await new Promise((r) => setTimeout(r, 50));
  }
}

/** GET `path` on the unix socket (the local administrator); the status and JSON body. */
function get(socketPath: string, path: string): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath, path }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        text += d;
      });
      res.on("end", () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
    });
    req.on("error", reject);
    req.end();
  });
}

test("Type=notify: READY=1 once the API answers, SIGHUP reloads (a bad file kept out, line by line), STOPPING=1", async (t) => {
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  writeImage(join(dir, "vm1.img"), 1);
  const socket = join(dir, "strata.sock");
  const notify = join(dir, "notify.sock");
  const config = join(dir, "strata.yaml");
  const head = `catalog: ${join(dir, "catalog.db")}
state-dir: ${join(dir, "state")}
api: { socket: ${socket} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm1: { sources: ["file:${join(dir, "vm1.img")}"] }
policies:
  nightly:
    repository: main
    vms: all
    schedule: "0 3 * * *"
`;
  writeFileSync(config, head);
  const rx = await receiver(t, notify);
  const child = startStrata(["daemon", "--config", config], { env: { NOTIFY_SOCKET: notify } });
  const out = collect(child);
  t.after(() => child.kill("SIGKILL"));
  const why = () => `datagrams: ${JSON.stringify(rx.lines)}\nstdout:\n${out.stdout}\nstderr:\n${out.stderr}`;
  const ready = await until("READY=1", 30_000, () => rx.lines.find((l) => l.includes("READY=1")), why);
  // The API answers by the time systemd hears READY=1 (the receiver got it after it was sent).
  const jobs = await get(socket, "/api/v1/jobs");
  assert.equal(jobs.status, 200);
  assert.ok(ready.split("|").includes(`MAINPID=${child.pid}`), ready);
  assert.match(ready, /STATUS=1 job\(s\), 0 running; API on .*strata\.sock/);
  const jobKeys = async () =>
    (
      (await get(socket, "/api/v1/jobs")).body as Array<{
        policy: string;
        vm: string;
        kind: string;
        schedule: string;
      }>
    )
      .map((j) => `${j.policy}/${j.vm}/${j.kind} ${j.schedule}`)
      .sort();
  assert.deepEqual(await jobKeys(), ["nightly/vm1/backup 0 3 * * *"]);

  // A broken file: every problem logged with its line, the running configuration stays.
  writeFileSync(
    config,
    `${head}  broken:
    repository: nowhere
    vms: all
    schedule: every 5 minutes
`,
  );
  let seen = rx.lines.length;
  child.kill("SIGHUP");
  await until(
    "the refused reload",
    30_000,
    () => rx.lines.slice(seen).find((l) => l.includes("reload refused")),
    why,
  );
  assert.ok(
    rx.lines.slice(seen).some((l) => l.includes("RELOADING=1|MONOTONIC_USEC=")),
    why(),
  );
  assert.match(
    out.stderr,
    /error: reload: .*strata\.yaml:14:17: policies\.broken\.repository: unknown repository "nowhere"/,
  );
  assert.match(out.stderr, /error: reload: .*strata\.yaml:16:15: policies\.broken\.schedule: /);
  assert.match(out.stderr, /error: reload: 2 problem\(s\) in .*: the configuration running stays/);
  assert.deepEqual(await jobKeys(), ["nightly/vm1/backup 0 3 * * *"]);

  // A good one: taken, jobs synced, a changed schedule applied.
  writeFileSync(
    config,
    head.replace('schedule: "0 3 * * *"', 'schedule: "30 4 * * *"') +
      `  hourly:
    repository: main
    vms: { names: [vm1] }
    schedule: every 1h
`,
  );
  seen = rx.lines.length;
  child.kill("SIGHUP");
  const reloaded = await until(
    "READY=1 after the reload",
    30_000,
    () => rx.lines.slice(seen).find((l) => l.includes("READY=1") && l.includes("2 job(s)")),
    why,
  );
  assert.match(reloaded, /STATUS=2 job\(s\)/);
  assert.match(out.stdout, /info: configuration reloaded from .*strata\.yaml: 2 job\(s\)/);
  assert.match(out.stdout, /job nightly\/vm1\/backup: schedule 30 4 \* \* \* from now/);
  assert.deepEqual(await jobKeys(), ["hourly/vm1/backup every 1h", "nightly/vm1/backup 30 4 * * *"]);

  seen = rx.lines.length;
  child.kill("SIGTERM");
  const r = await out.result;
  assert.equal(r.code, 0, r.stderr);
  assert.ok(
    rx.lines.slice(seen).some((l) => l.includes("STOPPING=1") && l.includes("STATUS=stopping (SIGTERM)")),
    why(),
  );
});

test("without $NOTIFY_SOCKET nothing is sent and nothing fails", async (t) => {
  const dir = tempDir(t);
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  const config = join(dir, "strata.yaml");
  const socket = join(dir, "strata.sock");
  writeFileSync(
    config,
    `catalog: ${join(dir, "catalog.db")}
state-dir: ${join(dir, "state")}
api: { socket: ${socket} }
repositories:
  main: { path: ${repoPath} }
vms:
  vm1: { sources: ["file:/nonexistent.img"] }
policies:
  nightly: { repository: main, vms: all, schedule: "0 3 * * *" }
`,
  );
  const child = startStrata(["daemon", "--config", config], { env: { NOTIFY_SOCKET: undefined } });
  const out = collect(child);
  t.after(() => child.kill("SIGKILL"));
  await until("the API", 30_000, () => (out.stdout.includes("job(s) for") ? true : undefined));
  await new Promise((r) => setTimeout(r, 300));
  child.kill("SIGTERM");
  const r = await out.result;
  assert.equal(r.code, 0, r.stderr);
  assert.doesNotMatch(r.stderr, /systemd-notify/);
});
