/**
 * The live section of npm run bench: incremental backups of a running VM through its dirty
 * bitmap, whose cost should follow the change, not the disk.
 *
 * The test guest (scripts/build-test-guest.sh; TCG on a machine without usable KVM) boots with
 * one 1 GiB qcow2 data disk holding synthetic content (text, binary, duplicates, random data and
 * holes: src/image/synthetic.ts). `strata backup qmp:...` takes a full live backup, which starts
 * the disk's persistent checkpoint bitmap. Then, for each change size, the guest itself writes
 * that many MiB of fresh random data to its disk (dd from /dev/urandom through the guest agent,
 * 1 MiB blocks at MiB offsets, fsynced: so the bitmap sees exactly the guest's writes, aligned to
 * the repository's 1 MiB chunks) and an incremental live backup follows, timed like every
 * command of the bench (cold page cache when root, repository synced). Random data is the
 * costliest change to store: nothing of it compresses or dedups.
 *
 * Recorded per incremental: wall and CPU time, bytes read from the VM (the backup's own summary:
 * the changed chunks it read over NBD), bytes the repository grew by. Derived: changed MiB read
 * per second of the whole backup, the time above the 0-change incremental (the fixed cost of a
 * live backup: QMP transaction, fsfreeze, NBD export, manifest) per changed MiB, and a least
 * squares line through all points. The rounds (STRATA_BENCH_LIVE_ROUNDS, default 5: one takes
 * seconds, and a single neighbour's burst doubles a sub-second time) repeat the change sizes on
 * the same VM and repository; each time is the fastest round's, bytes are the mean of the rounds.
 */
import { execFileSync } from "node:child_process";
import { mkdirSync, rmSync } from "node:fs";
import { join } from "node:path";
import { QgaClient } from "../src/hypervisor/qemu/qga.js";
import { writeSyntheticImage } from "../src/image/synthetic.js";
import { summary } from "../test/helpers/cli.js";
import { bootWorkloadVm } from "../test/helpers/vm.js";
import { du, ensureCommands, fmt, MiB, timed } from "./measure.js";

/** The section's name, matched by STRATA_BENCH_ONLY like a tool's. */
export const LIVE_NAME = "strata live incremental (qmp:, dirty bitmap, 1 MiB chunks)";
/** MiB the guest writes before each incremental, in this order. */
export const CHANGES_MIB = [0, 4, 16, 64, 256];
const DISK_MIB = 1024;

export interface LiveSample {
  /** MiB the guest wrote since the previous backup. */
  writtenMiB: number;
  wall: number;
  cpu: number;
  /** Bytes the backup read from the VM, as its summary reports them. */
  bytesRead: number;
  /** Bytes the repository grew by. */
  bytesStored: number;
}

export interface LiveRow extends LiveSample {
  /** Changed MiB read per second of the whole backup; undefined when nothing was read. */
  changedMiBps: number | undefined;
  /** Milliseconds above the 0-change incremental per changed MiB read; undefined when nothing was read. */
  msPerMiB: number | undefined;
  /** This backup's time over the 0-change incremental's. */
  timesOverhead: number;
}

export interface LiveFigures {
  rows: LiveRow[];
  /** Wall time of the 0-change incremental: what any live backup costs. */
  overheadS: number;
  /** Fastest and slowest round of the 0-change incremental: the noise the per-row figures sit in. */
  overheadRangeS: [number, number];
  /** Least squares line wall = interceptS + msPerMiB × MiB read / 1000 through every row. */
  fit: { interceptS: number; msPerMiB: number };
}

/**
 * Merges rounds (each a list of samples in the same order of change sizes) into one row per
 * size: the fastest round's times, the mean bytes; then derives the per-MiB figures.
 */
