// The derived password key kept between commands: an entry answers only its own password, a
// damaged entry is ignored, the entry really replaces scrypt, and the CLI keeps it in the
// kernel keyring (keyctl) unless STRATA_KEY_CACHE=0.
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { createHash, createHmac, randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { KeyringKdfCache } from "../../src/cli/kdf-cache.js";
import { FsStore } from "../../src/repo/fs-store.js";
import type { KdfCache } from "../../src/repo/keys.js";
import { Repository } from "../../src/repo/repository.js";
import { strata, strataOk, tempDir } from "../helpers/cli.js";

const KDF = { N: 1024, r: 8, p: 1 };

class MemoryCache implements KdfCache {
  readonly entries = new Map<string, Buffer>();
  hits = 0;
  async get(name: string) {
    const v = this.entries.get(name);
    if (v) this.hits++;
    return v;
  }
  async set(name: string, value: Buffer) {
    this.entries.set(name, Buffer.from(value));
  }
}

const code = (err: unknown) => (err as { code?: string }).code;

test("a cached derived key opens the repository only for its own password, and replaces scrypt", async (t) => {
  const dir = tempDir(t);
  const store = new FsStore(join(dir, "repo"));
  const cache = new MemoryCache();
  await Repository.init(store, { password: "right", kdfCost: KDF, kdfCache: cache });
  assert.equal(cache.entries.size, 1, "init leaves the derived key");
  const r = await Repository.open(store, { password: "right", kdfCache: cache });
  await r.close();
  assert.equal(cache.hits, 1);
  await assert.rejects(Repository.open(store, { password: "wrong", kdfCache: cache }), (e) => {
    assert.equal(code(e), "WRONG_PASSWORD");
    return true;
  });

  const [name] = [...cache.entries.keys()];
  // A damaged entry is a miss: the key is derived again and the right password still works.
  cache.entries.set(name!, randomBytes(64));
  (await Repository.open(store, { password: "right", kdfCache: cache })).close();
  // An entry that answers the password but holds another key is used as it is, without scrypt:
  // the repository key then fails to unwrap, which shows the entry stood in for the derivation.
  const other = randomBytes(32);
  const check = createHmac("sha256", other).update("strata kdf cache ").update("right").digest();
  cache.entries.set(name!, Buffer.concat([other, check]));
  await assert.rejects(Repository.open(store, { password: "right", kdfCache: cache }), (e) => {
    assert.equal(code(e), "WRONG_PASSWORD");
    return true;
  });
  // Without the cache the password opens it as ever.
  await (await Repository.open(store, { password: "right" })).close();
});

function keyringHas(name: string): boolean {
  try {
    execFileSync("keyctl", ["search", "@u", "user", `strata:${name}`], { stdio: "pipe" });
    return true;
  } catch {
    return false;
  }
}

test("the kernel keyring keeps the derived key for the CLI's next commands; STRATA_KEY_CACHE=0 keeps none", async (t) => {
  const cache = new KeyringKdfCache(60);
  const name = `test-${randomBytes(6).toString("hex")}`;
  const value = randomBytes(64);
  await cache.set(name, value);
  t.after(() => {
    execFileSync("sh", ["-c", `keyctl unlink $(keyctl search @u user strata:${name}) @u || true`]);
  });
  assert.deepEqual(await cache.get(name), value);
  assert.equal(await cache.get(`${name}-absent`), undefined);

  const dir = tempDir(t);
  /** The keyring entry a repository's key file leads to (named by its salt and cost). */
  const entryOf = (repo: string) => {
    const k = JSON.parse(readFileSync(join(repo, "keys", "default"), "utf8")) as Record<string, string>;
    return createHash("sha256")
      .update(`strata scrypt ${k.N} ${k.r} ${k.p} `)
      .update(Buffer.from(k.salt!, "base64"))
      .digest("hex")
      .slice(0, 32);
  };
  const off = join(dir, "off");
  await strataOk(["init", "--repo", off], { env: { STRATA_PASSWORD: "pw", STRATA_KEY_CACHE: "0" } });
  assert.equal(keyringHas(entryOf(off)), false, "STRATA_KEY_CACHE=0 keeps nothing");
  const on = join(dir, "on");
  await strataOk(["init", "--repo", on], { env: { STRATA_PASSWORD: "pw", STRATA_KEY_CACHE: "30" } });
  const kept = entryOf(on);
  assert.equal(keyringHas(kept), true, "init keeps the derived key");
  t.after(() => {
    execFileSync("sh", ["-c", `keyctl unlink $(keyctl search @u user strata:${kept}) @u || true`]);
  });
  await strataOk(["snapshots", "--repo", on], { env: { STRATA_PASSWORD: "pw", STRATA_KEY_CACHE: "30" } });
  const wrong = await strata(["snapshots", "--repo", on], { env: { STRATA_PASSWORD: "nope" } });
  assert.equal(wrong.code, 12, wrong.stderr);
  const bad = await strata(["snapshots", "--repo", on], {
    env: { STRATA_PASSWORD: "pw", STRATA_KEY_CACHE: "soon" },
  });
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /STRATA_KEY_CACHE/);
});
