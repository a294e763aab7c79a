/**
 * npm run bench: Strata against restic and borg on the same disk images, side by side, plus this
 * machine's raw limits measured in the same run. Prints tables; figures are ratios against the
 * peers measured here, since absolute numbers on a shared machine move from run to run.
 *
 * Two disks, each a day-0 image and its next days: first (the headline) an installed Debian 12
 * system used in a chroot (./debian-disk.ts), then the synthetic Linux-like tree (./disk.ts),
 * whose media, duplicates and generated files compress and dedup more cheaply than a real system.
 * The next days are image files, so every tool reads each one whole ("offline incremental").
 *
 * Every command starts cold: dirty pages are flushed and, when running as root, the page cache
 * is dropped first (untimed), so no tool reads what the one before it left cached (a VM's disk
 * on a hypervisor is rarely in the host's page cache either). Without root the caches stay and
 * the table says so.
 *
 * Every timing is to durable state: dirty pages are flushed before a command starts, and the
 * time of `sync -f` on the repository (backups) or the restored image (restores) after it ends is
 * added to its wall time (restic and borg return from a restore before the kernel has written
 * it; Strata fsyncs before it returns). Tools run in interleaved rounds, each round in an order
 * rotated by one tool (see clearWork), and each figure is the fastest round's, so a burst of
 * load from a neighbour on this shared machine costs one round, not the comparison; stored
 * bytes are the mean of the rounds (restic's chunker polynomial is random per repository, so its
 * figures move between rounds).
 *
 * Then live incrementals of a running VM through its dirty bitmap (./live.ts): the test guest
 * under QEMU writes 0 to 256 MiB into its disk between backups, and the table shows how the time
 * and the stored bytes follow the change. And what continuous data protection's journal costs for a
 * day of the Debian disk's workload (./journal-day.ts).
 *
 * Environment: STRATA_BENCH_DAYS (default 2), STRATA_BENCH_ROUNDS (default 3),
 * STRATA_BENCH_LIVE_ROUNDS (rounds of the live section, default 5),
 * STRATA_BENCH_ONLY ("|"-separated: run only the tools and sections whose name contains one of
 * them; "live" runs the live section alone, "journal" the journal's, "strata" every Strata
 * figure; a token naming a disk set, e.g. "Debian 12", runs that set alone; "Debian" also picks
 * the journal section), STRATA_CACHE (default .cache).
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs, mkdirSync, rmSync, statSync } from "node:fs";
import { availableParallelism } from "node:os";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { compress } from "zstd-napi";
import { imageMap } from "../src/image/qemu-img.js";
import { fillContent, Prng } from "../src/image/synthetic.js";
import { debianDisks } from "./debian-disk.js";
import { benchDisks } from "./disk.js";
import { benchJournalDay, JOURNAL_NAME } from "./journal-day.js";
import { benchLive, LIVE_NAME } from "./live.js";
import { dropCaches, du, ensureCommands, fmt, type Measure, MiB, timed } from "./measure.js";

const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..");
const CACHE = resolve(process.env.STRATA_CACHE ?? join(ROOT, ".cache"));
const DAYS = Number(process.env.STRATA_BENCH_DAYS ?? 2);
// Three: on this shared machine a tool's figure moves 10-25 % between rounds (borg's full backup
// of the Debian disk 5.4-8.4 s, restic's restore 5.2-7.0 s, Strata's encrypted restore 2.3-3.3 s
// over fourteen runs of two rounds), and with two rounds one slow round of either tool decided a
// ratio in most runs.
const ROUNDS = Math.max(1, Number(process.env.STRATA_BENCH_ROUNDS ?? 3));
const LIVE_ROUNDS = Math.max(1, Number(process.env.STRATA_BENCH_LIVE_ROUNDS ?? 5));
const WORK = join(CACHE, "bench-run");
const PASSWORD = "bench password";

function sha(path: string): string {
  return execFileSync("sha256sum", [path], { encoding: "utf8" }).split(" ")[0]!;
}

interface Tool {
  name: string;
  init(repo: string): void;
  backup(repo: string, image: string): Measure;
  restore(repo: string, target: string, image: string): Measure;
  /** Path of the restored image inside target. */
  restoredPath(target: string, image: string): string;
}

const strataBin = join(ROOT, "bin", "strata");

