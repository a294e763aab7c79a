/**
 * The restore side of the QEMU adapter: a VM back from its stored configuration.
 *
 *  - in place: every disk back to the path it had, in the format it had, the recorded command
 *    line with only the accelerator adjusted to this host;
 *  - as a clone in DIR: disks as DIR/<disk>.<format>, run files (sockets, console, logs) in
 *    DIR/run/, the definition in DIR/<name>.json; new name, UUID and MACs, so that it runs
 *    beside the original (the command line rewritten by clone.ts, or synthesised from the
 *    configuration when none was recorded).
 *
 * "Defining" a QEMU VM is writing its definition file (Strata's JSON: the configuration with the
 * command line to run); starting it runs that command line detached (start.ts). A VM restored
 * over is running when its QMP socket answers, a QEMU process names one of its paths, or QEMU
 * holds the lock of one of its images.
 *
 * Exported as {@link qemuRestore}, the restore methods of the QEMU {@link VmAdapter}.
 */
import { promises as fs } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { lstatOrUndefined, writeNew } from "../../util/files.js";
import { runProgram, socketAccepts } from "../../util/process.js";
import type {
  PlannedDisk,
  RestorePlan,
  RestorePlanOptions,
  StartedVm,
  VmAdapter,
  VmConfigDocument,
} from "../adapter.js";
import {
  findConsoleLog,
  newIdentity,
  type Rewrite,
  rewriteCommandLine,
  shellQuote,
  synthesiseCommandLine,
} from "./clone.js";
import type { RunPolicy } from "./cmdline-policy.js";
import { PLAIN_NAME, parseQemuConfig } from "./config.js";
import { type AcceleratorChoice, chooseAccelerator } from "./launcher.js";
import type { VmConfig } from "./live.js";
import { qemuProcessesUsing, startDetached } from "./start.js";

/** A restored VM's configuration: the VmConfig it runs with, and where it came from. */
export interface QemuDefinition extends VmConfig {
  restoredFrom?: string;
  consistency?: string;
  clone?: boolean;
  qmpSocket?: string;
  accelerator?: string;
}

/** What a QEMU restore writes and runs. */
export interface QemuRestorePlan extends RestorePlan {
  kind: "qemu";
  config: VmConfigDocument & QemuDefinition;
  /** The command line to run (binary first). */
  argv: string[];
  qmpSocket: string;
  /** The file the guest's serial console goes to, when the command line names one. */
  consoleLog: string | undefined;
  /** Where the QEMU log (and a clone's sockets and console) go. */
  runDir: string;
  accelerator: AcceleratorChoice;
}

/** The definition formats {@link renderQemuConfig} writes. */
export const QEMU_CONFIG_FORMATS = ["json", "qemu-args"] as const;

function asQemuPlan(plan: RestorePlan): QemuRestorePlan {
  if (plan.kind !== "qemu" || !Array.isArray(plan.argv) || typeof plan.qmpSocket !== "string")
    throw new StrataError(ErrorCode.INTERNAL, `a ${plan.kind} restore plan was given to the QEMU adapter`);
  return plan as QemuRestorePlan;
}

const doc = (c: QemuDefinition): VmConfigDocument & QemuDefinition => ({ ...c });

/**
 * Plans a restore (see the module comment). Nothing is written; the plan names every path.
 * `accelerator` is for tests; by default the host decides ({@link chooseAccelerator}).
 */
