// Damage and bad input: every flipped byte in a chunk, index or manifest is found by verify and
// stops a restore; bad input gets one clear line and a non-zero exit.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fillContent, Prng } from "../../src/image/synthetic.js";
import { sealJson } from "../../src/repo/sealed-json.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";
import { type ChunkRegion, chunkRegions, flipChunkByte } from "../helpers/stored.js";

async function setup(dir: string, password?: string) {
  const repo = join(dir, "repo");
  const env = password === undefined ? {} : { STRATA_PASSWORD: password };
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"], { env });
  const img = join(dir, "disk.img");
  const buf = Buffer.alloc(6 * 65536);
  fillContent(buf.subarray(0, 3 * 65536), "text", new Prng("d"));
  fillContent(buf.subarray(3 * 65536), "random", new Prng("e"));
  await fs.writeFile(img, buf);
  const b = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`], { env }),
  );
  // A second restore point that shares every chunk, so damage names both.
  const c = summary(
    await strataOk(["backup", "--repo", repo, "--vm", "vm2", "--json", `file:${img}`], { env }),
  );
  return { repo, img, env, ids: [b.id as string, c.id as string] };
}

async function flip(path: string, offset: number) {
  const buf = await fs.readFile(path);
  const at = offset < 0 ? buf.length + offset : offset;
  buf[at]! ^= 0x01;
  await fs.writeFile(path, buf);
}

for (const encrypted of [false, true]) {
  test(`a flipped byte in any chunk is found and stops restores (${encrypted ? "encrypted" : "plain"})`, async (t) => {
    const dir = tempDir(t);
    const { repo, env, ids } = await setup(dir, encrypted ? "pw" : undefined);
    const chunks = await chunkRegions(repo, encrypted ? "pw" : undefined);
    assert.equal(chunks.length, 6);
    // Header, middle and last byte of different chunks.
    const spots: Array<[ChunkRegion, number]> = [
      [chunks[0]!, 9],
      [chunks[2]!, 3000],
      [chunks[5]!, -1],
    ];
    assert.ok(chunks[2]!.length > 3000, `stored length ${chunks[2]!.length}`);
    for (const [region, at] of spots) await flipChunkByte(region, at);
    const v = await strata(["verify", "--repo", repo, "--read-data", "--json"], { env });
    assert.equal(v.code, 3, v.stderr);
    const report = summary<{ damagedChunks: Array<{ digest: string; usedBy: string[] }>; ok: boolean }>(v);
    assert.equal(report.ok, false);
    assert.deepEqual(
      report.damagedChunks.map((c) => c.digest),
      spots.map(([c]) => c.digest).sort(),
    );
    for (const c of report.damagedChunks) assert.deepEqual(c.usedBy, [...ids].sort());
    // Without --read-data the chunks exist, so metadata checks pass: that is what --read-data is for.
    assert.equal((await strata(["verify", "--repo", repo], { env })).code, 0);
    const out = join(dir, "out");
    const r = await strata(["restore", "--repo", repo, ids[0]!, "--target", out], { env });
    assert.equal(r.code, 3);
    assert.match(r.stderr, /chunk [0-9a-f]{64} is damaged/);
    assert.deepEqual(await fs.readdir(out), [], "a failed restore leaves no file behind");
  });
}

test("a flipped byte in an index or a manifest is found by verify and by restore", async (t) => {
  const dir = tempDir(t);
  const { repo, ids } = await setup(dir);
  const [vm1, t1] = ids[0]!.split("/") as [string, string];
  const [vm2, t2] = ids[1]!.split("/") as [string, string];
  await flip(join(repo, "vms", vm1, t1, "disk.fidx"), 64 + 40);
  await flip(join(repo, "vms", vm2, t2, "manifest.json"), 120);
  for (const args of [["verify"], ["verify", "--read-data"]]) {
    const v = await strata([...args, "--repo", repo, "--json"]);
    assert.equal(v.code, 3);
    const report = summary<{ damagedSnapshots: Array<{ id: string; problems: string[] }> }>(v);
    assert.deepEqual(
      report.damagedSnapshots.map((d) => d.id),
      [...ids].sort(),
    );
    assert.match(report.damagedSnapshots.find((d) => d.id === ids[0])!.problems[0]!, /index .* is damaged/);
    assert.match(
      report.damagedSnapshots.find((d) => d.id === ids[1])!.problems[0]!,
      /manifest .* is damaged/,
    );
  }
  const r1 = await strata(["restore", "--repo", repo, ids[0]!, "--target", join(dir, "o1")]);
  assert.equal(r1.code, 3);
  assert.match(r1.stderr, /index vm1\/.* is damaged/);
  const r2 = await strata(["restore", "--repo", repo, ids[1]!, "--target", join(dir, "o2")]);
  assert.equal(r2.code, 3);
  assert.match(r2.stderr, /manifest of vm2\/.* is damaged/);
});

test("bad input gets one clear line and a non-zero exit", async (t) => {
  const dir = tempDir(t);
  const { repo, img } = await setup(dir, "right");
  const oneLine = (s: string) => s.trim().split("\n").length === 1;

  const wrong = await strata(["snapshots", "--repo", repo], { env: { STRATA_PASSWORD: "wrong" } });
  assert.equal(wrong.code, 12);
  assert.match(wrong.stderr, /^strata: wrong password/);
  assert.ok(oneLine(wrong.stderr));

  const none = await strata(["snapshots", "--repo", repo]);
  assert.equal(none.code, 12);
  assert.match(none.stderr, /encrypted: give its password/);

  const missing = await strata(["snapshots", "--repo", join(dir, "nowhere")]);
  assert.equal(missing.code, 10);
  assert.match(missing.stderr, /^strata: no repository at .*nowhere/);
  assert.ok(oneLine(missing.stderr));

  const noRepo = await strata(["snapshots"]);
  assert.equal(noRepo.code, 2);
  assert.match(noRepo.stderr, /--repo DIR \(or s3:https:\/\/HOST\/BUCKET\[\/PREFIX\]\) or set STRATA_REPO/);

  const env = { STRATA_PASSWORD: "right" };
  for (const src of [join(dir, "no-such.img"), dir]) {
    const bad = await strata(["backup", "--repo", repo, "--vm", "x", `file:${src}`], { env });
    assert.equal(bad.code, 1, bad.stderr);
    assert.match(bad.stderr, /^strata: (cannot open source|cannot read source|source .* is neither)/);
    assert.ok(oneLine(bad.stderr), bad.stderr);
  }
  const badSpec = await strata(["backup", "--repo", repo, "--vm", "x", img], { env });
  assert.equal(badSpec.code, 2);
  assert.match(badSpec.stderr, /sources look like file:/);
  const badVm = await strata(["backup", "--repo", repo, "--vm", "../etc", `file:${img}`], { env });
  assert.equal(badVm.code, 2);
  assert.match(badVm.stderr, /bad VM name/);
  const noSnap = await strata(["restore", "--repo", repo, "vm1/2020-01-01T00:00:00Z", "--target", dir], {
    env,
  });
  assert.equal(noSnap.code, 1);
  assert.match(noSnap.stderr, /no restore point vm1\/2020-01-01T00:00:00Z/);

  // Corrupt config: truncated, then a changed digit.
  const config = join(repo, "config");
  const good = await fs.readFile(config, "utf8");
  await fs.writeFile(config, good.slice(0, 40));
  const trunc = await strata(["snapshots", "--repo", repo], { env });
  assert.equal(trunc.code, 1);
  assert.match(trunc.stderr, /^strata: repository config at .* is damaged: not valid JSON/);
  assert.ok(oneLine(trunc.stderr));
  await fs.writeFile(config, good.replace('"chunkSize": 65536', '"chunkSize": 65537'));
  const changed = await strata(["snapshots", "--repo", repo], { env });
  // An encrypted repository's config is sealed with its key: a changed byte breaks that seal.
  assert.match(changed.stderr, /config .* fails its keyed seal \(it was changed\): checksum mismatch/);
});

test("init refuses an existing repository; --help teaches, --version answers", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo]);
  const again = await strata(["init", "--repo", repo]);
  assert.equal(again.code, 1);
  assert.match(again.stderr, /already exists/);
  const help = await strataOk(["--help"]);
  for (const cmd of ["init", "backup", "snapshots", "restore", "verify", "forget", "gc"])
    assert.match(help.stdout, new RegExp(`\\n  ${cmd}\\b`));
  assert.match((await strataOk(["backup", "--help"])).stdout, /Examples:/);
  const { version } = JSON.parse(
    await fs.readFile(new URL("../../../package.json", import.meta.url), "utf8"),
  );
  assert.equal((await strataOk(["--version"])).stdout.trim(), version);
});

test("a resealed manifest naming a disk ../../x is refused before anything is written", async (t) => {
  const dir = tempDir(t);
  const { repo, ids } = await setup(dir);
  const [vm, time] = ids[0]!.split("/") as [string, string];
  const path = join(repo, "vms", vm, time, "manifest.json");
  const doc = JSON.parse(await fs.readFile(path, "utf8")) as Record<string, unknown> & {
    disks: Array<{ name: string }>;
  };
  delete doc.seal;
  doc.disks[0]!.name = "../../escaped";
  // An unencrypted repository's seal is a plain SHA-256: anyone who can write there recomputes it.
  await fs.writeFile(path, sealJson(doc));
  const target = join(dir, "out", "deep");
  const r = await strata(["restore", "--repo", repo, ids[0]!, "--target", target]);
  assert.equal(r.code, 3, r.stderr);
  assert.match(r.stderr, /manifest of .* is damaged: disks\.0\.name: not a plain name/);
  assert.deepEqual((await fs.readdir(dir)).sort(), ["disk.img", "repo"], "nothing written beside the target");
  const v = summary(await strata(["verify", "--repo", repo, "--json"]));
  assert.equal(v.ok, false);
});
