// strata files ls / files get through the real CLI, against disk images built here: GPT and MBR
// (with logical partitions) tables, ext4 with modes, owners, times, symlinks and a file spanning
// many chunks, FAT12/16/32 with long names, an ext4 whose journal was never replayed, and the
// errors a user meets (no restore point, no path, unknown filesystem, ambiguous disk/partition).
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BIN, strata, strataOk } from "../helpers/cli.js";
import { chunkRegion, flipChunkByte } from "../helpers/stored.js";
import { describeTree, type Expected, makeDisk, makeExt4, makeFat, sh, writeAt } from "./images.js";

const MiB = 1024 * 1024;
const SECTOR = 512;
const T0 = Date.UTC(2021, 4, 6, 7, 8, 10) / 1000; // even seconds: FAT keeps 2 s steps
const isRoot = process.getuid?.() === 0;

let dir = "";
let repo = "";
let extTree = "";
let fatTree = "";
/** Owners set inside the ext4 image (the host tree's files belong to whoever runs the test). */
const OWNERS: Record<string, [number, number]> = {
  "/etc/app.conf": [1234, 5678],
  "/data": [1001, 1002],
  "/links/rel": [42, 43],
};
const LONG = `${"long-name-".repeat(12)}end.txt`;

before(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "strata-files-"));
  repo = join(dir, "repo");
  extTree = join(dir, "ext-tree");
  fatTree = join(dir, "fat-tree");

  // ext4 contents: modes, nested directories, symlinks, odd names, a file of many chunks.
  const file = async (rel: string, data: string | Buffer, mode = 0o644) => {
    const p = join(extTree, rel);
    await fs.mkdir(join(p, ".."), { recursive: true });
    await fs.writeFile(p, data);
    await fs.chmod(p, mode);
  };
  await file("etc/app.conf", "listen 8080\n", 0o640);
  await file("etc/secret", "s3cret\n", 0o600);
  await file("bin/run.sh", "#!/bin/sh\necho hi\n", 0o755);
  await file("data/big.bin", randomBytes(3 * MiB + 12345));
  await file("data/empty", "");
  await file("data/sparse.img", "");
  await fs.truncate(join(extTree, "data/sparse.img"), 8 * MiB);
  await fs.appendFile(join(extTree, "data/sparse.img"), "the end\n");
  await file("deep/a/b/c/d/leaf.txt", "leaf\n");
  await file("name with spaces & ünïcödé.txt", "unicode\n");
  await file(`deep/${LONG}`, "long\n");
  await fs.mkdir(join(extTree, "links"));
  await fs.symlink("../etc/app.conf", join(extTree, "links/rel"));
  await fs.symlink("/etc/passwd-does-not-exist", join(extTree, "links/abs"));
  await fs.symlink("../deep/a", join(extTree, "links/dir"));
  await fs.mkdir(join(extTree, "shared"));
  await fs.chmod(join(extTree, "shared"), 0o2775);
  await setTimes(extTree);

  // FAT contents: long names, nested directories.
  await fs.mkdir(join(fatTree, "EFI/Boot Loader Entries"), { recursive: true });
  await fs.writeFile(join(fatTree, "A long file name with spaces.txt"), "long fat name\n");
  await fs.writeFile(join(fatTree, "SHORT.TXT"), "short\n");
  await fs.writeFile(join(fatTree, "EFI/Boot Loader Entries/entry-number-one.conf"), randomBytes(200 * 1024));
  await setTimes(fatTree);

  // GPT disk: 1 ext4, 2 FAT32, 3 a swap signature (a type Strata does not read), 4 nothing.
  const gpt = join(dir, "gpt.img");
  await makeDisk(
    gpt,
    100 * MiB,
    "label: gpt\nstart=2048, size=40MiB, type=L\nsize=40MiB, type=U\nsize=2MiB, type=L\nsize=1MiB, type=L\n",
  );
  const ext = join(dir, "ext.img");
  await makeExt4(ext, 40 * MiB, extTree, OWNERS);
  await writeAt(gpt, 2048 * SECTOR, await fs.readFile(ext));
  const fat32 = join(dir, "fat32.img");
  await makeFat(fat32, 40 * MiB, 32, fatTree);
  await writeAt(gpt, (2048 + 40 * 2048) * SECTOR, await fs.readFile(fat32));
  await writeAt(gpt, (2048 + 80 * 2048) * SECTOR + 4086, Buffer.from("SWAPSPACE2"));

  // MBR disk: 1 FAT16, 2 extended with logical 5 (ext4) and 6 (FAT12).
  const mbr = join(dir, "mbr.img");
  await makeDisk(
    mbr,
    64 * MiB,
    "label: dos\nstart=2048, size=16MiB, type=6\nstart=34816, size=28MiB, type=5\n" +
      "start=36864, size=20MiB, type=83\nstart=79872, size=4MiB, type=1\n",
  );
  const fat16 = join(dir, "fat16.img");
  await makeFat(fat16, 16 * MiB, 16, fatTree);
  await writeAt(mbr, 2048 * SECTOR, await fs.readFile(fat16));
  const ext5 = join(dir, "ext5.img");
  await makeExt4(ext5, 20 * MiB, extTree);
  await writeAt(mbr, 36864 * SECTOR, await fs.readFile(ext5));
  const fat12 = join(dir, "fat12.img");
  await makeFat(fat12, 4 * MiB, 12, fatTree);
  await writeAt(mbr, 79872 * SECTOR, await fs.readFile(fat12));

  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  await strataOk(["backup", "--repo", repo, "--vm", "multi", `file:${gpt},name=gpt`, `file:${mbr},name=mbr`]);
  await strataOk(["backup", "--repo", repo, "--vm", "one", `file:${gpt},name=root`]);
});

