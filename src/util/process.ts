/** Running external programs: run to completion, or keep a daemon and stop it surely. */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { readFileSync } from "node:fs";
import { connect } from "node:net";
import { ErrorCode, StrataError } from "./errors.js";

/** Runs `cmd` to completion and returns stdout; a failure says what ran and what it printed. */
export function runProgram(
  cmd: string,
  args: readonly string[],
  options: { timeoutMs?: number } = {},
): Promise<string> {
  return new Promise((resolve, reject) => {
    execFile(
      cmd,
      args,
      { timeout: options.timeoutMs ?? 60_000, maxBuffer: 256 * 1024 * 1024 },
      (err, stdout, stderr) => {
        if (!err) return resolve(stdout);
        const e = err as NodeJS.ErrnoException;
        if (e.code === "ENOENT") {
          reject(
            new StrataError(ErrorCode.EXTERNAL, `${cmd} is not installed (run scripts/setup.sh)`, {
              cause: err,
            }),
          );
          return;
        }
        const text = (stderr || stdout || e.message).trim().split("\n").slice(-3).join(" ");
        reject(new StrataError(ErrorCode.EXTERNAL, `${cmd} failed: ${text}`, { cause: err }));
      },
    );
  });
}

/** A long-running child process that is stopped (TERM, then KILL) and waited for. */
export class Daemon {
  private stderrTail = "";
  readonly exited: Promise<void>;
  private done = false;

  private constructor(
    readonly name: string,
    readonly child: ChildProcess,
  ) {
    child.stderr?.on("data", (d: Buffer) => {
      this.stderrTail = (this.stderrTail + d.toString()).slice(-4000);
    });
    this.exited = new Promise((resolve) => {
      child.once("exit", () => {
        this.done = true;
        resolve();
      });
      child.once("error", () => {
        this.done = true;
        resolve();
      });
    });
  }

  get pid(): number | undefined {
    return this.child.pid;
  }

  get running(): boolean {
    return !this.done;
  }

  /** What it printed on stderr lately, for error messages. */
  get stderr(): string {
    return this.stderrTail.trim();
  }

  /** Starts `cmd`; resolves once `ready()` says so, rejects if it exits first or time runs out. */
  static async start(
    name: string,
    cmd: string,
    args: readonly string[],
    ready: () => Promise<boolean>,
    timeoutMs = 15_000,
  ): Promise<Daemon> {
    const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
    const d = new Daemon(name, child);
    const spawnError = new Promise<Error>((resolve) => child.once("error", resolve));
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const failed = await Promise.race([
        spawnError,
        new Promise<undefined>((r) => setTimeout(() => r(undefined), 0)),
      ]);
      if (failed) {
        throw new StrataError(
          ErrorCode.EXTERNAL,
          (failed as NodeJS.ErrnoException).code === "ENOENT"
            ? `${cmd} is not installed (run scripts/setup.sh)`
            : `cannot start ${name}: ${failed.message}`,
        );
      }
      if (!d.running)
        throw new StrataError(ErrorCode.EXTERNAL, `${name} exited at start: ${d.stderr || "no message"}`);
      if (await ready()) return d;
      if (Date.now() > deadline) {
        await d.stop();
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `${name} did not become ready within ${timeoutMs} ms: ${d.stderr}`,
        );
      }
      await new Promise((r) => setTimeout(r, 25));
    }
  }

  /** SIGTERM, SIGKILL after `graceMs`, and waits for the process to be gone. */
  async stop(graceMs = 5000): Promise<void> {
    if (!this.running) return;
    this.child.kill("SIGTERM");
    const timer = setTimeout(() => this.child.kill("SIGKILL"), graceMs);
    await this.exited;
    clearTimeout(timer);
  }
}

/** True once something accepts connections on the unix socket `path`. */
export function socketAccepts(path: string): Promise<boolean> {
  return new Promise((resolve) => {
    const s = connect(path);
    s.once("connect", () => {
      s.destroy();
      resolve(true);
    });
    s.once("error", () => resolve(false));
  });
}

/**
 * True while a process with this PID exists (ours to signal or not). A zombie (exited, not yet
 * reaped by its parent) is gone for every purpose of ours.
 */
export function processAlive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code !== "EPERM") return false;
  }
  // /proc/<pid>/stat is "pid (comm) S ...", and comm may hold spaces and parentheses.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
  } catch {
    return true;
  }
}

/**
 * True while `pid` runs with `marker` (a socket path, say) in its command line: the process a
 * record names, not another one that reused its PID.
 */
export function processRunsWith(pid: number | null | undefined, marker: string): boolean {
  if (!pid || !processAlive(pid)) return false;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(marker);
  } catch {
    return false;
  }
}

/** Waits until `pid` is gone; false when it still runs after `timeoutMs`. */
export async function waitForExit(pid: number, timeoutMs: number): Promise<boolean> {
  const end = Date.now() + timeoutMs;
  while (processAlive(pid)) {
    if (Date.now() > end) return false;
    await new Promise((r) => setTimeout(r, 50));
  }
  return true;
}

/** SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone (or 5 s after KILL). */
export async function terminate(pid: number | null | undefined, graceMs = 5000): Promise<void> {
  if (!pid || !processAlive(pid)) return;
  try {
    process.kill(pid, "SIGTERM");
  } catch {
    return;
  }
  if (await waitForExit(pid, graceMs)) return;
  try {
    process.kill(pid, "SIGKILL");
  } catch {
    return;
  }
  await waitForExit(pid, 5000);
}
