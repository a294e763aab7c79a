/**
 * Live backup of a running QEMU VM: connect QMP (and the guest agent), decide per disk whether
 * its checkpoint bitmap can be trusted, cut a point-in-time view of all disks in one
 * transaction (hypervisor/qemu/live.ts), read the exports with Strata's NBD client — only the
 * dirty chunks when the bitmap is trusted — and tear everything down, on every path.
 *
 * A checkpoint bitmap is trusted only when it provably belongs to the latest restore point: the
 * manifest of that restore point names it for that disk (and the name carries this
 * repository's id), it exists on the disk's node, records, is neither busy nor inconsistent,
 * and the disk size is unchanged. Anything else means a full read (dedup keeps storage small),
 * and the reason is logged and recorded in the manifest.
 */
import { existsSync } from "node:fs";
import {
  cutView,
  describeVm,
  type LiveDisk,
  type LiveMode,
  listDisks,
  type PointInTimeView,
  type QuiescePolicy,
  release,
} from "../hypervisor/qemu/live.js";
import { QgaClient } from "../hypervisor/qemu/qga.js";
import { QmpClient } from "../hypervisor/qemu/qmp.js";
import { defaultStateDir, StateRecord } from "../hypervisor/qemu/state.js";
import type { NbdClient } from "../nbd/index.js";
import { processStart } from "../repo/locks.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { processAlive } from "../util/process.js";
import type { ProgressSink } from "../util/progress.js";
import { noProgress } from "../util/progress.js";
import { type BackupResult, backup, type DiskSource } from "./backup.js";
import { openNbdDisk } from "./nbd-disk.js";

export interface QemuTarget {
  qmp: string;
  qga?: string;
}

/** Parses `qmp:PATH[,qga=PATH]`; a sibling `X.qga` of `X.qmp` is used when present (Proxmox VE's layout). */
export function parseQmpSpec(spec: string): QemuTarget {
  if (!spec.startsWith("qmp:"))
    throw new StrataError(
      ErrorCode.USAGE,
      `not a QMP source: "${spec}" (qmp:/path/to/qmp.sock[,qga=/path/to/qga.sock])`,
    );
  const [path, ...opts] = spec.slice(4).split(",");
  if (!path) throw new StrataError(ErrorCode.USAGE, `source "${spec}" names no QMP socket`);
  const t: QemuTarget = { qmp: path };
  for (const o of opts) {
    const [k, v] = o.split("=", 2);
    if (k === "qga" && v) t.qga = v;
    else throw new StrataError(ErrorCode.USAGE, `unknown option "${o}" in "${spec}" (known: qga=PATH)`);
  }
  if (t.qga === undefined && path.endsWith(".qmp") && existsSync(`${path.slice(0, -4)}.qga`))
    t.qga = `${path.slice(0, -4)}.qga`;
  return t;
}

export interface LiveBackupOptions {
  vm: string;
  target: QemuTarget;
  mode: LiveMode;
  quiesce: QuiescePolicy;
  stateDir?: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
  log?: (message: string) => void;
}

export interface LiveBackupResult extends BackupResult {
  quiescedMs: number;
  frozen: number;
}

/** Bitmap state kept in the manifest: per disk, the checkpoint bitmap this restore point started. */
export interface BitmapRecord {
  repository: string;
  disks: Record<string, { node: string; bitmap: string; size: number; persistent: boolean }>;
}

export function bitmapPrefix(repo: Repository): string {
  return `strata-${repo.config.id.slice(0, 8)}-`;
}

/** Decides, per disk, whether the previous checkpoint bitmap is trusted; returns trusted names and reasons. */
export function trustBitmaps(
  repo: Repository,
  disks: readonly LiveDisk[],
  previous: SnapshotRef | undefined,
): { trusted: Map<string, string>; reasons: Map<string, string> } {
  const trusted = new Map<string, string>();
  const reasons = new Map<string, string>();
  const rec = previous?.manifest.bitmap as BitmapRecord | null | undefined;
  for (const d of disks) {
    const why = (() => {
      if (!previous) return "first backup of this VM";
      if (!rec || rec.repository !== repo.config.id)
        return "the latest restore point has no checkpoint bitmap from this repository";
      const r = rec.disks[d.name];
      if (!r) return "the latest restore point has no checkpoint bitmap for this disk";
      if (r.size !== d.size) return `the disk changed size (${r.size} → ${d.size})`;
      const b = d.bitmaps.find((x) => x.name === r.bitmap);
      if (!b) {
        return r.persistent
          ? `checkpoint bitmap ${r.bitmap} is missing (deleted, or QEMU did not close the image cleanly)`
          : `checkpoint bitmap ${r.bitmap} is gone: bitmaps of ${d.format} disks live in QEMU's memory and the VM was restarted`;
      }
      if (b.inconsistent)
        return `checkpoint bitmap ${r.bitmap} is inconsistent (QEMU did not close the image cleanly)`;
      if (b.busy) return `checkpoint bitmap ${r.bitmap} is in use by another job`;
      if (!b.recording) return `checkpoint bitmap ${r.bitmap} is not recording`;
      return undefined;
    })();
    if (why === undefined) trusted.set(d.name, rec!.disks[d.name]!.bitmap);
    else reasons.set(d.name, why);
  }
  return { trusted, reasons };
}

