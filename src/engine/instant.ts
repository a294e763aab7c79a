/**
 * Instant recovery: a VM boots straight from a restore point in seconds, then moves to
 * production storage while it runs.
 *
 * ```
 *  strata serve (detached)          QEMU (detached)
 *  NBD over DIR/run/nbd.sock  <--   nbd node (read-only, reconnect-delay)
 *  chunks on demand, verified       raw node                     <- backing
 *                                   qcow2 overlay DIR/<disk>.overlay.qcow2  <- every guest write
 *                                   virtio-blk device (unchanged id and node-name)
 * ```
 *
 * Start ({@link startInstant}): the restore point's recorded QEMU command line is rewritten as a
 * restore would (hypervisor/qemu/clone.ts: a clone's name, UUID, MACs and run files with
 * `--name`; the original identity, run files in DIR/run, without it), with each disk's file node
 * pointing at an empty qcow2 overlay and its format node turned into `driver=qcow2,backing=` a raw
 * node over an nbd node on the serving process's socket ({@link attachNbdBacking}). Nothing is
 * copied first: the time to a running guest is the time to start two processes, whatever the
 * disk sizes. Guest writes land in the overlay; the repository is only ever read.
 *
 * Migrate ({@link migrateInstant}): per disk, a new file + format node on production storage
 * (`blockdev-add`), `blockdev-mirror sync=full` from the disk's top node (the overlay) to it,
 * READY, `job-complete` (the device pivots to the new node without a pause the guest notices),
 * then `blockdev-del` of the overlay, raw and nbd nodes. Once every disk is local the server
 * stops and the overlays are removed. A mirror copies writes made while it runs, so no guest
 * write is lost and there is no second outage. An interrupted migration (Strata or the host
 * killed mid-way) can be run again: a leftover job and target nodes are cancelled and removed
 * first, disks already pivoted are skipped.
 *
 * Resume ({@link resumeInstant}): a dead serving process is started again on the same socket;
 * QEMU's NBD client reconnects by itself within `reconnect-delay` seconds (requests wait meanwhile,
 * they do not fail). A stopped QEMU is started again from the recorded command line, adjusted for
 * disks already migrated.
 *
 * Everything that runs is recorded in `<state dir>/instant/<name>.json` before it is started, so
 * `list`, `stop`, `resume` and `migrate` work from any shell, and a crash leaves a record.
 */
