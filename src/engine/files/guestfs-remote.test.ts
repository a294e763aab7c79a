// remoteFish against a real `guestfish --listen` daemon that has not launched its appliance
// (no appliance boot needed): a failed command exits 0 with nothing on the client's side, and
// its error is found in the daemon's log.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { mkdtemp, readFile, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { promisify } from "node:util";
import { isStrataError } from "../../util/errors.js";
import { remoteFish } from "./guestfs.js";

const run = promisify(execFile);

test("a command that fails in the daemon is an error naming it; one that works answers", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "strata-gf-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const log = join(dir, "guestfish.log");
  const env = { ...process.env, TMPDIR: dir };
  // As the guard starts it: the daemon's stdout and stderr go to the log, which gives its PID.
  await run("sh", ["-c", 'guestfish --listen >"$1" 2>&1 </dev/null', "sh", log], { env });
  const pid = /GUESTFISH_PID=(\d+)/.exec(await readFile(log, "utf8"))?.[1];
  assert.ok(pid, "guestfish --listen printed its PID");
  t.after(() => run("guestfish", [`--remote=${pid}`, "--", "exit"], { env }).catch(() => {}));
  const fish = remoteFish(pid, env, log);
  assert.match((await fish(["get-memsize"])).trim(), /^\d+$/);
  await assert.rejects(
    fish(["list-devices"]),
    (err: unknown) =>
      isStrataError(err) && /guestfish list-devices: list_devices: call launch before/.test(err.message),
  );
  // One after the other: the next command's answer is its own.
  const [a, b] = await Promise.all([
    fish(["get-memsize"]),
    fish(["is-config"]).catch((e: Error) => e.message),
  ]);
  assert.match(a.trim(), /^\d+$/);
  assert.equal(String(b).trim(), "true");
});
