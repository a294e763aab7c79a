/**
 * Instant recovery on QEMU: the VM boots on local qcow2 overlays whose backing is the restore
 * point, served read-only over NBD by Strata's serving process (which the engine runs).
 *
 * ```
 *  strata serve (the engine's)      QEMU (detached)
 *  NBD over <socket>          <--   nbd node (read-only, reconnect-delay)
 *  chunks on demand, verified       raw node                     <- backing
 *                                   qcow2 overlay DIR/<disk>.overlay.qcow2  <- every guest write
 *                                   virtio-blk device (unchanged id and node-name)
 * ```
 *
 * Start: the recorded command line is rewritten as a restore would (clone.ts: a clone's name,
 * UUID, MACs with `clone`; run files always in DIR/run, since the original may still run), with
 * each disk's file node on an empty overlay and its format node given an NBD backing
 * (instant-argv.ts). Nothing is copied first: the time to a running guest is the time to start
 * QEMU, whatever the disk sizes. A `-drive` command line cannot take such a backing and is
 * refused before anything is created.
 *
 * Migrate (instant-migrate.ts): a mirror per disk to production storage, then the pivot.
 * Resume: a stopped QEMU starts again from the record, on the production files of disks that
 * moved. Stop: QMP `quit` (images flushed), or an ACPI power-down first.
 *
 * Everything lives in the InstantVm record ({@link QemuInstantData} in `data`), which the engine
 * saves before anything is created and which checkQemuInstantVm (instant-record.ts) checks when
 * read back.
 */
import { promises as fs } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { processRunsWith, runProgram, socketAccepts, terminate, waitForExit } from "../../util/process.js";
import type { InstantRequest, InstantRuntime, InstantVm, VmConfigDocument } from "../adapter.js";
import {
  findAgentSocket,
  findConsoleLog,
  newIdentity,
  type Rewrite,
  rewriteCommandLine,
  synthesiseCommandLine,
} from "./clone.js";
import type { RunPolicy } from "./cmdline-policy.js";
import { parseQemuConfig } from "./config.js";
import { migrateQemuInstant } from "./instant-migrate.js";
import {
  checkQemuInstantVm,
  fileChildOf,
  instantArgv,
  type QemuInstantData,
  type QemuInstantDisk,
  qemuData,
} from "./instant-record.js";
import { chooseAccelerator } from "./launcher.js";
import type { VmConfig } from "./live.js";
import { QgaClient } from "./qga.js";
import { QmpClient } from "./qmp.js";
import { startDetached } from "./start.js";

/**
 * Where an instant VM's QEMU may touch the host (cmdline-policy.ts): its overlays (qcow2) or,
 * once moved, its production files; its run directory and the directory of its overlays; and
 * the serving process's NBD socket.
 */
function instantPolicy(vm: InstantVm, data: QemuInstantData): RunPolicy {
  const runDir = dirname(data.log);
  return {
    disks: new Map(
      vm.disks.map((d) => (d.production ? [d.production.path, d.production.format] : [d.overlay, "qcow2"])),
    ),
    dirs: [runDir, dirname(runDir)],
    sockets: [data.nbd.socket],
    cwd: runDir,
  };
}

const running = (vm: InstantVm): Promise<boolean> =>
  Promise.resolve(processRunsWith(vm.pid, qemuData(vm).qmpSocket));

/**
 * An empty qcow2 overlay whose header also names its backing (the NBD export, as a `json:`
 * filename) so that `qemu-img info` shows where it comes from; the running VM's backing is the
 * explicit `backing=` node. `-u`: the server is not asked now.
 */
