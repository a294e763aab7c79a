import assert from "node:assert/strict";
import { mkdtempSync, readdirSync, rmSync, utimesSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { FsStore } from "./fs-store.js";

function store(t: import("node:test").TestContext): { s: FsStore; dir: string } {
  const dir = mkdtempSync(join(tmpdir(), "strata-store-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return { s: new FsStore(dir), dir };
}

test("put is atomic and leaves no temporary file; get, stat, list, delete", async (t) => {
  const { s, dir } = store(t);
  await s.put("a/b/c", Buffer.from("one"));
  await s.put("a/b/c", Buffer.from("two"), { durable: true });
  await s.flush();
  assert.equal((await s.get("a/b/c")).toString(), "two");
  assert.deepEqual(readdirSync(join(dir, "a", "b")), ["c"]);
  assert.equal((await s.stat("a/b/c"))?.size, 3);
  assert.equal(await s.stat("a/x"), undefined);
  const keys: string[] = [];
  for await (const o of s.list("a/")) keys.push(o.key);
  assert.deepEqual(keys, ["a/b/c"]);
  await assert.rejects(s.get("a/x"), (e) => s.isNotFound(e));
  await s.delete("a/b/c");
  await s.delete("a/b/c");
  assert.equal(await s.stat("a/b/c"), undefined);
  await assert.rejects(s.stat("../escape"), /bad store key/);
});

test("deleteIfUntouched spares what was touched after the cutoff", async (t) => {
  const { s, dir } = store(t);
  const old = new Date(Date.now() - 3600_000);
  for (const k of ["c/old", "c/touched"]) {
    await s.put(k, Buffer.from(k));
    utimesSync(join(dir, ...k.split("/")), old, old);
  }
  const cutoff = Date.now() - 60_000;
  assert.equal(await s.touch("c/touched"), true);
  assert.equal(await s.touch("c/missing"), false);
  assert.equal(await s.deleteIfUntouched("c/old", cutoff), true);
  assert.equal(await s.deleteIfUntouched("c/touched", cutoff), false);
  assert.equal(await s.deleteIfUntouched("c/missing", cutoff), false);
  assert.deepEqual(readdirSync(join(dir, "c")), ["touched"]);
  assert.equal((await s.get("c/touched")).toString(), "c/touched");
});
