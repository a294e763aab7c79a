// A restore point's boot verification as the API lists it: the catalog row's outcome and time to
// answer in GET /api/v1/vms/{vm}/restore-points and in the OpenAPI document's RestorePoint; kept
// when retention (or strata catalog rebuild) makes the rows what the manifests say again; a
// failure replaces a pass. The boot itself is test/instant/boot-verify.test.ts.
import assert from "node:assert/strict";
import { request } from "node:http";
import { test } from "node:test";
import { rebuildRestorePoints, restorePointRow } from "../../src/catalog/rebuild.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { Api } from "../../src/server/api.js";
import { listenApi } from "../../src/server/listen.js";
import { daemonOf, HOURLY_ALL, setup } from "./helpers.js";

function get(socket: string, path: string): Promise<{ status: number; body: unknown }> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        text += d;
      });
      res.on("end", () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(text) as unknown }));
    });
    req.on("error", reject);
    req.end();
  });
}

interface Point {
  id: string;
  bootVerifiedAt: number | null;
  bootOutcome: string | null;
  bootAnswerMs: number | null;
  bootError: string | null;
}

test("the API lists each restore point's last boot verification; a rebuild keeps it", async (t) => {
  const s = await setup(t, {
    vms: ["vm1"],
    policies: HOURLY_ALL,
  });
  const d = daemonOf(t, s);
  await d.start();
  for (let i = 0; i < 2; i++) {
    d.runNow(s.catalog.jobs().find((j) => j.kind === "backup")!.id);
    await d.idle();
  }
  const api = new Api({ daemon: d });
  const listening = await listenApi(api, s.config.api, { stateDir: `${s.dir}/state`, log: () => {} });
  t.after(() => listening.close());
  const socket = s.config.api.socket;

  const list = async () => {
    const r = await get(socket, "/api/v1/vms/vm1/restore-points");
    assert.equal(r.status, 200);
    return (r.body as { items: Point[] }).items;
  };
  const before = await list();
  assert.equal(before.length, 2);
  for (const p of before)
    assert.deepEqual(
      [p.bootVerifiedAt, p.bootOutcome, p.bootAnswerMs, p.bootError],
      [null, null, null, null],
    );

  const repo = await Repository.open(new FsStore(s.repoPath));
  t.after(() => repo.close());
  const [older, newer] = await repo.snapshots("vm1");
  const where = { id: repo.config.id, location: repo.store.location };
  s.catalog.recordBootVerification(where, restorePointRow(newer!.manifest), {
    bootVerifiedAt: 1_700_000_000_000,
    bootOutcome: "passed",
    bootAnswerMs: 8123,
    bootError: null,
  });
  s.catalog.recordBootVerification(where, restorePointRow(older!.manifest), {
    bootVerifiedAt: 1_700_000_000_500,
    bootOutcome: "failed",
    bootAnswerMs: null,
    bootError: "the guest agent did not answer within 300 s of the boot (timeout)",
  });
  const expected = [
    [`vm1/${newer!.time}`, 1_700_000_000_000, "passed", 8123, null],
    [
      `vm1/${older!.time}`,
      1_700_000_000_500,
      "failed",
      null,
      "the guest agent did not answer within 300 s of the boot (timeout)",
    ],
  ];
  const view = (ps: Point[]) =>
    ps.map((p) => [p.id, p.bootVerifiedAt, p.bootOutcome, p.bootAnswerMs, p.bootError]);
  assert.deepEqual(view(await list()), expected, "newest first, each with its own verification");

  // The rows made again from the manifests (retention does this after each backup) keep it.
  const report = await rebuildRestorePoints(s.catalog, repo);
  assert.equal(report.kept, 2);
  assert.deepEqual(view(await list()), expected);

  // A later verification replaces the last one.
  s.catalog.recordBootVerification(where, restorePointRow(newer!.manifest), {
    bootVerifiedAt: 1_700_000_100_000,
    bootOutcome: "failed",
    bootAnswerMs: 9000,
    bootError: "the check command /bin/true exited 1",
  });
  assert.deepEqual(view(await list())[0], [
    `vm1/${newer!.time}`,
    1_700_000_100_000,
    "failed",
    9000,
    "the check command /bin/true exited 1",
  ]);

  // The OpenAPI document describes the fields.
  const doc = (await get(socket, "/api/v1/openapi.json")).body as {
    components: { schemas: { RestorePoint: { properties: Record<string, { enum?: string[] }> } } };
  };
  const props = doc.components.schemas.RestorePoint.properties;
  for (const k of ["bootVerifiedAt", "bootOutcome", "bootAnswerMs", "bootError"]) assert.ok(props[k], k);
  assert.deepEqual(props.bootOutcome!.enum, ["passed", "failed"]);
});
