/**
 * The VM adapter interface: the one contract between the engine and a virtualisation platform.
 *
 * Every platform (a QEMU process reached over QMP, libvirt, Proxmox VE, plain image files; later
 * vSphere, Hyper-V, XCP-ng) implements {@link VmAdapter}. The engine speaks only this interface:
 * it never sends a QMP command, runs virsh or rewrites a command line itself. An adapter turns a VM
 * into block sources and back:
 *
 * ```
 *   resolve(uri) ──> VmHandle ──open backup──> BackupSession { disks, consistency, checkpoint, config }
 *                                                 │ engine reads disks → repository
 *                                                 └ finish(ok)   (everything on the VM released)
 *   VmConfigDocument ──planRestore──> RestorePlan ──define / start──> a VM again (in place or a clone)
 *   VmConfigDocument + NBD exports ──startInstant──> a running VM on local overlays ──migrate──> production
 *   leftovers(fix) ──> what a dead run left on the platform
 * ```
 *
 * Sources are URIs (`qmp:`, `vm:`, `file:`, `libvirt:`, `pve:`) resolved by the registry
 * (registry.ts): the scheme picks the adapter, the adapter parses the rest.
 *
 * Rules every adapter keeps:
 *  - Nothing is left on a VM: whatever an adapter creates (bitmaps it does not hand over, scratch
 *    files, exports, jobs, a frozen guest) is recorded in its state directory before it is created,
 *    released by `finish` on every path, and found again by `leftovers` after a crash.
 *  - A checkpoint is trusted only when it provably belongs to the restore point named as `previous`;
 *    anything else means a full read, with the reason in `fullReadReason`. A wrong image is never
 *    the price of an incremental.
 *  - The adapter never holds a platform's control channel longer than it needs: the engine may keep
 *    a session open for minutes while it reads.
 *  - What an adapter parses from a stored configuration document is validated: it may come from a
 *    repository others can write.
 */
import type { BackupMode, Consistency } from "../repo/manifest.js";

/** A run of a disk; `zero` when it reads as zeros. Structurally the engine's DataExtent. */
export interface Extent {
  offset: number;
  length: number;
  zero: boolean;
}

/** A disk as a block source. Structurally the engine's DiskSource (the engine declares its own). */
export interface SessionDisk {
  /** Name in the repository, unique within the VM. */
  name: string;
  /** Where it comes from, for people. */
  source: string;
  size: number;
  /** Exactly `length` bytes at `offset`; may read into `into` and return a view of it. */
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  /** Which parts read as zeros, when the source knows. */
  allocation?(): Promise<Extent[]>;
  /** What changed since the restore point at time `since`: `zero: true` extents are unchanged. */
  changes?: { since: string; extents(): Promise<Extent[]> };
  /** Why a disk that could have had change tracking is read whole this time. */
  fullReadReason?: string;
}

/**
 * What an adapter keeps with a restore point so that the next backup can read only what changed
 * (stored in the manifest's `bitmap` field). `kind` names the adapter's record type, `repository`
 * the repository id it belongs to; the rest is the adapter's own, validated by it when read back.
 */
export interface CheckpointRecord {
  kind: string;
  repository: string;
  [key: string]: unknown;
}

/** A VM's configuration as stored with a restore point (the `config.blob`), JSON. */
export interface VmConfigDocument {
  /** The adapter that wrote it and can define the VM again from it ("qemu", "libvirt", "pve"). */
  kind: string;
  name: string | null;
  uuid: string | null;
  cpus: number;
  memoryBytes: number;
  /** The VM's disks as the platform names them; `name` matches the restore point's disk names. */
  disks: Array<{ name: string; file: string; format: string; size: number; [key: string]: unknown }>;
  nics: Array<{ id: string; mac: string | null; [key: string]: unknown }>;
  [key: string]: unknown;
}

export type LiveMode = "snapshot" | "pause";
export type QuiescePolicy = "require" | "try" | "off";