function strataTool(name: string, chunk: string, encrypted: boolean): Tool {
  const env: Record<string, string> = encrypted ? { STRATA_PASSWORD: PASSWORD } : {};
  return {
    name,
    init: (repo) =>
      void execFileSync(process.execPath, [strataBin, "init", "--repo", repo, "--chunk-size", chunk], {
        env: { ...process.env, ...env },
      }),
    backup: (repo, image) =>
      timed(
        repo,
        process.execPath,
        [strataBin, "backup", "-q", "--repo", repo, "--vm", "bench", `file:${image},name=disk`],
        env,
      ),
    restore: (repo, target) =>
      timed(
        join(target, "disk.raw"),
        process.execPath,
        [strataBin, "restore", "-q", "--repo", repo, "bench/latest", "--target", target],
        env,
      ),
    restoredPath: (target) => join(target, "disk.raw"),
  };
}

const restic: Tool = {
  name: "restic 0.14 (CDC ~1 MiB, zstd auto, AES)",
  init: (repo) =>
    void execFileSync("restic", ["init", "-q", "--repo", repo], {
      env: { ...process.env, RESTIC_PASSWORD: PASSWORD },
    }),
  backup: (repo, image) =>
    timed(
      repo,
      "restic",
      ["backup", "-q", "--repo", repo, "--stdin", "--stdin-filename", "disk.img"],
      { RESTIC_PASSWORD: PASSWORD },
      image,
    ),
  restore: (repo, target) =>
    timed(target, "restic", ["restore", "-q", "--repo", repo, "latest", "--target", target], {
      RESTIC_PASSWORD: PASSWORD,
    }),
  restoredPath: (target) => join(target, "disk.img"),
};

function borgTool(name: string, chunker: string[], compression: string): Tool {
  const env = { BORG_UNKNOWN_UNENCRYPTED_REPO_ACCESS_IS_OK: "yes", BORG_RELOCATED_REPO_ACCESS_IS_OK: "yes" };
  let n = 0;
  return {
    name,
    init: (repo) =>
      void execFileSync("borg", ["init", "-e", "none", repo], { env: { ...process.env, ...env } }),
    backup: (repo, image) =>
      timed(
        repo,
        "borg",
        ["create", "--compression", compression, ...chunker, `${repo}::b${n++}`, "-"],
        env,
        image,
      ),
    restore: (repo, target) => {
      mkdirSync(target, { recursive: true });
      return timed(target, "sh", ["-c", `cd ${target} && borg extract --sparse ${repo}::b${n - 1}`], env);
    },
    restoredPath: (target) => join(target, "stdin"),
  };
}

interface Row {
  tool: string;
  full: Measure;
  incr: Measure[];
  restore: Measure;
  storedFull: number;
  storedPerDay: number[];
}

function runTool(tool: Tool, images: string[]): Row {
  const dir = join(WORK, tool.name.replace(/[^a-z0-9]+/gi, "-"));
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const repo = join(dir, "repo");
  tool.init(repo);
  console.error(`bench: ${tool.name}: full backup`);
  const full = tool.backup(repo, images[0]!);
  const storedFull = du(repo);
  const incr: Measure[] = [];
  const storedPerDay: number[] = [];
  let prev = storedFull;
  for (const img of images.slice(1)) {
    console.error(`bench: ${tool.name}: incremental`);
    incr.push(tool.backup(repo, img));
    const now = du(repo);
    storedPerDay.push(now - prev);
    prev = now;
  }
  console.error(`bench: ${tool.name}: restore`);
  const target = join(dir, "restore");
  const restore = tool.restore(repo, target, images.at(-1)!);
  const got = sha(tool.restoredPath(target, images.at(-1)!));
  if (got !== sha(images.at(-1)!)) throw new Error(`${tool.name}: restored image differs from the source`);
  // The repository stays until the round ends (see clearWork).
  rmSync(target, { recursive: true, force: true });
  const row = { tool: tool.name, full, incr, restore, storedFull, storedPerDay };
  console.error(`bench: ${JSON.stringify(row)}`);
  return row;
}

