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

test("aligned puts and getInto give back exactly the bytes, direct or buffered", async (t) => {
  const { AlignedSlots } = await import("../util/aligned.js");
  const { randomBytes } = await import("node:crypto");
  const { dir } = store(t);
  const slots = new AlignedSlots(2, 2 * 1024 * 1024);
  for (const directIo of [true, false]) {
    const s = new FsStore(join(dir, String(directIo)), { directIo });
    for (const size of [0, 1, 4095, 4096, 4097, 1024 * 1024 + 3]) {
      const data = randomBytes(size);
      // The memory after the data holds other bytes: they must not end up in the object.
      slots.view(0).fill(0xee);
      slots.view(0, size).set(data);
      await s.put(`o/${size}`, slots.view(0, size), { aligned: true });
      assert.ok((await s.get(`o/${size}`)).equals(data), `get ${size} (direct ${directIo})`);
      assert.equal((await s.stat(`o/${size}`))?.size, size);
      const into = Buffer.from(slots.memory, slots.offset(1), slots.slotSize);
      const n = await s.getInto(`o/${size}`, into, { aligned: true });
      assert.equal(n, size);
      assert.ok(into.subarray(0, n).equals(data), `getInto ${size} (direct ${directIo})`);
      // Unaligned memory is read through the page cache.
      const odd = Buffer.alloc(size + 5);
      assert.equal(await s.getInto(`o/${size}`, odd.subarray(5), { aligned: true }), size);
      assert.ok(odd.subarray(5).equals(data));
    }
    assert.deepEqual(readdirSync(join(dir, String(directIo), "o")).length, 6, "no temporary files left");
    const small = Buffer.from(slots.memory, slots.offset(1), 4096);
    await assert.rejects(s.getInto(`o/${4097}`, small, { aligned: true }), (e) => s.isTooLarge(e));
    await assert.rejects(s.getInto("o/none", small, { aligned: true }), (e) => s.isNotFound(e));
  }
});

test("written is called once, when the bytes are written and before put returns; the memory is free from then on", async (t) => {
  const { AlignedSlots } = await import("../util/aligned.js");
  const { randomBytes } = await import("node:crypto");
  const { dir } = store(t);
  const slots = new AlignedSlots(1, 1024 * 1024);
  for (const directIo of [true, false]) {
    const s = new FsStore(join(dir, String(directIo)), { directIo });
    for (const size of [4096, 100_003]) {
      const data = randomBytes(size);
      slots.view(0, size).set(data);
      let calls = 0;
      await s.put(`o/${size}`, slots.view(0, size), {
        aligned: true,
        // The caller reuses the memory at once: what was stored must not change.
        written: () => {
          calls++;
          slots.view(0).fill(0x55);
        },
      });
      assert.equal(calls, 1, `written once (direct ${directIo}, ${size} bytes)`);
      assert.ok(
        (await s.get(`o/${size}`)).equals(data),
        `stored as given (direct ${directIo}, ${size} bytes)`,
      );
    }
  }
});

test("getRange reads exact ranges, direct or buffered, through kept handles that a put or delete lets go", async (t) => {
  const { s } = store(t);
  const data = Buffer.alloc(3 * 4096 + 123);
  for (let i = 0; i < data.length; i++) data[i] = (i * 7 + 3) & 0xff;
  await s.put("packs/ab/one", data);
  const { AlignedSlots } = await import("../util/aligned.js");
  const slots = new AlignedSlots(1, 64 * 1024);
  for (const [offset, length] of [
    [0, 16],
    [4095, 2],
    [5000, 7000],
    [data.length - 10, 10],
  ] as const) {
    const into = slots.view(0);
    assert.deepEqual(
      Buffer.from(await s.getRange("packs/ab/one", offset, length, into)),
      data.subarray(offset, offset + length),
    );
    assert.deepEqual(
      await s.getRange("packs/ab/one", offset, length),
      data.subarray(offset, offset + length),
    );
  }
  await assert.rejects(s.getRange("packs/ab/one", data.length - 5, 10), /ends before byte/);
  // Replaced: the next read sees the new object, not the handle kept on the old one.
  const next = Buffer.alloc(100, 9);
  await s.put("packs/ab/one", next);
  assert.deepEqual(await s.getRange("packs/ab/one", 10, 20), next.subarray(10, 30));
  await s.delete("packs/ab/one");
  await assert.rejects(s.getRange("packs/ab/one", 0, 1), (e) => s.isNotFound(e));
  await s.close();
});
