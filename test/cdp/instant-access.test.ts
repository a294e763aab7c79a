// Instants of a protected VM used like restore points, served from the journal without writing
// an image first: while `strata protect` runs, the guest writes stamp files (each settled by
// sync and a freeze) into an ext4 disk and records into another; `files ls/get VM@T` at instants
// between stamps show exactly the stamps written before T, `serve VM@T` exports disks holding the
// records up to T and byte-identical to `restore VM@T`, and `instant VM@T` boots a clone whose
// guest sees the stamps of T.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { existsSync } from "node:fs";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { promisify } from "node:util";
import { QgaClient } from "../../src/hypervisor/qemu/qga.js";
import { protectedGuest, protectSynced, startProtect } from "../helpers/cdp.js";
import { collect, startStrata, strataOk, summary } from "../helpers/cli.js";
import { journalRecordTimes, verifyRecords } from "../helpers/records.js";
import { until } from "../helpers/vm.js";

const run = promisify(execFile);

async function guestSh(qga: QgaClient, script: string): Promise<string> {
  const r = await qga.exec("/bin/sh", ["-c", script], { timeoutMs: 60_000 });
  assert.equal(r.exitcode, 0, `guest: ${script}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

const sha = async (path: string) =>
  createHash("sha256")
    .update(await readFile(path))
    .digest("hex");

function alive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
    return true;
  } catch {
    return false;
  }
}

describe("instants of a protected VM as restore points", { timeout: 900_000 }, () => {
  test("files ls/get, serve and instant recovery at T, from the journal's extents", async (t) => {
    const { dir, repo, journal, env, g } = await protectedGuest(t, {
      data: true,
      wlsize: "16M",
      rate: 50,
      seq: 20,
    });
    // A restore point of the VM first: instant recovery boots with its configuration.
    await strataOk(
      ["backup", "--repo", repo, "--vm", "live", `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`],
      {
        env,
      },
    );
    const { child, out } = startProtect(t, { repo, journal, env, g });
    await protectSynced({ child, out }, journal);
    // Stamp k is on the disk (synced, and the filesystem clean: frozen once) from after[k] on,
    // and stamp k+1 not before before[k+1].
    const qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 60_000 });
    const before: number[] = [];
    const after: number[] = [];
    for (let k = 1; k <= 4; k++) {
      await sleep(2000);
      before[k] = Date.now();
      await guestSh(
        qga,
        `echo stamp-${k} > /mnt/data/stamp-${k} && sync && fsfreeze --freeze /mnt/data && fsfreeze --unfreeze /mnt/data`,
      );
      after[k] = Date.now();
    }
    await qga.close();
    await sleep(2000);
    before[5] = Date.now();
    child.kill("SIGINT");
    const res = await out.result;
    assert.equal(res.code, 0, res.stderr);
    const between = (k: number) => Math.floor(after[k]! + (before[k + 1]! - after[k]!) / 2);
    const instants = [
      { k: 0, T: before[1]! - 1000 },
      { k: 2, T: between(2) },
      { k: 4, T: between(4) },
    ];

    for (const { k, T } of instants) {
      const at = `live@${new Date(T).toISOString()}`;
      const ls = JSON.parse(
        (await strataOk(["files", "ls", "--repo", repo, at, "--journal", journal, "vblk1", "/", "--json"]))
          .stdout,
      ) as { id: string; entries: Array<{ name: string }> };
      assert.equal(ls.id, at);
      assert.deepEqual(
        ls.entries
          .map((e) => e.name)
          .filter((n) => n.startsWith("stamp-"))
          .sort(),
        Array.from({ length: k }, (_, i) => `stamp-${i + 1}`),
        `${at}: the stamps written before it`,
      );
      if (k > 0) {
        const to = join(dir, `files-${k}`);
        await strataOk([
          "files",
          "get",
          "--repo",
          repo,
          at,
          `/stamp-${k}`,
          "--journal",
          journal,
          "--disk",
          "vblk1",
          "--to",
          to,
        ]);
        assert.equal(await readFile(join(to, `stamp-${k}`), "utf8"), `stamp-${k}\n`);
      }
    }

    // serve at T: the same bytes as restore at T, records up to T and none after.
    const T = instants[2]!.T;
    const at = `live@${new Date(T).toISOString()}`;
    const socket = join(dir, "at.sock");
    const server = startStrata(
      ["serve", "--repo", repo, at, "--journal", journal, "--socket", socket, "--json"],
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
    for (const disk of ["vblk0", "vblk1"])
      await run("qemu-img", [
        "convert",
        "-f",
        "raw",
        `nbd+unix:///${disk}?socket=${socket}`,
        "-O",
        "raw",
        join(dir, `served-${disk}.raw`),
      ]);
    server.kill("SIGINT");
    assert.equal((await served.result).code, 0, served.stderr);
    const target = join(dir, "restored");
    await strataOk(["restore", "--repo", repo, at, "--journal", journal, "--target", target]);
    for (const disk of ["vblk0", "vblk1"])
      assert.equal(await sha(join(dir, `served-${disk}.raw`)), await sha(join(target, `${disk}.raw`)), disk);
    const scan = await verifyRecords(join(dir, "served-vblk0.raw"));
    assert.ok(scan.gapFree, `missing ${scan.missing.slice(0, 5)}`);
    const { times } = await journalRecordTimes(journal);
    const m = times.get("vblk0")!;
    const Tns = BigInt(T) * 1_000_000n;
    const tL = m.get(scan.lastSeq);
    if (tL !== undefined) assert.ok(tL <= Tns, `record ${scan.lastSeq} was journaled after T`);
    const tNext = m.get(scan.lastSeq + 1);
    assert.ok(
      tNext === undefined || tNext > Tns,
      `record ${scan.lastSeq + 1}, journaled before T, is missing`,
    );

    // instant recovery at the instant between stamps 2 and 3: the clone's guest sees stamps 1-2.
    await g.vm.stop({ timeoutMs: 10_000 });
    const T2 = `live@${new Date(instants[1]!.T).toISOString()}`;
    const target2 = join(dir, "ir");
    const s = summary<{ vm: { pid: number; console: string }; serve: { pid: number } }>(
      await strataOk(
        [
          "instant",
          "--repo",
          repo,
          T2,
          "--journal",
          journal,
          "--name",
          "live-t2",
          "--target",
          target2,
          "--json",
        ],
        { env },
      ),
    );
    t.after(async () => {
      for (const pid of [s.vm.pid, s.serve.pid]) if (alive(pid)) process.kill(pid, "SIGKILL");
    });
    await until("the clone's guest", 180_000, async () =>
      /STRATA-GUEST-READY/.test(await readFile(s.vm.console, "utf8").catch(() => "")) ? true : undefined,
    );
    const qga2 = new QgaClient(join(target2, "run", "qga.sock"), { timeoutMs: 60_000 });
    const listing = await guestSh(qga2, "ls /mnt/data");
    await qga2.close();
    assert.deepEqual(
      listing
        .split(/\s+/)
        .filter((n) => n.startsWith("stamp-"))
        .sort(),
      ["stamp-1", "stamp-2"],
    );
    await strataOk(["instant", "stop", "live-t2", "--discard"], { env });
  });
});