async function createOverlay(path: string, size: number, socket: string, exportName: string, delay: number) {
  const backing = `json:${JSON.stringify({
    driver: "nbd",
    server: { type: "unix", path: socket },
    export: exportName,
    "reconnect-delay": delay,
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
    path,
    String(size),
  ]);
}

async function start(stored: VmConfigDocument, r: InstantRequest): Promise<InstantVm> {
  const config = parseQemuConfig(stored);
  const dir = resolve(r.dir);
  const runDir = join(dir, "run");
  const served = new Map(r.disks.map((d) => [d.name, d]));
  const absent = config.disks.filter((d) => !served.has(d.name));
  // A disk left out would be opened at its original path: the original VM's own image.
  if (absent.length > 0)
    throw new StrataError(
      ErrorCode.DATA_MISSING,
      `no export for disk ${absent.map((d) => `${d.name} (${d.file})`).join(", ")}: instant recovery needs every disk of the VM`,
    );
  const disks = config.disks;
  const overlays = disks.map((d) => join(dir, `${d.name}.overlay.qcow2`));
  for (const p of overlays) {
    if (await fs.lstat(p).catch(() => undefined))
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `${p} exists: not replacing another VM's overlay`);
  }
  const accelerator = await chooseAccelerator();

  // The command line with the overlays as plain qcow2 disks; their NBD backings come on top.
  const identity = newIdentity(config);
  const name = r.clone ? r.name : (config.name ?? r.name);
  const uuid = r.clone ? identity.uuid : config.uuid;
  const macs = r.clone
    ? identity.macs
    : new Map(config.nics.flatMap((n) => (n.mac ? [[n.id, n.mac] as [string, string]] : [])));
  let baseArgv: string[];
  let qmpSocket: string;
  let warnings: string[];
  if (config.commandLine && config.commandLine.length > 0) {
    const rw: Rewrite = {
      files: new Map(disks.map((d, i) => [resolve(d.file), overlays[i]!])),
      formats: new Map(disks.map((d) => [d.node, "qcow2"])),
      fileFormats: new Map(disks.map((d) => [resolve(d.file), "qcow2"])),
      accel: accelerator.accel,
      runDir,
      ...(r.isolateNetwork ? { isolate: true } : {}),
      // Run files always go to DIR/run (the original may still run); identity only for a clone.
      clone: { name, uuid: uuid ?? identity.uuid, macs, runDir },
    };
    ({ argv: baseArgv, qmpSocket, warnings } = rewriteCommandLine(config.commandLine, rw));
  } else {
    const synth: VmConfig = {
      ...config,
      name,
      uuid,
      nics: r.isolateNetwork ? [] : config.nics.map((n) => ({ ...n, mac: macs.get(n.id) ?? n.mac })),
      disks: disks.map((d, i) => ({ ...d, file: overlays[i]!, format: "qcow2" })),
    };
    ({ argv: baseArgv, qmpSocket, warnings } = synthesiseCommandLine(synth, runDir, accelerator.accel));
    if (r.isolateNetwork) baseArgv.push("-nic", "none");
  }
  const nodes: QemuInstantDisk[] = disks.map((d, i) => {
    const fileNode = fileChildOf(baseArgv, d.node);
    if (fileNode === undefined)
      throw new StrataError(
        ErrorCode.USAGE,
        `disk ${d.name}: the command line has no -blockdev format node "${d.node}" over a file node: instant recovery needs -blockdev disks`,
      );
    return {
      name: d.name,
      size: served.get(d.name)!.size,
      export: served.get(d.name)!.exportName,
      node: d.node,
      fileNode,
      backingNode: `instant-bk${i}`,
      nbdNode: `instant-nbd${i}`,
    };
  });
  const socket = r.disks[0]?.socket ?? join(runDir, "nbd.sock");
  const data: QemuInstantData = {
    accelerator: accelerator.accel,
    qmpSocket,
    log: join(runDir, "qemu.log"),
    console: findConsoleLog(baseArgv) ?? null,
    uuid,
    nbd: { socket, reconnectDelay: r.reconnectDelay },
    baseArgv,
    disks: nodes,
  };
  if (r.disks.some((d) => d.socket !== socket))
    throw new StrataError(ErrorCode.INTERNAL, "the QEMU adapter expects every export on one socket");
  const vm: InstantVm = {
    adapter: "qemu",
    name,
    where: `QMP socket ${qmpSocket}`,
    pid: null,
    disks: disks.map((d, i) => ({ name: d.name, overlay: overlays[i]! })),
    data: { ...data },
    details: {
      qmpSocket,
      log: data.log,
      ...(data.console ? { console: data.console } : {}),
      accelerator: accelerator.accel,
      acceleratorReason: accelerator.reason,
    },
    warnings,
  };
  const argv = instantArgv(vm, data); // fails now, before anything runs, on a line it cannot rewrite
  if (await socketAccepts(qmpSocket))
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `a VM already answers on ${qmpSocket}`);

  await r.record(vm);
  try {
    await fs.mkdir(runDir, { recursive: true });
    await Promise.all(
      disks.map((d, i) =>
        createOverlay(overlays[i]!, served.get(d.name)!.size, socket, nodes[i]!.export, r.reconnectDelay),
      ),
    );
    const started = await startDetached(argv, qmpSocket, data.log, instantPolicy(vm, data));
    vm.pid = started.pid;
    vm.warnings.push(...started.warnings);
    await r.record(vm);
  } catch (err) {
    await terminate(vm.pid);
    vm.pid = null;
    for (const p of overlays) await fs.rm(p, { force: true });
    throw err;
  }
  return vm;
}

async function resume(vm: InstantVm, log: (message: string) => void): Promise<InstantVm> {
  const data = qemuData(vm);
  if (processRunsWith(vm.pid, data.qmpSocket)) return vm;
  for (const d of vm.disks) {
    if (!d.production && !(await fs.lstat(d.overlay).catch(() => undefined)))
      throw new StrataError(ErrorCode.DATA_MISSING, `overlay ${d.overlay} of disk ${d.name} is gone`);
  }
  const started = await startDetached(
    instantArgv(vm, data),
    data.qmpSocket,
    data.log,
    instantPolicy(vm, data),
  );
  log(`started QEMU again (pid ${started.pid})`);
  return { ...vm, pid: started.pid };
}

async function stop(
  vm: InstantVm,
  powerdownMs: number,
): Promise<"quit" | "powerdown" | "killed" | "not running"> {
  const data = qemuData(vm);
  const pid = vm.pid;
  if (!pid || !processRunsWith(pid, data.qmpSocket)) return "not running";
  let how: "quit" | "powerdown" | "killed" = "killed";
  const qmp = await QmpClient.connect(data.qmpSocket, { connectTimeoutMs: 5000 }).catch(() => undefined);
  if (qmp) {
    try {
      if (powerdownMs > 0) {
        await qmp.execute("system_powerdown").catch(() => {});
        if (await waitForExit(pid, powerdownMs)) how = "powerdown";
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
  return how;
}

/** The agent of the VM's `virtserialport` channel (see findAgentSocket), when it has one. */
function guestAgent(vm: InstantVm): QgaClient | undefined {
  const socket = findAgentSocket(qemuData(vm).baseArgv);
  return socket === undefined
    ? undefined
    : new QgaClient(socket, { connectTimeoutMs: 2000, syncTimeoutMs: 2000 });
}

/** Instant recovery on QEMU, the `instant` of the QEMU adapter. */
export const qemuInstant: InstantRuntime = {
  start,
  checkRecord: checkQemuInstantVm,
  running,
  resume,
  migrate: migrateQemuInstant,
  stop,
  guestAgent,
};
