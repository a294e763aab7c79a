// The web UI against a real daemon (`strata daemon`, HTTPS) with real restore points made by the
// strata CLI on image-file VMs, driven in Debian's headless chromium by playwright-core. Every
// test asserts that the browser saw no console error and no page error.
import assert from "node:assert/strict";
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { before, test } from "node:test";
import type { Browser } from "playwright-core";
import { makeExt4, sh } from "../files/images.js";
import { strataOk } from "../helpers/cli.js";
import { writeImage } from "../server/helpers.js";
import {
  fetchRaw,
  fileTempDir,
  launchBrowser,
  logIn,
  makeToken,
  openPage,
  type RunningDaemon,
  screenshot,
  startDaemon,
} from "./helpers.js";

let browser: Browser;
let d: RunningDaemon;
const tokens: Record<string, string> = {};
/** What web1's ext4 disk holds, to compare downloads with. */
const FILE_TEXT = "hello from the restore point\n".repeat(1000);

// CLI restore points of two image-file VMs (web1 with an ext4 disk), then a daemon over them
// serving the UI over HTTPS, for the whole file.
const dir = fileTempDir(async () => {
  await d?.stop();
  await browser?.close();
});
before(async () => {
  browser = await launchBrowser();
  const repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const tree = join(dir, "tree");
  mkdirSync(join(tree, "etc"), { recursive: true });
  writeFileSync(join(tree, "etc", "motd"), FILE_TEXT);
  writeFileSync(join(tree, "etc", "hostname"), "web1\n");
  const web1 = join(dir, "web1.img");
  await makeExt4(web1, 32 << 20, tree);
  const db1 = join(dir, "db1.img");
  writeImage(db1, 24);
  const big1 = join(dir, "big1.img");
  writeImage(big1, 24);
  for (let i = 0; i < 3; i++) await strataOk(["backup", "--repo", repo, "--vm", "web1", `file:${web1}`]);
  await strataOk(["backup", "--repo", repo, "--vm", "db1", `file:${db1}`]);
  const catalog = join(dir, "catalog.db");
  await strataOk(["catalog", "rebuild", "--repo", repo, "--catalog", catalog]);
  const stateDir = join(dir, "state");
  const socket = join(dir, "strata.sock");
  d = await startDaemon(
    dir,
    `catalog: ${catalog}
state-dir: ${stateDir}
api: { socket: ${socket}, restore-targets: [${dir}] }
repositories:
  main: { path: ${repo} }
vms:
  web1: { sources: ["file:${web1}"] }
  db1: { sources: ["file:${db1}"] }
  big1: { sources: ["file:${big1}"] }
policies:
  nightly:
    repository: main
    vms: { names: [web1] }
    schedule: "0 3 * * *"
    retention: { keep-last: 2 }
  slow:
    repository: main
    vms: { names: [db1] }
    schedule: "0 4 * * *"
    limits: { job-bandwidth: 8 }
  crawl:
    repository: main
    vms: { names: [big1] }
    schedule: "0 5 * * *"
    limits: { job-bandwidth: 1 }
`,
    { catalog, stateDir, socket },
  );
  for (const role of ["operator", "read", "admin"]) tokens[role] = await makeToken(catalog, role);
});

