// Shared helpers for tests that start QEMU's NBD programs.
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { promisify } from "node:util";
import type { Extent } from "../../src/nbd/index.js";

const execFileP = promisify(execFile);

/** A temp directory removed after the test. */
export function tempDir(t: TestContext): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-nbd-it-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return dir;
}

/** Runs a program to completion (30 s limit) and returns its stdout; throws with stderr. */
export async function run(cmd: string, args: string[]): Promise<string> {
  try {
    const { stdout } = await execFileP(cmd, args, { timeout: 30_000, maxBuffer: 64 * 1024 * 1024 });
    return stdout;
  } catch (err) {
    const e = err as { stdout?: string; stderr?: string; message: string };
    throw new Error(`${cmd} ${args.join(" ")} failed: ${e.stdout ?? ""} ${e.stderr ?? ""} ${e.message}`);
  }
}

/**
 * Starts a long-running program that listens on the unix socket `socket`, resolves once the
 * socket accepts a connection, and stops it (SIGTERM, then SIGKILL after 5 s) after the test,
 * waiting for the process to exit: qemu-nbd and qemu-storage-daemon do not exit synchronously.
 */
export async function startDaemon(
  t: TestContext,
  cmd: string,
  args: string[],
  socket: string,
): Promise<ChildProcess> {
  const child = spawn(cmd, args, { stdio: ["ignore", "ignore", "pipe"] });
  let stderr = "";
  child.stderr?.on("data", (d: Buffer) => {
    if (stderr.length < 8192) stderr += d.toString();
  });
  const exited = new Promise<void>((resolve) => {
    if (child.exitCode !== null || child.signalCode !== null) resolve();
    else child.once("exit", () => resolve());
  });
  child.on("error", () => {});
  t.after(async () => {
    if (child.exitCode === null && child.signalCode === null) {
      child.kill("SIGTERM");
      const killer = setTimeout(() => child.kill("SIGKILL"), 5000);
      await exited;
      clearTimeout(killer);
    }
  });
  await waitListening(child, exited, socket, () => `${cmd} ${args.join(" ")}: ${stderr}`);
  return child;
}

/** Stops `child` and waits for its exit. */
export async function stopDaemon(child: ChildProcess): Promise<void> {
  if (child.exitCode !== null || child.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  child.kill("SIGTERM");
  await exited;
}

async function waitListening(
  child: ChildProcess,
  exited: Promise<void>,
  socket: string,
  describe: () => string,
): Promise<void> {
  let gone = false;
  void exited.then(() => {
    gone = true;
  });
  const deadline = Date.now() + 10_000;
  while (Date.now() < deadline) {
    if (gone) throw new Error(`exited before listening: ${describe()}`);
    const ok = await new Promise<boolean>((resolve) => {
      const s = connect(socket);
      s.once("connect", () => {
        s.destroy();
        resolve(true);
      });
      s.once("error", () => resolve(false));
    });
    if (ok) return;
    await new Promise((r) => setTimeout(r, 50));
  }
  child.kill("SIGKILL");
  throw new Error(`not listening on ${socket} within 10 s: ${describe()}`);
}

/** Merges adjacent extents with equal flags. */
export function merge(extents: Extent[]): Extent[] {
  const out: Extent[] = [];
  for (const e of extents) {
    const last = out[out.length - 1];
    if (last && last.flags === e.flags && last.offset + last.length === e.offset) last.length += e.length;
    else out.push({ ...e });
  }
  return out;
}

/** `qemu-img map --output=json` as base:allocation extents (HOLE = !data, ZERO = zero). */
export async function qemuImgMap(args: string[]): Promise<Extent[]> {
  const rows = JSON.parse(await run("qemu-img", ["map", "--output=json", ...args])) as Array<{
    start: number;
    length: number;
    data: boolean;
    zero: boolean;
  }>;
  return merge(
    rows.map((r) => ({ offset: r.start, length: r.length, flags: (r.data ? 0 : 1) | (r.zero ? 2 : 0) })),
  );
}

/** `nbdinfo --map[=CONTEXT]` lines as extents. */
export async function nbdinfoMap(uri: string, context?: string): Promise<Extent[]> {
  const out = await run("nbdinfo", [context ? `--map=${context}` : "--map", uri]);
  return merge(
    out
      .trim()
      .split("\n")
      .map((line) => {
        const [offset, length, flags] = line.trim().split(/\s+/).map(Number);
        return { offset: offset!, length: length!, flags: flags! };
      }),
  );
}
