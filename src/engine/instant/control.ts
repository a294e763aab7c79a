/**
 * Instant recovery, stop and resume: what runs is started again or stopped from the record.
 *
 * Resume: a dead serving process is started again on the same socket (the VM's NBD client
 * reconnects by itself within the reconnect delay; requests wait meanwhile, they do not fail);
 * a stopped VM is started again by its adapter, on production storage for disks that moved.
 * Stop: the adapter stops the VM (flushing its images), then the server stops; the overlays
 * stay unless discarded.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { AdapterRegistry } from "../../hypervisor/registry.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { socketAccepts, terminate } from "../../util/process.js";
import {
  type InstantRecord,
  loadInstantRecord,
  removeInstantRecord,
  runtimeOf,
  saveInstantRecord,
  serverRuns,
  startServer,
} from "./state.js";

export interface StopInstantOptions {
  /** Remove the overlays (the guest's writes since the start, unless migrated) and the record. */
  discard: boolean;
  /** Ask the guest to power down first, this long, before stopping it. 0 = at once. */
  powerdownMs: number;
  stateDir: string;
}

export interface StopInstantResult {
  record: InstantRecord;
  vm: "quit" | "powerdown" | "killed" | "not running";
  discarded: string[];
}

/** Stops the VM (through its adapter) and the server; with `discard` removes everything. */
export async function stopInstant(
  name: string,
  o: StopInstantOptions,
  adapters: AdapterRegistry,
): Promise<StopInstantResult> {
  const record = await loadInstantRecord(name, o.stateDir, adapters);
  let how: StopInstantResult["vm"] = "not running";
  if (record.vm) {
    how = await runtimeOf(record, adapters).stop(record.vm, o.powerdownMs);
    record.vm.pid = null;
  }
  if (serverRuns(record)) await terminate(record.serve.pid);
  await fs.rm(record.socket, { force: true });
  record.serve.pid = null;
  record.phase = "stopped";
  const discarded: string[] = [];
  if (o.discard) {
    for (const d of record.vm?.disks ?? []) {
      if (await fs.lstat(d.overlay).catch(() => undefined)) discarded.push(d.overlay);
      await fs.rm(d.overlay, { force: true });
    }
    await fs.rm(join(record.dir, "run"), { recursive: true, force: true });
    await fs.rmdir(record.dir).catch(() => {}); // only when nothing else is in it
    await removeInstantRecord(name, o.stateDir);
  } else await saveInstantRecord(record, o.stateDir);
  return { record, vm: how, discarded };
}

export interface ResumeResult {
  record: InstantRecord;
  /** What was started again. */
  restarted: Array<"serve" | "vm">;
  /** A migration that did not finish (run migrate again). */
  interruptedMigration: InstantRecord["migration"] | undefined;
}

/**
 * Starts what should run and does not: the server (on the same socket, so the VM's NBD client
 * reconnects) while any disk still reads from it, and the VM when it is not running.
 */
export async function resumeInstant(
  name: string,
  o: { stateDir: string; serveCommand?: string[]; log?: (message: string) => void },
  adapters: AdapterRegistry,
): Promise<ResumeResult> {
  const record = await loadInstantRecord(name, o.stateDir, adapters);
  const runtime = runtimeOf(record, adapters);
  const vm = record.vm;
  if (!vm)
    throw new StrataError(
      ErrorCode.DATA_MISSING,
      `"${name}" never got as far as starting its VM: run strata instant stop ${name} --discard and start it again`,
    );
  const restarted: ResumeResult["restarted"] = [];
  const needsServer = vm.disks.some((d) => !d.production);
  if (needsServer && !(serverRuns(record) && (await socketAccepts(record.socket)))) {
    if (serverRuns(record)) await terminate(record.serve.pid, 2000);
    record.serve.pid = await startServer(
      o.serveCommand ?? record.serve.command,
      record.socket,
      record.serve.log,
    );
    if (o.serveCommand) record.serve.command = o.serveCommand;
    restarted.push("serve");
    await saveInstantRecord(record, o.stateDir);
  }
  if (!(await runtime.running(vm))) {
    record.vm = await runtime.resume(vm, o.log ?? (() => {}));
    restarted.push("vm");
  }
  if (record.phase === "stopped" || record.phase === "starting")
    record.phase = record.vm!.disks.every((d) => d.production) ? "migrated" : "running";
  await saveInstantRecord(record, o.stateDir);
  return {
    record,
    restarted,
    interruptedMigration: record.phase === "migrating" ? record.migration : undefined,
  };
}
