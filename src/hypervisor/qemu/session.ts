/**
 * A backup session on a QEMU VM reached over QMP (and its guest agent): the VM adapter
 * interface's {@link BackupSession} for the qemu adapter, and for any platform that runs QEMU
 * underneath (Proxmox VE) and can name the VM's QMP socket.
 *
 * snapshot / pause: recover what a dead run left (its state record), list the disks, describe the
 * VM, decide per disk whether its checkpoint bitmap is trusted (checkpoint.ts), cut a
 * point-in-time view of all disks in one transaction (live.ts), and hand the engine the view's
 * NBD exports — only the dirty extents when the bitmap is trusted. finish(ok) releases everything
 * on the VM; `ok` keeps the new checkpoint bitmap, otherwise the previous one stays.
 *
 * offline: the guest is shut down cleanly (agent, else ACPI), QEMU lets go of the images, the
 * engine reads them through qemu-storage-daemon, and finish(ok) hands the checkpoint over with
 * qemu-img and starts the VM again with the command line it ran with — on every path.
 *
 * The control channels are held only for a step: one QMP (and agent) connection to recover,
 * describe and cut the view, closed before the engine reads; another to release at the end. QEMU
 * serves one QMP client at a time, and other tools (Proxmox VE's `qm`) need the socket while a
 * backup reads for minutes. A VM that goes away mid-read is reported as SOURCE_UNREADABLE naming
 * the VM: a failed read checks whether QMP still accepts connections.
 */

import { addBitmap, removeBitmap } from "../../image/qemu-img.js";
import { StorageDaemon } from "../../image/storage-daemon.js";
import type { NbdClient } from "../../nbd/client.js";
import { openNbdDisk } from "../../nbd/disk.js";
import { processStart } from "../../repo/locks.js";
import { ErrorCode, isStrataError, StrataError } from "../../util/errors.js";
import { processAlive, socketAccepts } from "../../util/process.js";
import type { BackupRequest, BackupSession, SessionDisk } from "../adapter.js";
import { checkpointRecord, newBitmapName, trustBitmaps } from "./checkpoint.js";
import { cutView, describeVm, findQemuProcess, type LiveDisk, listDisks, release } from "./live.js";
import { restartVm, shutdownVm } from "./offline.js";
import { QgaClient } from "./qga.js";
import { QmpClient } from "./qmp.js";
import { StateRecord } from "./state.js";

/** How to reach a QEMU VM: its QMP socket, and its guest agent's socket when it has one. */
export interface QemuTarget {
  qmp: string;
  qga?: string;
}

/** How long a step waits for QMP to answer (another client may hold it for a moment). */
const CONNECT_MS = 5000;
/** How long finish() waits for a QMP socket that accepts but is busy with another client. */
const RELEASE_CONNECT_MS = 60_000;

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

/** Releases what an earlier, dead run left on this VM (its state file), before a new run. */
export async function recover(
  stateDir: string,
  vm: string,
  qmp: QmpClient,
  qga: QgaClient | undefined,
  log: (m: string) => void,
): Promise<void> {
  const rec = await StateRecord.load(`${stateDir}/${vm}.json`);
  if (!rec) return;
  const pid = rec.data.pid;
  const alive = processAlive(pid) && processStart(pid) !== "";
  if (alive && pid !== process.pid) {
    throw new StrataError(
      ErrorCode.LOCKED,
      `another Strata run (pid ${pid}) is backing up VM ${vm} right now`,
    );
  }
  log(`cleaning up after an earlier run that did not finish (${rec.items.length} item(s) in ${rec.path})`);
  await release(qmp, qga, rec, log, { success: false });
}

/** A guest-agent client for one step (it connects on its first command), or none. */
function agentFor(target: QemuTarget): QgaClient | undefined {
  return target.qga === undefined ? undefined : new QgaClient(target.qga, { timeoutMs: 10_000 });
}

/** QMP for one step; an unreachable VM is a clear SOURCE_UNREADABLE error, with `hint` added. */
async function connectQmp(vm: string, target: QemuTarget, hint = ""): Promise<QmpClient> {
  try {
    return await QmpClient.connect(target.qmp, { connectTimeoutMs: CONNECT_MS });
  } catch (err) {
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `cannot reach VM ${vm} at ${target.qmp}: ${message(err)}${hint}`,
    );
  }
}

