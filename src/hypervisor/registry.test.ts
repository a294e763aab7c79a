import assert from "node:assert/strict";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../util/errors.js";
import type { VmAdapter, VmHandle } from "./adapter.js";
import { AdapterRegistry } from "./registry.js";

function fake(id: string, schemes: string[], group = false): VmAdapter {
  const handle = (adapter: VmAdapter, source: string): VmHandle => ({
    adapter,
    source,
    defaultName: undefined,
    openBackup: () => Promise.reject(new Error("not in this test")),
  });
  const a: VmAdapter = {
    id,
    schemes,
    usage: `${schemes[0]}:THING`,
    resolve: async (uri) => handle(a, uri),
    ...(group ? { resolveGroup: async (uris: readonly string[]) => handle(a, uris.join(" ")) } : {}),
  };
  return a;
}

const usage = (code: ErrorCode, re: RegExp) => (err: unknown) => {
  assert.ok(isStrataError(err, code), String(err));
  assert.match((err as Error).message, re);
  return true;
};

test("sources resolve by scheme; an unknown one is a usage error listing every syntax", async () => {
  const r = new AdapterRegistry()
    .register(fake("file", ["file"], true))
    .register(fake("qemu", ["qmp", "vm"]));
  assert.equal((await r.resolve("vm:web1")).adapter.id, "qemu");
  assert.equal((await r.resolve("file:/x.img")).adapter.id, "file");
  assert.throws(
    () => r.adapterFor("/var/lib/x.img"),
    usage(
      ErrorCode.USAGE,
      /^unknown source "\/var\/lib\/x.img": sources look like file:THING, or qmp:THING$/,
    ),
  );
  assert.throws(() => r.adapterFor("libvirt:web1"), usage(ErrorCode.USAGE, /unknown source "libvirt:web1"/));
  assert.throws(
    () => r.adapter("pve"),
    usage(ErrorCode.USAGE, /no adapter "pve" in this build \(known: file, qemu\)/),
  );
  assert.equal(r.adapter("qemu").id, "qemu");
});

test("an adapter or a scheme registered twice is refused", () => {
  const r = new AdapterRegistry().register(fake("qemu", ["qmp", "vm"]));
  assert.throws(() => r.register(fake("qemu", ["other"])), usage(ErrorCode.INTERNAL, /registered twice/));
  assert.throws(
    () => r.register(fake("pve", ["vm"])),
    usage(ErrorCode.INTERNAL, /scheme vm: is claimed by qemu and pve/),
  );
});

test("several sources make one VM only through an adapter that groups them", async () => {
  const r = new AdapterRegistry()
    .register(fake("file", ["file"], true))
    .register(fake("qemu", ["qmp", "vm"]));
  const files = await r.resolveAll(["file:/a.img", "file:/b.img"]);
  assert.equal(files.adapter.id, "file");
  assert.equal(files.source, "file:/a.img file:/b.img");
  assert.equal((await r.resolveAll(["qmp:/run/x.qmp"])).adapter.id, "qemu");
  assert.throws(() => r.resolveAll([]), usage(ErrorCode.USAGE, /no source given/));
  assert.throws(
    () => r.resolveAll(["vm:a", "vm:b"]),
    usage(
      ErrorCode.USAGE,
      /a qemu source \(qmp: or vm:\) names a whole VM and is backed up on its own: give one source/,
    ),
  );
  assert.throws(
    () => r.resolveAll(["file:/a.img", "qmp:/run/x.qmp"]),
    usage(
      ErrorCode.USAGE,
      /"file:\/a.img" and "qmp:\/run\/x.qmp" belong to different platforms \(file, qemu\)/,
    ),
  );
  assert.throws(() => r.resolveAll(["file:/a.img", "nope"]), usage(ErrorCode.USAGE, /unknown source "nope"/));
});
