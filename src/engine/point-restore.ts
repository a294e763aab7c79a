/**
 * Restore of a restore point as one call, for the CLI and the daemon's API alike: a whole VM in
 * place or as a clone (when the restore point carries a VM configuration), one disk (to its own
 * path, into a directory, or onto a block device), or the disks of an image-file restore point
 * into a directory. Options are checked before anything is read or written.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { RestorePlan, StartedVm } from "../hypervisor/adapter.js";
import type { AdapterRegistry } from "../hypervisor/registry.js";
import { checkName, type Repository, type SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ProgressSink } from "../util/progress.js";
import { type RestoreDiskResult, restoreDiskToFile } from "./restore.js";
import { restoreDiskToDevice, restoreDiskToQcow2 } from "./restore-sinks.js";
import { planVmRestore, readVmConfig, restoreVm } from "./vm-restore.js";

export interface PointRestoreOptions {
  /** A directory: a VM as a clone there, else its disks as <disk>.<format> files. */
  target?: string;
  /** The clone's name (with `target`). */
  name?: string;
  format?: "raw" | "qcow2";
  /** Only this disk. */
  disk?: string;
  /** Write `disk` onto this block device. */
  device?: string;
  start?: boolean;
  force: boolean;
  progress: ProgressSink;
  signal?: AbortSignal;
  /** Warnings of the plan (a disk left out, ...). */
  warn?: (message: string) => void;
}

export interface PointRestoreResult {
  id: string;
  scenario: "in-place" | "clone" | "disk" | "disks";
  disks: RestoreDiskResult[];
  /** The VM's plan, when the restore point carries a VM configuration. */
  plan?: RestorePlan;
  started?: StartedVm;
}

const usage = (m: string) => new StrataError(ErrorCode.USAGE, m);

/** Checks a restore's options on their own (the CLI's flags, the API's body), before any reading. */
export function checkRestoreOptions(o: {
  target?: string | undefined;
  name?: string | undefined;
  format?: string | undefined;
  disk?: string | undefined;
  device?: string | undefined;
  start?: boolean | undefined;
}): void {
  if (o.format !== undefined && o.format !== "raw" && o.format !== "qcow2")
    throw usage(`--format ${o.format}: restores write raw or qcow2`);
  if (o.device !== undefined) {
    if (o.disk === undefined) throw usage("--device needs --disk NAME: one disk goes onto one device");
    if (o.target !== undefined) throw usage("give exactly one of --target DIR or --device PATH");
    if (o.format !== undefined)
      throw usage("--format does not apply to --device (a device holds the raw disk)");
    if (o.name !== undefined || o.start)
      throw usage("--device restores one disk: --name and --start do not apply");
  }
  if (o.name !== undefined) {
    if (o.target === undefined)
      throw usage("--name names a clone: give the directory it goes to with --target DIR");
    checkName("clone", o.name);
  }
  if (o.disk !== undefined && (o.name !== undefined || o.start))
    throw usage("--disk restores one disk, not a VM: --name and --start do not apply");
}

/** Restores `snap` as `o` says (see the module comment). The caller holds a read lock. */
export async function restorePoint(
  repo: Repository,
  snap: SnapshotRef,
  adapters: AdapterRegistry,
  o: PointRestoreOptions,
): Promise<PointRestoreResult> {
  checkRestoreOptions(o);
  const id = `${snap.vm}/${snap.time}`;
  if (o.disk !== undefined && !snap.manifest.disks.some((d) => d.name === o.disk))
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `restore point ${id} has no disk "${o.disk}" (it has: ${snap.manifest.disks.map((d) => d.name).join(", ")})`,
    );
  const common = { force: o.force, progress: o.progress, ...(o.signal ? { signal: o.signal } : {}) };
  const stored = o.device === undefined ? await readVmConfig(repo, snap, adapters) : undefined;
  if (stored) {
    const plan = await planVmRestore(stored, snap, {
      ...(o.target === undefined ? {} : { target: o.target }),
      ...(o.name === undefined ? {} : { name: o.name }),
      ...(o.format === undefined ? {} : { format: o.format }),
      ...(o.disk === undefined ? {} : { disk: o.disk }),
    });
    for (const w of plan.warnings) o.warn?.(w);
    const { disks, started } = await restoreVm(repo, snap, stored, plan, {
      ...common,
      ...(o.start ? { start: true } : {}),
    });
    const scenario = o.disk !== undefined ? "disk" : plan.clone ? "clone" : "in-place";
    return { id, scenario, disks, plan, ...(started ? { started } : {}) };
  }
  if (o.name !== undefined || o.start)
    throw usage(
      `${o.name !== undefined ? "--name" : "--start"}: restore point ${id} was taken from image files and carries no VM configuration`,
    );
  if (o.target === undefined && o.device === undefined) throw usage("give --target DIR or --device PATH");
  const names = o.disk === undefined ? snap.manifest.disks.map((d) => d.name) : [o.disk];
  const disks: RestoreDiskResult[] = [];
  if (o.device !== undefined) {
    disks.push(await restoreDiskToDevice(repo, snap, names[0]!, o.device, common));
  } else {
    const dir = resolve(o.target!);
    await fs.mkdir(dir, { recursive: true });
    const format = o.format ?? "raw";
    const sink = format === "qcow2" ? restoreDiskToQcow2 : restoreDiskToFile;
    for (const name of names)
      disks.push(await sink(repo, snap, name, join(dir, `${name}.${format}`), common));
  }
  return { id, scenario: o.disk === undefined ? "disks" : "disk", disks };
}
