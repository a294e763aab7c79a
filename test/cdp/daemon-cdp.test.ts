// Continuous data protection under the daemon: the real binary (bin/strata daemon) runs a policy
// with cdp over a running test guest (real QEMU, TCG). Its strata protect child comes up, the API
// (GET /api/v1/vms, the VM's restore points) shows the window growing, the journal's size, the
// lag and a mark; the child killed with -9 is started again (a new pid, resuming its journal) and the
// window shows again; a reload without cdp stops the child and leaves nothing on the VM; cdp
// put back and the daemon stopped (SIGTERM) leaves nothing on the VM either (no mirror job, no
// strata-cdp bitmap, no NBD node or export, no state record). The web UI shows the window on the
// dashboard and on the VM's page (headless chromium).
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { request } from "node:http";
import { join } from "node:path";
import { describe, test } from "node:test";
import { collect, startStrata, strataOk, tempDir } from "../helpers/cli.js";
import { bootWorkloadVm, leftovers, until } from "../helpers/vm.js";
import { freePort, launchBrowser, logIn, makeToken, openPage, type RunningDaemon } from "../ui/helpers.js";

interface Cdp {
  state: string;
  pid: number | null;
  journal: string | null;
  from: string | null;
  to: string | null;
  journalBytes: number;
  lagMs: number | null;
  gaps: Array<{ from: string; to: string | null }>;
  starts: number;
  marks: Array<{ name: string; time: string }>;
}

function get<T>(socket: string, path: string): Promise<T> {
  return new Promise((resolve, reject) => {
    const req = request({ socketPath: socket, path }, (res) => {
      let text = "";
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        text += d;
      });
      res.on("end", () =>
        res.statusCode === 200
          ? resolve(JSON.parse(text) as T)
          : reject(new Error(`${path}: ${res.statusCode} ${text}`)),
      );
    });
    req.on("error", reject);
    req.end();
  });
}

const alive = (pid: number) => {
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
};