import { spawn } from "node:child_process";
import { promises as fs, readFileSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import {
  findConsoleLog,
  joinOpts,
  newIdentity,
  type Rewrite,
  rewriteCommandLine,
  splitOpts,
  synthesiseCommandLine,
} from "../hypervisor/qemu/clone.js";
import { type Accelerator, type AcceleratorChoice, chooseAccelerator } from "../hypervisor/qemu/launcher.js";
import type { VmConfig } from "../hypervisor/qemu/live.js";
import { QmpClient } from "../hypervisor/qemu/qmp.js";
import { startDetached } from "../hypervisor/qemu/start.js";
import { defaultStateDir } from "../hypervisor/qemu/state.js";
import type { SnapshotRef } from "../repo/repository.js";
import { describeError, ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import { runProgram, socketAccepts } from "../util/process.js";
import { noProgress, type ProgressSink } from "../util/progress.js";

/** Seconds QEMU's NBD client holds requests while it reconnects to a restarted server. */
export const DEFAULT_RECONNECT_DELAY = 300;

export type InstantPhase = "starting" | "running" | "migrating" | "migrated" | "stopped";

export interface InstantDisk {
  /** Disk name in the restore point (= NBD export name). */
  name: string;
  size: number;
  /** Node-name of the disk's format node (the device's drive; the overlay's qcow2 node). */
  node: string;
  /** Node-name of the overlay's file (protocol) node. */
  fileNode: string;
  /** The raw node over the nbd node: the overlay's backing. */
  backingNode: string;
  nbdNode: string;
  overlay: string;
  /** Set once the disk has pivoted to production storage. */
  production?: { path: string; format: "qcow2" | "raw"; node: string; fileNode: string };
}

/** The record of one instantly recovered VM (`<state dir>/instant/<name>.json`). */
export interface InstantState {
  format: "strata-instant";
  version: 1;
  name: string;
  /** `vm/time` of the restore point. */
  restorePoint: string;
  repo: string;
  passwordFile?: string;
  clone: boolean;
  uuid: string | null;
  dir: string;
  runDir: string;
  /** The NBD server's unix socket. */
  socket: string;
  reconnectDelay: number;
  accelerator: Accelerator;
  phase: InstantPhase;
  serve: { pid: number | null; log: string; command: string[] };
  qemu: { pid: number | null; qmpSocket: string; log: string; console: string | null };
  disks: InstantDisk[];
  /**
   * The command line with the overlays as plain qcow2 files (before {@link attachNbdBacking}):
   * {@link instantArgv} derives the one to run from it and the disks' state.
   */
  baseArgv: string[];
  migration?: { target: string; format: "qcow2" | "raw"; limitBytes: number | null; finished?: string };
  created: string;
  warnings: string[];
}

// ---- command line -----------------------------------------------------------------------------

/** What {@link attachNbdBacking} needs per disk. */
export interface NbdBacking {
  node: string;
  backingNode: string;
  nbdNode: string;
  socket: string;
  export: string;
  reconnectDelay: number;
}

/**
 * Gives each disk's format node (`node-name=<node>`, already `driver=qcow2` over the overlay file)
 * a backing: `-blockdev driver=nbd,...,read-only=on,reconnect-delay=N` and
 * `-blockdev driver=raw,file=<nbd>,read-only=on` inserted just before it, and `backing=<raw>` on
 * it. Handles QEMU's key=value and JSON `-blockdev` syntax. Pure.
 */
export function attachNbdBacking(argv: readonly string[], disks: readonly NbdBacking[]): string[] {
  const out: string[] = [argv[0]!];
  const done = new Set<string>();
  for (let i = 1; i < argv.length; i++) {
    const flag = argv[i]!;
    const val = argv[i + 1];
    if (flag !== "-blockdev" || val === undefined) {
      out.push(flag);
      continue;
    }
    i++;
    let nodeName: string | undefined;
    let json: Record<string, unknown> | undefined;
    if (val.startsWith("{")) {
      json = JSON.parse(val) as Record<string, unknown>;
      nodeName = typeof json["node-name"] === "string" ? (json["node-name"] as string) : undefined;
    } else nodeName = splitOpts(val).find((o) => o.key === "node-name")?.value;
    const d = disks.find((x) => x.node === nodeName);
    if (!d) {
      out.push(flag, val);
      continue;
    }
    const q = (s: string) => s.replaceAll(",", ",,");
    out.push(
      "-blockdev",
      `driver=nbd,node-name=${d.nbdNode},server.type=unix,server.path=${q(d.socket)},export=${q(d.export)},read-only=on,reconnect-delay=${d.reconnectDelay}`,
      "-blockdev",
      `driver=raw,file=${d.nbdNode},node-name=${d.backingNode},read-only=on`,
    );
    if (json) out.push(flag, JSON.stringify({ ...json, backing: d.backingNode }));
    else {
      const o = splitOpts(val).filter((x) => x.key !== "backing");
      o.push({ key: "backing", value: d.backingNode });
      out.push(flag, joinOpts(o));
    }
    done.add(d.node);
  }
  const missing = disks.filter((d) => !done.has(d.node));
  if (missing.length > 0)
    throw new StrataError(
      ErrorCode.USAGE,
      `the command line has no -blockdev with node-name ${missing.map((d) => d.node).join(", ")}: instant recovery needs -blockdev disks (a -drive line cannot take an NBD backing here)`,
    );
  return out;
}

/** The `file=` child of a format node in an argv (key=value or JSON -blockdev). */
export function fileChildOf(argv: readonly string[], node: string): string | undefined {
  for (let i = 1; i < argv.length - 1; i++) {
    if (argv[i] !== "-blockdev") continue;
    const val = argv[i + 1]!;
    if (val.startsWith("{")) {
      const j = JSON.parse(val) as Record<string, unknown>;
      if (j["node-name"] === node) return typeof j.file === "string" ? j.file : undefined;
    } else {
      const o = splitOpts(val);
      if (o.find((x) => x.key === "node-name")?.value === node) return o.find((x) => x.key === "file")?.value;
    }
  }
  return undefined;
}

/** The argv to run now: migrated disks on their production files, the others on overlay + NBD. */
export function instantArgv(state: InstantState): string[] {
  const migrated = state.disks.filter((d) => d.production);
  let argv = state.baseArgv;
  if (migrated.length > 0) {
    const files = new Map(migrated.map((d) => [resolve(d.overlay), d.production!.path]));
    const formats = new Map(migrated.map((d) => [d.node, d.production!.format]));
    const fileFormats = new Map(migrated.map((d) => [resolve(d.overlay), d.production!.format]));
    argv = rewriteCommandLine(argv, { files, formats, fileFormats, accel: state.accelerator }).argv;
  }
  return attachNbdBacking(
    argv,
    state.disks
      .filter((d) => !d.production)
      .map((d) => ({
        node: d.node,
        backingNode: d.backingNode,
        nbdNode: d.nbdNode,
        socket: state.socket,
        export: d.name,
        reconnectDelay: state.reconnectDelay,
      })),
  );
}

// ---- state ------------------------------------------------------------------------------------

export function instantStateDir(stateDir?: string): string {
  return join(stateDir ?? defaultStateDir(), "instant");
}

function statePath(name: string, stateDir?: string): string {
  return join(instantStateDir(stateDir), `${name}.json`);
}

export async function saveInstantState(state: InstantState, stateDir?: string): Promise<void> {
  const path = statePath(state.name, stateDir);
  await fs.mkdir(dirname(path), { recursive: true });
  const tmp = `${path}.tmp`;
  await fs.writeFile(tmp, `${JSON.stringify(state, null, 2)}\n`);
  await fs.rename(tmp, path);
}

export async function loadInstantState(name: string, stateDir?: string): Promise<InstantState> {
  try {
    return JSON.parse(await fs.readFile(statePath(name, stateDir), "utf8")) as InstantState;
  } catch (err) {
    if (isNotFound(err))
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no instantly recovered VM named "${name}" (see strata instant list; state in ${instantStateDir(stateDir)})`,
      );
    throw new StrataError(ErrorCode.EXTERNAL, `cannot read the record of "${name}": ${describeError(err)}`, {
      cause: err,
    });
  }
}

export async function listInstantStates(stateDir?: string): Promise<InstantState[]> {
  const dir = instantStateDir(stateDir);
  const names = await fs.readdir(dir).catch((err: unknown) => {
    if (isNotFound(err)) return [] as string[];
    throw err;
  });
  const out: InstantState[] = [];
  for (const n of names.filter((x) => x.endsWith(".json")).sort()) {
    try {
      out.push(JSON.parse(await fs.readFile(join(dir, n), "utf8")) as InstantState);
    } catch {
      // A record being rewritten (tmp + rename) or damaged: not listed.
    }
  }
  return out;
}

async function removeInstantState(name: string, stateDir?: string): Promise<void> {
  await fs.rm(statePath(name, stateDir), { force: true });
}

// ---- processes --------------------------------------------------------------------------------

export function processAlive(pid: number | null | undefined): boolean {
  if (!pid) return false;
  try {
    process.kill(pid, 0);
  } catch {
    return false;
  }
  // A zombie (exited, not yet reaped by its parent) is gone for our purposes. /proc/<pid>/stat
  // is "pid (comm) S ...", and comm may hold spaces and parentheses.
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    return stat.charAt(stat.lastIndexOf(")") + 2) !== "Z";
  } catch {
    return true;
  }
}

/** True while `pid` runs with `marker` (a socket path) in its command line: not a reused PID. */
function runsWith(pid: number | null | undefined, marker: string): boolean {
  if (!pid || !processAlive(pid)) return false;
  try {
    return readFileSync(`/proc/${pid}/cmdline`, "utf8").includes(marker);
  } catch {
    return false;
  }
}

/** The recorded QEMU process still runs (and is that QEMU, not a process that reused its PID). */
export function qemuRuns(state: InstantState): boolean {
  return runsWith(state.qemu.pid, state.qemu.qmpSocket);
}

/** The recorded serving process still runs (and is that server). */
export function serverRuns(state: InstantState): boolean {
  return runsWith(state.serve.pid, state.socket);
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

/** SIGTERM, then SIGKILL after `graceMs`; resolves once the process is gone. */
export async function terminate(pid: number | null, graceMs = 5000): Promise<void> {
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

async function tail(path: string): Promise<string> {
  return (await fs.readFile(path, "utf8").catch(() => "")).trim().split("\n").slice(-5).join("\n");
}

/**
 * Starts the serving process (`command` is `strata serve ...` without `--socket`) detached, its
 * output in `log`, and waits until `socket` accepts connections.
 */
export async function startServer(
  command: readonly string[],
  socket: string,
  log: string,
  timeoutMs = 30_000,
): Promise<number> {
  await fs.mkdir(dirname(socket), { recursive: true });
  const fh = await fs.open(log, "a");
  const child = spawn(command[0]!, [...command.slice(1), "--socket", socket], {
    detached: true,
    stdio: ["ignore", fh.fd, fh.fd],
  });
  let exited: number | null | undefined;
  let failed: Error | undefined;
  child.once("exit", (code) => {
    exited = code;
  });
  child.once("error", (err) => {
    failed = err;
  });
  await fh.close();
  child.unref();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    await new Promise((r) => setTimeout(r, 25));
    if (failed)
      throw new StrataError(ErrorCode.EXTERNAL, `cannot start the NBD server: ${describeError(failed)}`, {
        cause: failed,
      });
    if (exited !== undefined)
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the NBD server exited at start (code ${exited}): ${await tail(log)}`,
      );
    if (await socketAccepts(socket)) return child.pid!;
    if (Date.now() > deadline) {
      if (child.pid) await terminate(child.pid, 1000);
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `the NBD server did not listen on ${socket} within ${timeoutMs / 1000} s: ${await tail(log)}`,
      );
    }
  }
}