export async function planQemuRestore(
  stored: VmConfigDocument,
  o: RestorePlanOptions,
  accelerator?: AcceleratorChoice,
): Promise<QemuRestorePlan> {
  const original = parseQemuConfig(stored);
  const accel = accelerator ?? (await chooseAccelerator());
  const rp = o.restorePoint;
  const inRepo = new Set(o.available.map((d) => d.name));
  let disks = original.disks.filter((d) => inRepo.has(d.name));
  if (o.disk !== undefined) {
    disks = disks.filter((d) => d.name === o.disk);
    if (disks.length === 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `restore point ${rp.vm}/${rp.time} has no disk "${o.disk}" of the VM (it has: ${[...inRepo].join(", ")})`,
      );
  }
  const clone = o.target !== undefined;
  const dir = clone ? resolve(o.target!) : undefined;
  const name =
    o.name ?? `${original.name !== null && PLAIN_NAME.test(original.name) ? original.name : rp.vm}-restored`;
  const planned: PlannedDisk[] = disks.map((d) => {
    const format = o.format ?? (d.format === "qcow2" ? "qcow2" : "raw");
    if (!dir && !d.file.startsWith("/"))
      throw new StrataError(
        ErrorCode.USAGE,
        `disk ${d.name} was ${JSON.stringify(d.file)}, not a local file: restore it as a clone (--target DIR) or with --disk ${d.name} --target DIR`,
      );
    return {
      name: d.name,
      format,
      path: dir ? join(dir, `${d.name}.${format}`) : resolve(d.file),
      size: o.available.find((a) => a.name === d.name)?.size ?? d.size,
    };
  });
  const definitionFile = dir && o.disk === undefined ? join(dir, `${name}.json`) : undefined;
  // Names come from a repository others may write, and from the user: nothing lands outside DIR.
  if (dir) {
    for (const p of [...planned.map((d) => d.path), ...(definitionFile ? [definitionFile] : [])]) {
      if (dirname(p) !== dir)
        throw new StrataError(
          ErrorCode.USAGE,
          `${p} would be written outside ${dir}: "${name}" or a disk name is not a plain name`,
        );
    }
  }
  const files = new Map<string, string>();
  const formats = new Map<string, string>();
  const fileFormats = new Map<string, string>();
  for (const [i, d] of disks.entries()) {
    const p = planned[i]!;
    files.set(resolve(d.file), p.path);
    // Every disk's format is spelled out, changed or not: a restored image is guest data, never probed.
    formats.set(d.node, p.format);
    fileFormats.set(resolve(d.file), p.format);
  }
  const identity = clone ? newIdentity(original) : undefined;
  const runDir = dir ? join(dir, "run") : "";
  /** In place, for a command line without QMP: a run directory beside the first disk. */
  const fallbackRunDir = join(dirname(planned[0]?.path ?? resolve(".")), `${name}.run`);
  const config: QemuDefinition = {
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
      accel: accel.accel,
      runDir: runDir || fallbackRunDir,
      ...(identity ? { clone: { name, uuid: identity.uuid, macs: identity.macs, runDir } } : {}),
    };
    ({ argv, qmpSocket, warnings } = rewriteCommandLine(original.commandLine, rw));
  } else {
    ({ argv, qmpSocket, warnings } = synthesiseCommandLine(config, runDir || fallbackRunDir, accel.accel));
  }
  config.commandLine = argv;
  config.restoredFrom = `${rp.vm}/${rp.time}`;
  config.consistency = rp.consistency;
  config.clone = clone;
  config.qmpSocket = qmpSocket;
  config.accelerator = accel.accel;
  const definition = doc(config);
  return {
    kind: "qemu",
    clone,
    config: definition,
    disks: planned,
    definition: {
      text: renderQemuConfig(definition, "json"),
      mediaType: "application/json",
      ...(definitionFile ? { file: definitionFile } : {}),
    },
    warnings,
    argv,
    qmpSocket,
    consoleLog: findConsoleLog(argv),
    runDir: runDir || dirname(qmpSocket),
    accelerator: accel,
  };
}

/**
 * A configuration as text: Strata's JSON definition (`format: "strata-vm"`, 2-space indented) or
 * one shell-quoted QEMU command. A stored configuration without a command line has no
 * `qemu-args` until a restore is planned from it.
 */
