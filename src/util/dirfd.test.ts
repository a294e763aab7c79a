import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { DirHandle, openTargetDir } from "./dirfd.js";
import { ErrorCode, isStrataError } from "./errors.js";

const isRoot = process.getuid?.() === 0;

async function scratch(t: { after: (fn: () => Promise<void>) => void }): Promise<string> {
  const d = await fs.mkdtemp(join(tmpdir(), "strata-dirfd-"));
  t.after(() => fs.rm(d, { recursive: true, force: true }));
  return d;
}

const conflict = (pattern: RegExp) => (err: unknown) =>
  isStrataError(err, ErrorCode.TARGET_CONFLICT) && pattern.test(err.message);

test("openTargetDir creates a missing target 0700 and leaves an existing one's mode alone", async (t) => {
  const d = await scratch(t);
  const made = await openTargetDir(join(d, "a/b/target"));
  await made.dir.close();
  assert.equal(made.created, true);
  assert.equal((await fs.stat(join(d, "a/b/target"))).mode & 0o7777, 0o700);
  assert.equal((await fs.stat(join(d, "a/b"))).mode & 0o077, 0, "parents it creates are private too");
  await fs.mkdir(join(d, "mine"), { mode: 0o751 });
  await fs.chmod(join(d, "mine"), 0o751);
  const again = await openTargetDir(join(d, "mine"));
  await again.dir.close();
  assert.equal(again.created, false);
  assert.equal((await fs.stat(join(d, "mine"))).mode & 0o7777, 0o751);
});

test("openTargetDir refuses targets another user could swap or fill", async (t) => {
  const d = await scratch(t);
  // World-writable target.
  await fs.mkdir(join(d, "open"));
  await fs.chmod(join(d, "open"), 0o777);
  await assert.rejects(openTargetDir(join(d, "open")), conflict(/writable by every user/));
  await fs.chmod(join(d, "open"), 0o1777);
  await assert.rejects(openTargetDir(join(d, "open")), conflict(/writable by every user/));
  // Group-writable target.
  await fs.mkdir(join(d, "group"));
  await fs.chmod(join(d, "group"), 0o770);
  await assert.rejects(openTargetDir(join(d, "group")), conflict(/writable by group/));
  // A parent others can write without the sticky bit: they could rename the target away.
  await fs.mkdir(join(d, "shared"));
  await fs.chmod(join(d, "shared"), 0o777);
  await assert.rejects(openTargetDir(join(d, "shared/target")), conflict(/could be swapped for a symlink/));
  assert.equal(await fs.stat(join(d, "shared/target")).catch(() => undefined), undefined, "nothing created");
  // With the sticky bit (as /tmp), a target of our own is fine.
  await fs.chmod(join(d, "shared"), 0o1777);
  const ok = await openTargetDir(join(d, "shared/target"));
  await ok.dir.close();
  // A symlink as the target, or a file.
  await fs.mkdir(join(d, "real"), { mode: 0o700 });
  await fs.symlink(join(d, "real"), join(d, "link"));
  await assert.rejects(openTargetDir(join(d, "link")), conflict(/is a symlink/));
  await fs.writeFile(join(d, "file"), "x");
  await assert.rejects(openTargetDir(join(d, "file")), conflict(/not a directory/));
  if (isRoot) {
    // Owned by another user, who could put anything in it at any time.
    await fs.mkdir(join(d, "theirs"), { mode: 0o700 });
    await fs.chown(join(d, "theirs"), 4242, 4242);
    await assert.rejects(openTargetDir(join(d, "theirs")), conflict(/belongs to uid 4242/));
    await fs.chown(join(d, "shared"), 4242, 4242);
    await assert.rejects(openTargetDir(join(d, "shared/target")), conflict(/belongs to uid 4242/));
  }
});

test("DirHandle never follows a symlink in the final component", async (t) => {
  const d = await scratch(t);
  const outside = join(d, "outside");
  await fs.mkdir(outside);
  await fs.writeFile(join(outside, "victim"), "keep");
  const target = join(d, "target");
  await fs.mkdir(target, { mode: 0o700 });
  await fs.symlink(join(outside, "victim"), join(target, "file"));
  await fs.symlink(outside, join(target, "dir"));
  const dir = await DirHandle.open(target);
  t.after(() => dir.close());
  await assert.rejects(dir.createFile("file"), conflict(/exists/));
  await assert.rejects(dir.openDir("dir"), conflict(/is a symlink, not a directory/));
  await assert.rejects(dir.mkdir("dir"), conflict(/exists/));
  for (const bad of ["../outside", "..", ".", "a/b", ""])
    await assert.rejects(dir.createFile(bad), (e: unknown) => isStrataError(e, ErrorCode.INTERNAL));
  // Replacing a symlink by rename replaces the link, not what it points at.
  const fh = await dir.createFile("new");
  await fh.writeFile("guest");
  await fh.close();
  await dir.rename("new", "file");
  await dir.unlink("dir");
  assert.equal(await fs.readFile(join(outside, "victim"), "utf8"), "keep");
  assert.equal(await fs.readFile(join(target, "file"), "utf8"), "guest");
  assert.deepEqual(await fs.readdir(outside), ["victim"]);
  // A directory renamed away and replaced by a symlink after lookup is caught by the inode check:
  // here, simply, the handle keeps pointing at the directory it opened, not at the new path.
  await fs.mkdir(join(target, "sub"));
  const sub = await dir.openDir("sub");
  await fs.rename(join(target, "sub"), join(target, "moved"));
  await fs.symlink(outside, join(target, "sub"));
  const f2 = await sub.createFile("inside");
  await f2.close();
  await sub.close();
  assert.deepEqual(await fs.readdir(outside), ["victim"]);
  assert.deepEqual(await fs.readdir(join(target, "moved")), ["inside"]);
});

test("openTargetDir refuses a target reached through a directory another user could change", async (t) => {
  const d = await scratch(t);
  await fs.mkdir(join(d, "open/a/b"), { recursive: true });
  await fs.chmod(join(d, "open"), 0o777);
  // open/ is world-writable: anyone could rename a/ away and put a symlink to / in its place.
  await assert.rejects(
    openTargetDir(join(d, "open/a/b/target")),
    conflict(/reached through .*open is writable by every user/),
  );
  // Through a symlink, the resolved way is checked too.
  await fs.symlink(join(d, "open/a"), join(d, "via"));
  await assert.rejects(openTargetDir(join(d, "via/b/target")), conflict(/open is writable by every user/));
  // Sticky and root's (as /tmp), with our own names in it: fine.
  if (isRoot) {
    await fs.chmod(join(d, "open"), 0o1777);
    const ok = await openTargetDir(join(d, "open/a/b/target"));
    await ok.dir.close();
  }
});

test("a target whose missing parent would be made in a directory another user can write is refused first", async (t) => {
  const d = await scratch(t);
  await fs.mkdir(join(d, "open"));
  await fs.chmod(join(d, "open"), 0o777);
  await assert.rejects(openTargetDir(join(d, "open/new/target")), conflict(/open is writable by every user/));
  assert.deepEqual(await fs.readdir(join(d, "open")), [], "nothing made");
});
