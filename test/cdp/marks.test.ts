// Named instants and stopping: `strata protect mark --quiesce` freezes the guest through its
// agent, names the instant, and VM@mark:NAME gives the guest's files as they were at it (a file
// written but never synced included: the freeze flushed it), filesystem-consistent; marks are
// listed by protect status and a name is used once; folds with the agent are
// filesystem-consistent restore points. `strata protect stop` stops a running protect
// and, for one killed with SIGKILL, removes what it left on the VM (mirror, NBD node, bitmap).
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { QgaClient } from "../../src/hypervisor/qemu/qga.js";
import { protectedGuest, protectSynced, startProtect } from "../helpers/cdp.js";
import { strata, strataOk, summary } from "../helpers/cli.js";
import { verifyRecords } from "../helpers/records.js";
import { leftovers, until } from "../helpers/vm.js";

async function guestSh(qga: QgaClient, script: string): Promise<string> {
  const r = await qga.exec("/bin/sh", ["-c", script], { timeoutMs: 60_000 });
  assert.equal(r.exitcode, 0, `guest: ${script}\n${r.stdout}\n${r.stderr}`);
  return r.stdout;
}

describe("marks and protect stop", { timeout: 900_000 }, () => {
  test("a quiesced mark restores by name; protect stop leaves nothing, also after kill -9", async (t) => {
    const pg = await protectedGuest(t, {
      data: true,
      wlsize: "16M",
      rate: 50,
      seq: 20,
    });
    const { dir, repo, state, env, g } = pg;
    const protect = (journal: string, extra: string[] = []) =>
      startProtect(t, pg, { journal, qga: true, extra });
    const synced = (journal: string, p: ReturnType<typeof protect>) => protectSynced(p, journal);
    const journal = join(dir, "journal");
    // Folds every 20 s, each at an instant the agent froze: filesystem-consistent restore points.
    const p = protect(journal, ["--fold", "20s"]);
    await synced(journal, p);
    // The agent's socket takes one client at a time: the test's is closed while strata uses it.
    let qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 60_000 });
    // Written, not synced: only the mark's freeze puts it on the disk.
    await guestSh(qga, "echo one > /mnt/data/stamp-1");
    await qga.close();
    const m = summary<{ id: string; quiesced: boolean }>(
      await strataOk(
        [
          "protect",
          "mark",
          "--repo",
          repo,
          "live",
          "before-upgrade",
          "--quiesce",
          "--journal",
          journal,
          "--json",
        ],
        {
          env,
        },
      ),
    );
    assert.equal(m.id, "live@mark:before-upgrade");
    assert.equal(m.quiesced, true);
    qga = new QgaClient(g.vm.qgaSocket!, { timeoutMs: 60_000 });
    await guestSh(qga, "echo two > /mnt/data/stamp-2 && sync");
    await qga.close();
    await strataOk(["protect", "mark", "--repo", repo, "live", "after", "--journal", journal], { env });
    const again = await strata(["protect", "mark", "--repo", repo, "live", "after", "--journal", journal], {
      env,
    });
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /has a mark named after already/);
    const st = summary<{ marks: Array<{ name: string; quiesced: boolean }> }>(
      await strataOk(["protect", "status", "live", "--repo", repo, "--journal", journal, "--json"]),
    );
    assert.deepEqual(
      st.marks.map((x) => [x.name, x.quiesced]),
      [
        ["before-upgrade", true],
        ["after", false],
      ],
    );

    await until("a fold", 120_000, async () => {
      const s = JSON.parse(await readFile(join(journal, "status.json"), "utf8")) as { folds?: number };
      return (s.folds ?? 0) >= 1 ? true : undefined;
    });
    const points = JSON.parse((await strataOk(["snapshots", "--repo", repo, "--json"])).stdout) as Array<{
      consistency: string;
    }>;
    assert.ok(points.length >= 1);
    for (const x of points) assert.equal(x.consistency, "filesystem-consistent");

    // protect stop: the running protect stops cleanly; nothing stays on the VM.
    const stop = summary<{ stopped: boolean }>(
      await strataOk(["protect", "stop", "live", "--journal", journal, "--json"], { env }),
    );
    assert.equal(stop.stopped, true);
    assert.equal((await p.out.result).code, 0, p.out.stderr);
    let l = await leftovers(g.vm, state);
    assert.deepEqual([l.nodes, l.jobs, l.exports, l.files], [[], [], [], []]);
    for (const [node, names] of Object.entries(l.bitmaps)) assert.deepEqual(names, [], `bitmaps on ${node}`);

    // By name: the files at the quiesced mark, and the restore says what consistency it has.
    const ls = JSON.parse(
      (
        await strataOk([
          "files",
          "ls",
          "--repo",
          repo,
          "live@mark:before-upgrade",
          "--journal",
          journal,
          "vblk1",
          "/",
          "--json",
        ])
      ).stdout,
    ) as { entries: Array<{ name: string }> };
    assert.deepEqual(
      ls.entries.map((e) => e.name).filter((n) => n.startsWith("stamp-")),
      ["stamp-1"],
    );
    const r = await strataOk([
      "restore",
      "--repo",
      repo,
      "live@mark:before-upgrade",
      "--journal",
      journal,
      "--target",
      join(dir, "at-mark"),
    ]);
    assert.match(r.stdout, /filesystem-consistent/);
    assert.ok((await verifyRecords(join(dir, "at-mark", "vblk0.raw"))).gapFree);
    const unknown = await strata([
      "restore",
      "--repo",
      repo,
      "live@mark:nope",
      "--journal",
      journal,
      "--target",
      join(dir, "x"),
    ]);
    assert.notEqual(unknown.code, 0);
    assert.match(unknown.stderr, /has no mark named nope/);

    // kill -9, then protect stop removes what the dead protect left.
    const journal2 = join(dir, "journal2");
    const p2 = protect(journal2);
    await synced(journal2, p2);
    p2.child.kill("SIGKILL");
    await p2.out.result;
    const dead = await leftovers(g.vm, state);
    assert.ok(dead.files.includes("live.protect.json"), `state: ${dead.files}`);
    const stop2 = summary<{ stopped: boolean; removed: string[] }>(
      await strataOk(["protect", "stop", "live", "--journal", journal2, "--json"], { env }),
    );
    assert.equal(stop2.stopped, false);
    assert.ok(stop2.removed.length > 0, "what the dead protect left was removed");
    l = await leftovers(g.vm, state);
    assert.deepEqual([l.nodes, l.jobs, l.exports, l.files], [[], [], [], []]);
    for (const [node, names] of Object.entries(l.bitmaps)) assert.deepEqual(names, [], `bitmaps on ${node}`);
    assert.equal(l.status, "running");
  });
});
