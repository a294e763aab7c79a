/**
 * Backup of a VM through its adapter: open a session (the adapter cuts a point-in-time view of
 * every disk and says how consistent it is), read the disks into a restore point, and finish the
 * session on every path — with `ok` only once the manifest is committed, so that a failed backup
 * never moves the checkpoint the next incremental builds on.
 */
import type { BackupRequest, CheckpointRecord, VmHandle } from "../hypervisor/adapter.js";
import type { Repository } from "../repo/repository.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { allLimits, type Limiter, MiB, TokenBucket } from "../util/throttle.js";
import { type BackupResult, backup } from "./backup.js";
import { throttleDisk } from "./throttle.js";

export interface VmBackupOptions {
  /** The name restore points are filed under. */
  vm: string;
  mode: BackupRequest["mode"];
  quiesce: BackupRequest["quiesce"];
  shutdown?: boolean;
  shutdownTimeoutMs?: number;
  stateDir: string;
  progress?: ProgressSink;
  signal?: AbortSignal;
  log?: (message: string) => void;
  /** Disk reads wait for this limiter (the host's bandwidth shared by jobs, say). */
  readLimit?: Limiter;
  /**
   * MiB/s this job reads at most: its own limiter before `readLimit`, and the rate the adapter
   * gives the copy jobs it starts on the hypervisor (QEMU block-job speed).
   */
  jobMiBs?: number;
}

export interface VmBackupResult extends BackupResult {
  /** The session's facts (quiescedMs, frozen filesystems, ...). */
  details: Record<string, number | string>;
}

/** The checkpoint a restore point recorded, when it is one (older manifests hold other shapes). */
export function checkpointOf(bitmap: Record<string, unknown> | null | undefined): CheckpointRecord | null {
  if (!bitmap || typeof bitmap.repository !== "string") return null;
  // Restore points from before adapters recorded QEMU bitmaps without a kind.
  const kind = typeof bitmap.kind === "string" ? bitmap.kind : "qemu-bitmap";
  return { ...bitmap, kind, repository: bitmap.repository };
}

export async function backupVm(repo: Repository, vm: VmHandle, o: VmBackupOptions): Promise<VmBackupResult> {
  const log = o.log ?? (() => {});
  repo.startCodec();
  const previous = await repo.latestSnapshot(o.vm, () => {});
  const session = await vm.openBackup({
    vm: o.vm,
    repository: repo.config.id,
    mode: o.mode,
    quiesce: o.quiesce,
    ...(o.shutdown === undefined ? {} : { shutdown: o.shutdown }),
    ...(o.shutdownTimeoutMs === undefined ? {} : { shutdownTimeoutMs: o.shutdownTimeoutMs }),
    ...(previous
      ? { previous: { time: previous.time, checkpoint: checkpointOf(previous.manifest.bitmap) } }
      : {}),
    granularity: repo.chunkSize,
    stateDir: o.stateDir,
    ...(o.jobMiBs === undefined ? {} : { speed: o.jobMiBs * MiB }),
    log,
    ...(o.signal === undefined ? {} : { signal: o.signal }),
  });
  const limit = allLimits([
    o.jobMiBs === undefined ? undefined : new TokenBucket(o.jobMiBs * MiB),
    o.readLimit,
  ]);
  let ok = false;
  try {
    const result = await backup(repo, {
      vm: o.vm,
      disks: limit ? session.disks.map((d) => throttleDisk(d, limit, o.signal)) : session.disks,
      mode: session.mode,
      consistency: session.consistency,
      ...(session.config ? { config: Buffer.from(JSON.stringify(session.config)) } : {}),
      ...(session.checkpoint ? { bitmap: session.checkpoint } : {}),
      progress: o.progress ?? noProgress,
      ...(o.signal === undefined ? {} : { signal: o.signal }),
      log,
      previous: previous ?? null,
    });
    ok = true;
    return { ...result, details: session.details };
  } finally {
    await session.finish(ok);
  }
}