export function liveFigures(rounds: LiveSample[][]): LiveFigures {
  const first = rounds[0];
  if (!first || first.length === 0) throw new Error("live bench: no samples to derive figures from");
  const merged = first.map((s, i): LiveSample => {
    const same = rounds.map((r) => r[i]);
    if (same.some((x) => x?.writtenMiB !== s.writtenMiB))
      throw new Error(`live bench: rounds disagree on the change size of sample ${i}`);
    const all = same as LiveSample[];
    const fastest = all.reduce((a, b) => (b.wall < a.wall ? b : a));
    const mean = (f: (x: LiveSample) => number) => all.reduce((n, x) => n + f(x), 0) / all.length;
    return {
      writtenMiB: s.writtenMiB,
      wall: fastest.wall,
      cpu: fastest.cpu,
      bytesRead: mean((x) => x.bytesRead),
      bytesStored: mean((x) => x.bytesStored),
    };
  });
  const zero = merged.find((s) => s.writtenMiB === 0);
  if (!zero) throw new Error("live bench: no 0-change incremental to measure the fixed cost with");
  const overheadS = zero.wall;
  const zeroWalls = rounds.map((r) => r[merged.indexOf(zero)]!.wall);
  const overheadRangeS: [number, number] = [Math.min(...zeroWalls), Math.max(...zeroWalls)];
  const rows = merged.map((s): LiveRow => {
    const readMiB = s.bytesRead / MiB;
    return {
      ...s,
      changedMiBps: readMiB > 0 ? readMiB / s.wall : undefined,
      msPerMiB: readMiB > 0 ? ((s.wall - overheadS) * 1000) / readMiB : undefined,
      timesOverhead: s.wall / overheadS,
    };
  });
  const xs = merged.map((s) => s.bytesRead / MiB);
  const ys = merged.map((s) => s.wall);
  const mx = xs.reduce((a, b) => a + b, 0) / xs.length;
  const my = ys.reduce((a, b) => a + b, 0) / ys.length;
  const sxx = xs.reduce((n, x) => n + (x - mx) ** 2, 0);
  const sxy = xs.reduce((n, x, i) => n + (x - mx) * (ys[i]! - my), 0);
  if (sxx === 0) throw new Error("live bench: every incremental read the same amount; no line to fit");
  const slope = sxy / sxx;
  return { rows, overheadS, overheadRangeS, fit: { interceptS: my - slope * mx, msPerMiB: slope * 1000 } };
}

/**
 * The guest writes `mib` MiB of random data at MiB offset `at` of its disk. The agent serves one
 * client at a time, so the connection is closed again before strata's backup needs it.
 */
async function guestWrites(qga: QgaClient, at: number, mib: number): Promise<void> {
  const r = await qga
    .exec("/bin/sh", ["-c", `dd if=/dev/urandom of=/dev/vda bs=1M seek=${at} count=${mib} conv=fsync 2>&1`], {
      timeoutMs: 1_800_000,
      pollMs: 500,
    })
    .finally(() => qga.close());
  if (r.exitcode !== 0 || !r.stdout.includes(`${mib}+0 records out`))
    throw new Error(`guest dd of ${mib} MiB at ${at} MiB failed (${r.exitcode}): ${r.stdout}${r.stderr}`);
}

interface Summary {
  bytesRead: number;
  disks: Array<{ name: string; readMode?: string; fullReadReason?: string }>;
}

