import assert from "node:assert/strict";
import { test } from "node:test";
import { sealJson, unsealJson } from "./sealed-json.js";

const doc = { format: "x", vm: "web1", size: 1048576, disks: [{ name: "a", n: 1.5 }], parent: null };

test("round trip, plain and keyed", () => {
  assert.deepEqual(unsealJson(sealJson(doc)), { ok: true, doc });
  const key = Buffer.alloc(32, 7);
  assert.deepEqual(unsealJson(sealJson(doc, key), key), { ok: true, doc });
});

test("any changed byte is caught, whitespace included", () => {
  for (const key of [undefined, Buffer.alloc(32, 7)]) {
    const bytes = sealJson(doc, key);
    for (let i = 0; i < bytes.length; i++) {
      for (const bit of [0x01, 0x20]) {
        const bad = Buffer.from(bytes);
        bad[i]! ^= bit;
        assert.equal(unsealJson(bad, key).ok, false, `byte ${i} bit ${bit}`);
      }
    }
  }
});

test("a keyed document needs the key; a plain hash is refused where a key is required", () => {
  const key = Buffer.alloc(32, 7);
  assert.equal(unsealJson(sealJson(doc, key)).ok, false);
  assert.equal(unsealJson(sealJson(doc, key), Buffer.alloc(32, 8)).ok, false);
  assert.equal(unsealJson(sealJson(doc), key, true).ok, false);
});
