/**
 * Instant recovery, migrate: every disk of a running instantly recovered VM moves to production
 * storage (TARGET/<disk>.<format>) while the guest runs, through the adapter (QEMU: a mirror per
 * disk, then the pivot). The engine checks the target, records the migration before it starts
 * and each disk as it moves; once every disk is local, the serving process stops and the
 * overlays are removed. An interrupted migration (Strata or the host killed mid-way) can be run
 * again: the adapter cleans up its half-made copy, disks that moved are skipped.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { MigratedDisk } from "../../hypervisor/adapter.js";
import type { AdapterRegistry } from "../../hypervisor/registry.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { socketAccepts, terminate } from "../../util/process.js";
import { noProgress, type ProgressSink } from "../../util/progress.js";
import { loadInstantRecord, runtimeOf, saveInstantRecord, serverRuns } from "./state.js";

export interface MigrateOptions {
  target: string;
  format: "qcow2" | "raw";
  /** Copy speed limit in bytes/s; undefined = unlimited. */
  limitBytes?: number;
  /**
   * Every guest write goes to both copies before it completes, so the copy converges whatever
   * the guest's write rate (writes get slower meanwhile). Default: background copy.
   */
  active?: boolean;
  stateDir: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
  log?: (message: string) => void;
}

export type { MigratedDisk };

/** Moves every disk of a running instantly recovered VM to `target` (see the module comment). */
export async function migrateInstant(
  name: string,
  o: MigrateOptions,
  adapters: AdapterRegistry,
): Promise<MigratedDisk[]> {
  const record = await loadInstantRecord(name, o.stateDir, adapters);
  const runtime = runtimeOf(record, adapters);
  const progress = o.progress ?? noProgress;
  if (!record.vm || !(await runtime.running(record.vm)))
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `"${name}" is not running: start it again with strata instant resume ${name}`,
    );
  const target = resolve(o.target);
  await fs.mkdir(target, { recursive: true });
  const pending = record.vm.disks.filter((d) => !d.production);
  const ours = record.migration !== undefined && resolve(record.migration.target) === target;
  for (const d of pending) {
    const path = join(target, `${d.name}.${o.format}`);
    if (!ours && (await fs.lstat(path).catch(() => undefined)))
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `migration target ${path} exists: not replacing it`);
  }
  if (pending.length > 0 && !(await socketAccepts(record.socket)))
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `the NBD server of "${name}" does not answer on ${record.socket}: run strata instant resume ${name} first`,
    );
  record.phase = "migrating";
  record.migration = { target, format: o.format, limitBytes: o.limitBytes ?? null };
  await saveInstantRecord(record, o.stateDir);

  const begun = new Set<string>();
  const { vm, disks } = await runtime.migrate(record.vm, {
    target,
    format: o.format,
    limitBytes: o.limitBytes ?? null,
    active: o.active === true,
    progress: (disk, done, total) => {
      const job = `migrate ${disk}`;
      if (!begun.has(disk)) {
        begun.add(disk);
        progress.emit({ type: "start", job, total });
      }
      progress.emit({ type: "progress", job, done, total });
      if (done === total) progress.emit({ type: "end", job });
    },
    ...(o.signal === undefined ? {} : { signal: o.signal }),
    log: o.log ?? (() => {}),
    record: async (v) => {
      record.vm = v;
      await saveInstantRecord(record, o.stateDir);
    },
  });
  record.vm = vm;
  // Every disk is local: the repository is no longer needed.
  if (serverRuns(record)) await terminate(record.serve.pid);
  await fs.rm(record.socket, { force: true });
  record.serve.pid = null;
  for (const d of vm.disks) await fs.rm(d.overlay, { force: true });
  record.phase = "migrated";
  record.migration = { ...record.migration, finished: new Date().toISOString() };
  await saveInstantRecord(record, o.stateDir);
  return disks;
}
