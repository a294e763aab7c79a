/**
 * How the bench measures, shared by its sections (run.ts: offline images against restic and borg;
 * live.ts: live incrementals of a running VM): one timing discipline (cold page cache, durable
 * state), one way to install what is missing, one number format.
 */
import { execFileSync, spawnSync } from "node:child_process";
import { existsSync, readFileSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const MiB = 1024 * 1024;

export interface Measure {
  wall: number;
  cpu: number;
  rssMiB: number;
}

/**
 * Installs the Debian packages (values) of the commands or absolute file paths (keys) that are
 * missing, so that no section of the bench is skipped for want of a tool or a header.
 */
export function ensureCommands(need: Record<string, string>): void {
  const missing = Object.keys(need).filter((cmd) =>
    cmd.startsWith("/") ? !existsSync(cmd) : spawnSync("sh", ["-c", `command -v ${cmd}`]).status !== 0,
  );
  if (missing.length === 0) return;
  const packages = [...new Set(missing.map((cmd) => need[cmd]!))];
  console.error(`bench: installing ${packages.join(", ")} (missing: ${missing.join(", ")})`);
  execFileSync("apt-get", ["install", "-y", "-qq", ...packages], {
    // apt-get talks on stdout: to stderr, so that stdout holds only the tables.
    stdio: ["ignore", 2, 2],
    env: { ...process.env, DEBIAN_FRONTEND: "noninteractive" },
  });
}

/** Drops the page cache (root only); false when it can't. */
export function dropCaches(): boolean {
  try {
    writeFileSync("/proc/sys/vm/drop_caches", "3\n");
    return true;
  } catch {
    return false;
  }
}

const TIME_OUT = join(tmpdir(), `strata-bench-time-${process.pid}.out`);

/**
 * Runs a command under GNU time; returns wall s, CPU s, peak RSS MiB and what it printed on
 * stdout. Dirty pages are flushed first (untimed); `durable` is synced after the command and that
 * time added to the wall time.
 */
export function timed(
  durable: string,
  cmd: string,
  args: string[],
  env: Record<string, string> = {},
  stdinFile?: string,
): Measure & { stdout: string } {
  execFileSync("sync");
  dropCaches();
  const shell = stdinFile
    ? [
        "sh",
        "-c",
        `exec /usr/bin/time -o ${TIME_OUT} -f "%e %U %S %M" "$0" "$@" < ${stdinFile}`,
        cmd,
        ...args,
      ]
    : ["/usr/bin/time", "-o", TIME_OUT, "-f", "%e %U %S %M", cmd, ...args];
  const r = spawnSync(shell[0]!, shell.slice(1), {
    env: { ...process.env, ...env },
    stdio: ["ignore", "pipe", "pipe"],
    maxBuffer: 64 * MiB,
  });
  if (r.status !== 0)
    throw new Error(`${cmd} ${args.join(" ")} failed (${r.status}): ${r.stderr.toString().slice(-2000)}`);
  const t0 = process.hrtime.bigint();
  execFileSync("sync", ["-f", durable]);
  const syncSecs = Number(process.hrtime.bigint() - t0) / 1e9;
  const [wall, user, sys, rss] = readFileSync(TIME_OUT, "utf8")
    .trim()
    .split("\n")
    .at(-1)!
    .split(" ")
    .map(Number);
  return { wall: wall! + syncSecs, cpu: user! + sys!, rssMiB: rss! / 1024, stdout: r.stdout.toString() };
}

/** Bytes under `path` (a repository grows by what a backup stored, index and manifest included). */
export function du(path: string): number {
  return Number(execFileSync("du", ["-sb", path], { encoding: "utf8" }).split("\t")[0]);
}

export function fmt(n: number, digits = 1): string {
  return n.toFixed(digits);
}