describe("cdp under the daemon", { timeout: 1_200_000 }, () => {
  test("the daemon keeps a protect running, shows its window, restarts it, and stops it leaving nothing", async (t) => {
    const dir = tempDir(t);
    const repo = join(dir, "repo");
    const state = join(dir, "state");
    const socket = join(dir, "strata.sock");
    const journalDir = join(dir, "journal");
    await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "32M" }],
      workload: ["/dev/vda"],
      wlsize: "8M",
      rate: 50,
    });
    await g.waitSeq(10);
    const port = await freePort();
    const config = join(dir, "strata.yaml");
    const yaml = (cdp: boolean) => `catalog: ${join(dir, "catalog.db")}
state-dir: ${state}
api: { socket: ${socket}, https: { listen: "127.0.0.1:${port}" } }
repositories:
  main: { path: ${repo} }
vms:
  live: { sources: ["qmp:${g.vm.qmpSocket}"] }
policies:
  live:
    repository: main
    vms: { names: [live] }
    schedule: "0 3 * * *"
${cdp ? `    cdp: { journal-dir: ${journalDir}, window: 10m, fold: 5m }\n` : ""}`;
    writeFileSync(config, yaml(true));
    const daemon = startStrata(["daemon", "--config", config]);
    const out = collect(daemon);
    t.after(() => {
      if (daemon.exitCode === null && daemon.signalCode === null) daemon.kill("SIGKILL");
    });
    const cdpOf = async () =>
      (await get<Array<{ name: string; cdp: Cdp | null }>>(socket, "/api/v1/vms")).find(
        (v) => v.name === "live",
      )?.cdp ?? null;
    const windowShown = (why: string, starts: number) =>
      until(why, 300_000, async () => {
        if (daemon.exitCode !== null) throw new Error(`the daemon ended: ${out.stderr}`);
        const c = await cdpOf().catch(() => null);
        return c && c.state === "running" && c.starts === starts && c.from !== null ? c : undefined;
      });

    // The child comes up; the window opens once the first copy is done, and grows.
    const first = await windowShown("the protect's window", 1);
    assert.ok(first.pid !== null && alive(first.pid));
    assert.ok(first.journal?.startsWith(`${journalDir}/live/`), first.journal ?? "no journal");
    assert.equal(typeof first.lagMs, "number");
    await g.waitSeq((await g.seq()) + 20);
    const later = (await cdpOf())!;
    assert.equal(later.from, first.from);
    assert.ok(Date.parse(later.to!) > Date.parse(first.to!), `${later.to} after ${first.to}`);
    assert.ok(
      later.journalBytes > first.journalBytes,
      `journal grew: ${first.journalBytes} -> ${later.journalBytes}`,
    );
    console.log(
      `cdp window ${later.from}..${later.to}, journal ${later.journalBytes} bytes, lag ${later.lagMs} ms`,
    );
    // Killed, the child is started again on the same journal, which it resumes from the dirty
    // bitmaps: the window keeps its start, with a gap for the time protection was down.
    process.kill(first.pid!, "SIGKILL");
    const second = await windowShown("the restarted protect's window", 2);
    assert.notEqual(second.pid, first.pid);
    assert.equal(second.journal, first.journal);
    assert.equal(second.from, first.from);
    const resumed = await until("the resume's gap closed", 120_000, async () => {
      const c = await cdpOf();
      return c && c.gaps.length === 1 && c.gaps[0]!.to !== null ? c : undefined;
    });
    assert.ok(Date.parse(resumed.gaps[0]!.from) < Date.parse(resumed.gaps[0]!.to!));
    assert.match(
      out.stderr + out.stdout,
      /cdp live: strata protect exited \(signal SIGKILL\).*starting again in/,
    );
    assert.match(
      out.stderr + out.stdout,
      /cdp live: strata protect started \(pid \d+\) resuming the journal /,
    );

    // A mark made beside the restarted protect is listed, on the VM and its restore points.
    await strataOk(
      ["protect", "mark", "--repo", repo, "live", "before-upgrade", "--journal", second.journal!],
      {
        env: { STRATA_STATE_DIR: state },
      },
    );
    const page = await get<{ cdp: Cdp | null }>(socket, "/api/v1/vms/live/restore-points");
    assert.deepEqual(
      page.cdp?.marks.map((m) => m.name),
      ["before-upgrade"],
    );

    // The browser shows the window on the dashboard and on the VM's page.
    const token = await makeToken(join(dir, "catalog.db"), "read");
    const browser = await launchBrowser();
    t.after(() => browser.close());
    const w = await openPage(t, browser, { url: `https://127.0.0.1:${port}` } as RunningDaemon);
    await logIn(w, token, "read");
    const cell = w.page.locator('tr[data-vm="live"] [data-cdp="running"]');
    await cell.waitFor({ timeout: 60_000 });
    assert.match((await cell.textContent()) ?? "", /^CDP .+ – .+, lag (\d+ ms|–)$/);
    // Keyboard: the VM's link is reached with Tab and opened with Enter.
    await w.page.locator('tr[data-vm="live"] a').focus();
    await w.page.keyboard.press("Enter");
    const win = w.page.locator('[data-cdp-window="running"]');
    await win.waitFor({ timeout: 60_000 });
    const text = (await win.textContent()) ?? "";
    assert.match(text, /CDP window .+ – .+; protect running \(pid \d+\), journal/);
    assert.match(text, /mark before-upgrade/);
    assert.match(text, /gap .+ – .+: protection was down, instants inside\s+cannot be restored/);
    assert.equal(await w.page.locator(".cdp-window rect.cdp-gap").count(), 1);
    assert.deepEqual(w.errors, []);

    // A reload without cdp stops the child; nothing stays on the VM.
    writeFileSync(config, yaml(false));
    daemon.kill("SIGHUP");
    await until("the protect stopped by the reload", 180_000, async () =>
      !alive(second.pid!) && (await cdpOf()) === null ? true : undefined,
    );
    const clean = { nodes: [], exports: [], jobs: [], bitmaps: [], files: [] };
    const left = await leftovers(g.vm, state);
    assert.deepEqual(
      {
        nodes: left.nodes,
        exports: left.exports,
        jobs: left.jobs,
        bitmaps: Object.values(left.bitmaps).flat(),
        files: left.files.filter((f) => f.includes("live")),
      },
      clean,
    );

    // Back on, then the daemon stopped: the child stops with it, nothing stays on the VM.
    writeFileSync(config, yaml(true));
    daemon.kill("SIGHUP");
    const third = await windowShown("the protect after the reload", 1);
    daemon.kill("SIGTERM");
    await out.result;
    assert.equal(daemon.exitCode, 0, out.stderr);
    assert.ok(!alive(third.pid!));
    const after = await leftovers(g.vm, state);
    assert.deepEqual(
      {
        nodes: after.nodes,
        exports: after.exports,
        jobs: after.jobs,
        bitmaps: Object.values(after.bitmaps).flat(),
        files: after.files.filter((f) => f.includes("live")),
      },
      clean,
    );
    assert.equal(after.status, "running");
  });
});