/**
 * Runs `fn` with QMP (and agent) connections that are closed when it returns. A connection QEMU
 * dropped during the step means the VM went away: SOURCE_UNREADABLE, naming it.
 */
async function step<T>(
  vm: string,
  target: QemuTarget,
  hint: string,
  fn: (qmp: QmpClient, qga: QgaClient | undefined) => Promise<T>,
): Promise<T> {
  const qmp = await connectQmp(vm, target, hint);
  const qga = agentFor(target);
  try {
    return await fn(qmp, qga);
  } catch (err) {
    if (
      qmp.closed &&
      !isStrataError(err, ErrorCode.ABORTED) &&
      !isStrataError(err, ErrorCode.SOURCE_UNREADABLE)
    )
      throw wentAway(vm, err);
    throw err;
  } finally {
    await qga?.close().catch(() => {});
    await qmp.close().catch(() => {});
  }
}

function wentAway(vm: string, err: unknown): StrataError {
  return new StrataError(
    ErrorCode.SOURCE_UNREADABLE,
    `VM ${vm} went away during the backup: ${message(err)}`,
    {
      cause: err,
    },
  );
}

/**
 * QMP for releasing: the client, or undefined when QEMU is gone (its socket accepts nothing).
 * Throws when QEMU is there but did not answer in time (another client holds the socket).
 */
async function connectForRelease(target: QemuTarget): Promise<QmpClient | undefined> {
  if (!(await socketAccepts(target.qmp))) return undefined;
  try {
    return await QmpClient.connect(target.qmp, { connectTimeoutMs: RELEASE_CONNECT_MS });
  } catch (err) {
    if (!(await socketAccepts(target.qmp))) return undefined;
    throw err;
  }
}

/**
 * Turns a failed read into SOURCE_UNREADABLE naming the VM when the VM is gone (its QMP socket
 * accepts nothing any more); other errors pass unchanged.
 */
class GoneCheck {
  private gone = false;
  constructor(
    private readonly vm: string,
    private readonly target: QemuTarget,
  ) {}
  async explain(err: unknown): Promise<unknown> {
    if (isStrataError(err, ErrorCode.ABORTED) || isStrataError(err, ErrorCode.SOURCE_UNREADABLE)) return err;
    if (!this.gone) this.gone = !(await socketAccepts(this.target.qmp));
    return this.gone ? wentAway(this.vm, err) : err;
  }
  guard(disk: SessionDisk): SessionDisk {
    const g =
      <A extends unknown[], R>(f: (...a: A) => Promise<R>) =>
      (...a: A): Promise<R> =>
        f(...a).catch(async (err: unknown) => {
          throw await this.explain(err);
        });
    const out: SessionDisk = { ...disk, read: g(disk.read.bind(disk)) };
    if (disk.allocation) out.allocation = g(disk.allocation.bind(disk));
    if (disk.changes) out.changes = { since: disk.changes.since, extents: g(disk.changes.extents) };
    return out;
  }
}

/**
 * Opens a backup session on the QEMU VM `vm` (the name its state record and messages use) at
 * `target`, in `request.mode`. See the module comment.
 */
export async function openQemuSession(
  vm: string,
  target: QemuTarget,
  request: BackupRequest,
): Promise<BackupSession> {
  return request.mode === "offline" ? openOffline(vm, target, request) : openLive(vm, target, request);
}

