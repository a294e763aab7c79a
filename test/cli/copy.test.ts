// strata copy between local repositories: bit-exact restores from the target whatever the keys
// (different passwords, unencrypted into encrypted and back), chunk names keyed again under the
// target's key (and kept when the names agree), a second copy that sends nothing (no file
// written), an incremental copy that sends only the chunks it lacks, selection (VM names,
// VM/TIME, --latest), and the refusals (other chunk size, same repository, encrypted into plain
// without --to-unencrypted, wrong password).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs, readdirSync, statSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { sha256File, writeSyntheticImage } from "../../src/image/synthetic.js";
import { strata, strataOk, summary, tempDir } from "../helpers/cli.js";

const MiB = 1024 * 1024;

interface CopySummary {
  copied: number;
  present: number;
  chunksSent: number;
  bytesSent: number;
  chunksPresent: number;
  renamed: boolean;
  points: Array<{ id: string; state: string; chunksSent: number; chunksPresent: number }>;
}

/** Every file of a repository with its size, for "nothing was written". */
function files(repo: string): Map<string, number> {
  const out = new Map<string, number>();
  const walk = (dir: string) => {
    for (const e of readdirSync(dir, { withFileTypes: true })) {
      const p = join(dir, e.name);
      if (e.isDirectory()) walk(p);
      else out.set(p.slice(repo.length), statSync(p).size);
    }
  };
  walk(repo);
  return out;
}

/** The non-zero chunk names of a restore point's disk, from its fixed index. */
async function chunkNames(repo: string, id: string, disk: string): Promise<string[]> {
  const b = await fs.readFile(join(repo, "vms", id, `${disk}.fidx`));
  const out: string[] = [];
  for (let at = 64; at < b.length; at += 32) {
    const hex = b.toString("hex", at, at + 32);
    if (!/^0+$/.test(hex)) out.push(hex);
  }
  return out;
}

async function restoreSha(
  repo: string,
  id: string,
  dir: string,
  pw?: string,
  disk = "disk",
): Promise<string> {
  const out = join(dir, `out-${randomBytes(4).toString("hex")}`);
  await strataOk([
    "restore",
    "--repo",
    repo,
    ...(pw === undefined ? [] : ["--password-file", pw]),
    id,
    "--target",
    out,
  ]);
  return sha256File(join(out, `${disk}.raw`));
}

