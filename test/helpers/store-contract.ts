/**
 * The Store contract as tests every store must pass (restic's backend suite, kopia's blob
 * tests): the local directory runs it in test/repo/store-contract.test.ts, the S3 store against
 * a real gateway in test/s3/s3-store.test.ts. `make` gives a fresh, empty store per test.
 */
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import type { Store } from "../../src/repo/store.js";

export function storeContract(
  name: string,
  makeStore: (t: import("node:test").TestContext) => Promise<Store>,
): void {
  // Stores keep read handles open between reads: each test closes its store.
  const make = async (t: import("node:test").TestContext): Promise<Store> => {
    const s = await makeStore(t);
    t.after(() => s.close?.());
    return s;
  };
  test(`${name}: put, get, range get, stat, list with creation times, delete; missing keys are not-found`, async (t) => {
    const s = await make(t);
    const t0 = Date.now();
    const data = randomBytes(100_000);
    await s.put("packs/ab/one", data);
    await s.put("index/x", Buffer.from("x1"));
    await s.put("index/x", Buffer.from("x2"));
    await s.flush();
    assert.deepEqual(await s.get("packs/ab/one"), data);
    assert.equal((await s.get("index/x")).toString(), "x2", "a put overwrites");
    assert.deepEqual(await s.getRange("packs/ab/one", 1000, 5000), data.subarray(1000, 6000));
    assert.deepEqual(await s.getRange("packs/ab/one", 99_999, 1), data.subarray(99_999));
    const st = await s.stat("packs/ab/one");
    assert.equal(st?.size, 100_000);
    assert.ok(st && Math.abs(st.mtimeMs - t0) < 60_000, `creation time ${st?.mtimeMs} near ${t0}`);
    assert.equal(await s.stat("packs/ab/none"), undefined);
    const listed = [];
    for await (const o of s.list("packs/")) listed.push(o);
    assert.deepEqual(
      listed.map((o) => [o.key, o.size]),
      [["packs/ab/one", 100_000]],
    );
    assert.ok(Math.abs(listed[0]!.mtimeMs - t0) < 60_000);
    await assert.rejects(s.get("packs/ab/none"), (e) => s.isNotFound(e));
    await assert.rejects(s.getRange("packs/ab/none", 0, 10), (e) => s.isNotFound(e));
    await s.delete("packs/ab/one");
    await s.delete("packs/ab/one");
    assert.equal(await s.stat("packs/ab/one"), undefined);
    await s.deletePrefix("index/");
    for await (const o of s.list("index/")) assert.fail(`left over: ${o.key}`);
  });

  test(`${name}: a range past the end is an error, not a short read`, async (t) => {
    const s = await make(t);
    await s.put("p", Buffer.alloc(1000, 7));
    for (const [offset, length] of [
      [900, 200],
      [1000, 1],
      [5000, 10],
    ] as const)
      await assert.rejects(
        s.getRange("p", offset, length),
        (e: NodeJS.ErrnoException) => e.code === "ESTRATASHORT" && /ends before byte/.test(e.message),
        `${offset}+${length}`,
      );
  });

  test(`${name}: list finds every one of many objects`, async (t) => {
    const s = await make(t);
    const n = 1100;
    const names = Array.from({ length: n }, (_, i) => `locks/${String(i).padStart(5, "0")}`);
    for (let i = 0; i < n; i += 50)
      await Promise.all(names.slice(i, i + 50).map((k) => s.put(k, Buffer.from(k))));
    const seen: string[] = [];
    for await (const o of s.list("locks/")) seen.push(o.key);
    assert.deepEqual(seen.sort(), names);
  });

  test(`${name}: a 12 MiB object comes back whole, also in ranges`, async (t) => {
    const s = await make(t);
    const data = randomBytes(12 * 1024 * 1024 + 17);
    await s.put("packs/big", data);
    assert.deepEqual(await s.get("packs/big"), data);
    const at = 5 * 1024 * 1024 - 10;
    assert.deepEqual(await s.getRange("packs/big", at, 20), data.subarray(at, at + 20));
    assert.equal((await s.stat("packs/big"))?.size, data.length);
  });
}
