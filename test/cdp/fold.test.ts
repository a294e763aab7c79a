// Folding a protected VM's journal into restore points while the guest writes records: every
// --fold interval a crash-consistent restore point appears (only what the journal wrote since the
// previous one is read), segments older than --window are dropped, and with forget and gc run
// beside the running protect nothing is lost: the latest instant and the oldest one of the
// window restore with exactly the records written up to them (served over the newest fold: the
// same bytes), and a fold restore point restores on its own like any backup.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readdir, readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { promisify } from "node:util";
import { protectedGuest, startProtect } from "../helpers/cdp.js";
import { collect, startStrata, strataOk, summary } from "../helpers/cli.js";
import { journalRecordTimes, verifyRecords } from "../helpers/records.js";
import { until } from "../helpers/vm.js";

const run = promisify(execFile);
const sha = async (path: string) =>
  createHash("sha256")
    .update(await readFile(path))
    .digest("hex");

interface Status {
  folds?: number;
  lastFold?: { id: string; at: string; durationMs: number; bytesRead: number; segmentsDropped: number };
  foldError?: string;
  completeUntil?: string;
}

describe("folding the journal into restore points", { timeout: 900_000 }, () => {
  test("fold + window + forget + gc beside a running protect lose nothing", async (t) => {
    const pg = await protectedGuest(t, { wlsize: "16M", seq: 30 });
    const { dir, repo, journal, env } = pg;
    const { child, out } = startProtect(t, pg, { extra: ["--fold", "10s", "--window", "40s"] });
    const status = async () =>
      JSON.parse(await readFile(join(journal, "status.json"), "utf8").catch(() => "{}")) as Status;
    const folds = (n: number) =>
      until(`${n} folds`, 240_000, async () => {
        if (child.exitCode !== null) throw new Error(`protect ended: ${out.stderr}`);
        return ((await status()).folds ?? 0) >= n ? true : undefined;
      });
    await folds(3);
    // Beside the running protect: keep the 2 newest restore points, collect the rest.
    await strataOk(["forget", "--repo", repo, "--keep-last", "2", "--vm", "live"], { env });
    await strataOk(["gc", "--repo", repo], { env });
    // Folding goes on, and the window passes: old segments are dropped.
    await folds(7);
    const st = await status();
    child.kill("SIGINT");
    const res = await out.result;
    assert.equal(res.code, 0, res.stderr);
    assert.equal(st.foldError, undefined, st.foldError);
    t.diagnostic(
      `last fold: ${JSON.stringify(st.lastFold)}; protect said: ${`${res.stdout}\n${res.stderr}`
        .split("\n")
        .filter((l) => /folded/.test(l))
        .join(" | ")}`,
    );

    const meta = JSON.parse(await readFile(join(journal, "journal.json"), "utf8")) as {
      droppedBeforeNs?: string;
      bases: Array<{ snapshot: string; startNs: string; cutNs: string }>;
    };
    assert.ok(meta.droppedBeforeNs !== undefined, "segments older than the window were dropped");
    const points = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
      id?: string;
      vm: string;
      time: string;
      consistency: string;
    }>;
    assert.ok(points.length >= 5, `${points.length} restore points`);
    for (const p of points) assert.equal(p.consistency, "crash-consistent");
    // Folds after the first read only what the journal wrote since the one before.
    const lastBase = meta.bases.at(-1)!;
    assert.ok(
      st.lastFold!.bytesRead < 2 * 64 * 1024 * 1024,
      `the last fold read ${st.lastFold!.bytesRead} bytes`,
    );

    const final = JSON.parse(await readFile(join(journal, "status.json"), "utf8")) as Status;
    const toMs = Date.parse(final.completeUntil!);
    const ps = summary<{ from: string }>(
      await strataOk(["protect", "status", "live", "--repo", repo, "--journal", journal, "--json"]),
    );
    const fromMs = Date.parse(ps.from);
    assert.ok(toMs - fromMs >= 30_000, `window ${ps.from} .. ${final.completeUntil}`);
    assert.ok(BigInt(fromMs) * 1_000_000n >= BigInt(meta.droppedBeforeNs!) - 1_000_000n);
    const { times } = await journalRecordTimes(journal);
    const check = async (name: string, T: number) => {
      const at = new Date(T).toISOString();
      const target = join(dir, name);
      await strataOk(["restore", "--repo", repo, `live@${at}`, "--journal", journal, "--target", target]);
      const Tns = BigInt(T) * 1_000_000n;
      const last: number[] = [];
      for (const disk of ["vblk0", "vblk1"]) {
        const scan = await verifyRecords(join(target, `${disk}.raw`));
        assert.ok(scan.gapFree, `${name} ${disk}: missing ${scan.missing.slice(0, 5)}`);
        const m = times.get(disk)!;
        const tL = m.get(scan.lastSeq);
        if (tL !== undefined)
          assert.ok(tL <= Tns, `${name} ${disk}: record ${scan.lastSeq} journaled after T`);
        const tNext = m.get(scan.lastSeq + 1);
        assert.ok(
          tNext === undefined || tNext > Tns,
          `${name} ${disk}: record ${scan.lastSeq + 1} is missing`,
        );
        last.push(scan.lastSeq);
      }
      assert.ok(last[0]! - last[1]! === 0 || last[0]! - last[1]! === 1, `${name}: ${last}`);
      return last[0]!;
    };
    const latest = await check("latest", toMs - 200);
    // Served from the journal's extents over the newest fold: the bytes the restore wrote.
    const socket = join(dir, "latest.sock");
    const server = startStrata(
      [
        "serve",
        "--repo",
        repo,
        `live@${new Date(toMs - 200).toISOString()}`,
        "--journal",
        journal,
        "--socket",
        socket,
      ],
      { env },
    );
    const served = collect(server);
    t.after(() => {
      if (server.exitCode === null) server.kill("SIGKILL");
    });
    await until("the NBD socket", 60_000, async () => {
      if (server.exitCode !== null) throw new Error(`serve ended: ${served.stderr}`);
      return existsSync(socket) ? true : undefined;
    });
    for (const disk of ["vblk0", "vblk1"]) {
      const copy = join(dir, `served-${disk}.raw`);
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        `nbd+unix:///${disk}?socket=${socket}`,
        "-O",
        "raw",
        copy,
      ]);
      assert.equal(await sha(copy), await sha(join(dir, "latest", `${disk}.raw`)), `served ${disk}`);
    }
    server.kill("SIGINT");
    assert.equal((await served.result).code, 0, served.stderr);
    const oldest = await check("oldest", fromMs + 500);
    assert.ok(latest > oldest, `${oldest} .. ${latest}`);
    // A fold restore point restores on its own, like any backup.
    const target = join(dir, "fold");
    await strataOk(["restore", "--repo", repo, lastBase.snapshot, "--target", target]);
    const images = (await readdir(target)).filter((n) => /\.(raw|qcow2)$/.test(n));
    assert.equal(images.length, 2, `${images}`);
    for (const f of images) {
      const scan = await verifyRecords(join(target, f), { format: f.endsWith(".raw") ? "raw" : "qcow2" });
      assert.ok(scan.gapFree && scan.lastSeq > 0, `${lastBase.snapshot} ${f}`);
    }
  });
});