test("the daemon serves the built UI with content types, and nothing outside it", async () => {
  const index = await fetchRaw(d, "/");
  assert.equal(index.status, 200);
  assert.equal(index.headers["content-type"], "text/html; charset=utf-8");
  assert.match(String(index.headers["content-security-policy"]), /default-src 'self'/);
  const html = index.body.toString();
  const js = /src="(\/assets\/[^"]+\.js)"/.exec(html)?.[1];
  const css = /href="(\/assets\/[^"]+\.css)"/.exec(html)?.[1];
  assert.ok(js && css, html);
  const script = await fetchRaw(d, js);
  assert.equal(script.status, 200);
  assert.equal(script.headers["content-type"], "text/javascript; charset=utf-8");
  assert.match(String(script.headers["cache-control"]), /immutable/);
  assert.equal((await fetchRaw(d, css)).headers["content-type"], "text/css; charset=utf-8");
  // A route of the app gets index.html; a missing asset does not.
  assert.equal((await fetchRaw(d, "/vm/web1")).body.toString(), html);
  assert.equal((await fetchRaw(d, "/assets/nothing.js")).status, 404);
  // Nothing outside the build is reachable, however the path is spelled.
  for (const p of [
    "/../package.json",
    "/assets/../../package.json",
    "/%2e%2e/%2e%2e/package.json",
    "/assets/..%2f..%2f..%2fpackage.json",
    "/..%5c..%5cpackage.json",
    "//etc/passwd",
    "/assets/%00.js",
  ]) {
    const r = await fetchRaw(d, p);
    assert.ok(!r.body.toString().includes('"name": "strata"'), `${p} answered the package file`);
    assert.ok(!r.body.toString().includes("root:"), `${p} answered /etc/passwd`);
    assert.ok(r.status === 404 || r.body.toString() === html, `${p}: ${r.status}`);
  }
  // The API stays the API: JSON 404 for an unknown route, not the app.
  const api = await fetchRaw(d, "/api/v1/nothing", { token: tokens.read! });
  assert.equal(api.status, 404);
  assert.match(String(api.headers["content-type"]), /application\/json/);
});

test("log in, see the VMs failures first, open a VM's restore-point timeline", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.operator!, "operator");
  const rows = w.page.getByTestId("vm-table").locator("tbody tr");
  await rows.first().waitFor();
  // big1 was never backed up: at risk, so first; the two others are protected, by name.
  assert.deepEqual(await rows.evaluateAll((trs) => trs.map((tr) => tr.getAttribute("data-vm"))), [
    "big1",
    "db1",
    "web1",
  ]);
  assert.match((await rows.first().textContent()) ?? "", /never backed up/);
  await w.page.getByText("stored", { exact: true }).first().waitFor();
  await w.page.locator(".chart canvas").first().waitFor();
  await w.page.getByRole("link", { name: "web1" }).click();
  const points = w.page.getByTestId("point-table").locator("tbody tr");
  await w.page.getByText("3 in all").waitFor();
  assert.equal(await points.count(), 3);
  assert.equal(await w.page.locator("svg.timeline rect.mark").count(), 3);
  await w.page.getByText("policy nightly").waitFor();
  await screenshot(w, "timeline");
  assert.deepEqual(w.errors, []);
});

test("run a backup from the jobs page and watch its progress reach 100 %", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.operator!, "operator");
  await w.page.getByRole("link", { name: "Policies and jobs" }).click();
  const row = w.page.locator("[data-job]").filter({ hasText: "slow" }).filter({ hasText: "backup" });
  await row.getByRole("button", { name: "Run now" }).click();
  await row.locator(".run-progress").waitFor();
  // Record every figure shown until the run ends, read in the page (cheap: one evaluate).
  const seen: number[] = [];
  const end = Date.now() + 150_000;
  for (;;) {
    const s = await row.evaluate((tr) => {
      const bar = tr.querySelector(".run-progress");
      return {
        outcome: bar?.getAttribute("data-outcome") ?? null,
        pct: bar?.querySelector("[data-testid=progress-pct]")?.textContent ?? null,
      };
    });
    if (s.pct) seen.push(Number(s.pct.replace(/\s*%/, "")));
    if (s.outcome && s.outcome !== "running") {
      assert.equal(s.outcome, "success");
      break;
    }
    assert.ok(Date.now() < end, `no end after 150 s; seen ${seen}`);
    await new Promise((r) => setTimeout(r, 100));
  }
  assert.equal(seen.at(-1), 100, `progress seen: ${seen}`);
  assert.ok(
    seen.some((p) => p > 0 && p < 100),
    `progress moved through the run: ${seen}`,
  );
  for (let i = 1; i < seen.length; i++) assert.ok(seen[i]! >= seen[i - 1]!, `never backwards: ${seen}`);
  console.log(`backup progress seen in the browser: ${[...new Set(seen)].join(" → ")} %`);
  assert.deepEqual(w.errors, []);
});

