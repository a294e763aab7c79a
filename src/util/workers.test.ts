import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { pathToFileURL } from "node:url";
import { isStrataError } from "./errors.js";
import { WorkerPool } from "./workers.js";

test("closing the pool rejects calls still pending instead of leaving them hanging", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-workers-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const mod = join(dir, "slow-worker.mjs");
  writeFileSync(
    mod,
    `import { serveWorker } from ${JSON.stringify(pathToFileURL(join(import.meta.dirname, "workers.js")).href)};
serveWorker({ slow: () => new Promise((r) => setTimeout(() => r(1), 60_000)), echo: (a) => a });`,
  );
  const pool = new WorkerPool(pathToFileURL(mod), 1);
  assert.equal(await pool.run("echo", 42), 42);
  const pending = pool.run("slow", null);
  await new Promise((r) => setTimeout(r, 50));
  await pool.close();
  await assert.rejects(pending, (e) => isStrataError(e, "ABORTED"));
});

test("pending counts the calls sent and not yet answered over all threads", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-workers-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const mod = join(dir, "wait-worker.mjs");
  writeFileSync(
    mod,
    `import { serveWorker } from ${JSON.stringify(pathToFileURL(join(import.meta.dirname, "workers.js")).href)};
serveWorker({ wait: (ms) => new Promise((r) => setTimeout(() => r(ms), ms)) });`,
  );
  const pool = new WorkerPool(pathToFileURL(mod), 2);
  t.after(() => pool.close());
  assert.equal(pool.pending, 0);
  const calls = [pool.run("wait", 200), pool.run("wait", 200), pool.run("wait", 200)];
  assert.equal(pool.pending, 3);
  await Promise.all(calls);
  assert.equal(pool.pending, 0);
});
