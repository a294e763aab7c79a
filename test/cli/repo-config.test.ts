// A tampered repository config: an encrypted repository whose config is edited to say "no
// encryption" (or another chunk size) is refused, whatever password is given, and nothing is
// stored in plaintext; a password for an unencrypted repository is refused; a repository written
// before configs were keyed still opens and is keyed by its next writer.
import assert from "node:assert/strict";
import { createCipheriv, createHmac, randomBytes, scryptSync } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { sealJson } from "../../src/repo/sealed-json.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { chunkRegions, storedFiles } from "../helpers/stored.js";

const MARKER = Buffer.from("STRATA-PLAINTEXT-MARKER-7f3a91");
const PW = { STRATA_PASSWORD: "correct horse" };

/** Random bytes (zstd can't shrink them) with MARKER every 4 KiB: plaintext storage shows it. */
async function markedDisk(path: string, size = 4 * 65536): Promise<void> {
  const buf = Buffer.alloc(size);
  fillContent(buf, "random", new Prng(path));
  for (let off = 100; off + MARKER.length < size; off += 4096) MARKER.copy(buf, off);
  await fs.writeFile(path, buf);
}

/** Chunk files or packs, and any half-written ones. */
function chunkFiles(repo: string): string[] {
  return storedFiles(repo, { temporaries: true });
}

async function plaintextChunks(repo: string): Promise<string[]> {
  const hits: string[] = [];
  for (const f of chunkFiles(repo)) if ((await fs.readFile(f)).includes(MARKER)) hits.push(f);
  return hits;
}

type Doc = Record<string, unknown>;

async function readDoc(path: string): Promise<Doc> {
  const { seal: _seal, ...doc } = JSON.parse(await fs.readFile(path, "utf8")) as Doc;
  return doc;
}

/** Rewrites a sealed document with a plain SHA-256 seal, as anyone can, after `edit`. */
async function reseal(path: string, edit: (doc: Doc) => void): Promise<void> {
  const doc = await readDoc(path);
  edit(doc);
  await fs.writeFile(path, sealJson(doc));
}

test("an encrypted repository edited to say 'no encryption' is refused and stores nothing in plaintext", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const disk = join(dir, "disk.img");
  await markedDisk(disk);
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"], { env: PW });
  const config = JSON.parse(await fs.readFile(join(repo, "config"), "utf8")) as Doc;
  assert.match(String(config.seal), /^hmac-sha256:[0-9a-f]{64}$/, "init seals the config with the key");
  await strataOk(["backup", "--repo", repo, "--vm", "vm1", `file:${disk}`], { env: PW });
  const before = chunkFiles(repo);
  const regions = await chunkRegions(repo, PW.STRATA_PASSWORD);
  assert.equal(regions.length, 4);
  assert.deepEqual([...new Set(regions.map((c) => c.path))].sort(), before, "the files searched hold them");
  assert.deepEqual(await plaintextChunks(repo), [], "encrypted chunks do not show the marker");

  // The attack: the config says plaintext, with a seal anyone can compute.
  await reseal(join(repo, "config"), (d) => {
    d.encryption = "none";
    d.keyFingerprint = null;
  });
  // A changed disk, so that a backup would have new chunks to store.
  await markedDisk(disk, 8 * 65536);
  for (const env of [PW, {}]) {
    const r = await strata(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${disk}`], { env });
    assert.equal(r.code, 1, r.stderr);
    const err = JSON.parse(r.stderr.trim().split("\n").at(-1)!) as { code: string; message: string };
    assert.equal(err.code, "REPO_TAMPERED");
    assert.match(err.message, /key file .* config says it is not encrypted/);
  }
  assert.deepEqual(chunkFiles(repo), before, "no chunk was written");
  assert.deepEqual(await plaintextChunks(repo), []);
  const restore = await strata(["restore", "--repo", repo, "vm1/latest", "--target", join(dir, "out")], {
    env: PW,
  });
  assert.equal(restore.code, 1);
  assert.match(restore.stderr, /config says it is not encrypted/);

  // The same downgrade with the key file removed: the password is refused, not ignored.
  await fs.rm(join(repo, "keys"), { recursive: true });
  const r = await strata(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${disk}`], { env: PW });
  assert.equal(r.code, 12, r.stderr);
  assert.match(r.stderr, /"code":"PASSWORD_UNEXPECTED".*not encrypted, but a password was given/);
  assert.deepEqual(chunkFiles(repo), before);
  assert.deepEqual(await plaintextChunks(repo), []);
});