// ---- start ------------------------------------------------------------------------------------

export interface InstantOptions {
  /** Directory for overlays and run files. */
  dir: string;
  /** The VM's name; a clone (new UUID, MACs) when `clone` is set. */
  name: string;
  clone: boolean;
  repo: string;
  passwordFile?: string;
  /** `strata serve <vm/time> --repo ...` (argv, binary first), without `--socket`. */
  serveCommand: string[];
  stateDir?: string;
  reconnectDelay?: number;
  accelerator?: AcceleratorChoice;
}

export interface InstantStarted {
  state: InstantState;
  accelerator: AcceleratorChoice;
  /** Milliseconds from the call to QEMU answering on QMP. */
  startMs: number;
}

/**
 * Boots a VM from a restore point: server, overlays, QEMU (see the module comment). On failure
 * everything started is stopped and removed again.
 */
export async function startInstant(
  snap: SnapshotRef,
  config: VmConfig,
  o: InstantOptions,
): Promise<InstantStarted> {
  const t0 = Date.now();
  const stateDir = o.stateDir;
  const existing = await loadInstantState(o.name, stateDir).catch(() => undefined);
  if (existing) {
    if (qemuRuns(existing) || serverRuns(existing))
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `an instantly recovered VM named "${o.name}" runs (QEMU pid ${existing.qemu.pid}): stop it first, or pick another --name`,
      );
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `an instantly recovered VM named "${o.name}" is recorded (stopped, in ${existing.dir}): run strata instant stop ${o.name} --discard, or pick another --name`,
    );
  }
  const accelerator = o.accelerator ?? (await chooseAccelerator());
  const dir = resolve(o.dir);
  const runDir = join(dir, "run");
  const socket = join(runDir, "nbd.sock");
  const inRepo = new Set(snap.manifest.disks.map((d) => d.name));
  const disks = config.disks.filter((d) => inRepo.has(d.name));
  const absent = config.disks.filter((d) => !inRepo.has(d.name));
  // A disk left out would be opened at its original path: the original VM's own image.
  if (absent.length > 0)
    throw new StrataError(
      ErrorCode.DATA_MISSING,
      `restore point ${snap.vm}/${snap.time} does not hold disk ${absent.map((d) => `${d.name} (${d.file})`).join(", ")}: instant recovery needs every disk of the VM`,
    );
  const overlays = disks.map((d) => join(dir, `${d.name}.overlay.qcow2`));
  for (const p of overlays) {
    if (await fs.lstat(p).catch(() => undefined))
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `${p} exists: not replacing another VM's overlay`);
  }

  // The command line with the overlays as plain qcow2 disks, then their NBD backings.
  const identity = newIdentity(config);
  const name = o.clone ? o.name : (config.name ?? o.name);
  const uuid = o.clone ? identity.uuid : config.uuid;
  const macs = o.clone
    ? identity.macs
    : new Map(config.nics.flatMap((n) => (n.mac ? [[n.id, n.mac] as [string, string]] : [])));
  const files = new Map(disks.map((d, i) => [resolve(d.file), overlays[i]!]));
  const formats = new Map(disks.map((d) => [d.node, "qcow2"]));
  const fileFormats = new Map(disks.map((d) => [resolve(d.file), "qcow2"]));
  let baseArgv: string[];
  let qmpSocket: string;
  let warnings: string[];
  if (config.commandLine && config.commandLine.length > 0) {
    const rw: Rewrite = {
      files,
      formats,
      fileFormats,
      accel: accelerator.accel,
      runDir,
      // Run files always go to DIR/run (the original may still run); identity only for a clone.
      clone: { name, uuid: uuid ?? identity.uuid, macs, runDir },
    };
    ({ argv: baseArgv, qmpSocket, warnings } = rewriteCommandLine(config.commandLine, rw));
  } else {
    const synth: VmConfig = {
      ...config,
      name,
      uuid,
      nics: config.nics.map((n) => ({ ...n, mac: macs.get(n.id) ?? n.mac })),
      disks: config.disks.map((d) => {
        const i = disks.indexOf(d);
        return i < 0 ? d : { ...d, file: overlays[i]!, format: "qcow2" };
      }),
    };
    ({ argv: baseArgv, qmpSocket, warnings } = synthesiseCommandLine(synth, runDir, accelerator.accel));
  }
  const instDisks: InstantDisk[] = disks.map((d, i) => {
    const fileNode = fileChildOf(baseArgv, d.node);
    if (fileNode === undefined)
      throw new StrataError(
        ErrorCode.USAGE,
        `disk ${d.name}: the command line has no -blockdev format node "${d.node}" over a file node: instant recovery needs -blockdev disks`,
      );
    return {
      name: d.name,
      size: snap.manifest.disks.find((m) => m.name === d.name)?.size ?? d.size,
      node: d.node,
      fileNode,
      backingNode: `instant-bk${i}`,
      nbdNode: `instant-nbd${i}`,
      overlay: overlays[i]!,
    };
  });
  const state: InstantState = {
    format: "strata-instant",
    version: 1,
    name: o.name,
    restorePoint: `${snap.vm}/${snap.time}`,
    repo: o.repo,
    ...(o.passwordFile === undefined ? {} : { passwordFile: o.passwordFile }),
    clone: o.clone,
    uuid,
    dir,
    runDir,
    socket,
    reconnectDelay: o.reconnectDelay ?? DEFAULT_RECONNECT_DELAY,
    accelerator: accelerator.accel,
    phase: "starting",
    serve: { pid: null, log: join(runDir, "serve.log"), command: o.serveCommand },
    qemu: { pid: null, qmpSocket, log: join(runDir, "qemu.log"), console: findConsoleLog(baseArgv) ?? null },
    disks: instDisks,
    baseArgv,
    created: new Date().toISOString(),
    warnings,
  };
  const argv = instantArgv(state); // fails now, before anything runs, on a line it cannot rewrite
  if (await socketAccepts(qmpSocket))
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `a VM already answers on ${qmpSocket}`);

  await fs.mkdir(runDir, { recursive: true });
  await saveInstantState(state, stateDir);
  try {
    state.serve.pid = await startServer(o.serveCommand, socket, state.serve.log);
    await saveInstantState(state, stateDir);
    await Promise.all(instDisks.map((d) => createOverlay(d, socket, state.reconnectDelay)));
    const vm = await startDetached(argv, qmpSocket, state.qemu.log);
    state.qemu.pid = vm.pid;
    state.phase = "running";
    await saveInstantState(state, stateDir);
  } catch (err) {
    await terminate(state.qemu.pid);
    await terminate(state.serve.pid);
    for (const d of instDisks) await fs.rm(d.overlay, { force: true });
    await fs.rm(runDir, { recursive: true, force: true });
    await removeInstantState(o.name, stateDir);
    throw err;
  }
  return { state, accelerator, startMs: Date.now() - t0 };
}