test("copy between local repositories: keys, dedup, increments, selection", async (t) => {
  const dir = tempDir(t);
  const pw1 = join(dir, "pw1");
  const pw2 = join(dir, "pw2");
  await fs.writeFile(pw1, "first secret\n");
  await fs.writeFile(pw2, "second secret\n");
  const a = join(dir, "a"); // encrypted, pw1
  const b = join(dir, "b"); // encrypted, pw2
  const c = join(dir, "c"); // unencrypted
  const d = join(dir, "d"); // unencrypted
  await strataOk(["init", "--repo", a, "--chunk-size", "256K", "--password-file", pw1]);
  await strataOk(["init", "--repo", b, "--chunk-size", "256K", "--password-file", pw2]);
  await strataOk(["init", "--repo", c, "--chunk-size", "256K"]);
  await strataOk(["init", "--repo", d, "--chunk-size", "256K"]);

  const img = join(dir, "disk.img");
  await writeSyntheticImage(img, { size: 24 * MiB, seed: "copy-1", holes: 0.25 });
  const sha1 = await sha256File(img);
  const b1 = summary(
    await strataOk(["backup", "--repo", a, "--password-file", pw1, "--vm", "web1", "--json", `file:${img}`]),
  );
  const id1 = String(b1.id);
  const other = join(dir, "other.img");
  await writeSyntheticImage(other, { size: 8 * MiB, seed: "copy-other", holes: 0 });
  const o1 = summary(
    await strataOk(["backup", "--repo", a, "--password-file", pw1, "--vm", "db1", "--json", `file:${other}`]),
  );

  // Encrypted (pw1) into encrypted (pw2): every chunk named and encrypted again.
  const ab = summary<CopySummary>(
    await strataOk(["copy", a, b, "web1", "--from-password-file", pw1, "--to-password-file", pw2, "--json"]),
  );
  assert.equal(ab.copied, 1);
  assert.equal(ab.renamed, true);
  assert.deepEqual(
    ab.points.map((p) => p.id),
    [id1],
    "only web1 was selected",
  );
  const namesA = await chunkNames(a, id1, "disk");
  const namesB = await chunkNames(b, id1, "disk");
  assert.equal(namesB.length, namesA.length);
  assert.equal(
    namesB.filter((n) => namesA.includes(n)).length,
    0,
    "no chunk keeps its name under another key",
  );
  assert.equal(ab.chunksSent, new Set(namesA).size, "each distinct chunk sent once");
  assert.equal(await restoreSha(b, id1, dir, pw2), sha1, "bit-exact from the copy");
  assert.equal(
    summary(await strataOk(["verify", "--repo", b, "--password-file", pw2, "--read-data", "--json"])).ok,
    true,
  );
  // The copy opens with its own password only.
  const wrong = await strata(["snapshots", "--repo", b, "--password-file", pw1]);
  assert.equal(wrong.code, 12, wrong.stderr);

  // Again: nothing sent, no file written in the target.
  const before = files(b);
  const again = summary<CopySummary>(
    await strataOk(["copy", a, b, "web1", "--from-password-file", pw1, "--to-password-file", pw2, "--json"]),
  );
  assert.equal(again.copied, 0);
  assert.equal(again.present, 1);
  assert.equal(again.chunksSent, 0);
  assert.deepEqual(files(b), before, "the target is unchanged");

  // An increment: a few MiB changed, only those chunks are sent.
  const fh = await fs.open(img, "r+");
  await fh.write(randomBytes(2 * MiB), 0, 2 * MiB, 4 * MiB);
  await fh.close();
  const sha2 = await sha256File(img);
  const b2 = summary(
    await strataOk(["backup", "--repo", a, "--password-file", pw1, "--vm", "web1", "--json", `file:${img}`]),
  );
  const inc = summary<CopySummary>(
    await strataOk([
      "copy",
      a,
      b,
      "web1",
      "--latest",
      "--from-password-file",
      pw1,
      "--to-password-file",
      pw2,
      "--json",
    ]),
  );
  assert.deepEqual(
    inc.points.map((p) => [p.id, p.state]),
    [[String(b2.id), "copied"]],
    "--latest: the newest of web1 only",
  );
  assert.equal(inc.chunksSent, 8, "2 MiB changed: 8 chunks of 256 KiB sent");
  assert.equal(await restoreSha(b, String(b2.id), dir, pw2), sha2);

  // Encrypted into unencrypted: refused without --to-unencrypted (a shared password for both).
  const plain = await strata(["copy", a, c, "--password-file", pw1]);
  assert.equal(plain.code, 2, plain.stderr);
  assert.match(
    plain.stderr,
    /is encrypted and .* is not: the copy would be stored in the clear; add --to-unencrypted/,
  );
  assert.equal([...files(c).keys()].filter((k) => k.startsWith("/vms/")).length, 0, "nothing copied");
  const ac = summary<CopySummary>(
    await strataOk(["copy", a, c, "--password-file", pw1, "--to-unencrypted", "--json"]),
  );
  assert.equal(ac.copied, 3, "no selection: every restore point");
  assert.equal(await restoreSha(c, id1, dir), sha1);
  assert.equal(await restoreSha(c, String(b2.id), dir), sha2);
  assert.equal(await restoreSha(c, String(o1.id), dir, undefined, "other"), await sha256File(other));

  // Unencrypted into unencrypted: the names agree and are kept; present chunks are not even read.
  const cd = summary<CopySummary>(await strataOk(["copy", c, d, `web1/${String(b1.time)}`, "--json"]));
  assert.equal(cd.renamed, false);
  assert.deepEqual(await chunkNames(d, id1, "disk"), await chunkNames(c, id1, "disk"));
  const cd2 = summary<CopySummary>(await strataOk(["copy", c, d, "web1/latest", "--json"]));
  assert.equal(cd2.chunksSent, 8, "the increment's chunks only");
  assert.equal(cd2.chunksPresent, (await chunkNames(c, String(b2.id), "disk")).length - 8);
  assert.equal(await restoreSha(d, String(b2.id), dir), sha2);

  // Unencrypted into encrypted: named and encrypted under the target's key.
  const e = join(dir, "e");
  await strataOk(["init", "--repo", e, "--chunk-size", "256K", "--password-file", pw2]);
  const ce = summary<CopySummary>(await strataOk(["copy", c, e, "db1", "--to-password-file", pw2, "--json"]));
  assert.equal(ce.renamed, true);
  assert.equal(await restoreSha(e, String(o1.id), dir, pw2, "other"), await sha256File(other));
  const raw = await fs.readFile(other);
  for (const f of files(e).keys())
    if (f.startsWith("/packs/"))
      assert.equal(
        (await fs.readFile(join(e, f))).indexOf(raw.subarray(MiB, MiB + 64)),
        -1,
        "the target holds no plaintext",
      );

  // Refusals.
  const f = join(dir, "f");
  await strataOk(["init", "--repo", f, "--chunk-size", "1M"]);
  const size = await strata(["copy", c, f]);
  assert.equal(size.code, 2);
  assert.match(size.stderr, /different chunk sizes .*"strata init --chunk-size 262144"/);
  const same = await strata(["copy", c, c]);
  assert.equal(same.code, 2);
  assert.match(same.stderr, /are the same repository/);
  const badPw = await strata(["copy", a, b, "--from-password-file", pw2, "--to-password-file", pw2]);
  assert.equal(badPw.code, 12);
  const noPw = await strata(["copy", c, b]);
  assert.equal(noPw.code, 12);
  assert.match(noPw.stderr, /target repository .* is encrypted: give its password with --to-password-file/);
  const noVm = await strata(["copy", c, d, "nosuchvm"]);
  assert.notEqual(noVm.code, 0);
  assert.match(noVm.stderr, /no restore points of VM "nosuchvm"/);
});
