// Back up and restore through the real CLI: bit-exact results, sparse restores, incremental reuse,
// multi-disk VMs, JSON output.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { fillContent, Prng, sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { strataOk, summary, tempDir } from "../helpers/cli.js";

const CHUNK = 64 * 1024;

async function writeImage(
  path: string,
  size: number,
  kind: "random" | "zero" | "repeated" | "text" | "mixed",
) {
  const buf = Buffer.alloc(size);
  const rng = new Prng(path);
  if (kind === "random") fillContent(buf, "random", rng);
  if (kind === "text") fillContent(buf, "text", rng);
  if (kind === "repeated") {
    const block = randomBytes(CHUNK);
    for (let off = 0; off < size; off += CHUNK) block.copy(buf, off);
  }
  if (kind === "mixed") {
    fillContent(buf.subarray(0, Math.floor(size / 3)), "text", rng);
    fillContent(buf.subarray(Math.floor((2 * size) / 3)), "random", rng);
  }
  await fs.writeFile(path, buf);
}

test("random, zero, repeated, text and odd-sized disks restore bit-exact", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const cases: Array<[string, number, Parameters<typeof writeImage>[2]]> = [
    ["random", 3 * CHUNK + 12345, "random"],
    ["zero", 5 * CHUNK, "zero"],
    ["repeated", 8 * CHUNK, "repeated"],
    ["text", CHUNK - 1, "text"],
    ["mixed", 10 * CHUNK + 1, "mixed"],
    // Not 1 byte: the mixed disk ends in a 1-byte chunk of random data too, and 1 run in 256
    // would find them equal and count one reused chunk more.
    ["tiny", 7, "random"],
    ["empty", 0, "zero"],
  ];
  const sources: string[] = [];
  for (const [name, size, kind] of cases) {
    const p = join(dir, `${name}.img`);
    await writeImage(p, size, kind);
    sources.push(`file:${p}`);
  }
  const b = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", ...sources]));
  assert.equal(b.type, "summary");
  assert.equal(b.consistency, "crash-consistent");
  // The repeated disk's eight identical chunks are stored once, even when hashed at the same time.
  assert.equal(b.chunksReused, 7);
  assert.equal(b.chunksNew, 16);
  // The repeated image is one chunk stored once; the zero image stores nothing.
  const snaps = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<
    Record<string, unknown>
  >;
  assert.equal(snaps.length, 1);
  assert.deepEqual(
    (snaps[0]!.disks as Array<{ name: string; size: number }>).map((d) => [d.name, d.size]),
    cases.map(([n, s]) => [n, s]),
  );
  assert.equal(snaps[0]!.id, b.id);
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, `${b.id}`, "--target", out]);
  for (const [name] of cases) {
    assert.equal(
      await sha256File(join(out, `${name}.raw`)),
      await sha256File(join(dir, `${name}.img`)),
      name,
    );
  }
  // All-zero chunks come back as holes, not written blocks.
  const st = await fs.stat(join(out, "zero.raw"));
  assert.equal(st.size, 5 * CHUNK);
  assert.equal(st.blocks, 0);
});

test("a second backup of a 1 % changed image stores about 1 %; both restore exactly", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const img = join(dir, "disk.img");
  const size = 64 * 1024 * 1024;
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  await writeSyntheticImage(img, { size, seed: "incremental", holes: 0 });
  const first = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  const firstSha = await sha256File(img);
  // A day of guest writes: 1 % of the disk rewritten in one region (a file replaced).
  const changed = Math.round(size * 0.01);
  const fh = await fs.open(img, "r+");
  await fh.write(randomBytes(changed), 0, changed, 12_345_678);
  await fh.close();
  const second = summary(await strataOk(["backup", "--repo", repo, "--vm", "vm1", "--json", `file:${img}`]));
  assert.equal(second.parent, first.time);
  const bytesNew = second.bytesNew as number;
  assert.ok(bytesNew >= changed, `stored ${bytesNew} new bytes, less than the ${changed} changed`);
  assert.ok(bytesNew <= changed + 2 * 64 * 1024, `stored ${bytesNew} new bytes for ${changed} changed`);
  assert.equal(second.bytesRead, size);
  assert.ok((second.chunksReused as number) > 1000);
  const out1 = join(dir, "r1");
  const out2 = join(dir, "r2");
  await strataOk(["restore", "--repo", repo, first.id as string, "--target", out1]);
  await strataOk(["restore", "--repo", repo, "vm1/latest", "--target", out2]);
  assert.equal(await sha256File(join(out1, "disk.raw")), firstSha);
  assert.equal(await sha256File(join(out2, "disk.raw")), await sha256File(img));
});

test("encrypted repository: restore works, stored chunks reveal no plaintext", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const pw = join(dir, "pw");
  await fs.writeFile(pw, "correct horse battery staple\n");
  await strataOk(["init", "--repo", repo, "--password-file", pw]);
  const img = join(dir, "secret.img");
  const secret = "TOP-SECRET-PAYROLL-RECORD ";
  await fs.writeFile(img, Buffer.from(secret.repeat(300_000)));
  await strataOk(["backup", "--repo", repo, "--password-file", pw, "--vm", "vault", `file:${img}`]);
  const files: string[] = [];
  const walk = async (d: string) => {
    for (const e of await fs.readdir(d, { withFileTypes: true })) {
      if (e.isDirectory()) await walk(join(d, e.name));
      else files.push(join(d, e.name));
    }
  };
  await walk(repo);
  const needle = Buffer.from("TOP-SECRET");
  const zstdOfNeedle = Buffer.from("PAYROLL");
  for (const f of files) {
    const bytes = await fs.readFile(f);
    assert.equal(bytes.includes(needle) || bytes.includes(zstdOfNeedle), false, `${f} shows plaintext`);
  }
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "vault/latest", "--target", out], {
    env: { STRATA_PASSWORD: "correct horse battery staple" },
  });
  assert.equal(await sha256File(join(out, "secret.raw")), await sha256File(img));
});

test("restore refuses to overwrite unless --force, and --disk picks one disk", async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const a = join(dir, "a.img");
  const b = join(dir, "b.img");
  await writeImage(a, 3 * CHUNK, "random");
  await writeImage(b, 2 * CHUNK, "text");
  await strataOk(["backup", "--repo", repo, "--vm", "two", `file:${a}`, `file:${b},name=data`]);
  const out = join(dir, "out");
  await strataOk(["restore", "--repo", repo, "two/latest", "--target", out, "--disk", "data"]);
  assert.deepEqual((await fs.readdir(out)).sort(), ["data.raw"]);
  const { strata } = await import("../helpers/cli.js");
  const again = await strata(["restore", "--repo", repo, "two/latest", "--target", out, "--disk", "data"]);
  assert.notEqual(again.code, 0);
  assert.match(again.stderr, /exists \(use --force/);
  await strataOk(["restore", "--repo", repo, "two/latest", "--target", out, "--force"]);
  assert.equal(await sha256File(join(out, "a.raw")), await sha256File(a));
  assert.equal(await sha256File(join(out, "data.raw")), await sha256File(b));
  const missing = await strata(["restore", "--repo", repo, "two/latest", "--target", out, "--disk", "nope"]);
  assert.match(missing.stderr, /has no disk "nope" \(it has: a, data\)/);
});