/**
 * An empty qcow2 overlay whose header also names its backing (the NBD export, as a `json:`
 * filename) so that `qemu-img info` shows where it comes from; the running VM's backing is the
 * explicit `backing=` node. `-u`: the server is not asked now.
 */
async function createOverlay(d: InstantDisk, socket: string, reconnectDelay: number): Promise<void> {
  const backing = `json:${JSON.stringify({
    driver: "nbd",
    server: { type: "unix", path: socket },
    export: d.name,
    "reconnect-delay": reconnectDelay,
  })}`;
  await runProgram("qemu-img", [
    "create",
    "-q",
    "-f",
    "qcow2",
    "-u",
    "-F",
    "raw",
    "-b",
    backing,
    d.overlay,
    String(d.size),
  ]);
}

// ---- stop -------------------------------------------------------------------------------------

export interface StopInstantOptions {
  /** Remove the overlays (the guest's writes since the start, unless migrated) and the record. */
  discard: boolean;
  /** Ask the guest to power down (ACPI) first, this long, before QMP quit. 0 = quit at once. */
  powerdownMs: number;
  stateDir?: string;
}

export interface StopInstantResult {
  state: InstantState;
  qemu: "quit" | "powerdown" | "killed" | "not running";
  discarded: string[];
}

/** Stops QEMU (QMP quit, which flushes the images; SIGKILL if it does not exit) and the server. */
export async function stopInstant(name: string, o: StopInstantOptions): Promise<StopInstantResult> {
  const state = await loadInstantState(name, o.stateDir);
  let how: StopInstantResult["qemu"] = "not running";
  const pid = state.qemu.pid;
  if (pid && qemuRuns(state)) {
    how = "killed";
    const qmp = await QmpClient.connect(state.qemu.qmpSocket, { connectTimeoutMs: 5000 }).catch(
      () => undefined,
    );
    if (qmp) {
      try {
        if (o.powerdownMs > 0) {
          await qmp.execute("system_powerdown").catch(() => {});
          if (await waitForExit(pid, o.powerdownMs)) how = "powerdown";
        }
        if (how !== "powerdown") {
          await qmp.execute("quit").catch(() => {});
          if (await waitForExit(pid, 15_000)) how = "quit";
        }
      } finally {
        await qmp.close().catch(() => {});
      }
    }
    if (how === "killed") await terminate(pid, 1000);
  }
  if (serverRuns(state)) await terminate(state.serve.pid);
  await fs.rm(state.socket, { force: true });
  state.qemu.pid = null;
  state.serve.pid = null;
  state.phase = "stopped";
  const discarded: string[] = [];
  if (o.discard) {
    for (const d of state.disks) {
      if (await fs.lstat(d.overlay).catch(() => undefined)) discarded.push(d.overlay);
      await fs.rm(d.overlay, { force: true });
    }
    await fs.rm(state.runDir, { recursive: true, force: true });
    await fs.rmdir(state.dir).catch(() => {}); // only when nothing else is in it
    await removeInstantState(name, o.stateDir);
  } else await saveInstantState(state, o.stateDir);
  return { state, qemu: how, discarded };
}

