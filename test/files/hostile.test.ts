// A hostile guest against `strata files get`: every attack is built here from scratch (ext4 from
// host trees with mkfs.ext4 -d and debugfs, FAT with mkfs.vfat and mcopy, then byte patches),
// backed up, and restored; each test snapshots the host around the target (every entry's kind,
// mode, owner, size, mtime, bytes, link target) before and after, and asserts that nothing
// outside the target was created, changed or deleted.
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, test } from "node:test";
import { BIN, strata, strataOk } from "../helpers/cli.js";
import { sh, writeAt } from "./images.js";

const MiB = 1024 * 1024;
const isRoot = process.getuid?.() === 0;

let dir = "";
let repo = "";
/** Host files a guest would like to reach: /etc/passwd, a file, a directory. */
let sentinel = "";
let targets = 0;
const ESCAPES = "\x1b]0;pwned\x07\x1b[2Jevil\nname\u202etxt";

before(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "strata-hostile-"));
  repo = join(dir, "repo");
  sentinel = join(dir, "host");
  await fs.mkdir(join(sentinel, "etc"), { recursive: true });
  await fs.writeFile(join(sentinel, "etc/passwd"), "root:x:0:0::/root:/bin/sh\n");
  await fs.writeFile(join(sentinel, "important"), "host data\n");
  await fs.chmod(join(sentinel, "important"), 0o600);

  // evil1: symlinks into the host where directories and files will later be, setuid and setgid
  // entries owned by guest users, a root directory of mode 1777.
  const t1 = join(dir, "tree1");
  await fs.mkdir(join(t1, "data"), { recursive: true });
  await fs.mkdir(join(t1, "bin"));
  await fs.symlink(join(sentinel, "etc"), join(t1, "etc"));
  await fs.symlink(join(sentinel, "important"), join(t1, "data/link"));
  await fs.writeFile(join(t1, "bin/su"), "#!/bin/sh\nexec /bin/sh\n");
  await fs.chmod(join(t1, "bin/su"), 0o4755);
  await fs.mkdir(join(t1, "shared"));
  await fs.chmod(join(t1, "shared"), 0o2775);
  // Names and a link target that would retitle and clear a terminal, and break a line.
  await fs.writeFile(join(t1, ESCAPES), "escapes\n");
  await fs.symlink("\x1b[31mred\x1b[0m", join(t1, "esc-link"));
  await ext4(join(dir, "evil1.img"), t1, [
    "sif / mode 041777",
    "sif /bin/su uid 1234",
    "sif /bin/su gid 1234",
    "sif /shared gid 4321",
  ]);
  // evil2: the same names as real directories and files, so that a restore of evil2 over
  // evil1's would write through evil1's symlinks if it followed them.
  const t2 = join(dir, "tree2");
  await fs.mkdir(join(t2, "etc"), { recursive: true });
  await fs.mkdir(join(t2, "data"));
  await fs.writeFile(join(t2, "etc/passwd"), "guest:x:0:0::/:/bin/sh\n");
  await fs.writeFile(join(t2, "data/link"), "guest data\n");
  await ext4(join(dir, "evil2.img"), t2);

  // fat: a long name patched to "../escaped.tx" (13 characters, one LFN entry), beside a good file.
  const tf = join(dir, "fat-tree");
  await fs.mkdir(tf);
  await fs.writeFile(join(tf, "abcdefghij.tx"), "escaped\n");
  await fs.writeFile(join(tf, "ok.txt"), "ok\n");
  const fat = join(dir, "fat.img");
  await fs.writeFile(fat, "");
  await fs.truncate(fat, 16 * MiB);
  await sh("mkfs.vfat", ["-F", "16", fat]);
  await sh("mcopy", ["-i", fat, join(tf, "abcdefghij.tx"), join(tf, "ok.txt"), "::/"]);
  await patchLongName(fat, "abcdefghij.tx", "../escaped.tx");

  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  for (const vm of ["evil1", "evil2", "fat"])
    await strataOk(["backup", "--repo", repo, "--vm", vm, `file:${join(dir, `${vm}.img`)},name=disk`]);
});