/** Releases what an earlier, dead run left on this VM (its state file), before a new run. */
export async function recover(
  stateDir: string,
  vm: string,
  qmp: QmpClient,
  qga: QgaClient | undefined,
  log: (m: string) => void,
) {
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

/** QMP (and agent) connections to a VM; an unreachable VM is a clear error, with `hint` added. */
export async function connectVm(
  vm: string,
  target: QemuTarget,
  hint = "",
): Promise<{ qmp: QmpClient; qga: QgaClient | undefined }> {
  let qmp: QmpClient;
  try {
    qmp = await QmpClient.connect(target.qmp, { connectTimeoutMs: 5000 });
  } catch (err) {
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `cannot reach VM ${vm} at ${target.qmp}: ${err instanceof Error ? err.message : String(err)}${hint}`,
    );
  }
  const qga = target.qga === undefined ? undefined : new QgaClient(target.qga, { timeoutMs: 10_000 });
  return { qmp, qga };
}

export async function liveBackup(repo: Repository, o: LiveBackupOptions): Promise<LiveBackupResult> {
  const log = o.log ?? (() => {});
  const stateDir = o.stateDir ?? defaultStateDir();
  const { qmp, qga } = await connectVm(o.vm, o.target);
  const clients: NbdClient[] = [];
  let view: PointInTimeView | undefined;
  try {
    await recover(stateDir, o.vm, qmp, qga, log);
    const disks = await listDisks(qmp);
    if (disks.length === 0)
      throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `VM ${o.vm} has no writable disks`);
    const config = await describeVm(qmp, o.target.qmp, disks);
    const previous = (await repo.snapshots(o.vm, () => {})).at(-1);
    const { trusted, reasons } = trustBitmaps(repo, disks, previous);
    const newBitmap = `${bitmapPrefix(repo)}${Date.now().toString(36)}`;
    const record = await StateRecord.create(stateDir, o.vm, o.target.qmp, o.target.qga);
    view = await cutView({
      qmp,
      qga,
      record,
      vm: o.vm,
      disks,
      mode: o.mode,
      quiesce: o.quiesce,
      newBitmap,
      previous: trusted,
      granularity: repo.chunkSize,
      workDir: stateDir,
      log,
    });
    const sources: DiskSource[] = [];
    for (const ex of view.exports) {
      const reason = reasons.get(ex.disk.name);
      const { disk, client } = await openNbdDisk({
        socket: ex.socket,
        exportName: ex.exportName,
        name: ex.disk.name,
        source: `${ex.disk.device} (${ex.disk.file})`,
        ...(ex.dirtyContext && previous ? { dirty: { context: ex.dirtyContext, since: previous.time } } : {}),
        ...(reason === undefined ? {} : { fullReadReason: reason }),
      });
      clients.push(client);
      sources.push(disk);
    }
    const bitmap: BitmapRecord = {
      repository: repo.config.id,
      disks: Object.fromEntries(
        disks.map((d) => [
          d.name,
          { node: d.node, bitmap: newBitmap, size: d.size, persistent: d.format === "qcow2" },
        ]),
      ),
    };
    const result = await backup(repo, {
      vm: o.vm,
      disks: sources,
      mode: o.mode,
      consistency: view.consistency,
      config: Buffer.from(JSON.stringify(config)),
      bitmap: bitmap as unknown as Record<string, unknown>,
      progress: o.progress ?? noProgress,
      ...(o.signal === undefined ? {} : { signal: o.signal }),
      log,
    });
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
    const v = view;
    view = undefined;
    await v.finish(true);
    return { ...result, quiescedMs: v.quiescedMs, frozen: v.frozen };
  } catch (err) {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    if (view) await view.finish(false).catch((e: unknown) => log(`cleanup failed: ${String(e)}`));
    if (qmp.closed && !(err instanceof StrataError && err.code === ErrorCode.ABORTED)) {
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `VM ${o.vm} went away during the backup: ${err instanceof Error ? err.message : String(err)}`,
        { cause: err },
      );
    }
    throw err;
  } finally {
    await qga?.close().catch(() => {});
    await qmp.close().catch(() => {});
  }
}