/**
 * Removes the round's repositories, then lets the filesystem settle: ext4 skips inodes freed in
 * the last 60 s (300 s while their table block is dirty) when it allocates new ones, reading each
 * to check, so a tool that creates many files right after another tool's thousands were deleted
 * pays for the deletion (measured: 15 % of a Strata full backup's CPU time).
 *
 * Inside a round the order still counts, both ways, so the rounds rotate it (benchDiskSet). This
 * machine is a VM that hands freed memory back to its host. A tool that reads through the page
 * cache after memory sat free pays a fault in the host for every page it fills: borg's full
 * backup of the Debian disk took 10-13 s, 5.5-6.2 s of it system time in read(), when it ran
 * alone or after a pause, against 5.8-9.7 s right after another tool whose cache had just been
 * dropped. And a tool that runs while the host takes back what the one before it freed runs
 * 10-20 % slower (the encrypted Strata full backup 3.34 s against 2.87 s, its restore 2.60 s
 * against 2.33 s). Settling before every tool, not only every round, was tried: borg's full
 * backup then took 13.2 s in both rounds.
 */
function clearWork(settle: boolean): void {
  rmSync(WORK, { recursive: true, force: true });
  mkdirSync(WORK, { recursive: true });
  execFileSync("sync");
  if (settle) {
    console.error("bench: letting the filesystem settle for 65 s");
    execFileSync("sleep", ["65"]);
  }
}

/** One row from several rounds of a tool: the fastest of each timing, the mean stored bytes. */
function fastestRound(rounds: Row[]): Row {
  const fastest = (ms: Measure[]) => ms.reduce((a, b) => (b.wall < a.wall ? b : a));
  const avg = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / xs.length;
  const first = rounds[0]!;
  return {
    tool: first.tool,
    full: fastest(rounds.map((r) => r.full)),
    incr: first.incr.map((_, i) => fastest(rounds.map((r) => r.incr[i]!))),
    restore: fastest(rounds.map((r) => r.restore)),
    storedFull: avg(rounds.map((r) => r.storedFull)),
    storedPerDay: first.storedPerDay.map((_, i) => avg(rounds.map((r) => r.storedPerDay[i]!))),
  };
}

/**
 * Reads the image's data extents (qemu-img map: its holes are skipped, as every tool here skips
 * or cheaply reads them) in order, 4 MiB at a time, one read in flight; returns bytes read.
 */
async function readAllocated(image: string): Promise<number> {
  const extents = (await imageMap(image, "raw")).filter((e) => e.data);
  const fh = await fs.open(image, "r");
  const buf = Buffer.allocUnsafe(4 * MiB);
  let total = 0;
  try {
    for (const e of extents)
      for (let off = e.offset; off < e.offset + e.length; ) {
        const { bytesRead } = await fh.read(buf, 0, Math.min(buf.length, e.offset + e.length - off), off);
        if (bytesRead === 0) throw new Error(`${image}: ends inside an extent at ${off}`);
        off += bytesRead;
        total += bytesRead;
      }
  } finally {
    await fh.close();
  }
  return total;
}

async function limits(image: string): Promise<Record<string, number>> {
  // Sequential read of the image's data from an empty page cache, as the tools start (when root).
  dropCaches();
  const t0 = process.hrtime.bigint();
  const read = await readAllocated(image);
  const readSecs = Number(process.hrtime.bigint() - t0) / 1e9;
  // Mixed content like the disk's data: a third each of text, binary and incompressible bytes.
  const buf = Buffer.alloc(256 * MiB);
  const third = Math.floor(buf.length / 3);
  const rng = new Prng("limits");
  fillContent(buf.subarray(0, third), "text", rng);
  fillContent(buf.subarray(third, 2 * third), "binary", rng);
  fillContent(buf.subarray(2 * third), "random", rng);
  let t = process.hrtime.bigint();
  createHash("sha256").update(buf).digest();
  const shaSecs = Number(process.hrtime.bigint() - t) / 1e9;
  t = process.hrtime.bigint();
  for (let off = 0; off < buf.length; off += 4 * MiB)
    compress(buf.subarray(off, off + 4 * MiB), { compressionLevel: 1 });
  const zstdSecs = Number(process.hrtime.bigint() - t) / 1e9;
  // Sequential write of 1 GiB with fsync: what any restore is bound by on this disk.
  t = process.hrtime.bigint();
  execFileSync("dd", ["if=/dev/zero", `of=${join(WORK, "dd.out")}`, "bs=4M", "count=256", "conv=fsync"], {
    stdio: "ignore",
  });
  const writeSecs = Number(process.hrtime.bigint() - t) / 1e9;
  rmSync(join(WORK, "dd.out"), { force: true });
  return {
    "sequential write + fsync, MiB/s": 1024 / writeSecs,
    "sequential read of the allocated bytes, one stream (cold when root), MiB/s": read / MiB / readSecs,
    "SHA-256, one core, MiB/s": 256 / shaSecs,
    "zstd level 1, one core, MiB/s": 256 / zstdSecs,
  };
}

