// Where the REST API may write (api.restore-targets, api.restore-devices) over real HTTP against a
// real repository: a restore into an allowed directory is bit-exact; a target outside, a ".."
// escape, a symlink inside the allowed directory that leads outside, and a device no glob
// matches are each refused with 403 naming the path and the setting, logged, for admin tokens
// too, with nothing written outside; instant recovery's target is bound the same way.
import assert from "node:assert/strict";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { confineDevice, confineDirectory } from "../../src/server/restore-targets.js";
import { tempDir } from "../helpers/cli.js";
import { type Harness, harness, tokens } from "./api-harness.js";

const sha = (b: Buffer) => createHash("sha256").update(b).digest("hex");

/** Every file under `dir`, as paths relative to it. */
async function tree(dir: string): Promise<string[]> {
  return (await fs.readdir(dir, { recursive: true })).map(String).sort();
}

async function follow(h: Harness, runId: number, token: string) {
  const r = await h.call("GET", `/api/v1/runs/${runId}/events`, { token });
  const end = /event: end\ndata: (.*)\n/.exec(r.text);
  assert.ok(end, r.text);
  return (JSON.parse(end[1]!) as { run: { outcome: string; error: string | null } }).run;
}

test("API restores write only under api.restore-targets and onto api.restore-devices", async (t) => {
  const h = await harness(t, {
    restoreTargets: (s) => [join(s.dir, "allowed")],
    restoreDevices: ["/dev/vg0/*"],
  });
  const tok = tokens(h);
  const allowed = join(h.s.dir, "allowed");
  const outside = join(h.s.dir, "outside");
  await fs.mkdir(allowed);
  await fs.mkdir(outside);
  await fs.writeFile(join(outside, "keep"), "precious\n");
  await fs.symlink(outside, join(allowed, "escape"));

  const job = h.s.catalog.jobs().find((j) => j.kind === "backup")!;
  assert.equal((await h.call("POST", `/api/v1/jobs/${job.id}/run`, { token: tok.backup })).status, 202);
  await h.daemon.idle();
  const point = h.s.catalog.restorePoints({ vm: "vm1" }).at(-1)!;
  const base = `/api/v1/restore-points/vm1/${encodeURIComponent(point.time)}`;

  // Allowed: a directory made inside, restored bit-exact.
  const good = await h.call("POST", `${base}/restore`, {
    token: tok.operator,
    body: { target: join(allowed, "r1") },
  });
  assert.equal(good.status, 202, good.text);
  const ran = await follow(h, (good.body as { id: number }).id, tok.operator);
  assert.equal(ran.outcome, "success", ran.error ?? "");
  const files = await fs.readdir(join(allowed, "r1"));
  assert.equal(files.length, 1);
  assert.equal(
    sha(await fs.readFile(join(allowed, "r1", files[0]!))),
    sha(await fs.readFile(h.s.images.vm1!)),
  );
  const disk = files[0]!.replace(/\.raw$/, "");

  // Refused, each with 403 naming the path and the setting, for operator and admin alike.
  const refusals: Array<[string, Record<string, unknown>, RegExp]> = [
    [
      "outside",
      { target: join(outside, "r2") },
      /target .*outside\/r2 is outside .*api\.restore-targets is .*allowed/,
    ],
    ["a .. escape", { target: `${allowed}/../outside/r3` }, /has a "\.\." segment.*api\.restore-targets/],
    [
      "a symlink leading out",
      { target: join(allowed, "escape", "r4") },
      /escape\/r4 \(which resolves to .*outside\/r4\) is outside .*api\.restore-targets/,
    ],
    ["the symlink itself", { target: join(allowed, "escape") }, /which resolves to .*outside\)/],
    [
      "a device no glob matches",
      { disk, device: "/dev/sda", force: true },
      /device \/dev\/sda matches none .*api\.restore-devices is \/dev\/vg0\/\*/,
    ],
    [
      "a device below a glob's directory",
      { disk, device: "/dev/vg0/sub/lv", force: true },
      /device \/dev\/vg0\/sub\/lv matches none/,
    ],
  ];
  for (const role of ["operator", "admin"] as const)
    for (const [what, body, message] of refusals) {
      const r = await h.call("POST", `${base}/restore`, { token: tok[role], body });
      assert.equal(r.status, 403, `${role}, ${what}: ${r.text}`);
      assert.match((r.body as { error: { message: string } }).error.message, message, `${role}, ${what}`);
    }
  // The instant recovery's overlays are bound the same way (checked before anything starts).
  const ir = await h.call("POST", `${base}/instant`, {
    token: tok.admin,
    body: { name: "ir1", target: join(allowed, "escape", "ir") },
  });
  assert.equal(ir.status, 403, ir.text);
  assert.match(ir.text, /api\.restore-targets/);
  // Every refusal is logged; nothing was written outside.
  const logged = h.logs.filter((l) => l.includes(`refused POST ${base}/`) && l.includes(": 403 "));
  assert.equal(logged.length, refusals.length * 2 + 1, logged.join("\n"));
  assert.ok(logged.every((l) => /api\.restore-(targets|devices)/.test(l)));
  assert.deepEqual(await tree(outside), ["keep"]);
  assert.equal(await fs.readFile(join(outside, "keep"), "utf8"), "precious\n");
});

test("confining paths: symlinks resolved, a device's own udev link kept, globs within one segment", async (t) => {
  const dir = tempDir(t);
  const root = join(dir, "root");
  await fs.mkdir(join(dir, "real"));
  await fs.symlink(join(dir, "real"), join(dir, "link"));
  // A root that is itself a symlink is taken as what it resolves to.
  const policy = { restoreTargets: [join(dir, "link"), root], restoreDevices: ["/dev/vg0/*", "/dev/nul?"] };
  assert.equal(
    await confineDirectory(policy, join(dir, "real", "a", "b"), "target"),
    join(dir, "real", "a", "b"),
  );
  assert.ok((await fs.stat(join(dir, "real", "a", "b"))).isDirectory(), "the directory is made");
  assert.equal(await confineDirectory(policy, join(root, "x"), "target"), join(root, "x"));
  await assert.rejects(
    confineDirectory(policy, `${root}x`, "target"),
    /is outside/,
    "a sibling with the root's prefix",
  );
  await assert.rejects(confineDirectory(policy, "relative", "target"), /must be an absolute path/);
  assert.equal(await confineDevice(policy, "/dev/null", "device"), "/dev/null");
  assert.equal(await confineDevice(policy, "/dev/vg0/lv", "device"), "/dev/vg0/lv");
  await assert.rejects(confineDevice(policy, "/dev/vg0/a/b", "device"), /matches none/);
  await assert.rejects(confineDevice({ ...policy, restoreDevices: [] }, "/dev/null", "device"), /is empty/);
});