after(async () => {
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

/** Gives every entry of a tree a distinct, even-second mtime (directories last). */
async function setTimes(root: string): Promise<void> {
  let n = 0;
  const visit = async (p: string) => {
    const st = await fs.lstat(p);
    if (st.isDirectory()) for (const name of (await fs.readdir(p)).sort()) await visit(join(p, name));
    const t = T0 + 2 * n++;
    await fs.lutimes(p, t, t);
  };
  await visit(root);
}

function json<T>(stdout: string): T {
  return JSON.parse(stdout) as T;
}

/** The expected ext4 tree: the host tree with the owners set inside the image. */
async function expectedExt(): Promise<Map<string, Expected>> {
  const want = await describeTree(extTree, isRoot);
  if (isRoot) {
    for (const e of want.values()) Object.assign(e, { uid: 0, gid: 0 });
    for (const [p, [uid, gid]] of Object.entries(OWNERS)) Object.assign(want.get(p.slice(1))!, { uid, gid });
  }
  return want;
}

test("files ls lists GPT and MBR partitions (logical ones too) with their filesystems", async () => {
  const r = await strataOk(["files", "ls", "--repo", repo, "multi/latest", "--json"]);
  const doc = json<{
    disks: Array<{ disk: string; scheme: string; partitions: Array<Record<string, unknown>> }>;
  }>(r.stdout);
  const brief = doc.disks.map((d) => ({
    disk: d.disk,
    scheme: d.scheme,
    parts: d.partitions.map((p) => [p.number, p.start, p.size, p.filesystem]),
  }));
  assert.deepEqual(brief, [
    {
      disk: "gpt",
      scheme: "gpt",
      parts: [
        [1, 1 * MiB, 40 * MiB, "ext4"],
        [2, 41 * MiB, 40 * MiB, "vfat"],
        [3, 81 * MiB, 2 * MiB, "swap"],
        [4, 83 * MiB, 1 * MiB, null],
      ],
    },
    {
      disk: "mbr",
      scheme: "mbr",
      parts: [
        [1, 1 * MiB, 16 * MiB, "vfat"],
        [2, 17 * MiB, 28 * MiB, null],
        [5, 18 * MiB, 20 * MiB, "ext4"],
        [6, 39 * MiB, 4 * MiB, "vfat"],
      ],
    },
  ]);
  assert.equal(doc.disks[0]!.partitions[1]!.typeName, "EFI System");
  const text = await strataOk(["files", "ls", "--repo", repo, "multi/latest", "mbr"]);
  assert.match(text.stdout, /mbr:5 .* Linux .* ext4/);
});

test("files get restores an ext4 tree exactly: bytes, modes, owners, times, symlinks", async (t) => {
  const out = join(dir, "get-ext");
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  const r = await strataOk([
    "files",
    "get",
    "--repo",
    repo,
    "multi/latest",
    "/",
    "--disk",
    "gpt:1",
    "--to",
    out,
    "--json",
    ...(isRoot ? ["--same-owner"] : []),
    "--keep-setuid",
  ]);
  const s = json<Record<string, number>>(r.stdout.trim().split("\n").at(-1)!);
  assert.equal(s.type as unknown, "summary");
  assert.equal(s.symlinks, 3);
  const got = await describeTree(out, isRoot);
  assert.equal(got.get("lost+found")?.mode, 0o700);
  got.delete("lost+found");
  assert.deepEqual(got, await expectedExt());

  // A sparse file comes back sparse.
  const sparse = await fs.stat(join(out, "data/sparse.img"));
  assert.equal(sparse.size, 8 * MiB + 8);
  assert.ok(sparse.blocks * 512 < 1 * MiB, `${sparse.blocks} blocks allocated`);

  // A single file and a directory, by their last names.
  const one = join(dir, "get-one");
  t.after(() => fs.rm(one, { recursive: true, force: true }));
  await strataOk([
    "files",
    "get",
    "--repo",
    repo,
    "multi/latest",
    "/data/big.bin",
    "/deep",
    "--disk",
    "gpt:1",
    "--to",
    one,
  ]);
  assert.deepEqual((await fs.readdir(one)).sort(), ["big.bin", "deep"]);
  assert.deepEqual(await fs.readFile(join(one, "big.bin")), await fs.readFile(join(extTree, "data/big.bin")));
  // Existing files are not replaced without --overwrite.
  const again = await strata([
    "files",
    "get",
    "--repo",
    repo,
    "multi/latest",
    "/data/big.bin",
    "--disk",
    "gpt:1",
    "--to",
    one,
  ]);
  assert.equal(again.code, 1, again.stderr);
  assert.match(again.stderr, /big\.bin exists/);
  await strataOk([
    "files",
    "get",
    "--repo",
    repo,
    "multi/latest",
    "/data/big.bin",
    "--disk",
    "gpt:1",
    "--to",
    one,
    "--overwrite",
  ]);
});

test("files get --tar streams the same tree, and tar extracts it exactly", async (t) => {
  const out = join(dir, "tar-ext");
  await fs.mkdir(out);
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  const child = spawn(
    process.execPath,
    [BIN, "files", "get", "--repo", repo, "one/latest", "/", "--disk", "root:1", "--tar"],
    {
      stdio: ["ignore", "pipe", "pipe"],
    },
  );
  const tar = spawn("tar", ["-x", "--numeric-owner", "-p", "-f", "-", "-C", out], {
    stdio: ["pipe", "ignore", "pipe"],
  });
  child.stdout!.pipe(tar.stdin!);
  let err = "";
  child.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  tar.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  const [c1, c2] = await Promise.all([
    new Promise((r) => child.on("close", r)),
    new Promise((r) => tar.on("close", r)),
  ]);
  assert.equal(c1, 0, err);
  assert.equal(c2, 0, err);
  const got = await describeTree(out, isRoot);
  got.delete("lost+found");
  const want = await expectedExt();
  // tar sets the extraction directory's children only; the archive has no entry for "/" itself.
  assert.deepEqual(got, want);
});

test("FAT32, FAT16 and FAT12 read with long names, contents and times", async (t) => {
  const want = await describeTree(fatTree, false);
  for (const [where, vm] of [
    ["gpt:2", "multi"],
    ["mbr:1", "multi"],
    ["mbr:6", "multi"],
  ] as const) {
    const ls = json<{ filesystem: string; entries: Array<{ name: string; kind: string }> }>(
      (await strataOk(["files", "ls", "--repo", repo, `${vm}/latest`, where, "/", "--json"])).stdout,
    );
    assert.equal(ls.filesystem, "vfat");
    assert.deepEqual(
      ls.entries.map((e) => `${e.kind}:${e.name}`),
      ["file:A long file name with spaces.txt", "directory:EFI", "file:SHORT.TXT"],
    );
    const out = join(dir, `fat-${where.replace(":", "-")}`);
    t.after(() => fs.rm(out, { recursive: true, force: true }));
    await strataOk(["files", "get", "--repo", repo, `${vm}/latest`, "/", "--disk", where, "--to", out]);
    const got = await describeTree(out, false);
    // FAT keeps no modes: compare what it does keep.
    const strip = (m: Map<string, Expected>) =>
      [...m].map(([p, e]) => [p, e.kind, e.sha256, e.kind === "file" ? e.mtime : 0]);
    assert.deepEqual(strip(got), strip(want), where);
  }
  // Lookups are case-insensitive, as on FAT.
  const one = await strataOk([
    "files",
    "ls",
    "--repo",
    repo,
    "multi/latest",
    "gpt:2",
    "/efi/BOOT LOADER ENTRIES",
    "--json",
  ]);
  assert.equal(json<{ entries: Array<{ size: number }> }>(one.stdout).entries[0]!.size, 200 * 1024);
});

test("an ext4 whose journal was never replayed reads as after recovery", async (t) => {
  const d = join(dir, "crash");
  await fs.mkdir(join(d, "src/dir"), { recursive: true });
  t.after(() => fs.rm(d, { recursive: true, force: true }));
  await fs.writeFile(join(d, "src/dir/old.txt"), "before the crash\n");
  const base = join(d, "base.img");
  const after = join(d, "after.img");
  await makeExt4(base, 32 * MiB, join(d, "src"));
  await fs.copyFile(base, after);
  // The guest's last transaction: a new file and a rewritten one, made on a copy...
  const payload = randomBytes(300 * 1024);
  await fs.writeFile(join(d, "payload"), payload);
  await fs.writeFile(join(d, "newold"), "after the crash\n");
  await sh("debugfs", ["-w", "-R", `write ${join(d, "payload")} dir/journaled.bin`, after]);
  await sh("debugfs", ["-w", "-R", "rm dir/old.txt", after]);
  await sh("debugfs", ["-w", "-R", `write ${join(d, "newold")} dir/old.txt`, after]);
  // ...then written to base's journal only (committed, checksummed v3 like the kernel's), as a
  // crash right after the commit leaves it: needs_recovery set, the blocks not yet in place.
  const a = await fs.readFile(base);
  const b = await fs.readFile(after);
  const changed: number[] = [];
  for (let i = 0; i < a.length / 4096; i++)
    if (!a.subarray(i * 4096, (i + 1) * 4096).equals(b.subarray(i * 4096, (i + 1) * 4096))) changed.push(i);
  await fs.writeFile(
    join(d, "blocks"),
    Buffer.concat(changed.map((i) => b.subarray(i * 4096, (i + 1) * 4096))),
  );
  await fs.writeFile(join(d, "cmds"), `jo -c -v 3\njw -b ${changed.join(",")} ${join(d, "blocks")}\njc\n`);
  await sh("debugfs", ["-w", "-f", join(d, "cmds"), base]);
  assert.match(await sh("dumpe2fs", ["-h", base]), /needs_recovery/);
  assert.doesNotMatch(
    await sh("debugfs", ["-R", "ls /dir", base]),
    /journaled\.bin/,
    "the file is only in the journal",
  );

  await strataOk(["backup", "--repo", repo, "--vm", "crash", `file:${base},name=data`]);
  const out = join(d, "out");
  await strataOk(["files", "get", "--repo", repo, "crash/latest", "/dir", "--to", out]);
  assert.deepEqual(await fs.readFile(join(out, "dir/journaled.bin")), payload);
  assert.equal(await fs.readFile(join(out, "dir/old.txt"), "utf8"), "after the crash\n");
  const ls = await strataOk(["files", "ls", "--repo", repo, "crash/latest", "--json"]);
  assert.equal(json<{ disks: Array<{ scheme: string }> }>(ls.stdout).disks[0]!.scheme, "none");
});

test("errors: no restore point, no path, unknown filesystem, ambiguous disk or partition", async () => {
  const fail = async (args: string[], code: string, pattern: RegExp) => {
    const r = await strata(["files", ...args, "--repo", repo, "--json"]);
    assert.notEqual(r.code, 0);
    const e = json<{ code: string; message: string }>(r.stderr.trim().split("\n").at(-1)!);
    assert.equal(e.code, code, e.message);
    assert.match(e.message, pattern);
  };
  await fail(["ls", "nope/latest", "/"], "NOT_FOUND", /no restore points of VM "nope"/);
  await fail(
    ["ls", "one/2020-01-01T00:00:00Z", "/"],
    "NOT_FOUND",
    /no restore point one\/2020-01-01T00:00:00Z/,
  );
  await fail(
    ["ls", "one/latest", "root:1", "/etc/nope"],
    "NOT_FOUND",
    /\/etc\/nope: no such file or directory .*ext4/,
  );
  await fail(["ls", "one/latest", "root:1", "/etc/app.conf/x"], "NOT_FOUND", /\/etc\/app\.conf\/x/);
  await fail(["ls", "one/latest", "root:2", "/nope"], "NOT_FOUND", /\/nope: no such file/);
  await fail(
    ["get", "one/latest", "/etc/nope", "--disk", "root:1", "--to", join(dir, "x")],
    "NOT_FOUND",
    /\/etc\/nope/,
  );
  await fail(
    ["ls", "one/latest", "root:3", "/"],
    "USAGE",
    /partition 3 holds swap, which Strata cannot read/,
  );
  await fail(["ls", "one/latest", "root:4", "/"], "USAGE", /no filesystem Strata knows/);
  await fail(["ls", "one/latest", "root:9", "/"], "NOT_FOUND", /no partition 9; it has: root:1 .*root:4/);
  await fail(
    ["ls", "one/latest", "/"],
    "USAGE",
    /4 partitions, say which: root:1 \(Linux filesystem, 40\.0 MiB, ext4\)/,
  );
  await fail(["ls", "multi/latest", "/"], "USAGE", /2 disks \(gpt, mbr\)/);
  await fail(["ls", "multi/latest", "sdz:1", "/"], "NOT_FOUND", /no disk "sdz"/);
  assert.equal((await fs.stat(join(dir, "x")).catch(() => undefined)) === undefined, true, "nothing written");
});

test("journal replay honours revoke records, as e2fsck's recovery does", async (t) => {
  const d = join(dir, "revoke");
  await fs.mkdir(join(d, "src/dir"), { recursive: true });
  t.after(() => fs.rm(d, { recursive: true, force: true }));
  await fs.writeFile(join(d, "src/dir/old.txt"), "old\n");
  const base = join(d, "base.img");
  const after = join(d, "after.img");
  await makeExt4(base, 32 * MiB, join(d, "src"));
  await fs.copyFile(base, after);
  await fs.writeFile(join(d, "payload"), randomBytes(50 * 1024));
  await sh("debugfs", ["-w", "-R", `write ${join(d, "payload")} dir/new.bin`, after]);
  const dirBlock = Number(/\(0\):(\d+)/.exec(await sh("debugfs", ["-R", "stat /dir", after]))![1]);
  const a = await fs.readFile(base);
  const b = await fs.readFile(after);
  const changed: number[] = [];
  for (let i = 0; i < a.length / 4096; i++)
    if (!a.subarray(i * 4096, (i + 1) * 4096).equals(b.subarray(i * 4096, (i + 1) * 4096))) changed.push(i);
  assert.ok(changed.includes(dirBlock));
  await fs.writeFile(
    join(d, "blocks"),
    Buffer.concat(changed.map((i) => b.subarray(i * 4096, (i + 1) * 4096))),
  );
  await fs.writeFile(join(d, "garbage"), Buffer.alloc(4096, 0xaa));
  // T1 the new file; T2 garbage over the directory block; T3 revokes that block, which cancels
  // both earlier copies of it: recovery leaves the directory as it was before T1.
  await fs.writeFile(
    join(d, "cmds"),
    `jo -c -v 3\njw -b ${changed.join(",")} ${join(d, "blocks")}\n` +
      `jw -b ${dirBlock} ${join(d, "garbage")}\njw -r ${dirBlock} ${join(d, "garbage")}\njc\n`,
  );
  await sh("debugfs", ["-w", "-f", join(d, "cmds"), base]);
  // The oracle: e2fsck's own journal recovery on a copy.
  const fsck = join(d, "fsck.img");
  await fs.copyFile(base, fsck);
  await sh("e2fsck", ["-E", "journal_only", "-y", fsck]);
  const oracle = (await sh("debugfs", ["-R", "ls /dir", fsck]))
    .split(/\s+/)
    .filter((n) => /\.(txt|bin)$/.test(n));
  assert.deepEqual(oracle, ["old.txt"]);

  await strataOk(["backup", "--repo", repo, "--vm", "revoke", `file:${base},name=data`]);
  const ls = json<{ entries: Array<{ name: string }> }>(
    (await strataOk(["files", "ls", "--repo", repo, "revoke/latest", "/dir", "--json"])).stdout,
  );
  assert.deepEqual(
    ls.entries.map((e) => e.name),
    oracle,
  );
});

// Last: it damages a chunk that other tests' restore points share.
test("a damaged chunk fails files get with DATA_CORRUPT and leaves no partial file", async (t) => {
  // Where the 2nd MiB of /data/big.bin lies on the disk, and which chunk holds it.
  const bmap = await sh("debugfs", ["-R", "bmap /data/big.bin 256", join(dir, "ext.img")]);
  const offset = 1 * MiB + Number(bmap.trim()) * 4096;
  const snaps = json<Array<{ vm: string; time: string }>>(
    (await strataOk(["snapshots", "--repo", repo, "--json"])).stdout,
  );
  const snap = snaps.find((s) => s.vm === "one")!;
  const index = await fs.readFile(join(repo, "vms", "one", snap.time, "root.fidx"));
  const i = Math.floor(offset / (64 * 1024));
  const digest = index.subarray(64 + 32 * i, 96 + 32 * i).toString("hex");
  await flipChunkByte(await chunkRegion(repo, digest), -1, 0xff);

  const out = join(dir, "damaged");
  t.after(() => fs.rm(out, { recursive: true, force: true }));
  const r = await strata([
    "files",
    "get",
    "--repo",
    repo,
    "one/latest",
    "/data",
    "--disk",
    "root:1",
    "--to",
    out,
    "--json",
  ]);
  assert.equal(r.code, 3, r.stderr);
  assert.equal(json<{ code: string }>(r.stderr.trim().split("\n").at(-1)!).code, "DATA_CORRUPT");
  assert.equal(await fs.stat(join(out, "data/big.bin")).catch(() => undefined), undefined);
  // Other files of the same restore point still read.
  await strataOk([
    "files",
    "get",
    "--repo",
    repo,
    "one/latest",
    "/etc/app.conf",
    "--disk",
    "root:1",
    "--to",
    out,
  ]);
});