/** What the engine asks of a backup session. */
export interface BackupRequest {
  /**
   * The name the restore point is filed under (`--vm`, else the handle's defaultName). Adapters key
   * their state record and messages on it, so that `strata doctor --vm NAME` finds a dead run.
   */
  vm: string;
  /** The repository's id: checkpoints of another repository are never trusted. */
  repository: string;
  /** snapshot (no downtime), pause, or offline (the VM down for the read). */
  mode: "snapshot" | "pause" | "offline";
  quiesce: QuiescePolicy;
  /** offline: shut a running VM down for the backup and start it again afterwards. */
  shutdown?: boolean;
  shutdownTimeoutMs?: number;
  /**
   * The latest restore point of this VM in the repository: its time and the checkpoint it
   * recorded (null when it has none). Undefined for a first backup.
   */
  previous?: { time: string; checkpoint: CheckpointRecord | null };
  /** Change-tracking granularity wanted (the repository's chunk size). */
  granularity: number;
  /** Where the adapter records what it creates (see the module comment). */
  stateDir: string;
  /**
   * Bytes/s the job may read (the job's bandwidth limit): adapters that start copy jobs on the
   * hypervisor give them this rate (QEMU: the block job's `speed`). Strata's own reads are paced
   * by the engine.
   */
  speed?: number;
  log: (message: string) => void;
  signal?: AbortSignal;
}

/** An open backup: a point-in-time view of every disk of the VM. */
export interface BackupSession {
  disks: SessionDisk[];
  mode: BackupMode;
  consistency: Consistency;
  /** The record to keep with the restore point, or null when this platform tracks no changes. */
  checkpoint: CheckpointRecord | null;
  /** The VM's configuration, or null (plain image files have none). */
  config: VmConfigDocument | null;
  /** Facts for the summary (quiescedMs, frozen filesystems, ...). */
  details: Record<string, number | string>;
  /**
   * Releases everything on the VM. `ok`: the restore point was committed, so the new checkpoint
   * becomes the one to build on; otherwise the previous one must stay usable (no change forgotten).
   * Idempotent; never throws for cleanup problems it can log instead.
   */
  finish(ok: boolean): Promise<void>;
}

/** A VM as the adapter sees it, for lists and inventories. */
export interface VmSummary {
  /** The adapter's id ("qemu", "libvirt", "pve", "file"). */
  adapter: string;
  /** The URI that names it (`libvirt:web1`, `pve:100`). */
  source: string;
  name: string;
  state: "running" | "paused" | "shut off" | "unknown";
  /** Labels the platform or the inventory gives the VM; the daemon's policies select by them. */
  tags?: string[];
}

/** A VM named by a source URI, resolved but not yet touched. */
export interface VmHandle {
  adapter: VmAdapter;
  /** The URI as given. */
  source: string;
  /** The name restore points of this VM are filed under, unless the user gives another. */
  defaultName: string | undefined;
  /** Defaults the source carries (an inventory entry's mode and quiesce policy). */
  defaults?: { mode?: BackupRequest["mode"]; quiesce?: QuiescePolicy };
  /**
   * Starts what {@link openBackup} will check that depends on the source alone and leaves nothing
   * behind (an image file's probes), so that it runs while the caller opens the repository.
   * `openBackup` uses what it found; a failure surfaces there. Optional, and a no-op to skip.
   */
  prepare?(log: (message: string) => void): void;
  /** Opens a backup session (see {@link BackupSession}); the VM must exist. */
  openBackup(request: BackupRequest): Promise<BackupSession>;
  /**
   * Leftovers of dead runs on this one VM, and what other tools left on it (`strata doctor
   * SOURCE`); `vm` is the name its runs were filed under (as BackupRequest.vm). With `fix`,
   * Strata's own are removed. Absent when the platform leaves nothing.
   */
  leftovers?(vm: string, stateDir: string, fix: boolean): Promise<Finding[]>;
}

/** Where each disk of a restored VM goes. */
export interface PlannedDisk {
  name: string;
  format: "raw" | "qcow2";
  path: string;
  size: number;
}

export interface RestorePlanOptions {
  /** A clone in this directory (new name, UUID, MACs); undefined = in place. */
  target?: string;
  /** The clone's name. */
  name?: string;
  /** Every disk in this format; undefined = as recorded. */
  format?: "raw" | "qcow2";
  /** Only this disk. */
  disk?: string;
  /** The restore point's disks (a VM disk missing from it is not restored). */
  available: ReadonlyArray<{ name: string; size: number }>;
  /** The restore point restored from, for the definition (and a clone's default name). */
  restorePoint: { vm: string; time: string; consistency: Consistency };
}

/** What a VM restore will write and define; made before anything is written. */
export interface RestorePlan {
  kind: string;
  clone: boolean;
  /** The restored VM's configuration (the clone's, or the original's). */
  config: VmConfigDocument;
  disks: PlannedDisk[];
  /** The definition to write or hand to the platform, in the platform's own syntax. */
  definition: { text: string; mediaType: string; file?: string };
  warnings: string[];
  /**
   * How a person starts the defined VM where the platform starts its own VMs and the adapter
   * has no `start` (Proxmox VE: `qm start 101`); shown after the restore.
   */
  startHint?: string;
  /** The adapter's own planning data. */
  [key: string]: unknown;
}

