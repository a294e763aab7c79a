/**
 * Instant recovery, start: a VM boots straight from a restore point in seconds.
 *
 * ```
 *  strata serve (detached)            the VM (the adapter's: a QEMU process, a domain)
 *  NBD over DIR/run/nbd.sock   <--    one read-only NBD client per disk
 *  chunks on demand, verified         local overlays DIR/...  <- every guest write
 * ```
 *
 * The engine records the VM, starts the serving process, then asks the adapter's
 * {@link InstantRuntime} to boot the VM on empty overlays backed by the exports. Nothing is
 * copied first: the time to a running guest is the time to start two processes, whatever the
 * disk sizes. Guest writes land in the overlays; the repository is only ever read. Later:
 * migrate.ts moves the disks to production storage while the VM runs; control.ts stops and
 * resumes.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { InstantRuntime, NbdBackedDisk } from "../../hypervisor/adapter.js";
import type { AdapterRegistry } from "../../hypervisor/registry.js";
import type { SnapshotRef } from "../../repo/repository.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { socketAccepts, terminate } from "../../util/process.js";
import { isInstantRef } from "../pit.js";
import { need, type StoredVm } from "../vm-restore.js";
import {
  DEFAULT_RECONNECT_DELAY,
  INSTANT_RECORD_VERSION,
  type InstantRecord,
  loadInstantRecord,
  removeInstantRecord,
  runtimeOf,
  saveInstantRecord,
  serverRuns,
  startServer,
} from "./state.js";

export interface InstantOptions {
  /** Directory for overlays and run files. */
  dir: string;
  /** The name `strata instant` knows it by; the VM's own name too when `clone` is set. */
  name: string;
  /** New name, UUID and MACs, so that it runs beside the original. */
  clone: boolean;
  repo: string;
  passwordFile?: string;
  /** `strata serve <vm/time> --repo ...` (argv, binary first), without `--socket`. */
  serveCommand: string[];
  stateDir: string;
  reconnectDelay?: number;
  /** Start the VM without a network (boot verification; see InstantRequest.isolateNetwork). */
  isolateNetwork?: boolean;
  log?: (message: string) => void;
}

export interface InstantStarted {
  record: InstantRecord;
  /** Milliseconds from the call to the VM running. */
  startMs: number;
}

/** Refuses a name that is recorded already (running or not), with what to do. */
async function refuseTakenName(name: string, stateDir: string, adapters: AdapterRegistry): Promise<void> {
  let existing: InstantRecord;
  try {
    existing = await loadInstantRecord(name, stateDir, adapters);
  } catch (err) {
    if (err instanceof StrataError && err.code === ErrorCode.NOT_FOUND) return;
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `an instantly recovered VM named "${name}" is recorded, but its record cannot be used (${describeError(err)}): pick another --name`,
    );
  }
  const runs = existing.vm ? await runtimeOf(existing, adapters).running(existing.vm) : false;
  if (runs || serverRuns(existing))
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `an instantly recovered VM named "${name}" runs (${existing.vm?.where ?? `server pid ${existing.serve.pid}`}): stop it first, or pick another --name`,
    );
  throw new StrataError(
    ErrorCode.TARGET_CONFLICT,
    `an instantly recovered VM named "${name}" is recorded (stopped, in ${existing.dir}): run strata instant stop ${name} --discard, or pick another --name`,
  );
}

/**
 * Boots a VM from a restore point: record, server, then the adapter's start (see the module
 * comment). On failure everything started is stopped and removed again.
 */
export async function startInstant(
  snap: SnapshotRef,
  stored: StoredVm,
  adapters: AdapterRegistry,
  o: InstantOptions,
): Promise<InstantStarted> {
  const t0 = Date.now();
  const log = o.log ?? (() => {});
  const runtime: InstantRuntime = need(stored.adapter, "instant", "boot a VM from a restore point");
  await refuseTakenName(o.name, o.stateDir, adapters);
  // An instant of a protected VM (src/engine/pit.ts) is named VM@TIME.
  const id = isInstantRef(snap) ? `${snap.vm}@${snap.time}` : `${snap.vm}/${snap.time}`;
  const inRepo = new Map(snap.manifest.disks.map((d) => [d.name, d]));
  const absent = stored.config.disks.filter((d) => !inRepo.has(d.name));
  // A disk left out would be opened at its original path: the original VM's own image.
  if (absent.length > 0)
    throw new StrataError(
      ErrorCode.DATA_MISSING,
      `restore point ${id} does not hold disk ${absent.map((d) => `${d.name} (${d.file})`).join(", ")}: instant recovery needs every disk of the VM`,
    );
  const dir = resolve(o.dir);
  const runDir = join(dir, "run");
  const socket = join(runDir, "nbd.sock");
  if (await socketAccepts(socket))
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `a server already answers on ${socket}: is ${dir} another VM's?`,
    );
  const exports: NbdBackedDisk[] = stored.config.disks.map((d) => ({
    name: d.name,
    size: inRepo.get(d.name)!.size,
    socket,
    exportName: d.name,
  }));
  const record: InstantRecord = {
    format: "strata-instant",
    version: INSTANT_RECORD_VERSION,
    name: o.name,
    restorePoint: id,
    repo: o.repo,
    ...(o.passwordFile === undefined ? {} : { passwordFile: o.passwordFile }),
    clone: o.clone,
    dir,
    socket,
    reconnectDelay: o.reconnectDelay ?? DEFAULT_RECONNECT_DELAY,
    phase: "starting",
    serve: { pid: null, log: join(runDir, "serve.log"), command: o.serveCommand },
    exports,
    adapter: stored.adapter.id,
    vm: null,
    created: new Date().toISOString(),
  };
  const hadRunDir = await fs.lstat(runDir).then(
    () => true,
    () => false,
  );
  await fs.mkdir(runDir, { recursive: true });
  await saveInstantRecord(record, o.stateDir);
  try {
    record.serve.pid = await startServer(o.serveCommand, socket, record.serve.log);
    await saveInstantRecord(record, o.stateDir);
    record.vm = await runtime.start(stored.config, {
      name: o.name,
      clone: o.clone,
      dir,
      disks: exports,
      reconnectDelay: record.reconnectDelay,
      ...(o.isolateNetwork ? { isolateNetwork: true } : {}),
      stateDir: o.stateDir,
      log,
      record: async (vm) => {
        record.vm = vm;
        await saveInstantRecord(record, o.stateDir);
      },
    });
    record.phase = "running";
    await saveInstantRecord(record, o.stateDir);
  } catch (err) {
    if (record.vm) await runtime.stop(record.vm, 0).catch(() => {});
    await terminate(record.serve.pid);
    for (const d of record.vm?.disks ?? []) await fs.rm(d.overlay, { force: true });
    if (hadRunDir) {
      await fs.rm(socket, { force: true });
      await fs.rm(record.serve.log, { force: true });
    } else await fs.rm(runDir, { recursive: true, force: true });
    await removeInstantRecord(o.name, o.stateDir);
    throw err;
  }
  return { record, startMs: Date.now() - t0 };
}