test("an encrypted repository's config: any edit (chunk size, id) breaks its keyed seal", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"], { env: PW });
  const original = await fs.readFile(join(repo, "config"));
  const cases: Array<[string, (text: string) => Promise<void>, RegExp]> = [
    [
      "chunk size changed, keyed seal kept",
      (text) => fs.writeFile(join(repo, "config"), text.replace('"chunkSize": 65536', '"chunkSize": 131072')),
      /fails its keyed seal \(it was changed\)/,
    ],
    [
      "id changed, plain seal",
      () =>
        reseal(join(repo, "config"), (d) => {
          d.id = "0".repeat(32);
        }),
      /not sealed with the repository key, as its key file requires/,
    ],
  ];
  for (const [what, edit, message] of cases) {
    await fs.writeFile(join(repo, "config"), original);
    await edit(original.toString());
    const r = await strata(["snapshots", "--repo", repo, "--json"], { env: PW });
    assert.equal(r.code, 1, what);
    assert.match(r.stderr, /"code":"REPO_TAMPERED"/, what);
    assert.match(r.stderr, message, what);
  }
  // The key file's "config is keyed" flag is authenticated: removing it fails the key's tag.
  await fs.writeFile(join(repo, "config"), original);
  await reseal(join(repo, "keys", "default"), (d) => {
    delete d.configSeal;
  });
  const r = await strata(["snapshots", "--repo", repo], { env: PW });
  assert.equal(r.code, 12);
  assert.match(
    r.stderr,
    /wrong password: it does not open the repository key \(or .*keys\/default was changed\)/,
  );
});

test("a password given for an unencrypted repository is refused", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const disk = join(dir, "disk.img");
  await markedDisk(disk);
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const r = await strata(["backup", "--repo", repo, "--vm", "vm1", `file:${disk}`], { env: PW });
  assert.equal(r.code, 12);
  assert.match(r.stderr, /is not encrypted, but a password was given/);
  assert.deepEqual(chunkFiles(repo), []);
  await strataOk(["backup", "--repo", repo, "--vm", "vm1", `file:${disk}`]);
});

/**
 * An encrypted repository as version 1 wrote it before configs were keyed: a config under a
 * plain seal, a key file without `configSeal` whose key is wrapped with no additional data.
 */
async function legacyRepo(repo: string, password: string): Promise<void> {
  const master = randomBytes(64);
  const macKey = master.subarray(32);
  const cost = { N: 1024, r: 8, p: 1 };
  const salt = randomBytes(16);
  const nonce = randomBytes(12);
  const wrap = scryptSync(password, salt, 32, cost);
  const cipher = createCipheriv("aes-256-gcm", wrap, nonce);
  const data = Buffer.concat([cipher.update(master), cipher.final()]);
  const created = new Date().toISOString();
  await fs.mkdir(join(repo, "keys"), { recursive: true });
  await fs.writeFile(
    join(repo, "keys", "default"),
    sealJson({
      format: "strata-key",
      version: 1,
      kdf: "scrypt",
      ...cost,
      salt: salt.toString("base64"),
      nonce: nonce.toString("base64"),
      tag: cipher.getAuthTag().toString("base64"),
      data: data.toString("base64"),
      created,
    }),
  );
  await fs.writeFile(
    join(repo, "config"),
    sealJson({
      format: "strata-repository",
      version: 1,
      id: randomBytes(16).toString("hex"),
      chunkSize: 65536,
      compression: "zstd",
      encryption: "aes-256-gcm",
      keyFingerprint: createHmac("sha256", macKey)
        .update("strata key fingerprint")
        .digest("hex")
        .slice(0, 32),
      created,
    }),
  );
}

test("an encrypted repository from before keyed configs opens, and its next writer keys the config", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const disk = join(dir, "disk.img");
  await markedDisk(disk);
  await legacyRepo(repo, PW.STRATA_PASSWORD);
  const legacyConfig = await fs.readFile(join(repo, "config"));
  // Readers leave it as it is.
  await strataOk(["snapshots", "--repo", repo], { env: PW });
  assert.deepEqual(await fs.readFile(join(repo, "config")), legacyConfig);
  const b = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${disk}`], { env: PW }),
  );
  assert.deepEqual(await plaintextChunks(repo), []);
  const config = JSON.parse(await fs.readFile(join(repo, "config"), "utf8")) as Doc;
  assert.match(String(config.seal), /^hmac-sha256:/, "the backup sealed the config with the key");
  const { seal: _a, ...was } = JSON.parse(legacyConfig.toString()) as Doc;
  const { seal: _b, ...now } = config;
  assert.deepEqual(now, was, "same config, new seal");
  assert.equal((await readDoc(join(repo, "keys", "default"))).configSeal, "hmac-sha256");
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, String(b.id), "--target", out], { env: PW });
  assert.deepEqual(await fs.readFile(join(out, "disk.raw")), await fs.readFile(disk));
  // From now on the downgrade back to a plain seal is caught.
  await fs.writeFile(join(repo, "config"), legacyConfig);
  const r = await strata(["snapshots", "--repo", repo], { env: PW });
  assert.equal(r.code, 1);
  assert.match(r.stderr, /not sealed with the repository key/);
});
