/**
 * The setting every CDP test starts from: a repository of 256 KiB chunks, a state directory, a
 * journal path, and the test guest running its record workload on two 64 MiB qcow2 disks: on
 * both, or (`data`) on the first while the second holds an ext4 file system the test writes to.
 */
import assert from "node:assert/strict";
import { readFile } from "node:fs/promises";
import { join } from "node:path";
import { collect, startStrata, strataOk, tempDir } from "./cli.js";
import { verifyRecords } from "./records.js";
import { bootWorkloadVm, until, type WorkloadVm } from "./vm.js";

type Teardown = Parameters<typeof tempDir>[0] & Parameters<typeof bootWorkloadVm>[0];

export interface ProtectedGuest {
  dir: string;
  repo: string;
  state: string;
  journal: string;
  env: { STRATA_STATE_DIR: string };
  g: WorkloadVm;
}

export async function protectedGuest(
  t: Teardown,
  o: { data?: boolean; wlsize: string; rate?: number; seq: number },
): Promise<ProtectedGuest> {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const state = join(dir, "state");
  const journal = join(dir, "journal");
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  const g = await bootWorkloadVm(t, {
    disks: [
      { id: "vblk0", format: "qcow2", size: "64M" },
      { id: "vblk1", format: "qcow2", size: "64M", ...(o.data ? { ext4: true } : {}) },
    ],
    workload: o.data ? ["/dev/vda"] : ["/dev/vda", "/dev/vdb"],
    ...(o.data ? { data: "/dev/vdb" } : {}),
    wlsize: o.wlsize,
    ...(o.rate === undefined ? {} : { rate: o.rate }),
  });
  await g.waitSeq(o.seq);
  return { dir, repo, state, journal, env: { STRATA_STATE_DIR: state }, g };
}

/**
 * Checks disks restored at instant `T` (ms, host clock) in `target` (`<disk>.raw`) against the
 * journal times of the records (`journalRecordTimes`): gap-free, the last record journaled at or
 * before T and less than 1 s before it, the next one after T; both disks at one instant (vda's
 * record is written just before vdb's). Returns the last record per disk.
 */
export async function assertRecordsAt(
  target: string,
  times: Map<string, Map<number, bigint>>,
  T: number,
  disks: readonly string[] = ["vblk0", "vblk1"],
): Promise<Record<string, number>> {
  const at = new Date(T).toISOString();
  const Tns = BigInt(T) * 1_000_000n;
  const last: Record<string, number> = {};
  for (const disk of disks) {
    const scan = await verifyRecords(join(target, `${disk}.raw`));
    assert.ok(
      scan.gapFree,
      `${at} ${disk}: missing ${scan.missing.slice(0, 5)} bad ${JSON.stringify(scan.badRecords.slice(0, 2))}`,
    );
    const L = scan.lastSeq;
    last[disk] = L;
    const m = times.get(disk)!;
    const tL = m.get(L);
    // The last record is one written at or before T ...
    if (tL !== undefined) assert.ok(tL <= Tns, `${at} ${disk}: record ${L} was journaled after T`);
    // ... and the next one was written after T: nothing written after T is there.
    const tNext = m.get(L + 1);
    if (tNext !== undefined) {
      assert.ok(tNext > Tns, `${at} ${disk}: record ${L + 1}, journaled before T, is missing`);
      // The guest writes 100 records/s: the last one is less than 1 s before T.
      if (tL !== undefined)
        assert.ok(
          Tns - tL <= 1_000_000_000n,
          `${at} ${disk}: last record ${Number(Tns - tL) / 1e6} ms before T`,
        );
    }
  }
  if (disks.length === 2) {
    const d = last[disks[0]!]! - last[disks[1]!]!;
    assert.ok(
      d === 0 || d === 1,
      `${at}: ${disks[0]} at ${last[disks[0]!]}, ${disks[1]} at ${last[disks[1]!]}`,
    );
  }
  return last;
}

/** A `strata protect` of the test guest running in the background; killed when the test ends. */
export interface RunningProtect {
  child: ReturnType<typeof startStrata>;
  out: ReturnType<typeof collect>;
}

/**
 * Starts `strata protect` of `pg`'s guest into `journal` (default: pg.journal), its source the
 * guest's QMP socket (and its agent with `qga`), with `extra` options.
 */
export function startProtect(
  t: Teardown,
  pg: { repo: string; journal: string; env: Record<string, string>; g: WorkloadVm },
  o: { journal?: string; qga?: boolean; extra?: readonly string[] } = {},
): RunningProtect {
  const source = `qmp:${pg.g.vm.qmpSocket}${o.qga ? `,qga=${pg.g.vm.qgaSocket}` : ""}`;
  const child = startStrata(
    [
      "protect",
      "--repo",
      pg.repo,
      "--vm",
      "live",
      source,
      "--journal",
      o.journal ?? pg.journal,
      ...(o.extra ?? []),
    ],
    { env: pg.env },
  );
  const out = collect(child);
  t.after(() => {
    if (child.exitCode === null) child.kill("SIGKILL");
  });
  return { child, out };
}

/** Waits until the protect's first copy is done (journal.json has `syncedNs`). */
export function protectSynced(p: RunningProtect, journal: string, timeoutMs = 180_000): Promise<true> {
  return until("protect's first copy", timeoutMs, async () => {
    if (p.child.exitCode !== null) throw new Error(`protect ended: ${p.out.stderr}`);
    return /"syncedNs": "\d+"/.test(await readFile(join(journal, "journal.json"), "utf8").catch(() => ""))
      ? true
      : undefined;
  });
}