/** Boots the guest, runs the full and the incremental backups, prints the section's table. */
export async function benchLive(o: { work: string; rounds: number; strataBin: string }): Promise<void> {
  ensureCommands({
    "qemu-system-x86_64": "qemu-system-x86",
    "qemu-img": "qemu-utils",
    "/usr/bin/time": "time",
    // scripts/build-test-guest.sh: a static workload built with gcc, an initramfs packed with cpio
    // from .debs it downloads and unpacks (xz).
    gcc: "gcc",
    "/usr/include/stdio.h": "libc6-dev",
    cpio: "cpio",
    xz: "xz-utils",
  });
  rmSync(o.work, { recursive: true, force: true });
  mkdirSync(o.work, { recursive: true });
  const repo = join(o.work, "repo");
  const env = { STRATA_STATE_DIR: join(o.work, "state") };
  execFileSync(process.execPath, [o.strataBin, "init", "--repo", repo, "--chunk-size", "1M"]);
  const content = join(o.work, "content.raw");
  await writeSyntheticImage(content, { size: DISK_MIB * MiB, seed: "strata live bench", holes: 0.25 });

  const teardown: Array<() => Promise<void>> = [];
  let qga: QgaClient | undefined;
  try {
    console.error(`bench: live: booting the test guest with a ${DISK_MIB} MiB qcow2 disk`);
    const g = await bootWorkloadVm(
      { after: (fn) => void teardown.push(fn) },
      { disks: [{ id: "vblk0", format: "qcow2", size: `${DISK_MIB}M`, content }], workload: [] },
    );
    rmSync(content);
    if (!g.vm.qgaSocket) throw new Error("live bench: the test guest has no agent socket");
    console.error(`bench: live: ${g.vm.accelerator.accel} (${g.vm.accelerator.reason})`);
    qga = new QgaClient(g.vm.qgaSocket);
    await qga.waitUntilReady(60_000);
    await qga.close();
    const src = `qmp:${g.vm.qmpSocket},qga=${g.vm.qgaSocket}`;

    let storedBefore = du(repo);
    const backup = (writtenMiB: number, expect: "full" | "changed"): LiveSample => {
      const m = timed(
        repo,
        process.execPath,
        [o.strataBin, "backup", "--repo", repo, "--vm", "live", "--json", src],
        env,
      );
      const s = summary<Summary>({ code: 0, stdout: m.stdout, stderr: "" });
      for (const d of s.disks)
        if (d.readMode !== expect)
          throw new Error(
            `live bench: ${d.name} read ${d.readMode} where ${expect} was expected: ${d.fullReadReason ?? ""}`,
          );
      const stored = du(repo);
      const sample = {
        writtenMiB,
        wall: m.wall,
        cpu: m.cpu,
        bytesRead: s.bytesRead,
        bytesStored: stored - storedBefore,
      };
      storedBefore = stored;
      console.error(`bench: live: ${JSON.stringify(sample)}`);
      return sample;
    };

    console.error("bench: live: full backup");
    const full = backup(DISK_MIB, "full");
    const rounds: LiveSample[][] = [];
    // Successive changes overwrite successive regions of the disk (wrapping at its end), so that
    // they replace the content the full backup stored rather than one region over and over.
    let at = 0;
    for (let round = 1; round <= o.rounds; round++) {
      const samples: LiveSample[] = [];
      for (const mib of CHANGES_MIB) {
        console.error(`bench: live: round ${round} of ${o.rounds}: guest writes ${mib} MiB, incremental`);
        if (at + mib > DISK_MIB) at = 0;
        if (mib > 0) await guestWrites(qga, at, mib);
        at += mib;
        samples.push(backup(mib, "changed"));
      }
      rounds.push(samples);
    }
    printLive(full, liveFigures(rounds), o.rounds);
  } finally {
    await qga?.close();
    for (const fn of teardown.reverse()) await fn();
    rmSync(o.work, { recursive: true, force: true });
  }
}

function printLive(full: LiveSample, f: LiveFigures, rounds: number): void {
  const opt = (n: number | undefined, digits = 1) => (n === undefined ? "-" : fmt(n, digits));
  console.log(`\n## ${LIVE_NAME}\n`);
  console.log(
    `The test guest (busybox initramfs) running under QEMU with one ${DISK_MIB} MiB qcow2 disk of synthetic ` +
      "content; after a full live backup the guest writes N MiB of random data to its disk (dd, 1 MiB " +
      `blocks, fsynced) and \`strata backup qmp:...\` takes an incremental through the dirty bitmap. ${rounds} ` +
      "rounds on the same VM; times are the fastest round's, bytes the mean.\n",
  );
  console.log(
    "| guest wrote MiB | read from VM MiB | stored MiB | wall s | CPU s | changed MiB/s | ms per changed MiB above 0-change | time / 0-change time |",
  );
  console.log("|---|---|---|---|---|---|---|---|");
  console.log(
    `| full backup (${DISK_MIB} MiB disk) | ${fmt(full.bytesRead / MiB)} | ${fmt(full.bytesStored / MiB)} | ${fmt(full.wall)} | ${fmt(full.cpu)} | ${fmt(full.bytesRead / MiB / full.wall)} | - | - |`,
  );
  for (const r of f.rows) {
    console.log(
      `| ${r.writtenMiB} | ${fmt(r.bytesRead / MiB)} | ${fmt(r.bytesStored / MiB, 2)} | ${fmt(r.wall, 2)} | ${fmt(r.cpu, 2)} | ${opt(r.changedMiBps)} | ${opt(r.msPerMiB)} | ${fmt(r.timesOverhead, 2)} |`,
    );
  }
  const at = (mib: number) => f.rows.find((r) => r.writtenMiB === mib);
  const [small, large] = [at(16), at(256)];
  console.log(
    `\nFixed cost of a live incremental (0 changed): ${fmt(f.overheadS, 2)} s (${fmt(f.overheadRangeS[0], 2)}-${fmt(f.overheadRangeS[1], 2)} s ` +
      "over the rounds; a change that costs less than that spread has a per-row ms/MiB within the noise). Least squares over the rows: " +
      `wall = ${fmt(f.fit.interceptS, 2)} s + ${fmt(f.fit.msPerMiB, 1)} ms × changed MiB` +
      (small && large ? `; time(256 MiB) / time(16 MiB) = ${fmt(large.wall / small.wall, 2)}.` : "."),
  );
}