// ---- resume -----------------------------------------------------------------------------------

export interface ResumeResult {
  state: InstantState;
  /** What was started again. */
  restarted: Array<"serve" | "qemu">;
  /** A migration that did not finish (run migrate again). */
  interruptedMigration: InstantState["migration"] | undefined;
}

/**
 * Starts what should run and does not: the server (on the same socket, so QEMU's NBD client
 * reconnects) while any disk still reads from it, and QEMU when it is not running.
 */
export async function resumeInstant(
  name: string,
  o: { stateDir?: string; serveCommand?: string[] },
): Promise<ResumeResult> {
  const state = await loadInstantState(name, o.stateDir);
  const restarted: ResumeResult["restarted"] = [];
  const needsServer = state.disks.some((d) => !d.production);
  if (needsServer && !(serverRuns(state) && (await socketAccepts(state.socket)))) {
    if (serverRuns(state)) await terminate(state.serve.pid, 2000);
    state.serve.pid = await startServer(o.serveCommand ?? state.serve.command, state.socket, state.serve.log);
    if (o.serveCommand) state.serve.command = o.serveCommand;
    restarted.push("serve");
    await saveInstantState(state, o.stateDir);
  }
  if (!qemuRuns(state)) {
    for (const d of state.disks) {
      if (!d.production && !(await fs.lstat(d.overlay).catch(() => undefined)))
        throw new StrataError(ErrorCode.DATA_MISSING, `overlay ${d.overlay} of disk ${d.name} is gone`);
    }
    const vm = await startDetached(instantArgv(state), state.qemu.qmpSocket, state.qemu.log);
    state.qemu.pid = vm.pid;
    restarted.push("qemu");
  }
  if (state.phase === "stopped" || state.phase === "starting")
    state.phase = state.disks.every((d) => d.production) ? "migrated" : "running";
  await saveInstantState(state, o.stateDir);
  return {
    state,
    restarted,
    interruptedMigration: state.phase === "migrating" ? state.migration : undefined,
  };
}