interface DiskSet {
  title: string;
  /** What the disk is, printed above its tables. */
  about: string[];
  images: string[];
}

/** Runs every chosen tool on one disk set in interleaved rounds; prints its tables. */
function benchDiskSet(set: DiskSet, chosen: Tool[]): void {
  const runs = new Map<string, Row[]>(chosen.map((t) => [t.name, []]));
  for (let round = 1; round <= ROUNDS; round++) {
    clearWork(true);
    // Each round starts with the next tool: which tool follows which moves its figures (see
    // clearWork), so no tool keeps the first turn or one predecessor in every round.
    const start = (round - 1) % chosen.length;
    for (const t of [...chosen.slice(start), ...chosen.slice(0, start)]) {
      console.error(`bench: ${set.title}: round ${round} of ${ROUNDS}`);
      try {
        runs.get(t.name)!.push(runTool(t, set.images));
      } catch (err) {
        console.log(`| ${t.name} | failed: ${(err as Error).message.split("\n")[0]} |`);
      }
    }
  }
  const rows = [...runs.values()].filter((rs) => rs.length > 0).map(fastestRound);
  const size = statSync(set.images[0]!).size;
  const mean = (xs: number[]) => xs.reduce((a, b) => a + b, 0) / Math.max(1, xs.length);
  const peakRss = (r: Row) => Math.max(r.full.rssMiB, r.restore.rssMiB, ...r.incr.map((m) => m.rssMiB));

  console.log(`\n## ${set.title}\n`);
  for (const line of set.about) console.log(line);
  console.log(
    "\nOffline incremental: the next day's image as a file, read whole again by every tool (no dirty " +
      "bitmap); the figure is the mean over the days.\n",
  );
  console.log(
    "| tool | full: wall s | CPU s | stored MiB | offline incremental: wall s | CPU s | stored MiB/day | restore: wall s | peak RSS MiB |",
  );
  console.log("|---|---|---|---|---|---|---|---|---|");
  for (const r of rows) {
    console.log(
      `| ${r.tool} | ${fmt(r.full.wall)} | ${fmt(r.full.cpu)} | ${fmt(r.storedFull / MiB)} | ${fmt(mean(r.incr.map((m) => m.wall)))} | ${fmt(mean(r.incr.map((m) => m.cpu)))} | ${fmt(mean(r.storedPerDay) / MiB)} | ${fmt(r.restore.wall)} | ${fmt(peakRss(r), 0)} |`,
    );
  }
  const peers = rows.filter((r) => !r.tool.startsWith("strata"));
  for (const [label, strata] of [
    ["default: 1 MiB fixed, unencrypted", rows.find((r) => r.tool === STRATA_DEFAULT)],
    ["1 MiB fixed, encrypted (AES)", rows.find((r) => r.tool === STRATA_AES)],
  ] as const) {
    if (!strata || peers.length === 0) continue;
    console.log(`\nRatios of strata (${label}) to each peer (>1 = strata faster/smaller):\n`);
    console.log(
      "| peer | full backup speed | offline incremental speed | restore speed | stored bytes/day (peer/strata) | peak RSS (peer/strata) |",
    );
    console.log("|---|---|---|---|---|---|");
    for (const r of peers) {
      console.log(
        `| ${r.tool} | ${fmt(r.full.wall / strata.full.wall, 2)}x | ${fmt(mean(r.incr.map((m) => m.wall)) / mean(strata.incr.map((m) => m.wall)), 2)}x | ${fmt(r.restore.wall / strata.restore.wall, 2)}x | ${fmt(mean(r.storedPerDay) / Math.max(1, mean(strata.storedPerDay)), 2)} | ${fmt(peakRss(r) / peakRss(strata), 2)} |`,
      );
    }
    const dataMiB = size / MiB;
    console.log(
      `\nstrata (${label}): full backup ${fmt(dataMiB / strata.full.wall, 0)} MiB/s of disk; restore ${fmt(dataMiB / strata.restore.wall, 0)} MiB/s`,
    );
  }
}

