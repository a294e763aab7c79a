// The REST API over real HTTP: a daemon in-process with a temp catalog and repository, its API on
// a unix socket and on HTTPS with the self-signed certificate it makes. Each role's allowed and
// refused calls as roles.ts says; bad tokens refused (401) and logged; a run started through the
// API followed to its end over server-sent events; the OpenAPI document naming every route.
import assert from "node:assert/strict";
import { request as httpsRequest } from "node:https";
import { test } from "node:test";
import { Validator } from "@seriousme/openapi-schema-validator";
import { allows } from "../../src/catalog/roles.js";
import { ROLES } from "../../src/catalog/schema.js";
import { createToken, revokeToken } from "../../src/catalog/tokens.js";
import { backupVm } from "../../src/engine/vm-backup.js";
import { ImageFileAdapter } from "../../src/hypervisor/images/adapter.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { harness, tokens } from "./api-harness.js";

test("each role is allowed and refused as roles.ts says, over HTTPS with the self-signed certificate", async (t) => {
  const h = await harness(t);
  const tok = tokens(h);
  const jobs = h.s.catalog.jobs();
  const backup = jobs.find((j) => j.kind === "backup")!;
  const retention = jobs.find((j) => j.kind === "retention")!;
  const calls: Array<[string, string, Parameters<typeof allows>[1]]> = [
    ["GET", "/api/v1/vms", "vms.list"],
    ["GET", "/api/v1/vms/vm1/restore-points", "points.list"],
    ["GET", "/api/v1/jobs", "jobs.list"],
    ["GET", "/api/v1/policies/p/retention-preview", "retention.preview"],
    ["GET", "/api/v1/repositories/main/stats", "repo.stats"],
    ["POST", "/api/v1/runs/999999/cancel", "jobs.cancel"],
    ["GET", "/api/v1/runs/999999", "jobs.logs"],
    ["POST", `/api/v1/jobs/${backup.id}/run`, "backup.start"],
    ["POST", `/api/v1/jobs/${retention.id}/run`, "forget.run"],
  ];
  for (const role of ROLES) {
    for (const [method, path, action] of calls) {
      const r = await h.call(method, path, { token: tok[role] });
      if (allows(role, action))
        assert.ok(
          [200, 202, 404, 409].includes(r.status),
          `${role} may ${action}: ${method} ${path} gave ${r.status} ${r.text}`,
        );
      else {
        assert.equal(r.status, 403, `${role} may not ${action}: ${method} ${path} gave ${r.status}`);
        assert.equal((r.body as { error: { code: string } }).error.code, "FORBIDDEN");
        assert.ok(
          h.logs.some((l) => l.includes(`refused ${method} ${path}`) && l.includes(`may not do ${action}`)),
          `the refusal of ${action} to ${role} is logged`,
        );
      }
    }
    await h.daemon.idle();
  }
  // A backup token cannot forget, list restore points or read repository data.
  const b = await h.call("POST", `/api/v1/jobs/${retention.id}/run`, { token: tok.backup });
  assert.equal(b.status, 403);
  assert.match(
    (b.body as { error: { message: string } }).error.message,
    /role backup\) may not do forget\.run/,
  );
});

test("no token, malformed, unknown, wrong, revoked and expired tokens get 401, each refusal logged with its reason", async (t) => {
  const h = await harness(t);
  const good = createToken(h.s.catalog, { role: "admin" });
  const revoked = createToken(h.s.catalog, { role: "admin" });
  revokeToken(h.s.catalog, revoked.info.id);
  const expired = createToken(h.s.catalog, {
    role: "admin",
    expiresInMs: 1000,
    clock: { now: () => Date.now() - 60_000 },
  });
  const wrongSecret = `${good.token.slice(0, -4)}AAAA`;
  const cases: Array<[string | undefined, RegExp]> = [
    [undefined, /no API token/],
    ["hello", /malformed API token/],
    [`strata_0123456789abcdef_${"A".repeat(43)}`, /unknown or its secret is wrong/],
    [wrongSecret, /unknown or its secret is wrong/],
    [revoked.token, /was revoked/],
    [expired.token, /expired on/],
  ];
  for (const [token, reason] of cases) {
    const before = h.logs.length;
    const r = await h.call("GET", "/api/v1/jobs", token === undefined ? {} : { token });
    assert.equal(r.status, 401, `${token}: ${r.text}`);
    assert.equal(r.headers["www-authenticate"], 'Bearer realm="strata"');
    assert.match((r.body as { error: { message: string } }).error.message, reason);
    const logged = h.logs.slice(before).join("\n");
    assert.match(logged, /refused GET \/api\/v1\/jobs from 127\.0\.0\.1:\d+: 401/);
    assert.match(logged, reason);
    if (token !== undefined && token.length > 30)
      assert.ok(!logged.includes(token.slice(-43)), "the secret is never logged");
  }
  const ok = await h.call("GET", "/api/v1/jobs", { token: good.token });
  assert.equal(ok.status, 200);
  // On the owner-only unix socket a call without a token acts as the local administrator; with a
  // token, the token is checked.
  assert.equal((await h.call("GET", "/api/v1/jobs", { via: "unix" })).status, 200);
  assert.equal((await h.call("GET", "/api/v1/jobs", { via: "unix", token: revoked.token })).status, 401);
});