// ---- migrate ----------------------------------------------------------------------------------

export interface MigrateOptions {
  target: string;
  format: "qcow2" | "raw";
  /** Mirror speed limit in bytes/s; undefined = unlimited. */
  limitBytes?: number;
  /**
   * Active mirror (`copy-mode: write-blocking`): every guest write goes to both nodes before it
   * completes, so the copy converges whatever the guest's write rate (writes get slower
   * meanwhile). Default: background copy of what the guest dirtied.
   */
  active?: boolean;
  stateDir?: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
}

export interface MigratedDisk {
  disk: string;
  path: string;
  format: "qcow2" | "raw";
  size: number;
  /** Bytes the mirror reported as its work (QEMU's len), and the time to READY and to the pivot. */
  copied: number;
  readyMs: number;
  pivotMs: number;
  skipped: boolean;
}

interface BlockJob {
  device: string;
  type: string;
  len: number;
  offset: number;
  ready: boolean;
  status: string;
}

interface Job {
  id: string;
  status: string;
  error?: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Cancels a job (a mirror stops without pivot, READY or not) and waits until it is gone. */
async function cancelJob(qmp: QmpClient, id: string, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  let cancelled = false;
  for (;;) {
    const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === id);
    if (!j) return;
    if (j.status === "concluded") await qmp.execute("job-dismiss", { id });
    else if (!cancelled && j.status !== "aborting") {
      await qmp.execute("job-cancel", { id });
      cancelled = true;
    }
    if (Date.now() > end)
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `job ${id} did not end within ${timeoutMs / 1000} s (${j.status})`,
      );
    await sleep(50);
  }
}

