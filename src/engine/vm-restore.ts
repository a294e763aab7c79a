/**
 * Restore of a whole VM from a restore point that carries a VmConfig (live and offline backups):
 *
 *  - in place: every disk back to the path it had, in the format it had; refused while the VM
 *    runs (its QMP socket answers, a QEMU process names its disks, or an image is locked),
 *    --force or not, and refused over existing files without --force;
 *  - as a clone in a directory: disks as DIR/<disk>.<format>, run files (sockets, console,
 *    logs) in DIR/run/, the definition in DIR/<name>.json; new name, UUID and MACs, so that it
 *    runs beside the original;
 *  - configuration only: the definition (Strata's JSON or a QEMU command line) without disks.
 *
 * Everything is planned and checked first ({@link planVmRestore}, {@link checkVmTargets}), so a
 * refusal writes nothing. The command line comes from hypervisor/qemu/clone.ts; starting from
 * hypervisor/qemu/start.ts.
 */
import { promises as fs } from "node:fs";
import { dirname, join, resolve } from "node:path";
import {
  findConsoleLog,
  newIdentity,
  parseVmConfig,
  type Rewrite,
  rewriteCommandLine,
  shellQuote,
  synthesiseCommandLine,
} from "../hypervisor/qemu/clone.js";
import { type Accelerator, chooseAccelerator } from "../hypervisor/qemu/launcher.js";
import type { VmConfig } from "../hypervisor/qemu/live.js";
import { qemuProcessesUsing, type StartedVm, startDetached } from "../hypervisor/qemu/start.js";
import type { Consistency } from "../repo/manifest.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import { runProgram, socketAccepts } from "../util/process.js";
import type { ProgressSink } from "../util/progress.js";
import { type RestoreDiskResult, restoreDiskToFile } from "./restore.js";
import { restoreDiskToDevice, restoreDiskToQcow2 } from "./restore-sinks.js";

/** The VM configuration of a restore point, or undefined (file: restore points have none). */
export async function readVmConfig(repo: Repository, snap: SnapshotRef): Promise<VmConfig | undefined> {
  const blob = snap.manifest.config;
  if (!blob) return undefined;
  return parseVmConfig(await repo.blob(snap, blob));
}

export interface PlannedDisk {
  name: string;
  format: string;
  path: string;
  size: number;
}

/** What a VM restore will write and run. */
export interface VmRestorePlan {
  snap: SnapshotRef;
  original: VmConfig;
  /** The restored VM's configuration (the clone's, or the original's). */
  config: VmConfig;
  clone: boolean;
  disks: PlannedDisk[];
  argv: string[];
  qmpSocket: string;
  /** The file the guest's serial console goes to, when the command line names one. */
  consoleLog: string | undefined;
  /** Where the QEMU log (and a clone's sockets and console) go. */
  runDir: string;
  /** The clone's definition file (DIR/<name>.json); undefined in place and for one disk. */
  definitionFile: string | undefined;
  accelerator: { accel: Accelerator; reason: string };
  warnings: string[];
}

export interface PlanOptions {
  /** Directory for a clone; undefined = the original paths. */
  target?: string;
  /** Name of the clone (default: "<name>-restored"). */
  name?: string;
  /** Format of every restored disk; undefined = as recorded. */
  format?: "raw" | "qcow2";
  /** Only this disk. */
  disk?: string;
  accelerator?: { accel: Accelerator; reason: string };
}