/** A VM started by an adapter. */
export interface StartedVm {
  /** How to reach it, for people ("QMP /srv/x/run/qmp.sock", "libvirt domain web1b"). */
  where: string;
  pid?: number;
  /** Facts for people and the summary, the platform's own keys (qmpSocket, console, log, ...). */
  details?: Record<string, string>;
}

/** One disk served from the repository over NBD, for instant recovery. */
export interface NbdBackedDisk {
  name: string;
  size: number;
  socket: string;
  exportName: string;
}

export interface InstantRequest {
  /** The VM's name while it runs (a clone's new name, or the original's). */
  name: string;
  /** New name, UUID and MACs, so that it runs beside the original. */
  clone: boolean;
  /** Directory for the overlays and run files. */
  dir: string;
  /** Every disk of the VM, served read-only by Strata's NBD server. */
  disks: NbdBackedDisk[];
  /** Seconds the VM's NBD client waits for a restarted server before failing requests. */
  reconnectDelay: number;
  /**
   * No network (boot verification): the VM's NICs reach nothing outside the VM (no NIC, or one
   * on a private bridge). An adapter that cannot isolate refuses before creating anything.
   */
  isolateNetwork?: boolean;
  stateDir: string;
  log: (message: string) => void;
  /**
   * Saves the VM's record with the engine's (state dir). The adapter calls it before it creates
   * anything (overlays, a process, a domain) and again whenever the record changes, so that a
   * crash at any point leaves a record that names what exists.
   */
  record(vm: InstantVm): Promise<void>;
}

/**
 * A VM running on local overlays over NBD exports, as the adapter records it. The engine saves it
 * (with the serving process's record) and hands it back to every later call; `data` is the
 * adapter's own and validated by it.
 */
export interface InstantVm {
  adapter: string;
  name: string;
  /** How to reach it, for people. */
  where: string;
  pid: number | null;
  disks: Array<{
    name: string;
    overlay: string;
    /** Set once the disk has moved to production storage. */
    production?: { path: string; format: "qcow2" | "raw" };
  }>;
  data: Record<string, unknown>;
  /** Facts for people and the summary, the platform's own keys (qmpSocket, console, log, ...). */
  details: Record<string, string>;
  warnings: string[];
}

/**
 * The mirror buffer (QEMU's blockdev-mirror buf-size, virsh blockcopy --buf-size) for a copy
 * limited to `limitBytes` per second. QEMU copies up to a whole buffer of consecutive data before
 * its rate limit waits (16 MiB by default): at a few MiB/s that is seconds of unthrottled copying.
 * A quarter of a second's worth (a power of two, 256 KiB to 16 MiB) keeps bursts within the limit.
 */
export function mirrorBufferBytes(limitBytes: number): number {
  const quarter = Math.max(1, limitBytes / 4);
  return Math.min(16 << 20, Math.max(256 << 10, 2 ** Math.floor(Math.log2(quarter))));
}

export interface MigrateRequest {
  /** Directory on production storage. */
  target: string;
  format: "qcow2" | "raw";
  /** Bytes per second for the copy; null = unlimited. */
  limitBytes: number | null;
  /** Copy-mode write-blocking: converges under any guest write rate. */
  active: boolean;
  /** Bytes of `disk` copied so far, of `total`; `done === total` once it has moved. */
  progress?: (disk: string, done: number, total: number) => void;
  signal?: AbortSignal;
  log: (message: string) => void;
  /** Saves the record (see {@link InstantRequest.record}); called once each disk has moved. */
  record(vm: InstantVm): Promise<void>;
}

/** One disk of a migration. */
export interface MigratedDisk {
  disk: string;
  path: string;
  format: "qcow2" | "raw";
  size: number;
  /** Bytes the copy reported as its work, and the times to a synchronised copy and to the switch. */
  copied: number;
  readyMs: number;
  pivotMs: number;
  /** Moved by an earlier run. */
  skipped: boolean;
}

