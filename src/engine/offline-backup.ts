/**
 * Offline backup: the guest is shut down cleanly (agent, else ACPI), QEMU lets go of the images,
 * Strata reads them through qemu-storage-daemon (only what changed, when the qcow2 checkpoint
 * bitmap is trusted), hands the checkpoint over with qemu-img, and starts the VM again with the
 * command line it ran with — on every path, failures included. Consistency: clean-shutdown.
 */

import { describeVm, findQemuProcess, listDisks } from "../hypervisor/qemu/live.js";
import { restartVm, shutdownVm } from "../hypervisor/qemu/offline.js";
import { defaultStateDir, StateRecord } from "../hypervisor/qemu/state.js";
import { addBitmap, removeBitmap } from "../image/qemu-img.js";
import { StorageDaemon } from "../image/storage-daemon.js";
import type { NbdClient } from "../nbd/index.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { type BackupResult, backup, type DiskSource } from "./backup.js";
import {
  type BitmapRecord,
  bitmapPrefix,
  connectVm,
  type QemuTarget,
  recover,
  trustBitmaps,
} from "./live-backup.js";
import { openNbdDisk } from "./nbd-disk.js";

export interface OfflineBackupOptions {
  vm: string;
  target: QemuTarget;
  /** Strata may shut the VM down (and will start it again). */
  shutdown: boolean;
  shutdownTimeoutMs?: number;
  stateDir?: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
  log?: (message: string) => void;
}

export async function offlineBackup(repo: Repository, o: OfflineBackupOptions): Promise<BackupResult> {
  const log = o.log ?? (() => {});
  const stateDir = o.stateDir ?? defaultStateDir();
  const { qmp, qga } = await connectVm(
    o.vm,
    o.target,
    "; the disks of a VM that is already off can be backed up as file: sources",
  );
  let record: StateRecord | undefined;
  const daemons: StorageDaemon[] = [];
  const clients: NbdClient[] = [];
  let argv: string[] | undefined;
  try {
    if (!o.shutdown) {
      throw new StrataError(
        ErrorCode.USAGE,
        `VM ${o.vm} is running: offline mode needs --shutdown (Strata shuts it down and starts it again), or use --mode snapshot or pause`,
      );
    }
    await recover(stateDir, o.vm, qmp, qga, log);
    const disks = await listDisks(qmp);
    const config = await describeVm(qmp, o.target.qmp, disks);
    const proc = await findQemuProcess(o.target.qmp);
    if (!proc) {
      throw new StrataError(
        ErrorCode.USAGE,
        `the QEMU process of VM ${o.vm} is not on this host, so Strata could not start it again after an offline backup`,
      );
    }
    argv = proc.argv;
    const previous = (await repo.snapshots(o.vm, () => {})).at(-1);
    const { trusted, reasons } = trustBitmaps(repo, disks, previous);
    record = await StateRecord.create(stateDir, o.vm, o.target.qmp, o.target.qga);
    await record.add({ kind: "restart", argv });
    await shutdownVm(qmp, qga, proc.pid, o.shutdownTimeoutMs ?? 120_000, log);
    await qmp.close().catch(() => {});

    const sources: DiskSource[] = [];
    for (const d of disks) {
      const prev = d.format === "qcow2" ? trusted.get(d.name) : undefined;
      const daemon = await StorageDaemon.start([
        { path: d.file, format: d.format, name: d.name, ...(prev === undefined ? {} : { bitmaps: [prev] }) },
      ]);
      daemons.push(daemon);
      const reason =
        reasons.get(d.name) ??
        (d.format === "qcow2" ? undefined : `${d.format} disks keep no bitmap across a shutdown`);
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
    const newBitmap = `${bitmapPrefix(repo)}${Date.now().toString(36)}`;
    const qcow2 = disks.filter((d) => d.format === "qcow2");
    const bitmap: BitmapRecord = {
      repository: repo.config.id,
      disks: Object.fromEntries(
        qcow2.map((d) => [d.name, { node: d.node, bitmap: newBitmap, size: d.size, persistent: true }]),
      ),
    };
    const result = await backup(repo, {
      vm: o.vm,
      disks: sources,
      mode: "offline",
      consistency: "clean-shutdown",
      config: Buffer.from(JSON.stringify(config)),
      bitmap: bitmap as unknown as Record<string, unknown>,
      progress: o.progress ?? noProgress,
      ...(o.signal === undefined ? {} : { signal: o.signal }),
      log,
    });
    await Promise.all(clients.splice(0).map((c) => c.close().catch(() => {})));
    await Promise.all(daemons.splice(0).map((d) => d.stop()));
    // The checkpoint moves on: nothing wrote the images since they were read.
    for (const d of qcow2) {
      await addBitmap(d.file, newBitmap, repo.chunkSize);
      const prev = trusted.get(d.name);
      if (prev !== undefined)
        await removeBitmap(d.file, prev).catch((e: unknown) =>
          log(`could not remove bitmap ${prev}: ${String(e)}`),
        );
    }
    return result;
  } finally {
    await Promise.all(clients.map((c) => c.close().catch(() => {})));
    await Promise.all(daemons.map((d) => d.stop().catch(() => {})));
    await qga?.close().catch(() => {});
    await qmp.close().catch(() => {});
    if (record) {
      const restart = record.items.find((i) => i.kind === "restart");
      if (restart && argv) {
        await restartVm(argv, o.target.qmp);
        await record.remove(restart);
        log(`VM ${o.vm} started again`);
      }
      if (record.items.length === 0) await record.finish();
    }
  }
}