export async function planVmRestore(
  snap: SnapshotRef,
  original: VmConfig,
  o: PlanOptions,
): Promise<VmRestorePlan> {
  const accelerator = o.accelerator ?? (await chooseAccelerator());
  const inRepo = new Set(snap.manifest.disks.map((d) => d.name));
  let disks = original.disks.filter((d) => inRepo.has(d.name));
  if (o.disk !== undefined) {
    disks = disks.filter((d) => d.name === o.disk);
    if (disks.length === 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `restore point ${snap.vm}/${snap.time} has no disk "${o.disk}" (it has: ${[...inRepo].join(", ")})`,
      );
  }
  const clone = o.target !== undefined;
  const dir = clone ? resolve(o.target!) : undefined;
  const planned: PlannedDisk[] = disks.map((d) => {
    const format = o.format ?? (d.format === "qcow2" ? "qcow2" : "raw");
    return {
      name: d.name,
      format,
      path: dir ? join(dir, `${d.name}.${format}`) : resolve(d.file),
      size: d.size,
    };
  });
  const files = new Map<string, string>();
  const formats = new Map<string, string>();
  const fileFormats = new Map<string, string>();
  for (const [i, d] of disks.entries()) {
    const p = planned[i]!;
    files.set(resolve(d.file), p.path);
    if (p.format !== d.format) {
      formats.set(d.node, p.format);
      fileFormats.set(resolve(d.file), p.format);
    }
  }
  const name = o.name ?? `${original.name ?? snap.vm}-restored`;
  const identity = clone ? newIdentity(original) : undefined;
  const runDir = dir ? join(dir, "run") : "";
  /** In place, for a command line without QMP: a run directory beside the first disk. */
  const fallbackRunDir = join(dirname(planned[0]?.path ?? resolve(".")), `${name}.run`);
  const config: VmConfig = {
    ...original,
    disks: original.disks.map((d) => {
      const i = disks.indexOf(d);
      return i < 0 ? d : { ...d, file: planned[i]!.path, format: planned[i]!.format };
    }),
    ...(identity
      ? {
          name,
          uuid: identity.uuid,
          nics: original.nics.map((n) => ({ ...n, mac: identity.macs.get(n.id) ?? n.mac })),
        }
      : {}),
  };
  let argv: string[];
  let qmpSocket: string;
  let warnings: string[];
  if (original.commandLine && original.commandLine.length > 0) {
    const rw: Rewrite = {
      files,
      formats,
      fileFormats,
      accel: accelerator.accel,
      runDir: runDir || fallbackRunDir,
      ...(identity ? { clone: { name, uuid: identity.uuid, macs: identity.macs, runDir } } : {}),
    };
    ({ argv, qmpSocket, warnings } = rewriteCommandLine(original.commandLine, rw));
  } else {
    ({ argv, qmpSocket, warnings } = synthesiseCommandLine(
      config,
      runDir || fallbackRunDir,
      accelerator.accel,
    ));
  }
  config.commandLine = argv;
  return {
    snap,
    original,
    config,
    clone,
    disks: planned,
    argv,
    qmpSocket,
    consoleLog: findConsoleLog(argv),
    runDir: runDir || dirname(qmpSocket),
    definitionFile: dir && o.disk === undefined ? join(dir, `${name}.json`) : undefined,
    accelerator,
    warnings,
  };
}

/** The restored VM's definition as Strata's JSON: the VmConfig, with where it came from and its QMP socket. */
export function definitionJson(plan: VmRestorePlan): Record<string, unknown> {
  return {
    format: "strata-vm",
    version: 1,
    restoredFrom: `${plan.snap.vm}/${plan.snap.time}`,
    consistency: plan.snap.manifest.consistency,
    clone: plan.clone,
    ...plan.config,
    qmpSocket: plan.qmpSocket,
    accelerator: plan.accelerator.accel,
  };
}

/** The definition as text: JSON (2-space indented) or one shell-quoted QEMU command. */
export function renderDefinition(plan: VmRestorePlan, as: "json" | "qemu-args"): string {
  if (as === "json") return `${JSON.stringify(definitionJson(plan), null, 2)}\n`;
  return `${shellQuote(plan.argv)}\n`;
}

async function lstatOrUndefined(p: string) {
  return fs.lstat(p).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw err;
  });
}

/** Refuses when the target VM runs; returns nothing when the paths may be written. */
export async function refuseIfRunning(plan: VmRestorePlan, paths: readonly string[]): Promise<void> {
  const who = plan.clone ? `the clone in ${dirname(plan.runDir)}` : `VM ${plan.config.name ?? plan.snap.vm}`;
  if (await socketAccepts(plan.qmpSocket)) {
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `${who} is running (its QMP socket ${plan.qmpSocket} answers): shut it down first; --force never overwrites the disks of a running VM`,
    );
  }
  const procs = await qemuProcessesUsing([...paths, plan.qmpSocket]);
  if (procs.length > 0) {
    const p = procs[0]!;
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `QEMU process ${p.pid} is using ${p.path}: shut that VM down first; --force never overwrites the disks of a running VM`,
    );
  }
  for (const path of paths) {
    const st = await lstatOrUndefined(path);
    if (!st?.isFile()) continue;
    try {
      await runProgram("qemu-img", ["info", "--output=json", path]);
    } catch (err) {
      if (err instanceof Error && /lock/i.test(err.message))
        throw new StrataError(
          ErrorCode.TARGET_CONFLICT,
          `${path} is in use by a running VM (QEMU holds its lock): shut it down first; --force never overwrites the disks of a running VM`,
        );
      // Not an image QEMU can read: it is replaced like any other file.
    }
  }
}