/** Instant recovery on one platform. */
export interface InstantRuntime {
  /**
   * Boots the VM on empty local overlays backed by the exports; nothing is copied first. Refuses
   * (before creating anything) what it cannot run; on failure removes what it created.
   */
  start(config: VmConfigDocument, request: InstantRequest): Promise<InstantVm>;
  /**
   * Checks a record read back from the state directory (its `data` above all) and returns it;
   * throws DATA_CORRUPT naming what is wrong.
   */
  checkRecord(vm: InstantVm): InstantVm;
  /** Whether the VM's process (or domain) runs. */
  running(vm: InstantVm): Promise<boolean>;
  /** Starts a stopped VM again from its record (disks already migrated stay on production storage). */
  resume(vm: InstantVm, log: (message: string) => void): Promise<InstantVm>;
  /**
   * Moves every disk to production storage (`TARGET/<disk>.<format>`) while the VM runs, then
   * drops the NBD backing. Run again after an interruption, it cleans up and goes on; disks
   * that moved already are skipped.
   */
  migrate(vm: InstantVm, request: MigrateRequest): Promise<{ vm: InstantVm; disks: MigratedDisk[] }>;
  /** Stops the VM (a clean power-down first when `powerdownMs` > 0); overlays stay. */
  stop(vm: InstantVm, powerdownMs: number): Promise<"quit" | "powerdown" | "killed" | "not running">;
  /**
   * A client of the running VM's guest agent, or undefined when its configuration has no agent
   * channel. Absent when the platform offers no way to reach the agent.
   */
  guestAgent?(vm: InstantVm): GuestAgent | undefined;
}

/** What boot verification asks of a guest agent (QEMU's qemu-ga protocol). */
export interface GuestAgent {
  /** Resolves once the agent answers; TIMEOUT after `timeoutMs`. */
  waitUntilReady(timeoutMs: number): Promise<void>;
  ping(options?: { timeoutMs?: number }): Promise<void>;
  /** Runs a program in the guest and waits for it (output captured). */
  exec(
    path: string,
    args?: string[],
    options?: { timeoutMs?: number },
  ): Promise<{ exitcode: number | undefined; signal: number | undefined; stdout: string; stderr: string }>;
  close(): Promise<void>;
}

/** A leftover on a VM or host: Strata's own (fixable) or another tool's (reported). */
export interface Finding {
  vm: string;
  owner: "strata" | "foreign";
  what: string;
  bytes?: number;
  fixed: boolean;
}

/**
 * One platform. Methods a platform cannot offer are absent (plain image files cannot be started);
 * the engine says so clearly instead of guessing.
 */
export interface VmAdapter {
  /** "qemu", "libvirt", "pve", "file". */
  readonly id: string;
  /** URI schemes this adapter resolves, without the colon. */
  readonly schemes: readonly string[];
  /** One line for `--help`: the URI syntax. */
  readonly usage: string;
  /** Parses a source URI of one of its schemes; throws USAGE errors that show the syntax. */
  resolve(uri: string): Promise<VmHandle>;
  /**
   * Resolves several sources of its schemes as one VM (`strata backup --vm db1 file:a file:b`:
   * plain image files name one disk each). Absent when every source names a whole VM.
   */
  resolveGroup?(uris: readonly string[]): Promise<VmHandle>;
  /** Every VM this adapter can see on this host (the inventory). */
  list?(): Promise<VmSummary[]>;
  /**
   * Checks and parses a configuration document this adapter wrote. It may come from a repository
   * others can write: every field is checked (types, names that become file names, paths,
   * programs it would run, sizes); throws DATA_CORRUPT naming the first wrong field.
   */
  parseConfig?(doc: VmConfigDocument): VmConfigDocument;
  /**
   * Plans a restore of a VM from its configuration (paths, identity, definition); writes nothing.
   * Every path of a clone lies inside `options.target`.
   */
  planRestore?(config: VmConfigDocument, options: RestorePlanOptions): Promise<RestorePlan>;
  /** Refuses (throws TARGET_CONFLICT) when the VM a plan restores over is running. */
  refuseIfRunning?(plan: RestorePlan): Promise<void>;
  /**
   * Defines the restored VM on the platform (libvirt define, a Proxmox config, a JSON file), once
   * its disks are written. The engine has refused an existing `definition.file` without `force`.
   */
  define?(plan: RestorePlan, force: boolean): Promise<void>;
  /** Starts a defined VM. */
  start?(plan: RestorePlan): Promise<StartedVm>;
  /** Instant recovery (boot from the repository over NBD, then migrate). */
  instant?: InstantRuntime;
  /**
   * Renders a configuration (a planned restore's `plan.config`) for `restore --config-only`:
   * "json" always, and the platform's own ("qemu-args", "xml", "pve"). Throws USAGE for others.
   */
  renderConfig?(config: VmConfigDocument, as: string): string;
  /** Leftovers of dead runs on this platform; with `fix`, Strata's own are removed. */
  leftovers?(stateDir: string, fix: boolean): Promise<Finding[]>;
}