test("a read token (logged in by keyboard) sees state but no run, cancel or restore controls; the API refuses them; the theme follows the system", async (t) => {
  const w = await openPage(t, browser, d);
  // By keyboard alone: the token field has the focus, Enter logs in, Tab reaches a VM's link.
  await w.page.goto("/");
  await w.page.waitForFunction("document.activeElement?.id === 'token'");
  await w.page.keyboard.type(tokens.read!);
  await w.page.keyboard.press("Enter");
  await w.page.getByTestId("role").filter({ hasText: "role read" }).waitFor();
  await w.page.getByTestId("vm-table").locator("tbody tr").first().waitFor();
  let tabs = 0;
  while ((await w.page.evaluate("document.activeElement?.textContent")) !== "web1") {
    assert.ok(++tabs <= 40, "Tab reaches the link to web1");
    await w.page.keyboard.press("Tab");
  }
  await w.page.keyboard.press("Enter");
  await w.page.getByText("in all").first().waitFor();
  // The theme follows the system's: dark asked, dark given.
  const bg = () => w.page.evaluate("getComputedStyle(document.documentElement).backgroundColor");
  await w.page.emulateMedia({ colorScheme: "light" });
  const light = await bg();
  await w.page.emulateMedia({ colorScheme: "dark" });
  assert.equal(await bg(), "rgb(20, 23, 28)");
  assert.equal(light, "rgb(247, 248, 250)");
  await w.page.getByTestId("point-table").locator("tbody tr").first().waitFor();
  assert.equal(
    await w.page
      .getByRole("button", { name: /restore|browse|boot|configuration|forget|run now|cancel/i })
      .count(),
    0,
  );
  assert.equal(await w.page.getByRole("link", { name: /browse/i }).count(), 0);
  await w.page.getByRole("link", { name: "Policies and jobs" }).click();
  await w.page.getByTestId("job-table").locator("tbody tr").first().waitFor();
  assert.equal(await w.page.getByRole("button", { name: /run now|cancel/i }).count(), 0);
  // The preview is a read action: shown and answered.
  await w.page
    .getByRole("listitem")
    .filter({ hasText: "nightly" })
    .getByRole("button", { name: "Retention preview" })
    .click();
  await w.page.getByTestId("retention-preview").waitFor();
  const refused = await fetchRaw(d, "/api/v1/jobs/1/run", { method: "POST", token: tokens.read! });
  assert.equal(refused.status, 403);
  assert.deepEqual(w.errors, []);
});

test("browse into an ext4 restore point and download a file and a folder that match", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.operator!, "operator");
  await w.page.getByRole("link", { name: "web1" }).click();
  const newest = w.page.getByTestId("point-table").locator("tbody tr").first();
  // An operator sees the restore controls.
  await newest.getByRole("button", { name: "Restore…" }).waitFor();
  for (const name of ["Restore…", "Configuration", "Boot (instant)"])
    assert.equal(await newest.getByRole("button", { name }).count(), 1, name);
  assert.equal(await newest.getByRole("button", { name: "Forget" }).count(), 0, "forget is admin's");
  await newest.getByRole("link", { name: "Browse files" }).click();
  // One filesystem on the disk: chosen at once, its root listed.
  await w.page.getByText(/ext4 on /).waitFor();
  await w.page.getByRole("button", { name: "etc/" }).click();
  const motd = w.page.getByTestId("file-table").locator('tr[data-path="/etc/motd"]');
  await motd.waitFor();
  assert.match((await motd.textContent()) ?? "", /28\.3 KiB/);
  await screenshot(w, "files");
  const [file] = await Promise.all([
    w.page.waitForEvent("download"),
    motd.getByRole("button", { name: "Download motd" }).click(),
  ]);
  assert.equal(file.suggestedFilename(), "motd");
  assert.equal(readFileSync((await file.path())!, "utf8"), FILE_TEXT);
  const [tar] = await Promise.all([
    w.page.waitForEvent("download"),
    w.page.getByRole("button", { name: "Download this folder (tar)" }).click(),
  ]);
  assert.equal(tar.suggestedFilename(), "etc.tar");
  const listing = await sh("tar", ["-tvf", (await tar.path())!]);
  assert.match(listing, /etc\/motd/);
  assert.match(listing, /etc\/hostname/);
  assert.equal(await sh("tar", ["-xOf", (await tar.path())!, "etc/motd"]), FILE_TEXT);
  assert.deepEqual(w.errors, []);
});

