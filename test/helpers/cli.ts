/** Runs the real strata CLI (bin/strata) in a child process, as a user would. */
import { type ChildProcess, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { dirname, join, resolve } from "node:path";
import type { TestContext } from "node:test";
import { fileURLToPath } from "node:url";

export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
export const BIN = join(ROOT, "bin", "strata");

export interface RunResult {
  code: number;
  stdout: string;
  stderr: string;
}

export interface RunOptions {
  env?: Record<string, string | undefined>;
  /** Options for node itself (e.g. "--max-old-space-size=512"). */
  nodeArgs?: readonly string[];
  /** A command that runs node (e.g. setpriv ... --), instead of starting it directly. */
  prefix?: readonly string[];
}

/** Starts strata with `args`; the caller waits or kills. */
export function startStrata(args: readonly string[], options: RunOptions = {}): ChildProcess {
  const env: Record<string, string | undefined> = {
    ...process.env,
    STRATA_PASSWORD: undefined,
    STRATA_REPO: undefined,
  };
  for (const [k, v] of Object.entries(options.env ?? {})) env[k] = v;
  const [cmd, ...rest] = [
    ...(options.prefix ?? []),
    process.execPath,
    ...(options.nodeArgs ?? []),
    BIN,
    ...args,
  ];
  return spawn(cmd!, rest, {
    env: env as NodeJS.ProcessEnv,
    stdio: ["ignore", "pipe", "pipe"],
  });
}

/** A child's output so far, and its result once it has closed. */
export interface Collected {
  readonly stdout: string;
  readonly stderr: string;
  /** The exit code (128 when killed by a signal) and all output. */
  readonly result: Promise<RunResult>;
}

/** Collects a child's stdout and stderr as they come. */
export function collect(child: ChildProcess): Collected {
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => {
    stdout += d.toString();
  });
  child.stderr!.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const result = new Promise<RunResult>((res, rej) => {
    child.on("error", rej);
    child.on("close", (code, signal) => res({ code: code ?? (signal ? 128 : 1), stdout, stderr }));
  });
  return {
    get stdout() {
      return stdout;
    },
    get stderr() {
      return stderr;
    },
    result,
  };
}

export function strata(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  return collect(startStrata(args, options)).result;
}

/** Like strata() but fails the test with the output when the exit code is not 0. */
export async function strataOk(args: readonly string[], options: RunOptions = {}): Promise<RunResult> {
  const r = await strata(args, options);
  if (r.code !== 0)
    throw new Error(`strata ${args.join(" ")} exited ${r.code}\nstdout: ${r.stdout}\nstderr: ${r.stderr}`);
  return r;
}

/** The last JSON line of a --json run (the summary). */
export function summary<T = Record<string, unknown>>(r: RunResult): T {
  const lines = r.stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]!) as T;
}

/** A temporary directory removed after the test. */
export function tempDir(t: TestContext, prefix = "strata-test-"): string {
  const dir = mkdtempSync(join(tmpdir(), prefix));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}
