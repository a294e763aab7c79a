// Resuming protection after `strata protect` is killed with SIGKILL while the guest writes: the
// guest's writes never fail and its longest write (from the records workload's own latency
// report) stays under 5 s; protect started again on the same journal resumes from the rotated
// dirty bitmap, re-reading only what it marks (far less than the disks); an instant after the
// resume restores exactly (records gap-free up to T, nothing after), an instant inside the gap
// is refused naming the gap; a clean stop leaves no bitmap on the VM, and its journal is not
// continued.
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { describe, test } from "node:test";
import { readMeta } from "../../src/journal/meta.js";
import { assertRecordsAt, protectedGuest, protectSynced, startProtect } from "../helpers/cdp.js";
import { strata, strataOk, summary } from "../helpers/cli.js";
import { journalRecordTimes, parseLatencySummaries } from "../helpers/records.js";
import { leftovers, until } from "../helpers/vm.js";

const DISK = 64 * 1024 * 1024;

describe("resuming protection after a crash", { timeout: 900_000 }, () => {
  test("kill -9 of protect: the guest writes on, protect resumes from the bitmap without a full read, instants after the gap are exact", async (t) => {
    const pg = await protectedGuest(t, { wlsize: "32M", seq: 50 });
    const { dir, repo, state, journal, env, g } = pg;
    const protect = () => startProtect(t, pg, { extra: ["--bitmap-interval", "3s"] });
    const p1 = protect();
    await protectSynced(p1, journal);
    // Bitmaps rotate every 3 s: the one the resume reads covers the last few seconds only.
    await until("two bitmap rotations", 120_000, async () => {
      if (p1.child.exitCode !== null) throw new Error(`protect ended: ${p1.out.stderr}`);
      return ((await readMeta(journal, undefined))?.cover?.seq ?? 0) >= 3 ? true : undefined;
    });
    const consoleBefore = (await g.vm.console()).length;
    p1.child.kill("SIGKILL");
    await p1.out.result;
    const killedAt = await g.seq();
    // The guest writes on while nothing protects it (its mirror failed with the socket).
    await g.waitSeq(killedAt + 100, 120_000);
    const dead = await leftovers(g.vm, state);
    for (const [node, names] of Object.entries(dead.bitmaps))
      assert.ok(
        names.some((n) => /^strata-cdp-\d+$/.test(n)),
        `the dead protect's bitmap on ${node}: ${names}`,
      );

    const p2 = protect();
    const said = await until("the resume", 180_000, async () => {
      if (p2.child.exitCode !== null) throw new Error(`protect ended: ${p2.out.stderr}`);
      return /resumed from the dirty bitmap.*re-read (\d+) bytes.*/.exec(p2.out.stdout) ?? undefined;
    });
    const reread = Number(said[1]);
    t.diagnostic(`resume: ${said[0]}`);
    // Not a full read: the bitmap covers a few seconds of 4 KiB records on two 64 MiB disks.
    assert.ok(reread > 0, "the resume re-read what the journal missed");
    assert.ok(reread < (2 * DISK) / 8, `re-read ${reread} bytes of ${2 * DISK}`);
    await g.waitSeq((await g.seq()) + 300, 120_000);
    const worst = Math.max(
      ...parseLatencySummaries((await g.vm.console()).slice(consoleBefore)).map((x) => x.maxUs),
    );
    t.diagnostic(`longest guest write from the kill to after the resume: ${worst} us`);
    assert.ok(worst < 5_000_000, `a guest write waited ${worst} us`);
    const st = summary<{ running: boolean; gaps: Array<{ from: string; to: string | null }> }>(
      await strataOk(["protect", "status", "live", "--repo", repo, "--journal", journal, "--json"], { env }),
    );
    assert.equal(st.running, true);
    assert.equal(st.gaps.length, 1);
    const gap = { from: Date.parse(st.gaps[0]!.from), to: Date.parse(st.gaps[0]!.to ?? "") };
    assert.ok(gap.to > gap.from, JSON.stringify(st.gaps));
    t.diagnostic(`gap: ${st.gaps[0]!.from} .. ${st.gaps[0]!.to} (${gap.to - gap.from} ms)`);

    p2.child.kill("SIGINT");
    const res = await p2.out.result;
    assert.equal(res.code, 0, res.stderr);
    const l = await leftovers(g.vm, state);
    assert.deepEqual([l.nodes, l.jobs, l.exports, l.files], [[], [], [], []]);
    for (const [node, names] of Object.entries(l.bitmaps)) assert.deepEqual(names, [], `bitmaps on ${node}`);
    // Stopped cleanly: no bitmap says what comes after, so the journal is not continued.
    const again = await strata(
      ["protect", "--repo", repo, "--vm", "live", `qmp:${g.vm.qmpSocket}`, "--journal", journal],
      { env },
    );
    assert.notEqual(again.code, 0);
    assert.match(again.stderr, /cannot be resumed \(it was stopped cleanly/);

    const { times } = await journalRecordTimes(journal);
    const status = JSON.parse(await readFile(join(journal, "status.json"), "utf8")) as {
      completeUntil: string;
    };
    const end = Date.parse(status.completeUntil);
    assert.ok(end - gap.to > 3000, `protected after the gap: ${st.gaps[0]!.to} .. ${status.completeUntil}`);
    // Instants after the gap: the records written before the crash, during it (re-read) and
    // after it, exactly up to T.
    for (const [i, T] of [gap.to + 200, Math.floor((gap.to + end) / 2), end - 500].entries()) {
      const target = join(dir, `after-${i}`);
      await strataOk(
        [
          "restore",
          "--repo",
          repo,
          `live@${new Date(T).toISOString()}`,
          "--journal",
          journal,
          "--target",
          target,
        ],
        { env },
      );
      const last = await assertRecordsAt(target, times, T);
      assert.ok(last.vblk0! > killedAt + 100, `restored at ${new Date(T).toISOString()} up to ${last.vblk0}`);
    }
    // An instant before the crash restores too; one inside the gap is refused, naming it.
    const before = join(dir, "before");
    const Tb = gap.from - 1000;
    await strataOk(
      [
        "restore",
        "--repo",
        repo,
        `live@${new Date(Tb).toISOString()}`,
        "--journal",
        journal,
        "--target",
        before,
      ],
      { env },
    );
    await assertRecordsAt(before, times, Tb);
    const inside = new Date(Math.floor((gap.from + gap.to) / 2)).toISOString();
    const refused = await strata(
      ["restore", "--repo", repo, `live@${inside}`, "--journal", journal, "--target", join(dir, "inside")],
      { env },
    );
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /inside a gap of its journal/);
    assert.ok(
      refused.stderr.includes(st.gaps[0]!.from) && refused.stderr.includes(st.gaps[0]!.to!),
      refused.stderr,
    );
  });
});
