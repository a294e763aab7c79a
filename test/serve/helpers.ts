// Helpers for tests of strata serve and the restore sinks: a backed-up image, a running serve.
import type { ChildProcess } from "node:child_process";
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { promisify } from "node:util";
import { writeSyntheticImage } from "../../src/image/synthetic.js";
import { startStrata, strataOk, summary } from "../helpers/cli.js";

const execFileP = promisify(execFile);

export const CHUNK = 64 * 1024;

/** Runs a program (30 s limit); resolves with its output whatever the exit code. */
export async function runTool(
  cmd: string,
  args: string[],
): Promise<{ code: number; stdout: string; stderr: string }> {
  try {
    const { stdout, stderr } = await execFileP(cmd, args, { timeout: 30_000, maxBuffer: 64 * 1024 * 1024 });
    return { code: 0, stdout, stderr };
  } catch (err) {
    const e = err as { code?: number; stdout?: string; stderr?: string; message: string };
    return {
      code: typeof e.code === "number" ? e.code : 1,
      stdout: e.stdout ?? "",
      stderr: e.stderr ?? e.message,
    };
  }
}

/** Like runTool but throws with the output when the program fails. */
export async function tool(cmd: string, args: string[]): Promise<string> {
  const r = await runTool(cmd, args);
  if (r.code !== 0) throw new Error(`${cmd} ${args.join(" ")} exited ${r.code}: ${r.stdout} ${r.stderr}`);
  return r.stdout;
}

export interface BackedUp {
  repo: string;
  image: string;
  id: string;
  size: number;
}

/** Writes a synthetic image, creates a 64 KiB-chunk repository and backs the image up as disk `name`. */
export async function backedUpImage(
  dir: string,
  options: { size: number; seed: string; holes?: number; name?: string; runSize?: number },
): Promise<BackedUp> {
  const repo = join(dir, "repo");
  const image = join(dir, `${options.name ?? "root"}.img`);
  await writeSyntheticImage(image, {
    size: options.size,
    seed: options.seed,
    holes: options.holes ?? 0.5,
    runSize: options.runSize ?? 256 * 1024,
  });
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
  const b = summary(
    await strataOk([
      "backup",
      "--repo",
      repo,
      "--vm",
      "vm1",
      "--json",
      `file:${image},name=${options.name ?? "root"}`,
    ]),
  );
  return { repo, image, id: b.id as string, size: options.size };
}

/** Which 64 KiB pieces of a file are all zero. */
export async function zeroChunks(path: string): Promise<boolean[]> {
  const data = await fs.readFile(path);
  const out: boolean[] = [];
  for (let off = 0; off < data.length; off += CHUNK) {
    const piece = data.subarray(off, Math.min(data.length, off + CHUNK));
    out.push(piece.every((b) => b === 0));
  }
  return out;
}

/** Offset of the first 64 KiB piece of `path` whose SHA-256 is `digest` (unencrypted repositories). */
export async function offsetOfDigest(path: string, digest: string): Promise<number> {
  const data = await fs.readFile(path);
  for (let off = 0; off < data.length; off += CHUNK) {
    const h = createHash("sha256")
      .update(data.subarray(off, Math.min(data.length, off + CHUNK)))
      .digest("hex");
    if (h === digest) return off;
  }
  throw new Error(`no piece of ${path} has digest ${digest}`);
}

export interface Served {
  child: ChildProcess;
  ready: {
    type: string;
    exports: Array<{ name: string; size: number; uri: string }>;
    socket?: string;
    port?: number;
  };
  /** SIGTERM, wait; the exit code and everything printed. */
  stop(): Promise<{ code: number | null; stdout: string; stderr: string }>;
}

/** Starts `strata serve --json ...args` and waits for its ready line; killed after the test if still running. */
export async function startServe(t: TestContext, args: string[]): Promise<Served> {
  const child = startStrata(["serve", "--json", ...args]);
  let stdout = "";
  let stderr = "";
  child.stdout!.on("data", (d: Buffer) => {
    stdout += d.toString();
  });
  child.stderr!.on("data", (d: Buffer) => {
    stderr += d.toString();
  });
  const exited = new Promise<number | null>((resolve) => child.once("exit", (code) => resolve(code)));
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGKILL");
      await exited;
    }
  });
  const deadline = Date.now() + 15_000;
  for (;;) {
    const line = stdout.split("\n").find((l) => l.startsWith('{"type":"ready"'));
    if (line) {
      return {
        child,
        ready: JSON.parse(line) as Served["ready"],
        async stop() {
          child.kill("SIGTERM");
          const code = await exited;
          return { code, stdout, stderr };
        },
      };
    }
    if (child.exitCode !== null)
      throw new Error(`strata serve exited ${child.exitCode}: ${stdout} ${stderr}`);
    if (Date.now() > deadline) throw new Error(`strata serve not ready in time: ${stdout} ${stderr}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** The JSON summary a stopped serve printed last. */
export function serveSummary(stdout: string): {
  type: string;
  exports: Array<{ name: string } & Record<string, number>>;
} {
  const lines = stdout.trim().split("\n");
  return JSON.parse(lines[lines.length - 1]!);
}
