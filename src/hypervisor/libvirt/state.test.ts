import assert from "node:assert/strict";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../../util/errors.js";
import { LibvirtState, stateDirOf } from "./state.js";

function tempDir(t: { after(fn: () => void): void }): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-lvstate-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

test("a libvirt state record round-trips", async (t) => {
  const dir = tempDir(t);
  const rec = await LibvirtState.create(dir, "qemu:///system", "web1");
  await rec.add({ kind: "dir", path: join(stateDirOf(dir), "web1.run") });
  await rec.add({ kind: "checkpoint", name: "strata-0123456789ab-20261129t100000000z" });
  await rec.add({ kind: "job", socket: join(stateDirOf(dir), "web1.run", "nbd.sock") });
  await rec.add({ kind: "process", pid: 4242, marker: join(stateDirOf(dir), "web1.run", "x", "nbd.sock") });
  await rec.add({ kind: "freeze" });
  const back = await LibvirtState.load(rec.path);
  assert.deepEqual(back?.data, rec.data);
  assert.equal(await LibvirtState.load(join(dir, "none.json")), undefined);
});

test("a libvirt state record that does not fit its schema is refused, naming the field", async (t) => {
  const dir = tempDir(t);
  const good = () => ({
    adapter: "libvirt",
    uri: "qemu:///system",
    domain: "web1",
    pid: 77,
    started: "2026-11-29T10:00:00.000Z",
    items: [{ kind: "dir", path: "/var/lib/strata/state/libvirt/web1.run" }] as unknown[],
  });
  const path = join(dir, "web1.json");
  const cases: Array<[(d: ReturnType<typeof good>) => unknown, RegExp]> = [
    [
      (d) => ({ ...d, items: [{ kind: "dir", path: "/var/lib/../../etc" }] }),
      /items\.0\.path: the directory .* is not an absolute path/,
    ],
    [
      (d) => ({ ...d, items: [{ kind: "file", path: "etc/passwd" }] }),
      /items\.0\.path: the file "etc\/passwd"/,
    ],
    [
      (d) => ({ ...d, items: [{ kind: "checkpoint", name: "other; rm" }] }),
      /items\.0\.name: the checkpoint .* is not a checkpoint Strata makes/,
    ],
    [
      (d) => ({ ...d, items: [{ kind: "process", pid: "1", marker: "/x" }] }),
      /items\.0\.pid: the process id is not a whole number/,
    ],
    [(d) => ({ ...d, items: [{ kind: "rm-rf" }] }), /items\.0(\.kind)?: /],
    [(d) => ({ ...d, uri: "qemu:///system;id" }), /uri: the libvirt connection .* is not a URI/],
    [(d) => ({ ...d, domain: "web2" }), /domain: "web2" is not the domain the file is named after/],
    [(d) => ({ ...d, adapter: "qemu" }), /adapter: it is not a libvirt record/],
    [() => "{", /not JSON/],
  ];
  for (const [spoil, re] of cases) {
    const doc = spoil(good());
    writeFileSync(path, typeof doc === "string" ? doc : JSON.stringify(doc));
    await assert.rejects(
      LibvirtState.load(path),
      (err) =>
        isStrataError(err, ErrorCode.DATA_CORRUPT) && re.test(err.message) && err.message.includes(path),
      String(re),
    );
  }
  writeFileSync(path, JSON.stringify(good()));
  assert.ok(await LibvirtState.load(path));
});
