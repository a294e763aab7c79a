import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { pathToFileURL } from "node:url";
import { isStrataError } from "./errors.js";
import { prestartWorkers } from "./prestart.js";
import { WorkerPool } from "./workers.js";

const SERVE = `import { serveWorker } from ${JSON.stringify(pathToFileURL(join(import.meta.dirname, "workers.js")).href)};`;

/** A worker module in a directory of its own (removed after the test): `SERVE`, then `body`. */
function workerModule(t: TestContext, body: string, head = ""): URL {
  const dir = mkdtempSync(join(tmpdir(), "strata-workers-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const mod = join(dir, "worker.mjs");
  writeFileSync(mod, `${head}${SERVE}\n${body}`);
  return pathToFileURL(mod);
}

test("closing the pool rejects calls still pending instead of leaving them hanging", async (t) => {
  const mod = workerModule(
    t,
    "serveWorker({ slow: () => new Promise((r) => setTimeout(() => r(1), 60_000)), echo: (a) => a });",
  );
  const pool = new WorkerPool(mod, 1);
  assert.equal(await pool.run("echo", 42), 42);
  const pending = pool.run("slow", null);
  await new Promise((r) => setTimeout(r, 50));
  await pool.close();
  await assert.rejects(pending, (e) => isStrataError(e, "ABORTED"));
});

test("pending counts the calls sent and not yet answered over all threads", async (t) => {
  const mod = workerModule(
    t,
    "serveWorker({ wait: (ms) => new Promise((r) => setTimeout(() => r(ms), ms)) });",
  );
  const pool = new WorkerPool(mod, 2);
  t.after(() => pool.close());
  assert.equal(pool.pending, 0);
  const calls = [pool.run("wait", 200), pool.run("wait", 200), pool.run("wait", 200)];
  assert.equal(pool.pending, 3);
  await Promise.all(calls);
  assert.equal(pool.pending, 0);
});

test("a pool takes over threads started ahead, sends them its setup, and stops the spare ones", async (t) => {
  const url = workerModule(
    t,
    "serveWorker({ data: (_a, data) => ({ data, threadId }) });",
    'import { threadId } from "node:worker_threads";\n',
  );
  prestartWorkers(url, 3);
  const pool = new WorkerPool(url, 2, { key: "k1" });
  t.after(() => pool.close());
  assert.equal(pool.prestartedTaken, 2);
  const replies = await Promise.all(
    [1, 2, 3, 4].map(() => pool.run<{ data: unknown; threadId: number }>("data", null)),
  );
  for (const r of replies) assert.deepEqual(r.data, { key: "k1" });
  assert.equal(new Set(replies.map((r) => r.threadId)).size, 2, "both threads answer");
  // Taken once: the next pool of the module starts its own.
  const later = new WorkerPool(url, 1, { key: "k2" });
  t.after(() => later.close());
  assert.equal(later.prestartedTaken, 0);
  assert.deepEqual((await later.run<{ data: unknown }>("data", null)).data, { key: "k2" });
});
