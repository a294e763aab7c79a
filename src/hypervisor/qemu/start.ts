/**
 * Starting a restored VM and telling whether a VM still runs.
 *
 * {@link startDetached} runs a QEMU argv as a detached process (it outlives Strata, in a session
 * of its own) with its stdout/stderr in a log file, and returns once its QMP socket accepts a
 * connection; if QEMU exits first, the error carries the end of its log. Before it spawns, the
 * exact argv passes the command-line policy (cmdline-policy.ts): defence in depth behind the
 * check made when the configuration was read.
 *
 * {@link qemuProcessesUsing} scans /proc for QEMU processes whose command line names any of the
 * given paths (disk images, sockets): with the QMP socket answering and QEMU's image lock, the
 * three ways Strata notices that a VM whose disks it is asked to overwrite is running.
 */
import { spawn } from "node:child_process";
import { promises as fs } from "node:fs";
import { mkdir, open, readFile, writeFile } from "node:fs/promises";
import { dirname, join } from "node:path";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { processAlive, socketAccepts } from "../../util/process.js";
import { checkCommandLineToRun, type RunPolicy } from "./cmdline-policy.js";

/** QEMU processes on this host whose argv mentions one of `paths` (as a whole value or inside an option). */
export async function qemuProcessesUsing(
  paths: readonly string[],
): Promise<Array<{ pid: number; path: string }>> {
  const found: Array<{ pid: number; path: string }> = [];
  let pids: string[];
  try {
    pids = (await fs.readdir("/proc")).filter((p) => /^\d+$/.test(p));
  } catch {
    return found;
  }
  for (const pid of pids) {
    if (Number(pid) === process.pid) continue;
    const argv = await fs
      .readFile(`/proc/${pid}/cmdline`, "utf8")
      .then((t) => t.split("\0").filter((x) => x !== ""))
      .catch(() => [] as string[]);
    if (argv.length === 0 || !/qemu/.test(argv[0]!)) continue;
    const path = paths.find((p) =>
      argv.some((a) => a === p || a.replaceAll(",,", ",").includes(`=${p}`) || a.includes(`:${p}`)),
    );
    if (path !== undefined) found.push({ pid: Number(pid), path });
  }
  return found;
}

export interface StartedVm {
  pid: number;
  qmpSocket: string;
  log: string;
  /** What the command-line check noticed but let run (a firmware file others can change). */
  warnings: string[];
}

/**
 * Starts `argv` (binary first) detached, output to `log`, and waits until `qmpSocket` accepts
 * connections (at most `timeoutMs`). The argv comes from a stored configuration: it is checked
 * against `policy` (cmdline-policy.ts) right here, the exact one spawned, and QEMU runs in the
 * policy's working directory.
 */
export async function startDetached(
  argv: readonly string[],
  qmpSocket: string,
  log: string,
  policy: RunPolicy,
  timeoutMs = 30_000,
): Promise<StartedVm> {
  const warnings = await checkCommandLineToRun(argv, policy);
  if (await socketAccepts(qmpSocket))
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `a VM already answers on ${qmpSocket}`);
  await mkdir(dirname(log), { recursive: true });
  await mkdir(dirname(qmpSocket), { recursive: true });
  await mkdir(policy.cwd, { recursive: true });
  await writeFile(join(dirname(log), "cmdline.json"), `${JSON.stringify(argv, null, 2)}\n`).catch(() => {});
  const fh = await open(log, "w");
  const child = spawn(argv[0]!, argv.slice(1), {
    detached: true,
    stdio: ["ignore", fh.fd, fh.fd],
    cwd: policy.cwd,
  });
  const failed = new Promise<Error>((resolve) => child.once("error", resolve));
  let exited: number | null | undefined;
  child.once("exit", (code) => {
    exited = code;
  });
  await fh.close();
  child.unref();
  const pid = child.pid;
  const tail = async () =>
    (await readFile(log, "utf8").catch(() => "")).trim().split("\n").slice(-5).join("\n");
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const err = await Promise.race([
      failed,
      new Promise<undefined>((r) => setTimeout(() => r(undefined), 50)),
    ]);
    if (err)
      throw new StrataError(ErrorCode.EXTERNAL, `cannot start ${argv[0]}: ${describeError(err)}`, {
        cause: err,
      });
    if (await socketAccepts(qmpSocket)) return { pid: pid ?? 0, qmpSocket, log, warnings };
    if (exited !== undefined) {
      throw new StrataError(ErrorCode.EXTERNAL, `QEMU exited at start (code ${exited}): ${await tail()}`);
    }
    if (Date.now() > deadline) {
      if (pid !== undefined && processAlive(pid)) process.kill(pid, "SIGKILL");
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `the VM's QMP socket ${qmpSocket} did not answer within ${timeoutMs / 1000} s: ${await tail()}`,
      );
    }
  }
}