async function openLive(vm: string, target: QemuTarget, request: BackupRequest): Promise<BackupSession> {
  if (request.mode === "offline") throw new StrataError(ErrorCode.INTERNAL, "openLive: offline mode");
  const mode = request.mode;
  const { stateDir, log } = request;
  const newBitmap = newBitmapName(request.repository);
  let record: StateRecord | undefined;
  let disks: LiveDisk[] = [];
  let trusted = new Map<string, string>();
  // One QMP connection: recover, describe, cut. Closed before the engine reads.
  const cut = await step(vm, target, "", async (qmp, qga) => {
    await recover(stateDir, vm, qmp, qga, log);
    disks = await listDisks(qmp);
    if (disks.length === 0)
      throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `VM ${vm} has no writable disks`);
    const config = await describeVm(qmp, target.qmp, disks);
    const trust = trustBitmaps(request.repository, disks, request.previous);
    trusted = trust.trusted;
    record = await StateRecord.create(stateDir, vm, target.qmp, target.qga);
    try {
      const view = await cutView({
        qmp,
        qga,
        record,
        vm,
        disks,
        mode,
        quiesce: request.quiesce,
        newBitmap,
        previous: trusted,
        granularity: request.granularity,
        workDir: stateDir,
        ...(request.speed === undefined ? {} : { speed: request.speed }),
        log,
      });
      return { view, config, reasons: trust.reasons };
    } catch (err) {
      // cutView released what it made; an empty record goes too.
      if (record.items.length === 0) await record.finish().catch(() => {});
      throw err;
    }
  });
  const rec = record!;
  const gone = new GoneCheck(vm, target);
  const clients: NbdClient[] = [];
  let finishing: Promise<void> | undefined;
  const finish = (ok: boolean): Promise<void> => {
    finishing ??= (async () => {
      await Promise.all(clients.map((c) => c.close().catch(() => {})));
      let qmp: QmpClient | undefined;
      try {
        qmp = await connectForRelease(target);
      } catch (err) {
        log(
          `VM ${vm}: QMP did not answer for the cleanup (${message(err)}); what the backup made stays listed in ${rec.path}: run "strata doctor --fix"`,
        );
        return;
      }
      const qga = agentFor(target);
      try {
        if (!qmp) log(`VM ${vm} is gone: nothing of the backup can be left inside it`);
        await release(qmp, qga, rec, log, { success: ok, previous: trusted, disks });
      } catch (err) {
        log(`cleanup failed: ${message(err)}`);
      } finally {
        await qga?.close().catch(() => {});
        await qmp?.close().catch(() => {});
      }
    })();
    return finishing;
  };
  try {
    const sources: SessionDisk[] = [];
    for (const ex of cut.view.exports) {
      const reason = cut.reasons.get(ex.disk.name);
      const previous = request.previous;
      const { disk, client } = await openNbdDisk({
        socket: ex.socket,
        exportName: ex.exportName,
        name: ex.disk.name,
        source: `${ex.disk.device} (${ex.disk.file})`,
        ...(ex.dirtyContext && previous ? { dirty: { context: ex.dirtyContext, since: previous.time } } : {}),
        ...(reason === undefined ? {} : { fullReadReason: reason }),
      }).catch(async (err: unknown) => {
        throw await gone.explain(err);
      });
      clients.push(client);
      sources.push(gone.guard(disk));
    }
    return {
      disks: sources,
      mode,
      consistency: cut.view.consistency,
      checkpoint: checkpointRecord(request.repository, newBitmap, disks),
      config: cut.config,
      details: { quiescedMs: cut.view.quiescedMs, frozenFilesystems: cut.view.frozen },
      finish,
    };
  } catch (err) {
    await finish(false);
    throw err;
  }
}

const OFFLINE_HINT = "; the disks of a VM that is already off can be backed up as file: sources";

