// A live backup's rate limit on the test guest (real QEMU): `strata backup --limit-read 4` gives
// QEMU's backup block job speed = 4 MiB/s (read back with query-block-jobs while the backup
// reads) and reads the point-in-time view at 4 MiB/s within 10 %; without it the read is faster.
// It also prints what the issue asks to report: the guest's 4 KiB O_DIRECT|O_DSYNC write latency
// (the records workload's own figures from the console) with no backup, during an unthrottled
// and during a throttled backup, and the host's CPU during each (all CPUs, from /proc/stat, so
// other work on the machine counts too) beside the CPU time of the strata process itself.
import assert from "node:assert/strict";
import type { ChildProcess } from "node:child_process";
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { cpus } from "node:os";
import { join } from "node:path";
import { describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { collect, startStrata, strataOk, tempDir } from "../helpers/cli.js";
import { type LatencySummary, parseLatencySummaries } from "../helpers/records.js";
import { bootWorkloadVm, qmpOnce, type WorkloadVm } from "../helpers/vm.js";

const MiB = 1 << 20;
const TICK = 100; // USER_HZ

/** Busy and total jiffies of all CPUs (/proc/stat's first line). */
function cpuTimes(): { busy: number; total: number } {
  const f = readFileSync("/proc/stat", "utf8").split("\n")[0]!.trim().split(/\s+/).slice(1).map(Number);
  const total = f.reduce((a, b) => a + b, 0);
  const idle = f[3]! + (f[4] ?? 0);
  return { busy: total - idle, total };
}

/** utime + stime of a process in seconds, or undefined once it is gone. */
function processCpu(pid: number): number | undefined {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const f = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return (Number(f[11]) + Number(f[12])) / TICK;
  } catch {
    return undefined;
  }
}

/** The latency summaries the workload printed after console offset `from`, merged. */
function latency(s: LatencySummary[]): { writes: number; p50: number; p99: number; max: number } {
  const n = s.reduce((a, x) => a + x.n, 0);
  return {
    writes: n,
    // Summaries cover 20 writes each: the median of their p50s, the worst p99 and max.
    p50: s.map((x) => x.p50Us).sort((a, b) => a - b)[Math.floor(s.length / 2)] ?? 0,
    p99: Math.max(0, ...s.map((x) => x.p99Us)),
    max: Math.max(0, ...s.map((x) => x.maxUs)),
  };
}

interface Measured {
  seconds: number;
  /** From the exports being up to the end: the read itself. */
  readSeconds: number;
  bytesRead: number;
  hostCpu: number;
  strataCpu: number;
  /** CPU-seconds of the QEMU process (its TCG vCPU and I/O threads). */
  qemuCpu: number;
  guest: ReturnType<typeof latency>;
  speed?: number;
}

async function measuredBackup(g: WorkloadVm, dir: string, name: string, extra: string[]): Promise<Measured> {
  const repo = join(dir, `repo-${name}`);
  const state = join(dir, `state-${name}`);
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  const consoleAt = (await g.vm.console()).length;
  const c0 = cpuTimes();
  const q0 = processCpu(g.vm.pid) ?? 0;
  const t0 = performance.now();
  const child: ChildProcess = startStrata(
    ["backup", "--repo", repo, "--vm", name, "--json", ...extra, `qmp:${g.vm.qmpSocket}`],
    { env: { STRATA_STATE_DIR: state } },
  );
  const out = collect(child);
  let strataCpu = 0;
  let exportsAt: number | undefined;
  let speed: number | undefined;
  const stateFile = join(state, `${name}.json`);
  while (child.exitCode === null) {
    strataCpu = processCpu(child.pid!) ?? strataCpu;
    if (exportsAt === undefined && existsSync(stateFile)) {
      try {
        const items = (JSON.parse(readFileSync(stateFile, "utf8")) as { items: Array<{ kind: string }> })
          .items;
        if (items.some((i) => i.kind === "export")) {
          exportsAt = performance.now();
          // The block job as QEMU runs it (QMP is free: strata closed it after the cut).
          const jobs = await qmpOnce<Array<{ device: string; type: string; speed: number }>>(
            g.vm.qmpSocket,
            "query-block-jobs",
          ).catch(() => []);
          speed = jobs.find((j) => j.device === "strata-job-vblk0")?.speed;
        }
      } catch {
        // written meanwhile: read it again
      }
    }
    await sleep(50);
  }
  const r = await out.result;
  const t1 = performance.now();
  const c1 = cpuTimes();
  const q1 = processCpu(g.vm.pid) ?? q0;
  assert.equal(r.code, 0, r.stderr);
  const summary = JSON.parse(r.stdout.trim().split("\n").at(-1)!) as { bytesRead: number };
  return {
    seconds: (t1 - t0) / 1000,
    readSeconds: (t1 - (exportsAt ?? t0)) / 1000,
    bytesRead: summary.bytesRead,
    hostCpu: (c1.busy - c0.busy) / (c1.total - c0.total),
    strataCpu,
    qemuCpu: q1 - q0,
    guest: latency(parseLatencySummaries((await g.vm.console()).slice(consoleAt))),
    ...(speed === undefined ? {} : { speed }),
  };
}