const STRATA_DEFAULT = "strata (1 MiB fixed, zstd -3..1/2)";
const STRATA_AES = "strata (1 MiB fixed, zstd -3..1/2, AES)";

function offlineSets(): { sets: DiskSet[]; limitsImage: string } {
  const debian = debianDisks(ROOT, CACHE, DAYS);
  const synthetic = benchDisks(CACHE, DAYS);
  const sets: DiskSet[] = [
    {
      title: "Debian 12, installed (headline)",
      about: [
        `${debian.images.length} images of ${statSync(debian.images[0]!).size / MiB} MiB: ext4 holding a debootstrap'd ` +
          `Debian 12 (kernel, systemd, Python, Perl, gcc, PostgreSQL, a JRE, docs), ${fmt(debian.allocated / MiB, 0)} MiB ` +
          "allocated on day 0; each next day is the day before used in a chroot (apt-get install/purge, logs " +
          "rotated and appended, a SQLite database grown, configuration edited, user files created and deleted).",
        `Changed per day (64 KiB blocks of the image that differ from the day before): ${debian.changed.map((b, i) => `day ${i + 1}: ${fmt(b / MiB, 0)} MiB`).join(", ")}.`,
      ],
      images: debian.images,
    },
    {
      title: "Synthetic Linux-like tree (media, duplicates, generated files)",
      about: [
        `${synthetic.length} images of ${statSync(synthetic[0]!).size / MiB} MiB: ext4 with ~2.4 GiB used: this machine's ` +
          "/usr, generated logs and databases, incompressible media, a duplicated directory; next days changed with debugfs.",
      ],
      images: synthetic,
    },
  ];
  return { sets, limitsImage: debian.images[0]! };
}

async function main(): Promise<void> {
  const tools: Tool[] = [
    strataTool(STRATA_DEFAULT, "1M", false),
    strataTool(STRATA_AES, "1M", true),
    strataTool("strata (4 MiB fixed, zstd -3..1/2)", "4M", false),
    strataTool("strata (256 KiB fixed, zstd -3..1/2)", "256K", false),
    restic,
    borgTool("borg 1.2 (fixed 4 MiB, lz4)", ["--chunker-params", "fixed,4194304"], "lz4"),
    borgTool("borg 1.2 (buzhash CDC 2 MiB, lz4)", [], "lz4"),
  ];
  const only = process.env.STRATA_BENCH_ONLY;
  const picked = (name: string) => !only || only.split("|").some((o) => name.includes(o));
  const chosen = tools.filter((x) => picked(x.name));
  const live = picked(LIVE_NAME);
  const journal = picked(JOURNAL_NAME);
  if (chosen.length === 0 && !live && !journal)
    throw new Error(
      `STRATA_BENCH_ONLY=${only} matches none of: ${[...tools.map((t) => t.name), LIVE_NAME, JOURNAL_NAME].join("; ")}`,
    );
  ensureCommands({ "/usr/bin/time": "time" });
  mkdirSync(WORK, { recursive: true });
  const cold = dropCaches();
  console.log(
    `${availableParallelism()} cores. ${ROUNDS} interleaved rounds per disk; times are the fastest round's, stored bytes the mean. ` +
      (cold
        ? "Every command started with an empty page cache."
        : "Not root: the page cache was NOT dropped between commands, so later tools may read what earlier ones cached."),
  );
  if (chosen.length > 0) {
    ensureCommands({
      restic: "restic",
      borg: "borgbackup",
      "mkfs.ext4": "e2fsprogs",
      debootstrap: "debootstrap",
    });
    const { sets, limitsImage } = offlineSets();
    // A token that names a disk set (e.g. "Debian") picks the sets too; otherwise every set runs.
    const named = sets.filter((s) => only?.split("|").some((o) => s.title.includes(o)));
    for (const set of named.length > 0 ? named : sets) benchDiskSet(set, chosen);
    const lim = await limits(limitsImage);
    console.log("\nThis machine's limits, same run (reads: the Debian disk's day 0):");
    for (const [k, v] of Object.entries(lim)) console.log(`- ${k}: ${fmt(v, 0)}`);
  }
  if (journal) await benchJournalDay(debianDisks(ROOT, CACHE, DAYS).images, WORK);
  if (live) await benchLive({ work: join(WORK, "live"), rounds: LIVE_ROUNDS, strataBin });
  clearWork(false);
}

await main();