after(async () => {
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

/** An ext4 image of `tree`, then debugfs commands on it. */
async function ext4(image: string, tree: string, cmds: string[] = [], features = ""): Promise<void> {
  await fs.writeFile(image, "");
  await fs.truncate(image, 16 * MiB);
  await sh("mkfs.ext4", ["-q", "-F", "-b", "4096", ...(features ? ["-O", features] : []), "-d", tree, image]);
  if (cmds.length > 0) {
    await fs.writeFile(`${image}.cmds`, `${cmds.join("\n")}\n`);
    await sh("debugfs", ["-w", "-f", `${image}.cmds`, image]);
    await fs.rm(`${image}.cmds`);
  }
}

/** Rewrites the 13 characters of the one VFAT long-name entry holding `from` (13 characters). */
async function patchLongName(image: string, from: string, to: string): Promise<void> {
  assert.equal(from.length, 13);
  assert.equal(to.length, 13);
  const data = await fs.readFile(image);
  const at = data.indexOf(Buffer.from(from.slice(0, 5), "utf16le")) - 1;
  assert.ok(at > 0 && data[at] === 0x41 && data[at + 11] === 0x0f, "the long-name entry");
  const u = Buffer.from(to, "utf16le");
  u.copy(data, at + 1, 0, 10);
  u.copy(data, at + 14, 10, 22);
  u.copy(data, at + 28, 22, 26);
  await writeAt(image, at, data.subarray(at, at + 32));
}

/** Everything under `root` but `skip` (absolute paths): what must not change. */
async function snapshot(root: string, skip: string[]): Promise<Map<string, string>> {
  const out = new Map<string, string>();
  const visit = async (p: string) => {
    if (skip.includes(p)) return;
    const st = await fs.lstat(p);
    let what = `${st.mode.toString(8)} ${st.uid}:${st.gid} ${st.size} ${st.mtimeMs} ${st.ctimeMs} ${st.nlink}`;
    if (st.isSymbolicLink()) what += ` -> ${await fs.readlink(p)}`;
    if (st.isFile())
      what += ` ${createHash("sha256")
        .update(await fs.readFile(p))
        .digest("hex")}`;
    out.set(p, what);
    if (st.isDirectory()) for (const name of (await fs.readdir(p)).sort()) await visit(join(p, name));
  };
  await visit(root);
  return out;
}

/** A new, empty target directory (0700) and a snapshot of the host around it. */
async function target(): Promise<{ to: string; unchanged: () => Promise<void> }> {
  const to = join(dir, `target-${++targets}`);
  await fs.mkdir(to, { mode: 0o700 });
  const skip = [repo, to];
  const before = await snapshot(dir, skip);
  return {
    to,
    unchanged: async () => {
      assert.deepEqual(await snapshot(dir, skip), before, "nothing outside the target changed");
      // Above `dir`, only what a guest's names could reach.
      assert.equal(await fs.stat(join(tmpdir(), "escaped.tx")).catch(() => undefined), undefined);
    },
  };
}

function get(vm: string, paths: string[], to: string, ...flags: string[]) {
  return strata(["files", "get", "--repo", repo, `${vm}/latest`, ...paths, "--to", to, ...flags]);
}

test("a guest's symlinks are restored as symlinks and never written through, with or without --overwrite", async () => {
  const { to, unchanged } = await target();
  // evil1 plants etc -> HOST/etc and data/link -> HOST/important in the target.
  const r1 = await get("evil1", ["/"], to);
  assert.equal(r1.code, 0, r1.stderr);
  assert.equal(await fs.readlink(join(to, "etc")), join(sentinel, "etc"));
  assert.equal(await fs.readlink(join(to, "data/link")), join(sentinel, "important"));
  // evil2 has etc/passwd and data/link as real entries. Without --overwrite: refused.
  const r2 = await get("evil2", ["/"], to);
  assert.equal(r2.code, 1, r2.stderr);
  assert.match(r2.stderr, /data\/link exists: not replacing it \(use --overwrite\)/);
  await unchanged();
  // With --overwrite: the symlinks are replaced (the links, not what they point at).
  const r3 = await get("evil2", ["/"], to, "--overwrite");
  assert.equal(r3.code, 0, r3.stderr);
  assert.ok((await fs.lstat(join(to, "etc"))).isDirectory());
  assert.equal(await fs.readFile(join(to, "etc/passwd"), "utf8"), "guest:x:0:0::/:/bin/sh\n");
  assert.equal(await fs.readFile(join(to, "data/link"), "utf8"), "guest data\n");
  assert.ok((await fs.lstat(join(to, "data/link"))).isFile());
  // And back: evil1 over evil2 with --overwrite puts the symlinks back as symlinks.
  const r4 = await get("evil1", ["/data"], to, "--overwrite");
  assert.equal(r4.code, 0, r4.stderr);
  assert.equal(await fs.readlink(join(to, "data/link")), join(sentinel, "important"));
  await unchanged();
});

test("symlinks already in the target (to a host file, to a host directory) are replaced, never followed", async () => {
  const { to, unchanged } = await target();
  await fs.symlink(join(sentinel, "etc"), join(to, "etc"));
  await fs.mkdir(join(to, "data"));
  await fs.symlink(join(sentinel, "important"), join(to, "data/link"));
  const before = await snapshot(sentinel, []);
  // data/link -> HOST/important, and the guest's data/link is a file: --overwrite replaces the
  // link, it does not write the guest's bytes into HOST/important.
  const r0 = await get("evil2", ["/data"], to, "--overwrite");
  assert.equal(r0.code, 0, r0.stderr);
  assert.ok((await fs.lstat(join(to, "data/link"))).isFile());
  assert.deepEqual(await snapshot(sentinel, []), before);
  await fs.rm(join(to, "data/link"));
  await fs.symlink(join(sentinel, "important"), join(to, "data/link"));
  const r = await get("evil2", ["/etc", "/data"], to);
  assert.equal(r.code, 1);
  assert.match(r.stderr, /etc exists and is not a directory/);
  const r2 = await get("evil2", ["/etc", "/data"], to, "--overwrite");
  assert.equal(r2.code, 0, r2.stderr);
  assert.equal(await fs.readFile(join(to, "etc/passwd"), "utf8"), "guest:x:0:0::/:/bin/sh\n");
  assert.ok((await fs.lstat(join(to, "data/link"))).isFile());
  assert.deepEqual(await snapshot(sentinel, []), before);
  await unchanged();
});

test("a FAT long name holding ../ is skipped with a warning, in a directory and in a tar", async () => {
  const { to, unchanged } = await target();
  const ls = await strataOk(["files", "ls", "--repo", repo, "fat/latest", "/", "--json"]);
  const entries = (JSON.parse(ls.stdout) as { entries: Array<{ name: string; invalid?: string }> }).entries;
  assert.deepEqual(
    entries.map((e) => [e.name, e.invalid]),
    [
      ["../escaped.tx", 'a name containing "/"'],
      ["ok.txt", undefined],
    ],
  );
  const r = await get("fat", ["/"], to);
  assert.equal(r.code, 0, r.stderr);
  assert.match(r.stderr, /warning: \/\.\.\/escaped\.tx: a name containing "\/"; skipped/);
  assert.match(r.stdout, /skipped 1 entries/);
  assert.deepEqual(await fs.readdir(to), ["ok.txt"]);
  assert.equal(await fs.stat(join(dir, "escaped.tx")).catch(() => undefined), undefined);
  await unchanged();

  // The same name in a tar stream: skipped, warned, every member name relative and clean.
  const child = spawn(process.execPath, [BIN, "files", "get", "--repo", repo, "fat/latest", "/", "--tar"], {
    stdio: ["ignore", "pipe", "pipe"],
  });
  const chunks: Buffer[] = [];
  let err = "";
  child.stdout!.on("data", (d: Buffer) => chunks.push(d));
  child.stderr!.on("data", (d: Buffer) => {
    err += d.toString();
  });
  assert.equal(await new Promise((res) => child.on("close", res)), 0, err);
  assert.match(err, /escaped\.tx: a name containing "\/"; skipped/);
  await fs.writeFile(join(to, "..", `fat-${targets}.tar`), Buffer.concat(chunks));
  const members = (await sh("tar", ["-tf", join(to, "..", `fat-${targets}.tar`)])).trim().split("\n");
  await fs.rm(join(to, "..", `fat-${targets}.tar`));
  assert.deepEqual(members, ["ok.txt"]);
});

test("setuid/setgid bits and guest owners only on request; the target keeps its own mode", async () => {
  const { to, unchanged } = await target();
  await fs.chmod(to, 0o750);
  const r = await get("evil1", ["/"], to, "--json");
  assert.equal(r.code, 0, r.stderr);
  const s = JSON.parse(r.stdout.trim().split("\n").at(-1)!) as { setuidDropped: number };
  assert.equal(s.setuidDropped, 2);
  const su = await fs.stat(join(to, "bin/su"));
  assert.equal(su.mode & 0o7777, 0o755);
  assert.equal(su.uid, process.getuid!());
  assert.equal((await fs.stat(join(to, "shared"))).mode & 0o7777, 0o775);
  // The guest's root is 1777: the target is not made world-writable.
  assert.equal((await fs.stat(to)).mode & 0o7777, 0o750);
  await unchanged();

  const { to: to2 } = await target();
  const kept = await get(
    "evil1",
    ["/bin", "/shared"],
    to2,
    "--keep-setuid",
    ...(isRoot ? ["--same-owner"] : []),
  );
  assert.equal(kept.code, 0, kept.stderr);
  const su2 = await fs.stat(join(to2, "bin/su"));
  assert.equal(su2.mode & 0o7777, 0o4755);
  assert.equal((await fs.stat(join(to2, "shared"))).mode & 0o7777, 0o2775);
  if (isRoot) {
    assert.equal(su2.uid, 1234);
    assert.equal((await fs.stat(join(to2, "shared"))).gid, 4321);
  }
});

test("targets another user could swap are refused; a missing one is created 0700", async () => {
  const { to, unchanged } = await target();
  await fs.chmod(to, 0o777);
  const r = await get("evil2", ["/etc"], to, "--json");
  assert.equal(r.code, 1);
  assert.match(r.stderr, /TARGET_CONFLICT.*writable by every user/);
  await fs.chmod(to, 0o700);
  await fs.symlink(sentinel, join(to, "link"));
  const r2 = await get("evil2", ["/etc"], join(to, "link"));
  assert.equal(r2.code, 1);
  assert.match(r2.stderr, /is a symlink/);
  const r3 = await get("evil2", ["/etc"], join(to, "new/deeper"));
  assert.equal(r3.code, 0, r3.stderr);
  assert.equal((await fs.stat(join(to, "new/deeper"))).mode & 0o7777, 0o700);
  await unchanged();
});

test("files ls prints guest names with terminal escapes escaped; --json keeps them exact", async () => {
  const text = await strataOk(["files", "ls", "--repo", repo, "evil1/latest", "/"]);
  assert.doesNotMatch(text.stdout, /[\x00-\x08\x0b-\x1f\x7f\u202e]/, "no control characters but line ends");
  assert.equal(text.stdout.trim().split("\n").length, 7, text.stdout); // one line per entry
  assert.match(text.stdout, / \\e\]0;pwned\\x07\\e\[2Jevil\\nname\\u\{202e\}txt$/m);
  assert.match(text.stdout, /esc-link -> \\e\[31mred\\e\[0m$/m);
  const json = await strataOk(["files", "ls", "--repo", repo, "evil1/latest", "/", "--json"]);
  const entries = (JSON.parse(json.stdout) as { entries: Array<{ name: string; target?: string }> }).entries;
  assert.ok(entries.some((e) => e.name === ESCAPES));
  assert.equal(entries.find((e) => e.name === "esc-link")?.target, "\x1b[31mred\x1b[0m");
});
