/**
 * Disk I/O limits the kernel enforces on a whole process (the daemon, and the programs it starts),
 * chosen by what the host offers:
 *
 *  - cgroup v2 with the io controller: the process moves into a child of its own cgroup,
 *    `strata`, with `io.max` (rbps/wbps per disk) and `io.weight` (`default W`);
 *  - else cgroup v1 blkio (hybrid hosts, where the v2 tree has no controllers): a child `strata`
 *    of its own blkio cgroup with `blkio.throttle.read_bps_device` / `write_bps_device` per disk;
 *    the weight becomes an ioprio (below), since blkio weights need the BFQ scheduler;
 *  - else ioprio (`ionice`) on every thread of the process: no rate limit, only the weight, as
 *    the best-effort class's level (weight 100 or more: 4, the default; 67-99: 5; 34-66: 6;
 *    1-33: 7). Threads started later inherit it.
 *
 * Rates apply to every disk of the host (/sys/block entries with a size), since a backup reads
 * wherever its sources are and writes wherever its repository is. v1 throttles only I/O that
 * reaches the disk directly: reads (Strata reads raw images with O_DIRECT) and direct writes;
 * buffered writes are throttled by v2 only.
 *
 * Paths are parameters so that tests can point them at a tree of their own.
 */
import { existsSync, mkdirSync, readdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { describeError } from "./errors.js";
import { runProgram } from "./process.js";
import { MiB } from "./throttle.js";

export interface IoLimits {
  /** MiB/s read from each disk, by the whole process. */
  readMiBs?: number;
  /** MiB/s written to each disk. */
  writeMiBs?: number;
  /** Relative share of the disks, 1-10000 (cgroup v2 io.weight; 100 is everyone's default). */
  weight?: number;
}

export type IoMechanism =
  | { kind: "cgroup2"; root: string; cgroup: string }
  | { kind: "blkio"; root: string; cgroup: string }
  | { kind: "ioprio"; why: string };

export interface IoHost {
  /** /proc/self/mounts (or another process's). */
  mounts: string;
  /** /proc/self/cgroup. */
  cgroups: string;
  /** Where disks are listed: /sys/block. */
  sysBlock: string;
}

export function readIoHost(): IoHost {
  const read = (p: string) => {
    try {
      return readFileSync(p, "utf8");
    } catch {
      return "";
    }
  };
  return { mounts: read("/proc/self/mounts"), cgroups: read("/proc/self/cgroup"), sysBlock: "/sys/block" };
}

/** Which mechanism this host offers: cgroup v2 io, else cgroup v1 blkio, else ioprio (and why). */
export function detectIoMechanism(host: IoHost = readIoHost()): IoMechanism {
  const mounts = host.mounts
    .split("\n")
    .map((l) => l.split(" "))
    .filter((f) => f.length >= 4);
  const own = (hierarchy: (controllers: string) => boolean) => {
    for (const line of host.cgroups.split("\n")) {
      const m = /^\d+:([^:]*):(.*)$/.exec(line);
      if (m && hierarchy(m[1]!)) return m[2]!;
    }
    return undefined;
  };
  const why: string[] = [];
  const v2 = mounts.find((f) => f[2] === "cgroup2");
  if (v2) {
    const root = unescapeMount(v2[1]!);
    const available = readText(join(root, "cgroup.controllers")).split(/\s+/);
    const path = own((c) => c === "");
    if (!available.includes("io")) why.push(`cgroup v2 at ${root} has no io controller (it is bound to v1)`);
    else if (path === undefined) why.push("this process has no cgroup v2 path");
    else return { kind: "cgroup2", root, cgroup: join(root, path, "strata") };
  } else why.push("no cgroup v2 mounted");
  const v1 = mounts.find((f) => f[2] === "cgroup" && f[3]!.split(",").includes("blkio"));
  if (v1) {
    const root = unescapeMount(v1[1]!);
    const path = own((c) => c.split(",").includes("blkio"));
    if (path === undefined) why.push("this process has no blkio cgroup");
    else return { kind: "blkio", root, cgroup: join(root, path, "strata") };
  } else why.push("no cgroup v1 blkio mounted");
  return { kind: "ioprio", why: why.join("; ") };
}

/** The best-effort ioprio level for a weight (see the file's comment). */
export function ioprioLevel(weight: number): number {
  if (weight >= 100) return 4;
  if (weight >= 67) return 5;
  if (weight >= 34) return 6;
  return 7;
}

/** "MAJ:MIN" of every disk with a size under `sysBlock`. */
export function hostDisks(sysBlock = "/sys/block"): string[] {
  const out: string[] = [];
  let names: string[] = [];
  try {
    names = readdirSync(sysBlock);
  } catch {
    return out;
  }
  for (const name of names) {
    const dev = readText(join(sysBlock, name, "dev")).trim();
    const size = Number(readText(join(sysBlock, name, "size")).trim());
    if (/^\d+:\d+$/.test(dev) && size > 0) out.push(dev);
  }
  return out;
}

export interface IoApplied {
  mechanism: IoMechanism;
  /** What is in force, for the log: "cgroup v1 blkio /sys/fs/cgroup/blkio/strata: reads 50 MiB/s on 254:0". */
  summary: string;
  /** Settings that could not be applied, each with its reason. */
  refused: string[];
}

/**
 * Applies `limits` to process `pid` (all its threads) by `mechanism`. A cgroup that cannot be
 * made or entered falls back to ioprio; a disk that refuses a rate is reported in `refused`.
 */
export async function applyIoLimits(
  limits: IoLimits,
  pid: number = process.pid,
  mechanism: IoMechanism = detectIoMechanism(),
  sysBlock = "/sys/block",
): Promise<IoApplied> {
  const refused: string[] = [];
  const disks = hostDisks(sysBlock);
  const rates = (l: IoLimits) =>
    [
      l.readMiBs === undefined ? "" : `reads ${l.readMiBs} MiB/s`,
      l.writeMiBs === undefined ? "" : `writes ${l.writeMiBs} MiB/s`,
    ]
      .filter(Boolean)
      .join(", ");
  const bps = (mibs: number) => Math.round(mibs * MiB);
  const hasRate = limits.readMiBs !== undefined || limits.writeMiBs !== undefined;
  if (!hasRate && limits.weight === undefined) return { mechanism, summary: "no disk limit set", refused };
  if (mechanism.kind === "cgroup2") {
    try {
      mkdirSync(mechanism.cgroup, { recursive: true });
      writeFileSync(join(mechanism.cgroup, "cgroup.procs"), `${pid}\n`);
      // The parent hands the io controller to its children (it holds no process now).
      const parent = join(mechanism.cgroup, "..");
      if (!readText(join(parent, "cgroup.subtree_control")).split(/\s+/).includes("io"))
        writeFileSync(join(parent, "cgroup.subtree_control"), "+io\n");
    } catch (err) {
      return applyIoLimits(
        limits,
        pid,
        { kind: "ioprio", why: `cannot use ${mechanism.cgroup}: ${describeError(err)}` },
        sysBlock,
      );
    }
    if (limits.readMiBs !== undefined || limits.writeMiBs !== undefined)
      for (const dev of disks) {
        const r = limits.readMiBs === undefined ? "max" : bps(limits.readMiBs);
        const w = limits.writeMiBs === undefined ? "max" : bps(limits.writeMiBs);
        tryWrite(
          join(mechanism.cgroup, "io.max"),
          `${dev} rbps=${r} wbps=${w}\n`,
          `io.max on ${dev}`,
          refused,
        );
      }
    if (limits.weight !== undefined)
      tryWrite(join(mechanism.cgroup, "io.weight"), `default ${limits.weight}\n`, "io.weight", refused);
    const parts = [
      rates(limits) && `${rates(limits)} on ${disks.join(" ")}`,
      limits.weight === undefined ? "" : `io.weight ${limits.weight}`,
    ];
    return {
      mechanism,
      summary: `cgroup v2 ${mechanism.cgroup}: ${parts.filter(Boolean).join(", ")}`,
      refused,
    };
  }
  if (mechanism.kind === "blkio" && hasRate) {
    try {
      mkdirSync(mechanism.cgroup, { recursive: true });
      writeFileSync(join(mechanism.cgroup, "cgroup.procs"), `${pid}\n`);
    } catch (err) {
      return applyIoLimits(
        limits,
        pid,
        { kind: "ioprio", why: `cannot use ${mechanism.cgroup}: ${describeError(err)}` },
        sysBlock,
      );
    }
    for (const dev of disks) {
      if (limits.readMiBs !== undefined)
        tryWrite(
          join(mechanism.cgroup, "blkio.throttle.read_bps_device"),
          `${dev} ${bps(limits.readMiBs)}\n`,
          `read rate on ${dev}`,
          refused,
        );
      if (limits.writeMiBs !== undefined)
        tryWrite(
          join(mechanism.cgroup, "blkio.throttle.write_bps_device"),
          `${dev} ${bps(limits.writeMiBs)}\n`,
          `write rate on ${dev}`,
          refused,
        );
    }
    let summary = `cgroup v1 blkio ${mechanism.cgroup}: ${rates(limits)} on ${disks.join(" ")}`;
    if (limits.weight !== undefined) {
      const level = await setIoprio(pid, ioprioLevel(limits.weight), refused);
      summary += `; weight ${limits.weight} as ioprio best-effort ${level}`;
    }
    return { mechanism, summary, refused };
  }
  // ioprio: the weight only (on v1 without a rate too: blkio weights need the BFQ scheduler).
  if (mechanism.kind === "ioprio" && hasRate)
    refused.push(`${rates(limits)}: no cgroup I/O controller here (${mechanism.why})`);
  if (limits.weight === undefined) return { mechanism, summary: "ioprio: no weight set", refused };
  const level = await setIoprio(pid, ioprioLevel(limits.weight), refused);
  return { mechanism, summary: `ioprio: weight ${limits.weight} as ioprio best-effort ${level}`, refused };
}

/** ionice -c2 -n LEVEL on every thread of `pid`; the level set. */
async function setIoprio(pid: number, level: number, refused: string[]): Promise<number> {
  let tids: string[];
  try {
    tids = readdirSync(`/proc/${pid}/task`);
  } catch {
    tids = [String(pid)];
  }
  for (const tid of tids) {
    try {
      await runProgram("ionice", ["-c", "2", "-n", String(level), "-p", tid], { timeoutMs: 10_000 });
    } catch (err) {
      // A thread that ended meanwhile is not a refusal.
      if (existsSync(`/proc/${pid}/task/${tid}`)) {
        refused.push(`ioprio on thread ${tid}: ${describeError(err)}`);
        break;
      }
    }
  }
  return level;
}

function tryWrite(file: string, text: string, what: string, refused: string[]): void {
  try {
    writeFileSync(file, text);
  } catch (err) {
    refused.push(`${what}: ${describeError(err)}`);
  }
}

function readText(p: string): string {
  try {
    return readFileSync(p, "utf8");
  } catch {
    return "";
  }
}

/** /proc/mounts escapes spaces and the like as \\040 (octal). */
function unescapeMount(s: string): string {
  return s.replace(/\\([0-7]{3})/g, (_, o: string) => String.fromCharCode(Number.parseInt(o, 8)));
}

/** How `mechanism` is named in `daemon --check` and the log. */
export function describeMechanism(m: IoMechanism): string {
  if (m.kind === "cgroup2") return `cgroup v2 io.max/io.weight (${m.cgroup})`;
  if (m.kind === "blkio") return `cgroup v1 blkio throttle (${m.cgroup}); weight as ioprio`;
  return `ioprio (ionice) only, no rate limit: ${m.why}`;
}
