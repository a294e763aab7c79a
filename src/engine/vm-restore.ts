/**
 * Restore of a whole VM from a restore point that carries a configuration document, on any
 * platform: the adapter that wrote the document (its `kind`) plans where every disk goes and
 * how the VM is defined; the engine writes the disks and asks the adapter to define and start.
 *
 *  - in place: every disk back to where it was; refused while the VM runs (the adapter tells),
 *    --force or not, and refused over existing files without --force;
 *  - as a clone in a directory: a new name, UUID and MACs, so that it runs beside the original;
 *  - configuration only: the definition, rendered by the adapter, without disks.
 *
 * Everything is planned and checked first ({@link planVmRestore}, {@link checkVmTargets}), so a
 * refusal writes nothing.
 */
import { promises as fs } from "node:fs";
import { dirname } from "node:path";
import type {
  RestorePlan,
  RestorePlanOptions,
  StartedVm,
  VmAdapter,
  VmConfigDocument,
} from "../hypervisor/adapter.js";
import type { AdapterRegistry } from "../hypervisor/registry.js";
import type { Consistency } from "../repo/manifest.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { lstatOrUndefined } from "../util/files.js";
import type { ProgressSink } from "../util/progress.js";
import { type RestoreDiskResult, restoreDiskToFile } from "./restore.js";
import { restoreDiskToDevice, restoreDiskToQcow2 } from "./restore-sinks.js";

/** The configuration `kind` of file: restore points made before adapters. */
const LEGACY_FILES_KIND = "files";

/** A stored configuration is a small JSON document; anything larger is refused unread. */
export const MAX_CONFIG_BYTES = 16 * 1024 * 1024;

/** A restore point's VM configuration, checked by the adapter that wrote it. */
export interface StoredVm {
  adapter: VmAdapter;
  config: VmConfigDocument;
}

/** An adapter's optional method, or a clear error saying the platform lacks it. */
export function need<K extends keyof VmAdapter>(adapter: VmAdapter, method: K, what: string) {
  const m = adapter[method];
  if (m === undefined)
    throw new StrataError(
      ErrorCode.USAGE,
      `the ${adapter.id} adapter cannot ${what} (it has no ${String(method)})`,
    );
  // Adapters may be classes: their methods keep their `this`.
  return (typeof m === "function" ? m.bind(adapter) : m) as NonNullable<VmAdapter[K]>;
}

/**
 * The VM configuration of a restore point, parsed by the adapter that wrote it (found in
 * `adapters` by its `kind`); undefined when there is none (file: restore points, whose document
 * only lists their images). A kind no registered adapter has is an error, not a guess.
 */
export async function readVmConfig(
  repo: Repository,
  snap: SnapshotRef,
  adapters: AdapterRegistry,
): Promise<StoredVm | undefined> {
  const ref = snap.manifest.config;
  if (!ref) return undefined;
  const where = `the configuration of ${snap.vm}/${snap.time}`;
  const blob = await repo.blob(snap, ref);
  if (blob.length > MAX_CONFIG_BYTES)
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${where} is ${blob.length} bytes, more than a configuration holds`,
    );
  let doc: unknown;
  try {
    doc = JSON.parse(blob.toString("utf8"));
  } catch (err) {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${where} is not JSON: ${describeError(err)}`);
  }
  const kind = (doc as { kind?: unknown } | null)?.kind;
  if (typeof doc !== "object" || doc === null || typeof kind !== "string")
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${where} names no adapter (no "kind")`);
  // file: restore points list their images under kind "files": disks without a VM to define.
  if (kind === LEGACY_FILES_KIND) return undefined;
  const adapter = adapters.adapter(kind);
  // An adapter that cannot define a VM (plain image files) stores no VM to restore either.
  if (!adapter.parseConfig) return undefined;
  return {
    adapter,
    config: need(adapter, "parseConfig", "read a stored configuration")(doc as VmConfigDocument),
  };
}

export interface PlanOptions {
  /** Directory for a clone; undefined = the original paths. */
  target?: string;
  /** Name of the clone (the adapter's default: "<name>-restored"). */
  name?: string;
  /** Format of every restored disk; undefined = as recorded. */
  format?: "raw" | "qcow2";
  /** Only this disk. */
  disk?: string;
}

/** Asks the adapter where every disk goes and how the VM is defined; nothing is written. */
export function planVmRestore(vm: StoredVm, snap: SnapshotRef, o: PlanOptions): Promise<RestorePlan> {
  const options: RestorePlanOptions = {
    ...o,
    available: snap.manifest.disks.map((d) => ({ name: d.name, size: d.size })),
    restorePoint: { vm: snap.vm, time: snap.time, consistency: snap.manifest.consistency },
  };
  return need(vm.adapter, "planRestore", "restore a VM")(vm.config, options);
}

/** The definition of a planned restore as text, in a format the adapter knows ("json", "qemu-args", ...). */
export function renderVmConfig(vm: StoredVm, plan: RestorePlan, as: string): string {
  return need(vm.adapter, "renderConfig", "print a definition")(plan.config, as);
}

/**
 * Checks every path the restore would write before anything is written: the VM must not run
 * (the adapter tells), and existing files are replaced only with `force`.
 */
export async function checkVmTargets(adapter: VmAdapter, plan: RestorePlan, force: boolean): Promise<void> {
  await adapter.refuseIfRunning?.(plan);
  const paths = plan.disks.map((d) => d.path);
  for (const p of [...paths, ...(plan.definition.file ? [plan.definition.file] : [])]) {
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
  /** Start the VM once restored and defined. */
  start?: boolean;
  progress: ProgressSink;
  signal?: AbortSignal;
}

export interface VmRestoreResult {
  disks: RestoreDiskResult[];
  started: StartedVm | undefined;
}

/** Writes the planned disks (a file, a qcow2 image or a block device each). Call {@link checkVmTargets} first. */
export async function restoreVmDisks(
  repo: Repository,
  snap: SnapshotRef,
  plan: RestorePlan,
  o: VmRestoreOptions,
): Promise<RestoreDiskResult[]> {
  const results: RestoreDiskResult[] = [];
  const common = { force: o.force, progress: o.progress, ...(o.signal ? { signal: o.signal } : {}) };
  for (const d of plan.disks) {
    await fs.mkdir(dirname(d.path), { recursive: true });
    const st = await lstatOrUndefined(d.path);
    if (st?.isBlockDevice()) results.push(await restoreDiskToDevice(repo, snap, d.name, d.path, common));
    else if (d.format === "qcow2") results.push(await restoreDiskToQcow2(repo, snap, d.name, d.path, common));
    else results.push(await restoreDiskToFile(repo, snap, d.name, d.path, common));
  }
  return results;
}

/**
 * A whole VM restore of a plan: checks, disks, then the adapter defines the VM (a clone's
 * definition file, a libvirt domain, ...) and, with `start`, starts it.
 */
export async function restoreVm(
  repo: Repository,
  snap: SnapshotRef,
  vm: StoredVm,
  plan: RestorePlan,
  o: VmRestoreOptions,
): Promise<VmRestoreResult> {
  const start = o.start ? need(vm.adapter, "start", "start a VM") : undefined;
  await checkVmTargets(vm.adapter, plan, o.force);
  const disks = await restoreVmDisks(repo, snap, plan, o);
  await vm.adapter.define?.(plan, o.force);
  const started = start ? await start(plan) : undefined;
  return { disks, started };
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
