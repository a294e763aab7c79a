// The cdp supervisor with a stand-in for the strata binary (a real node process, not QEMU: the
// test guest's end to end run is test/cdp/daemon-cdp.test.ts): a child that exits is started
// again after a doubling backoff on the same journal (protect resumes it), on a new one when protect
// says that journal cannot be resumed; one that ignores SIGTERM is killed
// after the grace and `protect stop VM` runs after it; sync([]) stops every child.
import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { CdpSupervisor, type CdpWant } from "./cdp.js";

const SCRIPT = `
const fs = require("node:fs");
const args = process.argv.slice(2);
fs.appendFileSync(process.env.CALLS, JSON.stringify(args) + "\\n");
if (args[1] === "stop") process.exit(0);
const mode = fs.readFileSync(process.env.MODE, "utf8").trim();
if (mode === "exit") setTimeout(() => process.exit(3), 100);
else if (mode === "spent") { process.stderr.write("strata: journal J holds an earlier capture of live that cannot be resumed (x): give protect a new --journal directory\\n"); process.exit(2); }
else if (mode === "stubborn") { process.on("SIGTERM", () => {}); setInterval(() => {}, 1000); }
else setInterval(() => {}, 1000);
`;

async function until<T>(what: string, fn: () => T | undefined, ms = 10_000): Promise<T> {
  const end = Date.now() + ms;
  for (;;) {
    const v = fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

test("protects restart with backoff, stop with SIGTERM, and a stubborn one is killed and cleaned up", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-cdp-sup-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const script = join(dir, "fake.cjs");
  writeFileSync(script, SCRIPT);
  const mode = join(dir, "mode");
  const calls = join(dir, "calls");
  writeFileSync(mode, "exit");
  process.env.MODE = mode;
  process.env.CALLS = calls;
  const logs: string[] = [];
  const sup = new CdpSupervisor({
    strataCommand: [process.execPath, script],
    stateDir: join(dir, "state"),
    log: (level, m) => logs.push(`${level} ${m}`),
    backoffMs: 100,
    maxBackoffMs: 400,
    stopGraceMs: 300,
  });
  t.after(() => sup.stop());
  const want: CdpWant = {
    vm: "live",
    source: "qmp:/run/live.qmp",
    policy: "p",
    cdp: { journalDir: join(dir, "journal"), windowMs: 600_000, foldMs: 60_000 },
    repository: { name: "main", path: "/backup/strata", passwordFile: "/etc/strata/main.pass" },
  };
  await sup.sync([want]);
  // Exits after 100 ms each time: restarted at 100, 200, 400, 400 ms.
  const s = await until("four starts", () => {
    const x = sup.status("live")!;
    return x.starts >= 4 ? x : undefined;
  });
  assert.match(s.lastExit ?? "", /exited \(code 3\)/);
  const all = readFileSync(calls, "utf8")
    .trim()
    .split("\n")
    .map((l) => JSON.parse(l) as string[]);
  // Before the first start: protect stop, for a protect a killed daemon left running.
  assert.deepEqual(all[0], ["protect", "stop", "live", "--state-dir", join(dir, "state")]);
  const started = all.filter((a) => a[1] !== "stop");
  assert.deepEqual(started[0]!.slice(0, 14), [
    "protect",
    "qmp:/run/live.qmp",
    "--vm",
    "live",
    "--journal",
    started[0]![5]!,
    "--repo",
    "/backup/strata",
    "--password-file",
    "/etc/strata/main.pass",
    "--state-dir",
    join(dir, "state"),
    "--fold",
    "60000ms",
  ]);
  assert.ok(started[0]![5]!.startsWith(join(dir, "journal", "live")));
  assert.deepEqual(new Set(started.map((a) => a[5])), new Set([started[0]![5]]), "the journal resumed");
  assert.ok(
    logs.some((l) => l.includes(`resuming the journal ${started[0]![5]}`)),
    logs.join("\n"),
  );
  const waits = logs.flatMap((l) => /starting again in (\d+) s/.exec(l)?.[1] ?? []);
  assert.ok(waits.length >= 3, logs.join("\n"));

  // Protect says the journal cannot be resumed: the next start takes a new one.
  const before = started.length;
  writeFileSync(mode, "spent");
  const journals = await until("a new journal", () => {
    const js = readFileSync(calls, "utf8")
      .trim()
      .split("\n")
      .map((l) => JSON.parse(l) as string[])
      .filter((a) => a[1] !== "stop")
      .map((a) => a[5]!);
    return js.length >= before + 3 ? js : undefined;
  });
  const after = journals.slice(before);
  assert.equal(after[0], started[0]![5], "the first start after the switch still resumes");
  assert.notEqual(after[1], after[0], "then a new journal");
  assert.notEqual(after[2], after[1], "and a new one each time it is refused");

  // Running for good now: sync([]) stops it with SIGTERM.
  writeFileSync(mode, "run");
  // A child started before the switch exits once more; then one runs on.
  await new Promise((r) => setTimeout(r, 1000));
  const running = await until("a running child", () => {
    const x = sup.status("live")!;
    return x.state === "running" ? x : undefined;
  });
  const pid = running.pid!;
  await sup.sync([]);
  assert.equal(sup.status("live"), undefined);
  assert.throws(() => process.kill(pid, 0));
  assert.ok(logs.some((l) => l.includes(`strata protect (pid ${pid}) stopped`)));

  // One ignoring SIGTERM is killed after the grace, then protect stop removes its leftovers.
  writeFileSync(mode, "stubborn");
  await sup.sync([want]);
  const stubborn = await until("the stubborn child", () => {
    const x = sup.status("live");
    return x?.state === "running" ? x : undefined;
  });
  await new Promise((r) => setTimeout(r, 300));
  await sup.stop();
  assert.throws(() => process.kill(stubborn.pid!, 0));
  assert.ok(
    logs.some((l) => /stopped only by SIGKILL/.test(l)),
    logs.join("\n"),
  );
  const last = readFileSync(calls, "utf8").trim().split("\n").at(-1)!;
  assert.deepEqual(JSON.parse(last), ["protect", "stop", "live", "--state-dir", join(dir, "state")]);
});
