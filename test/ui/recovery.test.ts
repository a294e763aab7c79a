// Instant recovery from the web UI: a live backup of the test guest made by the strata CLI, then
// in the browser (operator token, real daemon over HTTPS) its captured configuration shown, the
// VM booted from the restore point as a clone, seen running on the instant recovery page,
// migrated to production storage at a speed limit, and stopped with its overlays discarded. QEMU runs under TCG here, so this file is the slow one.
import assert from "node:assert/strict";
import { existsSync, readFileSync } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { strataOk, summary, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm } from "../helpers/vm.js";
import { fetchRaw, launchBrowser, logIn, makeToken, openPage, screenshot, startDaemon } from "./helpers.js";

/** True while `pid` runs (a zombie does not count). */
function alive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
  } catch {
    return false;
  }
}

interface Described {
  name: string;
  phase: string;
  vm: { pid: number | null; running: boolean };
  serve: { pid: number | null; running: boolean };
}

test("start and stop an instant recovery of a test guest's restore point from the UI", {
  timeout: 400_000,
}, async (t) => {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const stateDir = join(dir, "state");
  const env = { STRATA_STATE_DIR: stateDir };
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  const g = await bootWorkloadVm(t, {
    disks: [{ id: "vblk0", format: "qcow2", size: "64M", ext4: true }],
    workload: [],
  });
  const b = summary<{ id: string }>(
    await strataOk(
      ["--repo", repo, "backup", "--vm", "guest", "--json", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`],
      {
        env,
      },
    ),
  );
  await g.vm.stop({ timeoutMs: 10_000 });
  const catalog = join(dir, "catalog.db");
  await strataOk(["catalog", "rebuild", "--repo", repo, "--catalog", catalog]);
  const socket = join(dir, "strata.sock");
  const d = await startDaemon(
    dir,
    `catalog: ${catalog}
state-dir: ${stateDir}
api: { socket: ${socket}, restore-targets: [${dir}] }
repositories:
  main: { path: ${repo} }
policies:
  nightly:
    repository: main
    vms: all
    schedule: "0 3 * * *"
`,
    { catalog, stateDir, socket },
  );
  const pids: number[] = [];
  t.after(async () => {
    // Whatever a failed assertion left running.
    for (const pid of pids) if (alive(pid)) process.kill(pid, "SIGKILL");
    await d.stop();
  });
  const token = await makeToken(catalog, "operator");
  const browser = await launchBrowser();
  t.after(() => browser.close());
  const w = await openPage(t, browser, d);
  await logIn(w, token, "operator");
  await w.page.goto(`/#/vm/guest`);
  const point = w.page.locator(`tr[data-point="${b.id}"]`);
  await point.getByRole("button", { name: "Configuration" }).click();
  const config = w.page.getByTestId("vm-config");
  await config.waitFor();
  assert.match((await config.textContent()) ?? "", /"kind": "qemu"/);
  await w.page.getByRole("dialog").getByRole("button", { name: "Close" }).click();

  await point.getByRole("button", { name: "Boot (instant)" }).click();
  const dialog = w.page.getByRole("dialog");
  await dialog.getByLabel(/^Name/).fill("guest-ir");
  await dialog.getByLabel(/^Host directory for overlays/).fill(join(dir, "ir"));
  await dialog.getByRole("button", { name: "Boot" }).click();
  const row = w.page.locator('tr[data-instant="guest-ir"]');
  await row.waitFor({ timeout: 180_000 });
  await row.getByText("running", { exact: true }).first().waitFor();
  const api = async () =>
    JSON.parse((await fetchRaw(d, "/api/v1/instant", { token })).body.toString()) as Described[];
  const [s] = await api();
  assert.equal(s?.name, "guest-ir");
  assert.ok(s.vm.running && s.serve.running, JSON.stringify(s));
  pids.push(s.vm.pid!, s.serve.pid!);
  assert.ok(alive(s.vm.pid) && alive(s.serve.pid), "QEMU and the server run");
  await screenshot(w, "instant");

  // Migrate to production storage at a speed limit, followed to its end.
  const prod = join(dir, "prod");
  await row.getByLabel("production directory").fill(prod);
  await row.getByLabel("format").selectOption("raw");
  await row.getByLabel("speed limit MiB/s").fill("32");
  await row.getByRole("button", { name: "Migrate" }).click();
  await row.locator('.run-progress[data-outcome="success"]').waitFor({ timeout: 180_000 });
  await row.getByTestId("instant-phase").filter({ hasText: "migrated" }).waitFor();
  assert.ok(existsSync(join(prod, "vblk0.raw")), "the disk is in production storage");

  await row.getByRole("button", { name: "Stop" }).click();
  await w.page.getByTestId("instant-empty").waitFor({ timeout: 60_000 });
  assert.deepEqual(await api(), []);
  for (const pid of pids) assert.equal(alive(pid), false, `pid ${pid} is gone`);
  assert.deepEqual(w.errors, []);
});