test("restore one disk of a restore point into a folder from the restore dialog, bit-exact", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.operator!, "operator");
  await w.page.getByRole("link", { name: "web1" }).click();
  const newest = w.page.getByTestId("point-table").locator("tbody tr").first();
  const id = (await newest.getAttribute("data-point"))!;
  const [vm, time] = [id.slice(0, id.indexOf("/")), id.slice(id.indexOf("/") + 1)];
  const layout = JSON.parse(
    (
      await fetchRaw(d, `/api/v1/restore-points/${vm}/${encodeURIComponent(time)}/layout`, {
        token: tokens.operator!,
      })
    ).body.toString(),
  ) as { disks: Array<{ disk: string }> };
  const disk = layout.disks[0]!.disk;
  await newest.getByRole("button", { name: "Restore…" }).click();
  const dialog = w.page.getByRole("dialog");
  await dialog.getByLabel("One disk").check();
  await dialog.getByRole("textbox", { name: "Disk" }).fill(disk);
  const target = join(dir, "restored");
  mkdirSync(target);
  await dialog.getByLabel(/^Host directory/).fill(target);
  await dialog.getByLabel("Format").selectOption("raw");
  await dialog.getByRole("button", { name: "Restore" }).click();
  await dialog.locator('.run-progress[data-outcome="success"]').waitFor({ timeout: 120_000 });
  assert.equal(await dialog.getByTestId("progress-pct").textContent(), "100 %");
  const files = readdirSync(target);
  assert.equal(files.length, 1, `one disk restored: ${files}`);
  assert.ok(readFileSync(join(target, files[0]!)).equals(readFileSync(join(dir, "web1.img"))), "bit-exact");
  assert.deepEqual(w.errors, []);
});

test("cancel a running backup from the jobs page: it ends cancelled", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.operator!, "operator");
  await w.page.getByRole("link", { name: "Policies and jobs" }).click();
  const row = w.page.locator("[data-job]").filter({ hasText: "crawl" }).filter({ hasText: "backup" });
  await row.getByRole("button", { name: "Run now" }).click();
  // 24 MiB at 1 MiB/s: long enough to cancel.
  await row.getByRole("button", { name: "Cancel" }).click();
  await row.locator('.run-progress[data-outcome="cancelled"]').waitFor({ timeout: 60_000 });
  const jobs = JSON.parse(
    (await fetchRaw(d, "/api/v1/jobs", { token: tokens.read! })).body.toString(),
  ) as Array<{
    policy: string;
    kind: string;
    runs: Array<{ outcome: string; error: string | null }>;
  }>;
  const run = jobs.find((j) => j.policy === "crawl" && j.kind === "backup")!.runs[0]!;
  assert.equal(run.outcome, "cancelled");
  assert.match(run.error ?? "", /through the API/);
  assert.deepEqual(w.errors, []);
});

test("an admin forgets a restore point from the timeline; an operator has no such button", async (t) => {
  const w = await openPage(t, browser, d);
  await logIn(w, tokens.admin!, "admin");
  await w.page.getByRole("link", { name: "web1" }).click();
  await w.page.getByText("3 in all").waitFor();
  const oldest = w.page.getByTestId("point-table").locator("tbody tr").last();
  const id = (await oldest.getAttribute("data-point"))!;
  w.page.once("dialog", (dlg) => dlg.accept());
  await oldest.getByRole("button", { name: "Forget" }).click();
  await w.page.getByText("2 in all").waitFor();
  assert.equal(await w.page.locator(`tr[data-point="${id}"]`).count(), 0);
  const left = JSON.parse(
    (await fetchRaw(d, "/api/v1/vms/web1/restore-points", { token: tokens.read! })).body.toString(),
  ) as { total: number; items: Array<{ id: string }> };
  assert.equal(left.total, 2);
  assert.ok(!left.items.some((p) => p.id === id));
  assert.deepEqual(w.errors, []);
});