/** Moves every disk of a running instantly recovered VM to `target` (see the module comment). */
export async function migrateInstant(name: string, o: MigrateOptions): Promise<MigratedDisk[]> {
  const state = await loadInstantState(name, o.stateDir);
  const progress = o.progress ?? noProgress;
  if (!qemuRuns(state))
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `"${name}" is not running: start it again with strata instant resume ${name}`,
    );
  const target = resolve(o.target);
  await fs.mkdir(target, { recursive: true });
  const pending = state.disks.filter((d) => !d.production);
  for (const d of pending) {
    const path = join(target, `${d.name}.${o.format}`);
    const ours = state.migration && resolve(state.migration.target) === target;
    if (!ours && (await fs.lstat(path).catch(() => undefined)))
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `migration target ${path} exists: not replacing it`);
  }
  if (pending.length > 0 && !(await socketAccepts(state.socket)))
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `the NBD server of "${name}" does not answer on ${state.socket}: run strata instant resume ${name} first`,
    );
  state.phase = "migrating";
  state.migration = { target, format: o.format, limitBytes: o.limitBytes ?? null };
  await saveInstantState(state, o.stateDir);

  const qmp = await QmpClient.connect(state.qemu.qmpSocket, { connectTimeoutMs: 10_000 });
  const results: MigratedDisk[] = [];
  try {
    const nodeNames = async () =>
      new Set(
        (await qmp.execute<Array<{ "node-name": string }>>("query-named-block-nodes", { flat: true })).map(
          (n) => n["node-name"],
        ),
      );
    for (const [i, d] of state.disks.entries()) {
      if (d.production) {
        results.push({
          disk: d.name,
          path: d.production.path,
          format: d.production.format,
          size: d.size,
          copied: 0,
          readyMs: 0,
          pivotMs: 0,
          skipped: true,
        });
        continue;
      }
      o.signal?.throwIfAborted();
      const path = join(target, `${d.name}.${o.format}`);
      // Not "strata-…": backups skip such nodes and doctor --fix removes them as its leftovers.
      const node = `instant-prod${i}`;
      const fileNode = `instant-prod${i}-file`;
      const jobId = `instant-migrate${i}`;
      // Leftovers of an interrupted run: its job and target nodes.
      const jobs = await qmp.execute<Job[]>("query-jobs");
      if (jobs.some((j) => j.id === jobId)) await cancelJob(qmp, jobId);
      let nodes = await nodeNames();
      if (!nodes.has(d.node) && nodes.has(node)) {
        // Pivoted, but the record was not written: finish the bookkeeping only.
        d.production = { path, format: o.format, node, fileNode };
      } else {
        if (nodes.has(node)) await qmp.execute("blockdev-del", { "node-name": node });
        if (nodes.has(fileNode)) await qmp.execute("blockdev-del", { "node-name": fileNode });
        await runProgram("qemu-img", ["create", "-q", "-f", o.format, path, String(d.size)]);
        await qmp.execute("blockdev-add", { driver: "file", filename: path, "node-name": fileNode });
        await qmp.execute("blockdev-add", { driver: o.format, file: fileNode, "node-name": node });
        const t0 = Date.now();
        await qmp.execute("blockdev-mirror", {
          "job-id": jobId,
          device: d.node,
          target: node,
          sync: "full",
          "auto-dismiss": false,
          ...(o.limitBytes ? { speed: Math.round(o.limitBytes) } : {}),
          ...(o.active ? { "copy-mode": "write-blocking" } : {}),
        });
        progress.emit({ type: "start", job: `migrate ${d.name}`, total: d.size });
        let copied = 0;
        for (;;) {
          if (o.signal?.aborted) {
            await cancelJob(qmp, jobId).catch(() => {});
            o.signal.throwIfAborted();
          }
          const bj = (await qmp.execute<BlockJob[]>("query-block-jobs")).find((j) => j.device === jobId);
          if (bj) {
            copied = bj.len;
            progress.emit({
              type: "progress",
              job: `migrate ${d.name}`,
              done: Math.round((bj.offset / Math.max(1, bj.len)) * d.size),
              total: d.size,
            });
            if (bj.ready) break;
          }
          const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === jobId);
          if (!j || j.status === "concluded" || j.status === "aborting" || j.status === "null") {
            const why = j?.error ?? `job ${j?.status ?? "gone"}`;
            if (j) await qmp.execute("job-dismiss", { id: jobId }).catch(() => {});
            throw new StrataError(ErrorCode.EXTERNAL, `mirror of disk ${d.name} to ${path} failed: ${why}`);
          }
          await sleep(200);
        }
        const readyMs = Date.now() - t0;
        // Pivot: from here on the device writes to the production node only.
        await qmp.execute("job-complete", { id: jobId });
        for (;;) {
          const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === jobId);
          if (!j) break;
          if (j.status === "concluded") {
            await qmp.execute("job-dismiss", { id: jobId });
            if (j.error)
              throw new StrataError(
                ErrorCode.EXTERNAL,
                `pivot of disk ${d.name} to ${path} failed: ${j.error}`,
              );
            break;
          }
          await sleep(50);
        }
        const pivotMs = Date.now() - t0;
        progress.emit({ type: "progress", job: `migrate ${d.name}`, done: d.size, total: d.size });
        progress.emit({ type: "end", job: `migrate ${d.name}` });
        d.production = { path, format: o.format, node, fileNode };
        results.push({
          disk: d.name,
          path,
          format: o.format,
          size: d.size,
          copied,
          readyMs,
          pivotMs,
          skipped: false,
        });
      }
      await saveInstantState(state, o.stateDir);
      // The overlay's file node and the backing chain: monitor-owned, never freed implicitly.
      nodes = await nodeNames();
      for (const n of [d.node, d.fileNode, d.backingNode, d.nbdNode]) {
        if (nodes.has(n)) await qmp.execute("blockdev-del", { "node-name": n });
      }
    }
  } finally {
    await qmp.close().catch(() => {});
  }
  // Every disk is local: the repository is no longer needed.
  if (serverRuns(state)) await terminate(state.serve.pid);
  await fs.rm(state.socket, { force: true });
  state.serve.pid = null;
  for (const d of state.disks) await fs.rm(d.overlay, { force: true });
  state.phase = "migrated";
  state.migration = { ...state.migration, finished: new Date().toISOString() };
  await saveInstantState(state, o.stateDir);
  return results;
}
