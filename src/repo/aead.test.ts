import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createCipheriv, createDecipheriv, randomBytes } from "node:crypto";
import { test } from "node:test";
import { isStrataError } from "../util/errors.js";
import { NATIVE_ADDON_PATH } from "../util/native.js";
import { nativeAead } from "./aead.js";
import { chunkDigest, decodeChunk, encodeChunk } from "./codec.js";

const key = randomBytes(32);
const aad = randomBytes(16);

function nodeSeal(nonce: Buffer, plain: Buffer): { sealed: Buffer; tag: Buffer } {
  const c = createCipheriv("aes-256-gcm", key, nonce);
  c.setAAD(aad);
  const sealed = Buffer.concat([c.update(plain), c.final()]);
  return { sealed, tag: c.getAuthTag() };
}

test("the AES-GCM addon is built and seals and opens exactly as Node's crypto does", () => {
  const aead = nativeAead();
  assert.ok(aead, `${NATIVE_ADDON_PATH} loads (npm run build makes it)`);
  for (const size of [0, 1, 15, 16, 17, 65_539, 1 << 20]) {
    const plain = randomBytes(size);
    const nonce = randomBytes(12);
    const expect = nodeSeal(nonce, plain);

    const data = Buffer.from(plain);
    const tag = Buffer.alloc(16);
    aead.seal(key, nonce, aad, data, tag);
    assert.ok(data.equals(expect.sealed), `${size} bytes: the same ciphertext`);
    assert.ok(tag.equals(expect.tag), `${size} bytes: the same tag`);

    // Node's ciphertext opens, into other memory and in place.
    const out = Buffer.alloc(size);
    assert.equal(aead.open(key, nonce, aad, expect.sealed, out, expect.tag), true);
    assert.ok(out.equals(plain));
    const inPlace = Buffer.from(expect.sealed);
    assert.equal(aead.open(key, nonce, aad, inPlace, inPlace, expect.tag), true);
    assert.ok(inPlace.equals(plain));
    // And the addon's opens with Node's.
    const d = createDecipheriv("aes-256-gcm", key, nonce);
    d.setAAD(aad);
    d.setAuthTag(tag);
    assert.ok(Buffer.concat([d.update(data), d.final()]).equals(plain));

    // Any bit changed in the ciphertext, the tag, the additional data or the nonce: refused.
    const flip = (b: Buffer, at: number) => {
      const c = Buffer.from(b);
      c[at] = c[at]! ^ 0x10;
      return c;
    };
    const open = (n: Buffer, a: Buffer, s: Buffer, t: Buffer): boolean =>
      aead.open(key, n, a, s, Buffer.alloc(s.length), t);
    if (size > 0) assert.equal(open(nonce, aad, flip(expect.sealed, size - 1), expect.tag), false);
    assert.equal(open(nonce, aad, expect.sealed, flip(expect.tag, 3)), false);
    assert.equal(open(nonce, flip(aad, 0), expect.sealed, expect.tag), false);
    assert.equal(open(flip(nonce, 11), aad, expect.sealed, expect.tag), false);
  }
});

test("the addon refuses wrong arguments instead of reading past them", () => {
  const aead = nativeAead();
  assert.ok(aead);
  const tag = Buffer.alloc(16);
  assert.throws(() => aead.seal(randomBytes(16), randomBytes(12), aad, Buffer.alloc(8), tag), RangeError);
  assert.throws(() => aead.seal(key, randomBytes(8), aad, Buffer.alloc(8), tag), RangeError);
  assert.throws(() => aead.seal(key, randomBytes(12), aad, Buffer.alloc(8), Buffer.alloc(8)), RangeError);
  assert.throws(
    () => aead.open(key, randomBytes(12), aad, Buffer.alloc(8), Buffer.alloc(7), tag),
    /dst: as long as src/,
  );
  assert.throws(
    () => aead.seal(key, randomBytes(12), aad, new Uint16Array(4) as unknown as Uint8Array, tag),
    TypeError,
  );
  assert.throws(
    () => (aead.open as unknown as (...a: unknown[]) => boolean)(key, randomBytes(12), aad),
    TypeError,
  );
});

test("chunks sealed by the addon open through Node's crypto and the other way round", () => {
  const keys = { encKey: key, macKey: randomBytes(32) };
  const text = Buffer.from("a chunk that compresses well enough\n".repeat(3000));
  const random = randomBytes(70_000);
  // Another process with STRATA_NATIVE_AEAD=0 (Node's crypto) encodes and decodes the same chunks.
  const codec = new URL("./codec.js", import.meta.url).href;
  const other = (op: "encode" | "decode", hexes: string[]): string[] =>
    JSON.parse(
      execFileSync(
        process.execPath,
        [
          "--input-type=module",
          "-e",
          `import { readFileSync } from "node:fs";
           import { encodeChunk, decodeChunk } from ${JSON.stringify(codec)};
           import { nativeAead } from ${JSON.stringify(new URL("./aead.js", import.meta.url).href)};
           if (nativeAead()) throw new Error("STRATA_NATIVE_AEAD=0 still loaded the addon");
           const job = JSON.parse(readFileSync(0, "utf8"));
           const keys = { encKey: Buffer.from(job.encKey, "hex"), macKey: Buffer.from(job.macKey, "hex") };
           const input = job.hexes.map((h) => Buffer.from(h, "hex"));
           const out = job.op === "encode"
             ? input.map((p) => encodeChunk(p, keys))
             : input.map((s, i) => decodeChunk(s, Buffer.from(job.digests[i], "hex"), keys, "t"));
           process.stdout.write(JSON.stringify(out.map((b) => b.toString("hex"))));`,
        ],
        {
          env: { ...process.env, STRATA_NATIVE_AEAD: "0" },
          maxBuffer: 64 << 20,
          input: JSON.stringify({
            op,
            hexes,
            encKey: keys.encKey.toString("hex"),
            macKey: keys.macKey.toString("hex"),
            digests: [text, random].map((p) => chunkDigest(p, keys).toString("hex")),
          }),
        },
      ).toString(),
    );
  const plains = [text, random];
  const ours = plains.map((p) => encodeChunk(p, keys));
  assert.deepEqual(
    other(
      "decode",
      ours.map((b) => b.toString("hex")),
    ),
    plains.map((p) => p.toString("hex")),
  );
  const theirs = other(
    "encode",
    plains.map((p) => p.toString("hex")),
  ).map((h) => Buffer.from(h, "hex"));
  theirs.forEach((s, i) => {
    assert.ok(decodeChunk(s, chunkDigest(plains[i]!, keys), keys, "t").equals(plains[i]!));
  });
  // A flipped bit in a sealed payload is a damaged chunk, named as such.
  const bad = Buffer.from(theirs[0]!);
  bad[bad.length - 1] = bad[bad.length - 1]! ^ 1;
  assert.throws(
    () => decodeChunk(bad, chunkDigest(text, keys), keys, "t"),
    (err: unknown) => isStrataError(err) && /authentication failed/.test((err as Error).message),
  );
});