export function renderQemuConfig(config: VmConfigDocument, as: string): string {
  const c = config as VmConfigDocument & QemuDefinition;
  if (as === "json") return `${JSON.stringify({ format: "strata-vm", version: 1, ...c }, null, 2)}\n`;
  if (as === "qemu-args") {
    if (!Array.isArray(c.commandLine) || c.commandLine.length === 0)
      throw new StrataError(ErrorCode.USAGE, "this configuration holds no QEMU command line to print");
    return `${shellQuote(c.commandLine)}\n`;
  }
  throw new StrataError(
    ErrorCode.USAGE,
    `a QEMU VM's definition is written as ${QEMU_CONFIG_FORMATS.join(" or ")}, not "${as}"`,
  );
}

/** Refuses (TARGET_CONFLICT) while the VM the plan restores over runs; see the module comment. */
export async function refuseIfQemuRuns(p: RestorePlan): Promise<void> {
  const plan = asQemuPlan(p);
  const paths = plan.disks.map((d) => d.path);
  const who = plan.clone
    ? `the clone in ${dirname(plan.runDir)}`
    : `VM ${plan.config.name ?? "being restored"}`;
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
    // An image another QEMU holds opens only with force-share (-U): asked both ways, a
    // difference is the lock, whatever words qemu-img uses for it.
    const opens = (args: string[]) =>
      runProgram("qemu-img", ["info", ...args, "--output=json", path]).then(
        () => true,
        () => false,
      );
    if (!(await opens([])) && (await opens(["-U"])))
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${path} is in use by a running VM (QEMU holds its lock): shut it down first; --force never overwrites the disks of a running VM`,
      );
    // Otherwise it is free, or not an image QEMU can read: it is replaced like any other file.
  }
}

/** Writes a clone's definition file (DIR/<name>.json); in place there is nothing to define. */
export async function defineQemuVm(p: RestorePlan, force: boolean): Promise<void> {
  const plan = asQemuPlan(p);
  if (plan.definition.file) await writeNew(plan.definition.file, plan.definition.text, force);
}

/**
 * Where the restored VM's QEMU may touch the host (cmdline-policy.ts): the disks this restore
 * wrote (in place also the VM's disks the restore point lacks, which stay where they are), the
 * run directory, and a clone's directory.
 */
export function runPolicy(plan: QemuRestorePlan): RunPolicy {
  const disks = plan.clone
    ? plan.disks.map((d) => [d.path, d.format] as const)
    : plan.config.disks.map((d) => [d.file, d.format] as const);
  return {
    disks: new Map(disks),
    dirs: plan.clone ? [plan.runDir, dirname(plan.runDir)] : [plan.runDir],
    cwd: plan.runDir,
  };
}

/** Starts the restored VM, detached; QEMU's output goes to <runDir>/qemu.log. */
export async function startQemuVm(p: RestorePlan): Promise<StartedVm> {
  const plan = asQemuPlan(p);
  if (plan.clone) await fs.mkdir(plan.runDir, { recursive: true });
  const vm = await startDetached(plan.argv, plan.qmpSocket, join(plan.runDir, "qemu.log"), runPolicy(plan));
  return {
    where: `QMP socket ${vm.qmpSocket}`,
    pid: vm.pid,
    details: {
      qmpSocket: vm.qmpSocket,
      log: vm.log,
      ...(plan.consoleLog ? { console: plan.consoleLog } : {}),
      accelerator: plan.accelerator.accel,
      acceleratorReason: plan.accelerator.reason,
      ...(vm.warnings.length > 0 ? { warnings: vm.warnings.join("; ") } : {}),
    },
  };
}

/** The restore methods of the QEMU adapter, to be spread into it. */
export const qemuRestore = {
  parseConfig: (d: VmConfigDocument): VmConfigDocument => doc(parseQemuConfig(d)),
  planRestore: (c: VmConfigDocument, o: RestorePlanOptions): Promise<RestorePlan> => planQemuRestore(c, o),
  refuseIfRunning: refuseIfQemuRuns,
  define: defineQemuVm,
  start: startQemuVm,
  renderConfig: renderQemuConfig,
} satisfies Partial<VmAdapter>;