test("a run started through the API is followed over server-sent events to its end", async (t) => {
  // The run waits until the event stream is open, so that it has progress to show.
  let open: () => void = () => {};
  const opened = new Promise<void>((r) => {
    open = r;
  });
  const h = await harness(t, {
    runner: (inner) => ({
      run: async (ctx) => {
        await opened;
        return inner.run(ctx);
      },
    }),
  });
  const tok = tokens(h);
  const backup = h.s.catalog.jobs().find((j) => j.kind === "backup")!;
  const vmsBefore = (await h.call("GET", "/api/v1/vms", { token: tok.read })).body as Array<{
    name: string;
    protected: boolean;
    policies: Array<{ rpoMet: boolean; lastRestorePoint: unknown }>;
  }>;
  assert.equal(vmsBefore[0]!.name, "vm1");
  assert.equal(vmsBefore[0]!.protected, false, "no restore point yet: RPO not met");
  assert.equal(vmsBefore[0]!.policies[0]!.lastRestorePoint, null);

  const started = await h.call("POST", `/api/v1/jobs/${backup.id}/run`, { token: tok.operator });
  assert.equal(started.status, 202, started.text);
  const { status, run } = started.body as { status: string; run: { id: number } };
  assert.equal(status, "started");
  const again = await h.call("POST", `/api/v1/jobs/${backup.id}/run`, { token: tok.operator });
  assert.equal(again.status, 409, "a running job is not started twice");

  const events = await new Promise<Array<{ event: string; data: Record<string, unknown> }>>(
    (resolve, reject) => {
      const req = httpsRequest(
        {
          host: "127.0.0.1",
          port: h.listening.https!.port,
          servername: "localhost",
          ca: h.ca,
          path: `/api/v1/runs/${run.id}/events`,
          headers: { authorization: `Bearer ${tok.backup}` },
        },
        (res) => {
          assert.equal(res.headers["content-type"], "text/event-stream; charset=utf-8");
          open();
          let buf = "";
          res.setEncoding("utf8");
          res.on("data", (d: string) => {
            buf += d;
          });
          res.on("end", () =>
            resolve(
              buf
                .split("\n\n")
                .filter((b) => b.startsWith("event:"))
                .map((b) => {
                  const [e, d] = b.split("\n");
                  return { event: e!.slice(7), data: JSON.parse(d!.slice(6)) as Record<string, unknown> };
                }),
            ),
          );
        },
      );
      req.on("error", reject);
      req.end();
    },
  );
  const progress = events.filter((e) => e.event === "progress");
  assert.ok(progress.length >= 2, `progress events arrive (${progress.length})`);
  const last = progress.at(-1)!.data;
  assert.ok((last.total as number) > 0 && last.done === last.total, "the last progress is complete");
  const end = events.at(-1)!;
  assert.equal(end.event, "end");
  assert.equal((end.data.run as { outcome: string }).outcome, "success");
  assert.ok(events.some((e) => e.event === "log" && /restore point .* created/.test(String(e.data.message))));

  await h.daemon.idle();
  const vms = (await h.call("GET", "/api/v1/vms", { token: tok.read })).body as typeof vmsBefore;
  assert.equal(vms[0]!.protected, true, "a fresh restore point meets the RPO");
  assert.equal(vms[0]!.policies[0]!.rpoMet, true);
  // Metrics: the same protection state, and the run counted.
  const m = await h.call("GET", "/metrics", { token: tok.read });
  assert.equal(m.status, 200);
  assert.match(String(m.headers["content-type"]), /^text\/plain; version=0\.0\.4/);
  assert.match(m.text, /^strata_vm_rpo_met\{vm="vm1",policy="p",repository="main"\} 1$/m);
  assert.match(m.text, /^strata_vm_rpo_seconds\{vm="vm1",policy="p",repository="main"\} 3600$/m);
  assert.match(m.text, /^strata_runs_total\{policy="p",vm="vm1",kind="backup",outcome="success"\} 1$/m);
  assert.match(m.text, /^strata_job_last_success_bytes_read\{policy="p",vm="vm1",kind="backup"\} 2097152$/m);
  assert.match(m.text, /^# TYPE strata_runs_total counter$/m);
  assert.equal((await h.call("GET", "/metrics", { token: tok.backup })).status, 403);
  // A run that has ended: its log and its end at once.
  const after = await h.call("GET", `/api/v1/runs/${run.id}/events`, { token: tok.read });
  assert.match(after.text, /event: end\ndata: \{"type":"end","run":\{"id":\d+.*"outcome":"success"/);
});

test("a running run is cancelled through the API and ends cancelled", async (t) => {
  const h = await harness(t, {
    runner: () => ({
      run: (ctx) =>
        new Promise((_, reject) => ctx.signal.addEventListener("abort", () => reject(ctx.signal.reason))),
    }),
  });
  const tok = tokens(h);
  const backup = h.s.catalog.jobs().find((j) => j.kind === "backup")!;
  const { run } = (await h.call("POST", `/api/v1/jobs/${backup.id}/run`, { token: tok.backup })).body as {
    run: { id: number };
  };
  assert.equal((await h.call("POST", `/api/v1/runs/${run.id}/cancel`, { token: tok.backup })).status, 403);
  const c = await h.call("POST", `/api/v1/runs/${run.id}/cancel`, { token: tok.operator });
  assert.equal(c.status, 202, c.text);
  await h.daemon.idle();
  const r = (await h.call("GET", `/api/v1/runs/${run.id}`, { token: tok.read })).body as {
    outcome: string;
    error: string;
  };
  assert.equal(r.outcome, "cancelled");
  assert.match(r.error, /cancelled: by token [0-9a-f]{16} \(operator-.*role operator\) through the API/);
  assert.equal((await h.call("POST", `/api/v1/runs/${run.id}/cancel`, { token: tok.operator })).status, 409);
});

test("restore points page by page, retention preview and repository stats agree with the repository", async (t) => {
  const h = await harness(t);
  const tok = tokens(h);
  // Two restore points made outside the daemon (so its retention has not run on them).
  const repo = await Repository.open(new FsStore(h.s.repoPath));
  t.after(() => repo.close());
  const vm = await new ImageFileAdapter().resolve(`file:${h.s.images.vm1}`);
  for (let i = 0; i < 2; i++)
    await backupVm(repo, vm, { vm: "vm1", mode: "snapshot", quiesce: "off", stateDir: `${h.s.dir}/state` });
  const { rebuildRestorePoints } = await import("../../src/catalog/rebuild.js");
  await rebuildRestorePoints(h.s.catalog, repo);
  const ids = (await repo.snapshots("vm1")).map((s) => `${s.vm}/${s.time}`);

  const page1 = (await h.call("GET", "/api/v1/vms/vm1/restore-points?limit=1", { token: tok.read })).body as {
    total: number;
    nextOffset: number | null;
    items: Array<{ id: string }>;
  };
  assert.equal(page1.total, 2);
  assert.deepEqual(
    page1.items.map((i) => i.id),
    [ids[1]],
    "newest first",
  );
  assert.equal(page1.nextOffset, 1);
  const page2 = (await h.call("GET", "/api/v1/vms/vm1/restore-points?limit=1&offset=1", { token: tok.read }))
    .body as typeof page1;
  assert.deepEqual(
    page2.items.map((i) => i.id),
    [ids[0]],
  );
  assert.equal(page2.nextOffset, null);
  const bad = await h.call("GET", "/api/v1/vms/vm1/restore-points?limit=x", { token: tok.read });
  assert.equal(bad.status, 400);
  assert.equal((await h.call("GET", "/api/v1/vms/nope/restore-points", { token: tok.read })).status, 404);

  const preview = (await h.call("GET", "/api/v1/policies/p/retention-preview", { token: tok.read })).body as {
    vms: Array<{ vm: string; keep: Array<{ id: string; reasons: string[] }>; remove: string[] }>;
  };
  assert.deepEqual(preview.vms, [{ vm: "vm1", keep: [{ id: ids[1], reasons: ["last"] }], remove: [ids[0]] }]);
  assert.equal((await repo.snapshots("vm1")).length, 2, "a preview removes nothing");
  assert.equal(
    (await h.call("GET", "/api/v1/policies/none/retention-preview", { token: tok.read })).status,
    404,
  );

  const stats = (await h.call("GET", "/api/v1/repositories/main/stats", { token: tok.read })).body as {
    restorePoints: number;
    vms: number;
    logicalBytes: number;
    storedBytes: number;
    dedupRatio: number;
  };
  assert.equal(stats.restorePoints, 2);
  assert.equal(stats.vms, 1);
  assert.equal(stats.logicalBytes, 2 * (2 << 20));
  assert.ok(stats.storedBytes > 0 && stats.dedupRatio >= 2, `the second backup dedups (${stats.dedupRatio})`);
});

test("the OpenAPI document is served without a token, validates, and describes every route", async (t) => {
  const h = await harness(t);
  const r = await h.call("GET", "/api/v1/openapi.json");
  assert.equal(r.status, 200);
  const doc = r.body as {
    openapi: string;
    paths: Record<
      string,
      Record<string, { parameters: Array<{ name: string; in: string }>; responses: object }>
    >;
    components: { schemas: Record<string, unknown> };
  };
  assert.match(doc.openapi, /^3\.\d+\.\d+$/);
  // Valid against the OpenAPI 3.0 JSON schema, with every reference resolving.
  const validator = new Validator();
  const checked = await validator.validate(structuredClone(r.body) as Parameters<Validator["validate"]>[0]);
  assert.deepEqual(checked.errors, undefined, JSON.stringify(checked.errors, null, 2));
  assert.equal(checked.valid, true);
  assert.doesNotThrow(() => validator.resolveRefs());
  const listed = Object.entries(doc.paths).flatMap(([p, ops]) =>
    Object.keys(ops).map((m) => `${m.toUpperCase()} ${p}`),
  );
  for (const want of [
    "GET /api/v1/vms",
    "GET /api/v1/vms/{vm}/restore-points",
    "GET /api/v1/jobs",
    "POST /api/v1/jobs/{id}/run",
    "POST /api/v1/runs/{id}/cancel",
    "GET /api/v1/runs/{id}/events",
    "GET /api/v1/policies/{name}/retention-preview",
    "GET /api/v1/repositories/{name}/stats",
    "GET /api/v1/openapi.json",
    "GET /metrics",
  ])
    assert.ok(listed.includes(want), `${want} is described`);
  assert.deepEqual(
    listed.sort(),
    h.api.routes.map((x) => `${x.method} ${x.path}`).sort(),
    "exactly the routes served",
  );
  // Every path parameter is declared, every reference resolves.
  for (const [p, ops] of Object.entries(doc.paths))
    for (const op of Object.values(ops)) {
      for (const m of p.matchAll(/\{(\w+)\}/g))
        assert.ok(
          op.parameters.some((x) => x.name === m[1] && x.in === "path"),
          `${p}: {${m[1]}} declared`,
        );
      assert.ok(Object.keys(op.responses).length > 0);
    }
  for (const m of r.text.matchAll(/"\$ref": "#\/components\/schemas\/(\w+)"/g))
    assert.ok(m[1]! in doc.components.schemas, `schema ${m[1]} exists`);
  const unknown = await h.call("GET", "/api/v1/nothing", { via: "unix" });
  assert.equal(unknown.status, 404);
  assert.equal((await h.call("DELETE", "/api/v1/jobs", { via: "unix" })).status, 405);
  assert.equal((await h.call("GET", "/api/v1/vms/%E0%A4%A/restore-points", { via: "unix" })).status, 400);
});