async function openOffline(vm: string, target: QemuTarget, request: BackupRequest): Promise<BackupSession> {
  const { stateDir, log } = request;
  let record: StateRecord | undefined;
  let argv: string[] | undefined;
  const daemons: StorageDaemon[] = [];
  const clients: NbdClient[] = [];

  /** Starts the VM again (when this run shut it down) and drops the record once it is empty. */
  const restart = async () => {
    if (!record) return;
    const item = record.items.find((i) => i.kind === "restart");
    if (item && argv) {
      await restartVm(argv, target.qmp);
      await record.remove(item);
      log(`VM ${vm} started again`);
    }
    if (record.items.length === 0) await record.finish();
  };
  const stopReaders = async () => {
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
    await Promise.all(daemons.splice(0).map((d) => d.stop().catch(() => {})));
  };

  let opened: {
    disks: LiveDisk[];
    config: Awaited<ReturnType<typeof describeVm>>;
    trusted: Map<string, string>;
    reasons: Map<string, string>;
  };
  try {
    opened = await step(vm, target, OFFLINE_HINT, async (qmp, qga) => {
      if (!request.shutdown) {
        throw new StrataError(
          ErrorCode.USAGE,
          `VM ${vm} is running: offline mode needs --shutdown (Strata shuts it down and starts it again), or use --mode snapshot or pause`,
        );
      }
      await recover(stateDir, vm, qmp, qga, log);
      const disks = await listDisks(qmp);
      const config = await describeVm(qmp, target.qmp, disks);
      const proc = await findQemuProcess(target.qmp);
      if (!proc) {
        throw new StrataError(
          ErrorCode.USAGE,
          `the QEMU process of VM ${vm} is not on this host, so Strata could not start it again after an offline backup`,
        );
      }
      argv = proc.argv;
      const { trusted, reasons } = trustBitmaps(request.repository, disks, request.previous);
      record = await StateRecord.create(stateDir, vm, target.qmp, target.qga);
      await record.add({ kind: "restart", argv });
      await shutdownVm(qmp, qga, proc.pid, request.shutdownTimeoutMs ?? 120_000, log);
      return { disks, config, trusted, reasons };
    });
  } catch (err) {
    await restart().catch((e: unknown) => log(`VM ${vm} could not be started again: ${message(e)}`));
    throw err;
  }

  const { disks, trusted, reasons } = opened;
  const qcow2 = disks.filter((d) => d.format === "qcow2");
  const newBitmap = newBitmapName(request.repository);
  let finishing: Promise<void> | undefined;
  const finish = (ok: boolean): Promise<void> => {
    finishing ??= (async () => {
      await stopReaders();
      if (ok) {
        // The checkpoint moves on: nothing wrote the images since they were read.
        for (const d of qcow2) {
          try {
            await addBitmap(d.file, newBitmap, request.granularity);
          } catch (err) {
            log(`could not add checkpoint bitmap ${newBitmap} to ${d.file}: ${message(err)}`);
            continue;
          }
          const prev = trusted.get(d.name);
          if (prev !== undefined)
            await removeBitmap(d.file, prev).catch((e: unknown) =>
              log(`could not remove bitmap ${prev}: ${String(e)}`),
            );
        }
      }
      try {
        await restart();
      } catch (err) {
        const msg = `VM ${vm} could not be started again: ${message(err)}; "strata doctor --fix" starts it from ${record?.path}`;
        // After a committed restore point nothing hides this error; otherwise the backup's own
        // error is the one to report, and this one is logged.
        if (ok) throw new StrataError(ErrorCode.EXTERNAL, msg, { cause: err });
        log(msg);
      }
    })();
    return finishing;
  };

  try {
    const sources: SessionDisk[] = [];
    for (const d of disks) {
      const prev = d.format === "qcow2" ? trusted.get(d.name) : undefined;
      const daemon = await StorageDaemon.start([
        { path: d.file, format: d.format, name: d.name, ...(prev === undefined ? {} : { bitmaps: [prev] }) },
      ]);
      daemons.push(daemon);
      const reason =
        reasons.get(d.name) ??
        (d.format === "qcow2" ? undefined : `${d.format} disks keep no bitmap across a shutdown`);
      const previous = request.previous;
      const { disk, client } = await openNbdDisk({
        socket: daemon.socket,
        exportName: d.name,
        name: d.name,
        source: d.file,
        ...(prev !== undefined && previous
          ? { dirty: { context: `qemu:dirty-bitmap:${prev}`, since: previous.time } }
          : {}),
        ...(reason === undefined ? {} : { fullReadReason: reason }),
      });
      clients.push(client);
      sources.push(disk);
    }
    return {
      disks: sources,
      mode: "offline",
      consistency: "clean-shutdown",
      checkpoint: checkpointRecord(request.repository, newBitmap, qcow2),
      config: opened.config,
      details: {},
      finish,
    };
  } catch (err) {
    await finish(false);
    throw err;
  }
}