describe("live backup limits", { timeout: 600_000 }, () => {
  test("--limit-read: QEMU's block job gets the speed, the view is read at the rate; latency and CPU printed", async (t) => {
    const dir = tempDir(t);
    const content = join(dir, "content.raw");
    writeFileSync(content, randomBytes(64 * MiB));
    const g = await bootWorkloadVm(t, {
      disks: [{ id: "vblk0", format: "qcow2", size: "64M", content }],
      workload: ["/dev/vda"],
      wlsize: "4M",
      rate: 50,
    });
    await g.waitSeq(40, 120_000);
    // The guest's writes with no backup, for comparison.
    const idleAt = (await g.vm.console()).length;
    const i0 = cpuTimes();
    const iq0 = processCpu(g.vm.pid) ?? 0;
    await sleep(8000);
    const i1 = cpuTimes();
    const iq1 = processCpu(g.vm.pid) ?? iq0;
    const idle = latency(parseLatencySummaries((await g.vm.console()).slice(idleAt)));

    const free = await measuredBackup(g, dir, "free", []);
    const capped = await measuredBackup(g, dir, "capped", ["--limit-read", "4"]);
    const rate = (m: Measured) => m.bytesRead / MiB / m.readSeconds;
    const show = (what: string, m: Measured) =>
      `${what}: ${(m.bytesRead / MiB).toFixed(1)} MiB in ${m.seconds.toFixed(1)} s (read ${rate(m).toFixed(2)} MiB/s), ` +
      `host CPU ${(m.hostCpu * 100).toFixed(0)} % of ${cpus().length} CPUs, strata ${m.strataCpu.toFixed(2)} CPU-s ` +
      `(${((m.strataCpu / m.seconds) * 100).toFixed(0)} % of one CPU), QEMU ${((m.qemuCpu / m.seconds) * 100).toFixed(0)} % of one CPU; guest 4 KiB sync writes: ${m.guest.writes}, ` +
      `p50 ${m.guest.p50} us, p99 ${m.guest.p99} us, max ${m.guest.max} us`;
    t.diagnostic(
      `no backup: host CPU ${(((i1.busy - i0.busy) / (i1.total - i0.total)) * 100).toFixed(0)} %, QEMU ${(((iq1 - iq0) / 8) * 100).toFixed(0)} % of one CPU; guest 4 KiB sync writes: ` +
        `${idle.writes}, p50 ${idle.p50} us, p99 ${idle.p99} us, max ${idle.max} us`,
    );
    t.diagnostic(show("unthrottled", free));
    t.diagnostic(show("--limit-read 4", capped));

    assert.equal(free.speed, 0, "without a limit the block job runs at QEMU's unlimited speed 0");
    assert.equal(capped.speed, 4 * MiB, "the block job's speed is the limit");
    assert.ok(capped.bytesRead >= 60 * MiB, `the whole disk was read: ${capped.bytesRead}`);
    assert.ok(Math.abs(rate(capped) - 4) <= 0.4, `4 MiB/s within 10 %: ${rate(capped).toFixed(2)} MiB/s`);
    assert.ok(
      rate(free) > 8,
      `without a limit the read is more than twice as fast: ${rate(free).toFixed(2)}`,
    );
    assert.ok(capped.guest.writes > 0 && free.guest.writes > 0, "the guest kept writing during both backups");
  });
});
