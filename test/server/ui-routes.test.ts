// The routes the web UI adds to the API, over the real unix socket of an in-process daemon:
// whoami (each role's actions, the socket's local administrator), the repository list, and the
// usage history, checked against restore-point rows put in the catalog over several days.
import assert from "node:assert/strict";
import { request } from "node:http";
import { test } from "node:test";
import { ROLE_ACTIONS } from "../../src/catalog/roles.js";
import { ROLES } from "../../src/catalog/schema.js";
import { createToken } from "../../src/catalog/tokens.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { Api } from "../../src/server/api.js";
import { listenApi } from "../../src/server/listen.js";
import { daemonOf, HOURLY_ALL, setup } from "./helpers.js";

// biome-ignore lint/suspicious/noExplicitAny: answers are checked field by field below
function get(socket: string, path: string, token?: string): Promise<{ status: number; body: any }> {
  return new Promise((resolve, reject) => {
    const req = request(
      { socketPath: socket, path, headers: token ? { authorization: `Bearer ${token}` } : {} },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => {
          text += d;
        });
        res.on("end", () => resolve({ status: res.statusCode!, body: JSON.parse(text) }));
      },
    );
    req.on("error", reject);
    req.end();
  });
}

test("whoami, repositories and usage history answer what the catalog and roles say", async (t) => {
  const s = await setup(t, {
    vms: ["vm1", "vm2"],
    policies: HOURLY_ALL,
  });
  const daemon = daemonOf(t, s);
  await daemon.start();
  const api = new Api({ daemon });
  const listening = await listenApi(api, s.config.api, { stateDir: `${s.dir}/state` });
  t.after(() => listening.close());
  const sock = listening.socket;

  for (const role of ROLES) {
    const { token, info } = createToken(s.catalog, { role, name: `t-${role}` });
    const r = await get(sock, "/api/v1/whoami", token);
    assert.equal(r.status, 200);
    assert.equal(r.body.role, role);
    assert.equal(r.body.token.id, info.id);
    assert.equal(r.body.token.name, `t-${role}`);
    assert.deepEqual(new Set(r.body.actions), ROLE_ACTIONS[role]);
  }
  const local = await get(sock, "/api/v1/whoami");
  assert.equal(local.body.role, "admin");
  assert.equal(local.body.token, null);
  assert.equal((await get(sock, "/api/v1/whoami", "strata_0000000000000000_nope")).status, 401);

  // Rows for three days: day 1 two points of vm1, day 3 one of vm1 and one of vm2.
  const repo = await Repository.open(new FsStore(s.repoPath));
  const repository = { id: repo.config.id, location: repo.store.location };
  await repo.close();
  const row = (vm: string, time: string, size: number, stored: number) => ({
    vm,
    time,
    timeMs: Date.parse(time),
    mode: "full",
    consistency: "crash",
    parent: null,
    disks: 1,
    size,
    bytesRead: size,
    bytesNew: stored,
    bytesStored: stored,
    durationMs: 1000,
    host: "h",
    runId: null,
  });
  s.catalog.putRestorePoint(repository, row("vm1", "2026-01-01T01:00:00.000Z", 1000, 400));
  s.catalog.putRestorePoint(repository, row("vm1", "2026-01-01T13:00:00.000Z", 1000, 100));
  s.catalog.putRestorePoint(repository, row("vm1", "2026-01-03T00:00:00.000Z", 1000, 50));
  s.catalog.putRestorePoint(repository, row("vm2", "2026-01-03T05:00:00.000Z", 4000, 450));

  const repos = await get(sock, "/api/v1/repositories");
  assert.deepEqual(repos.body, [{ name: "main", location: s.repoPath, restorePoints: 4, storedBytes: 1000 }]);
  const h = await get(sock, "/api/v1/repositories/main/history");
  assert.deepEqual(h.body, {
    name: "main",
    samples: [
      {
        day: "2026-01-01",
        logicalBytes: 2000,
        storedBytes: 500,
        ratio: 4,
        addedBytes: 500,
        restorePoints: 2,
      },
      {
        day: "2026-01-03",
        logicalBytes: 7000,
        storedBytes: 1000,
        ratio: 7,
        addedBytes: 500,
        restorePoints: 4,
      },
    ],
  });
  assert.deepEqual((await get(sock, "/api/v1/repositories/main/history?days=1")).body.samples.length, 1);
  assert.equal((await get(sock, "/api/v1/repositories/main/history?days=x")).status, 400);
  const none = await get(sock, "/api/v1/repositories/nope/history");
  assert.equal(none.status, 404);
  assert.match(none.body.error.message, /no repository "nope" \(the configuration has main\)/);

  // The VM list reads each VM's newest point in one query: the same as its full list's last.
  const vms = (await get(sock, "/api/v1/vms")).body as Array<{
    name: string;
    policies: Array<{ lastRestorePoint: { time: string } | null }>;
  }>;
  assert.deepEqual(
    vms.map((v) => [v.name, v.policies[0]?.lastRestorePoint?.time]),
    [
      ["vm1", "2026-01-03T00:00:00.000Z"],
      ["vm2", "2026-01-03T05:00:00.000Z"],
    ],
  );
});

test("a call made while the daemon still lists the host's VMs waits for that listing", async (t) => {
  const s = await setup(t, {
    vms: ["vm1"],
    policies: HOURLY_ALL,
  });
  let listed = false;
  const daemon = daemonOf(t, s, {
    // A slow adapter (libvirt on a busy host): its VMs come after half a second.
    listVms: async () => {
      await new Promise((r) => setTimeout(r, 500));
      listed = true;
      return {
        vms: [{ name: "slow1", adapter: "qemu", state: "running", source: "vm:slow1" }],
        unreachable: [],
      };
    },
  });
  // As `strata daemon` does: start, then listen at once, before the listing is done.
  const starting = daemon.start();
  const api = new Api({ daemon });
  const listening = await listenApi(api, s.config.api, { stateDir: `${s.dir}/state` });
  t.after(() => listening.close());
  assert.equal(listed, false);
  const r = await get(listening.socket, "/api/v1/vms");
  assert.equal(r.status, 200);
  assert.deepEqual((r.body as Array<{ name: string }>).map((v) => v.name).sort(), ["slow1", "vm1"]);
  await starting;
});