/**
 * Checks every path the restore would write before anything is written: the VM must not run,
 * and existing files are replaced only with `force`.
 */
export async function checkVmTargets(plan: VmRestorePlan, force: boolean): Promise<void> {
  const paths = plan.disks.map((d) => d.path);
  await refuseIfRunning(plan, paths);
  for (const p of [...paths, ...(plan.definitionFile ? [plan.definitionFile] : [])]) {
    const st = await lstatOrUndefined(p);
    if (!st) continue;
    if (!force)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `restore target ${p} exists (use --force to replace it)`,
      );
    const disk = plan.disks.find((d) => d.path === p);
    if (st.isBlockDevice() && disk && disk.format !== "raw")
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `restore target ${p} is a block device but disk ${disk.name} is ${disk.format}: restore it with --format raw`,
      );
    if (!st.isFile() && !st.isBlockDevice())
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `restore target ${p} exists and is neither a regular file nor a block device`,
      );
  }
}

export interface VmRestoreOptions {
  force: boolean;
  progress: ProgressSink;
  signal?: AbortSignal;
}

/** Writes the planned disks (and a clone's definition file). Call {@link checkVmTargets} first. */
export async function restoreVmDisks(
  repo: Repository,
  plan: VmRestorePlan,
  o: VmRestoreOptions,
): Promise<RestoreDiskResult[]> {
  const results: RestoreDiskResult[] = [];
  const common = { force: o.force, progress: o.progress, ...(o.signal ? { signal: o.signal } : {}) };
  for (const d of plan.disks) {
    await fs.mkdir(dirname(d.path), { recursive: true });
    const st = await lstatOrUndefined(d.path);
    if (st?.isBlockDevice()) results.push(await restoreDiskToDevice(repo, plan.snap, d.name, d.path, common));
    else if (d.format === "qcow2")
      results.push(await restoreDiskToQcow2(repo, plan.snap, d.name, d.path, common));
    else results.push(await restoreDiskToFile(repo, plan.snap, d.name, d.path, common));
  }
  if (plan.definitionFile) await writeNew(plan.definitionFile, renderDefinition(plan, "json"), o.force);
  return results;
}

/** Writes `text` to `path`, refusing an existing file without `force`. */
export async function writeNew(path: string, text: string, force: boolean): Promise<void> {
  await fs.mkdir(dirname(path), { recursive: true });
  try {
    await fs.writeFile(path, text, { flag: force ? "w" : "wx" });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST")
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists (use --force to replace it)`);
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `cannot write ${path}: ${(err as Error).message}`);
  }
}

/** Starts the restored VM, detached; QEMU's output goes to <runDir>/qemu.log. */
export async function startRestoredVm(plan: VmRestorePlan): Promise<StartedVm> {
  if (plan.clone) await fs.mkdir(plan.runDir, { recursive: true });
  return startDetached(plan.argv, plan.qmpSocket, join(plan.runDir, "qemu.log"));
}

/** What a VM restored from a restore point of this consistency goes through when it boots. */
export function bootHint(c: Consistency): string {
  switch (c) {
    case "clean-shutdown":
      return "the guest was shut down cleanly: it boots cleanly";
    case "application-consistent":
      return "applications flushed their state: it boots with filesystems and applications consistent";
    case "filesystem-consistent":
      return "filesystems were frozen: they mount cleanly; applications recover as after a crash";
    case "paused":
      return "cut while paused: it boots as after a power loss at that instant (journal replay, application recovery)";
    case "crash-consistent":
      return "it boots as after a power loss (journal replay, fsck, application recovery)";
  }
}
