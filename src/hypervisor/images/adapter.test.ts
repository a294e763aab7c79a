import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import type { BackupRequest } from "../adapter.js";
import { ImageFileAdapter } from "./adapter.js";
import { parseFileSpecs } from "./index.js";

test("file: specs: names from the file, options, unique names, clear errors", () => {
  assert.deepEqual(parseFileSpecs(["file:/var/lib/images/web1.qcow2"]), [
    { path: "/var/lib/images/web1.qcow2", name: "web1" },
  ]);
  assert.deepEqual(parseFileSpecs(["file:/dev/vg0/db1-root,name=root,format=raw"]), [
    { path: "/dev/vg0/db1-root", name: "root", format: "raw" },
  ]);
  assert.deepEqual(
    parseFileSpecs(["file:/a/disk.img", "file:/b/disk.img", "file:/c/disk.raw"]).map((s) => s.name),
    ["disk", "disk-1", "disk-2"],
  );
  assert.equal(parseFileSpecs(["file:/x/@@weird name.img"])[0]!.name, "weird_name");
  const bad = (spec: string, re: RegExp) =>
    assert.throws(
      () => parseFileSpecs([spec]),
      (err: unknown) => isStrataError(err, ErrorCode.USAGE) && re.test((err as Error).message),
    );
  bad("file:", /names no file/);
  bad("file:/x.img,format=ext4", /unknown option "format=ext4"/);
  bad("file:/x.img,size=3", /unknown option "size=3".*known: name=DISK/);
  bad("/x.img", /sources look like file:/);
});

const request = (dir: string): BackupRequest => ({
  vm: "two",
  repository: "0123456789abcdef",
  mode: "snapshot",
  quiesce: "try",
  granularity: 65536,
  stateDir: join(dir, "state"),
  log: () => {},
});

test("several file: sources are one VM: a crash-consistent session with a files config and no checkpoint", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-images-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const a = join(dir, "a.img");
  const b = join(dir, "b.img");
  writeFileSync(a, Buffer.alloc(1 << 20, 1));
  writeFileSync(b, Buffer.alloc(2 << 20, 2));
  const adapter = new ImageFileAdapter();
  assert.deepEqual(adapter.schemes, ["file"]);
  const vm = await adapter.resolveGroup([`file:${a}`, `file:${b},name=data`]);
  assert.equal(vm.defaultName, undefined);
  assert.equal(vm.adapter, adapter);
  const s = await vm.openBackup(request(dir));
  try {
    assert.equal(s.mode, "file");
    assert.equal(s.consistency, "crash-consistent");
    assert.equal(s.checkpoint, null);
    assert.deepEqual(
      s.disks.map((d) => [d.name, d.size, d.source]),
      [
        ["a", 1 << 20, a],
        ["data", 2 << 20, b],
      ],
    );
    assert.deepEqual((await s.disks[1]!.read(4096, 8)).toJSON().data, [2, 2, 2, 2, 2, 2, 2, 2]);
    assert.equal(s.config?.kind, "files");
    assert.deepEqual(
      s.config?.disks.map((d) => [d.name, d.source, d.format, d.size]),
      [
        ["a", a, "raw", 1 << 20],
        ["data", b, "raw", 2 << 20],
      ],
    );
  } finally {
    await s.finish(true);
    await s.finish(true);
  }
  // One source resolves the same way.
  assert.equal((await adapter.resolve(`file:${a}`)).source, `file:${a}`);
  await assert.rejects(
    async () => (await adapter.resolve(`file:${join(dir, "missing.img")}`)).openBackup(request(dir)),
    (err: unknown) => isStrataError(err, ErrorCode.SOURCE_UNREADABLE),
  );
});

test("prepare vets the sources ahead of openBackup, which uses what it found; a failure surfaces there", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-images-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  // A raw disk that begins like a qcow2 image: vetting it warns, once per vetting.
  const a = join(dir, "a.img");
  const head = Buffer.alloc(1 << 20, 5);
  head.write("QFI\xfb", 0, "latin1");
  writeFileSync(a, head);
  const vm = await new ImageFileAdapter().resolveGroup([`file:${a}`]);
  const early: string[] = [];
  const late: string[] = [];
  vm.prepare!((m) => early.push(m));
  const s = await vm.openBackup({ ...request(dir), log: (m) => late.push(m) });
  try {
    assert.equal(early.length, 1, "prepare vetted the source");
    assert.match(early[0]!, /begins like a qcow2 image but is read as raw/);
    assert.equal(late.length, 0, "openBackup used the vetting prepare started, not a second one");
    assert.deepEqual((await s.disks[0]!.read(4096, 4)).toJSON().data, [5, 5, 5, 5]);
  } finally {
    await s.finish(true);
  }
  // The next session vets again, and tells its own log.
  await (await vm.openBackup({ ...request(dir), log: (m) => late.push(m) })).finish(true);
  assert.equal(late.length, 1);

  const gone = await new ImageFileAdapter().resolveGroup([`file:${join(dir, "missing.img")}`]);
  gone.prepare!(() => {});
  // Nothing reports the failure until openBackup, which names the source.
  await new Promise((r) => setTimeout(r, 50));
  await assert.rejects(
    gone.openBackup(request(dir)),
    (err: unknown) =>
      isStrataError(err, ErrorCode.SOURCE_UNREADABLE) &&
      /cannot open source .*missing\.img/.test(String(err)),
  );
});
