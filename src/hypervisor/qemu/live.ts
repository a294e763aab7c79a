/**
 * A running QEMU VM as a backup source: its disks and configuration from QMP, and a
 * point-in-time view of all its disks cut in one QMP transaction and exported over QEMU's own
 * NBD server (the pull-mode sequence libvirt uses; QEMU-NOTES.md):
 *
 *  1. per disk, a scratch qcow2 "fleecing" node whose backing is the disk's node;
 *  2. one `transaction`: per disk, the new checkpoint bitmap (persistent on qcow2), a disabled
 *     temporary copy of the previous checkpoint bitmap (when there is one), and
 *     `blockdev-backup sync=none` into the fleecing node (copy-before-write keeps the old data);
 *     the guest is frozen (agent) or paused (`stop`) only around this one command;
 *  3. `nbd-server-start` on a private unix socket, one read-only `block-export-add` per disk with
 *     the temporary bitmap, read as `qemu:dirty-bitmap:strata-tmp`.
 *
 * The view outlives the QMP connection that cut it: exports, jobs and nodes belong to QEMU, not
 * to the monitor session, so the caller closes QMP while it reads (session.ts). release() tears
 * down in order: export, NBD server, job, fleecing node and file, temporary bitmap; on success
 * the previous checkpoint bitmap goes, on failure the new one does and the previous one (still
 * recording) keeps every change for the next run. Every item is recorded in
 * the state file before it is created (state.ts), so a crash leaves a list for `strata doctor`.
 */
import { promises as fs } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { NbdClient } from "../../nbd/client.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { runProgram, socketAccepts } from "../../util/process.js";
import { restartVm } from "./offline.js";
import type { QgaClient } from "./qga.js";
import type { QmpClient } from "./qmp.js";
import type { StateItem, StateRecord } from "./state.js";
import { QemuCommandError } from "./wire.js";

export interface BitmapInfo {
  name: string;
  granularity: number;
  recording: boolean;
  busy: boolean;
  persistent: boolean;
  inconsistent: boolean;
  count: number;
}

export interface LiveDisk {
  /** Name in the repository: the device id ("vblk0", "scsi0"), else the node name. */
  name: string;
  /** Node name of the top (format) node the guest device uses. */
  node: string;
  /** qdev path or device name, for people. */
  device: string;
  format: string;
  file: string;
  size: number;
  bitmaps: BitmapInfo[];
}

interface QueryBlockEntry {
  device: string;
  qdev?: string;
  inserted?: {
    "node-name": string;
    drv: string;
    file: string;
    ro: boolean;
    image: { "virtual-size": number; filename: string; format: string };
    "dirty-bitmaps"?: Array<{
      name: string;
      granularity: number;
      recording: boolean;
      busy: boolean;
      persistent: boolean;
      inconsistent?: boolean;
      count: number;
    }>;
  };
}

/** Names of the objects Strata creates on a VM. Everything starts with "strata-". */
export const names = {
  fleeceNode: (disk: string) => `strata-fleece-${disk}`,
  job: (disk: string) => `strata-job-${disk}`,
  exportId: (disk: string) => `strata-export-${disk}`,
  tmpBitmap: "strata-tmp",
  isOurs: (name: string) => name.startsWith("strata-"),
};

function diskName(e: QueryBlockEntry): string {
  // `qdev` is the device's id when the device itself holds the drive (scsi-hd, ide-hd: "scsi0"),
  // or its QOM path when a child does (virtio-blk: "/machine/peripheral/vblk0/virtio-backend").
  const q = e.qdev ?? "";
  const qdev = q.startsWith("/") ? /^\/machine\/peripheral\/([^/]+)/.exec(q)?.[1] : q || undefined;
  const raw = e.device !== "" ? e.device.replace(/^drive-/, "") : (qdev ?? e.inserted!["node-name"]);
  return raw.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^[^A-Za-z0-9]+/, "") || "disk";
}

/** The VM's writable disks attached to guest devices (CD-ROMs, read-only media and empty drives left out). */
export async function listDisks(qmp: QmpClient): Promise<LiveDisk[]> {
  const entries = await qmp.execute<QueryBlockEntry[]>("query-block");
  const out: LiveDisk[] = [];
  for (const e of entries) {
    const ins = e.inserted;
    if (!ins || ins.ro) continue;
    if (names.isOurs(ins["node-name"])) continue;
    out.push({
      name: diskName(e),
      node: ins["node-name"],
      device: e.qdev ?? e.device,
      format: ins.image.format,
      file: ins.image.filename,
      size: ins.image["virtual-size"],
      bitmaps: (ins["dirty-bitmaps"] ?? [])
        .filter((b) => b.name !== undefined)
        .map((b) => ({
          name: b.name,
          granularity: b.granularity,
          recording: b.recording,
          busy: b.busy,
          persistent: b.persistent,
          inconsistent: b.inconsistent === true,
          count: b.count,
        })),
    });
  }
  const seen = new Set<string>();
  for (const d of out) {
    let n = d.name;
    for (let i = 1; seen.has(n); i++) n = `${d.name}-${i}`;
    d.name = n;
    seen.add(n);
  }
  return out;
}

/** A type, not an interface: it is a VmConfigDocument (adapter.ts) as it stands. */
export type VmConfig = {
  kind: "qemu";
  name: string | null;
  uuid: string | null;
  machine: string | null;
  cpus: number;
  memoryBytes: number;
  disks: Array<{ name: string; node: string; device: string; format: string; file: string; size: number }>;
  nics: Array<{ id: string; type: string; mac: string | null }>;
  firmware: string | null;
  /** QEMU's command line, when the process could be found on this host. */
  commandLine: string[] | null;
};

/** The QEMU process that listens on `qmpSocket`, found through /proc (same host only). */
export async function findQemuProcess(
  qmpSocket: string,
): Promise<{ pid: number; argv: string[] } | undefined> {
  let pids: string[];
  try {
    pids = (await fs.readdir("/proc")).filter((p) => /^\d+$/.test(p));
  } catch {
    return undefined;
  }
  for (const pid of pids) {
    const argv = await fs
      .readFile(`/proc/${pid}/cmdline`, "utf8")
      .then((t) => t.split("\0").filter((x) => x !== ""))
      .catch(() => [] as string[]);
    if (argv.length > 0 && /qemu/.test(argv[0]!) && argv.some((a) => a.includes(qmpSocket))) {
      return { pid: Number(pid), argv };
    }
  }
  return undefined;
}

/** The VM's configuration from QMP (and its command line when the process is on this host). */
export async function describeVm(
  qmp: QmpClient,
  qmpSocket: string,
  disks: readonly LiveDisk[],
): Promise<VmConfig> {
  // What QEMU refuses to tell (an old QEMU without the command, a device without the property)
  // is left out; a lost connection or a timeout is an error.
  const soft = async <T>(cmd: string, args?: Record<string, unknown>): Promise<T | undefined> =>
    qmp.execute<T>(cmd, args).catch((err: unknown) => {
      if (err instanceof QemuCommandError) return undefined;
      throw err;
    });
  const name = (await soft<{ name?: string }>("query-name"))?.name ?? null;
  const uuid = (await soft<{ UUID: string }>("query-uuid"))?.UUID ?? null;
  const cpus = (await soft<unknown[]>("query-cpus-fast"))?.length ?? 0;
  const memoryBytes =
    (await soft<{ "base-memory": number }>("query-memory-size-summary"))?.["base-memory"] ?? 0;
  const machine =
    (await soft<string>("qom-get", { path: "/machine", property: "type" }))?.replace(/-machine$/, "") ?? null;
  const nics: VmConfig["nics"] = [];
  const periph =
    (await soft<Array<{ name: string; type: string }>>("qom-list", { path: "/machine/peripheral" })) ?? [];
  for (const p of periph) {
    const type = /^child<(.+)>$/.exec(p.type)?.[1];
    if (!type || !/net|e1000|rtl8139|vmxnet/.test(type)) continue;
    const mac =
      (await soft<string>("qom-get", { path: `/machine/peripheral/${p.name}`, property: "mac" })) ?? null;
    nics.push({ id: p.name, type, mac });
  }
  const proc = await findQemuProcess(qmpSocket);
  const argv = proc?.argv ?? null;
  let firmware: string | null = null;
  if (argv) {
    const bios = argv.indexOf("-bios");
    if (bios >= 0) firmware = argv[bios + 1] ?? null;
    else if (argv.some((a) => /if=pflash|pflash0/.test(a))) firmware = "uefi (pflash)";
    else if (argv.includes("-kernel")) firmware = "direct kernel boot";
    else firmware = "seabios (default)";
  }
  return {
    kind: "qemu",
    name,
    uuid,
    machine,
    cpus,
    memoryBytes,
    disks: disks.map((d) => ({
      name: d.name,
      node: d.node,
      device: d.device,
      format: d.format,
      file: d.file,
      size: d.size,
    })),
    nics,
    firmware,
    commandLine: argv,
  };
}

export type LiveMode = "snapshot" | "pause";
export type QuiescePolicy = "require" | "try" | "off";

export interface CutOptions {
  qmp: QmpClient;
  qga?: QgaClient | undefined;
  record: StateRecord;
  vm: string;
  disks: readonly LiveDisk[];
  mode: LiveMode;
  quiesce: QuiescePolicy;
  /** Name of the checkpoint bitmap this backup starts. */
  newBitmap: string;
  /** Previous checkpoint bitmap per disk name, for disks whose bitmap is trusted. */
  previous: ReadonlyMap<string, string>;
  /** Granularity of new bitmaps, bytes (the repository's chunk size). */
  granularity: number;
  /** Directory for fleecing images and the NBD socket (QEMU must be able to write there). */
  workDir: string;
  /**
   * The backup block jobs' `speed` (bytes/s), the job's bandwidth limit. A sync=none job copies
   * only the old data of blocks the guest overwrites, which QEMU never delays for the rate; the
   * reads through the export are paced by Strata's reader at the same rate.
   */
  speed?: number;
  log: (message: string) => void;
  /** Deadline of fsfreeze, below Windows VSS's 10 s. */
  freezeTimeoutMs?: number;
}

export interface ViewExport {
  disk: LiveDisk;
  socket: string;
  exportName: string;
  /** Meta context of the changes since the previous checkpoint, when one is trusted. */
  dirtyContext?: string;
}

export interface PointInTimeView {
  consistency: "application-consistent" | "filesystem-consistent" | "paused" | "crash-consistent";
  exports: ViewExport[];
  /** How long the guest was frozen or paused around the cut, ms. */
  quiescedMs: number;
  frozen: number;
}

/** Runs `fn` with `item` recorded before it; release() strikes the item off. */
async function tracked(record: StateRecord, item: StateItem, fn: () => Promise<unknown>): Promise<void> {
  await record.add(item);
  await fn();
}

/**
 * Starts QEMU's NBD server on `socket` (`purpose`, and a `hint` when it can't, for the message).
 * Socket and server are in `record` first: QEMU removes its socket when the server stops, and if
 * QEMU dies first, release() removes the file.
 */
export async function startNbdServer(
  qmp: QmpClient,
  record: StateRecord,
  socket: string,
  purpose: string,
  hint: string,
): Promise<void> {
  await record.add({ kind: "file", path: socket });
  await record.add({ kind: "nbd-server", socket });
  await fs.rm(socket, { force: true });
  await qmp
    .execute("nbd-server-start", { addr: { type: "unix", data: { path: socket } } })
    .catch((err: unknown) => {
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `cannot start QEMU's NBD server ${purpose} (${describeError(err)}); ${hint}`,
        { cause: err },
      );
    });
}

/**
 * Runs `fn` with the VM paused (`stop` drains the guest's requests first), then resumes it. The
 * pause is in `record` meanwhile, so a Strata that dies inside it leaves a VM that release()
 * resumes. A VM that is not running is left as it is. `paused.ms` is set to how long the guest
 * stood still: from `stop` (its drain included) until `cont` returned; for a VM that was not
 * running, how long `fn` took.
 */
export async function whilePaused<T>(
  qmp: QmpClient,
  record: StateRecord,
  fn: () => Promise<T>,
  paused: { ms: number } = { ms: 0 },
): Promise<T> {
  const { running } = await qmp.execute<{ running: boolean }>("query-status");
  if (running) await record.add({ kind: "paused" });
  const t0 = Date.now();
  if (running) await qmp.execute("stop");
  try {
    return await fn();
  } finally {
    if (running) await qmp.execute("cont");
    paused.ms = Date.now() - t0;
    if (running) await record.remove({ kind: "paused" });
  }
}

export async function cutView(o: CutOptions): Promise<PointInTimeView> {
  const { qmp, record } = o;
  // Recorded paths are absolute (state.ts refuses others when it reads a record back).
  const workDir = resolve(o.workDir);
  const socket = join(workDir, `strata-nbd-${o.vm}.sock`);
  if (socket.length > 107)
    throw new StrataError(ErrorCode.USAGE, `state directory path too long for a socket: ${socket}`);
  try {
    await fs.mkdir(workDir, { recursive: true });
    // The fleecing images hold the old data of every block the guest overwrites during the
    // backup; in the worst case that is every disk whole. If the directory fills up, QEMU's
    // copy-before-write fails the guest's writes: say so before starting.
    const st = await fs.statfs(workDir);
    const free = st.bavail * st.bsize;
    const worst = o.disks.reduce((n, d) => n + d.size, 0);
    if (free < worst) {
      o.log(
        `${workDir} has ${Math.floor(free / 2 ** 20)} MiB free; the fleecing images can grow to ${Math.floor(worst / 2 ** 20)} MiB if the guest rewrites its disks during the backup`,
      );
    }
    // 1. Fleecing nodes.
    for (const d of o.disks) {
      const file = join(workDir, `strata-fleece-${o.vm}-${d.name}.qcow2`);
      await tracked(record, { kind: "file", path: file }, () =>
        runProgram("qemu-img", ["create", "-q", "-f", "qcow2", file, String(d.size)]),
      );
      await tracked(record, { kind: "node", node: names.fleeceNode(d.name) }, () =>
        qmp.execute("blockdev-add", {
          driver: "qcow2",
          "node-name": names.fleeceNode(d.name),
          file: { driver: "file", filename: file },
          backing: d.node,
          discard: "unmap",
        }),
      );
    }
    // 2. The transaction, recorded first.
    const actions: Array<{ type: string; data: Record<string, unknown> }> = [];
    for (const d of o.disks) {
      await record.add({ kind: "bitmap", node: d.node, name: o.newBitmap });
      actions.push({
        type: "block-dirty-bitmap-add",
        data: {
          node: d.node,
          name: o.newBitmap,
          persistent: d.format === "qcow2",
          granularity: o.granularity,
        },
      });
      const prev = o.previous.get(d.name);
      if (prev !== undefined) {
        const g = d.bitmaps.find((b) => b.name === prev)?.granularity ?? o.granularity;
        await record.add({ kind: "bitmap", node: d.node, name: names.tmpBitmap });
        actions.push({
          type: "block-dirty-bitmap-add",
          data: { node: d.node, name: names.tmpBitmap, persistent: false, disabled: true, granularity: g },
        });
        actions.push({
          type: "block-dirty-bitmap-merge",
          data: { node: d.node, target: names.tmpBitmap, bitmaps: [prev] },
        });
      }
      await record.add({ kind: "job", id: names.job(d.name) });
      actions.push({
        type: "blockdev-backup",
        data: {
          device: d.node,
          target: names.fleeceNode(d.name),
          sync: "none",
          "job-id": names.job(d.name),
          "auto-dismiss": true,
          ...(o.speed === undefined ? {} : { speed: Math.max(1, Math.round(o.speed)) }),
        },
      });
    }
    const { consistency, quiescedMs, frozen } = await quiesced(o, () =>
      qmp.execute("transaction", { actions }),
    );
    // 3. Exports. QEMU removes its socket when the server stops; if QEMU dies first, the socket
    // file stays: it is recorded, so that release() removes it either way.
    await startNbdServer(qmp, record, socket, "for the backup", "is another backup tool using it?");
    const exports: ViewExport[] = [];
    for (const d of o.disks) {
      const hasPrev = o.previous.has(d.name);
      await tracked(record, { kind: "export", id: names.exportId(d.name) }, () =>
        qmp.execute("block-export-add", {
          type: "nbd",
          id: names.exportId(d.name),
          "node-name": names.fleeceNode(d.name),
          name: d.name,
          writable: false,
          ...(hasPrev ? { bitmaps: [names.tmpBitmap] } : {}),
        }),
      );
      exports.push({
        disk: d,
        socket,
        exportName: d.name,
        ...(hasPrev ? { dirtyContext: `qemu:dirty-bitmap:${names.tmpBitmap}` } : {}),
      });
    }
    return { consistency, exports, quiescedMs, frozen };
  } catch (err) {
    await release(qmp, o.qga, record, o.log, { success: false }).catch((e: unknown) =>
      o.log(`cleanup after a failed cut: ${String(e)}`),
    );
    throw err;
  }
}

/** Freezes (agent) or pauses the guest around `cut`, and always undoes it. */
async function quiesced(
  o: CutOptions,
  cut: () => Promise<unknown>,
): Promise<{ consistency: PointInTimeView["consistency"]; quiescedMs: number; frozen: number }> {
  const { qmp, record } = o;
  if (o.mode === "pause") {
    const paused = { ms: 0 };
    await whilePaused(qmp, record, cut, paused);
    return { consistency: "paused", quiescedMs: paused.ms, frozen: 0 };
  }
  let frozen = 0;
  let windows = false;
  if (o.quiesce !== "off") {
    if (!o.qga) {
      if (o.quiesce === "require") {
        throw new StrataError(
          ErrorCode.USAGE,
          `--quiesce require needs the guest agent socket (qmp:...,qga=PATH)`,
        );
      }
      o.log("no guest agent given: the restore point is crash-consistent");
    } else {
      try {
        await o.qga.ping({ timeoutMs: 3000 });
        // An agent without guest-get-osinfo (or with it disabled) refuses it: not Windows.
        const os = await o.qga
          .execute<{ id?: string }>("guest-get-osinfo", undefined, { timeoutMs: 3000 })
          .catch((err: unknown) => {
            if (err instanceof QemuCommandError) return {} as { id?: string };
            throw err;
          });
        windows = os.id === "mswindows";
        await record.add({ kind: "freeze" });
        frozen = await o.qga.fsfreezeFreeze({ timeoutMs: o.freezeTimeoutMs ?? 8000 });
      } catch (err) {
        await thaw(o.qga, record, o.log);
        if (o.quiesce === "require") {
          throw new StrataError(
            ErrorCode.EXTERNAL,
            `cannot freeze the guest's filesystems: ${err instanceof Error ? err.message : String(err)}`,
          );
        }
        o.log(
          `guest agent did not freeze (${err instanceof Error ? err.message : String(err)}): the restore point is crash-consistent`,
        );
        frozen = -1;
      }
    }
  }
  const t0 = Date.now();
  try {
    await cut();
  } finally {
    if (frozen >= 0 && o.qga && record.items.some((i) => i.kind === "freeze"))
      await thaw(o.qga, record, o.log);
  }
  const quiescedMs = Date.now() - t0;
  if (frozen > 0)
    return { consistency: windows ? "application-consistent" : "filesystem-consistent", quiescedMs, frozen };
  if (frozen === 0 && o.qga && o.quiesce !== "off")
    o.log("the guest agent froze no filesystem: the restore point is crash-consistent");
  return { consistency: "crash-consistent", quiescedMs, frozen: Math.max(frozen, 0) };
}

/** Thaws the guest, retrying, and strikes the freeze off only once the agent says thawed. */
export async function thaw(qga: QgaClient, record: StateRecord, log: (m: string) => void): Promise<void> {
  for (let attempt = 1; attempt <= 5; attempt++) {
    try {
      await qga.fsfreezeThaw({ timeoutMs: 5000 });
      if ((await qga.fsfreezeStatus({ timeoutMs: 5000 })) === "thawed") {
        await record.remove({ kind: "freeze" });
        return;
      }
    } catch (err) {
      log(`thaw attempt ${attempt} failed: ${err instanceof Error ? err.message : String(err)}`);
    }
  }
  throw new StrataError(
    ErrorCode.EXTERNAL,
    `the guest's filesystems could not be thawed: run "strata doctor --fix" now`,
  );
}

/** The kinds of QMP answer release() asks for before each step. */
interface QueryJob {
  id: string;
  type: string;
  status: string;
}
interface NamedNode {
  "node-name": string;
  "dirty-bitmaps"?: Array<{ name?: string }>;
}

/**
 * What QEMU holds right now of what Strata makes. Each teardown step asks first: something
 * absent is struck off the record without a command; something present gets its command, and any
 * error of that command is an error (QEMU 7.2 reports most of them as GenericError, so the error
 * alone can't tell "already gone" from a real failure).
 */
export const present = {
  async export(qmp: QmpClient, id: string): Promise<boolean> {
    return (await qmp.execute<Array<{ id: string }>>("query-block-exports")).some((e) => e.id === id);
  },
  async job(qmp: QmpClient, id: string): Promise<QueryJob | undefined> {
    return (await qmp.execute<QueryJob[]>("query-jobs")).find((j) => j.id === id);
  },
  async node(qmp: QmpClient, node: string): Promise<NamedNode | undefined> {
    const nodes = await qmp.execute<NamedNode[]>("query-named-block-nodes", { flat: true });
    return nodes.find((n) => n["node-name"] === node);
  },
  async bitmap(qmp: QmpClient, node: string, name: string): Promise<boolean> {
    const n = await present.node(qmp, node);
    return (n?.["dirty-bitmaps"] ?? []).some((b) => b.name === name);
  },
  /**
   * Whether QEMU's NBD server listens on `socket` (QMP has no query for the server): a listing
   * over NBD answers; a socket that accepts nothing means no server there.
   */
  async nbdServer(socket: string): Promise<boolean> {
    try {
      await NbdClient.listExports({ path: socket }, { timeoutMs: 10_000 });
      return true;
    } catch (err) {
      if (!(await socketAccepts(socket))) return false;
      throw err;
    }
  },
};

const sleepMs = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function waitJobGone(qmp: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (!(await present.job(qmp, id))) return;
    await sleepMs(25);
  }
  throw new StrataError(ErrorCode.TIMEOUT, `block job ${id} did not end within 10 s`);
}

async function waitExportGone(qmp: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (!(await present.export(qmp, id))) return;
    await sleepMs(25);
  }
  throw new StrataError(ErrorCode.TIMEOUT, `NBD export ${id} was still there 10 s after block-export-del`);
}

/** The socket of the NBD server a record lists (records written before it was kept: the default). */
export function nbdSocketOf(record: StateRecord, item: Extract<StateItem, { kind: "nbd-server" }>): string {
  return item.socket ?? join(dirname(record.path), `strata-nbd-${record.data.vm}.sock`);
}

function label(i: StateItem): string {
  switch (i.kind) {
    case "file":
      return `file ${i.path}`;
    case "node":
      return `node ${i.node}`;
    case "job":
      return `job ${i.id}`;
    case "export":
      return `export ${i.id}`;
    case "bitmap":
      return `bitmap ${i.name} on ${i.node}`;
    case "nbd-server":
      return `NBD server${i.socket ? ` ${i.socket}` : ""}`;
    default:
      return i.kind;
  }
}

/**
 * Releases everything `record` lists, in the safe order: thaw and resume first, then exports,
 * NBD server, jobs, nodes, files, temporary bitmaps. `success` decides which checkpoint bitmap
 * stays: the new one (success) or the previous one (failure). Before each step QEMU is asked
 * whether the item is still there (see {@link present}); the errors of the steps are collected
 * and thrown together, the first one as the cause, and the record is kept.
 */
export async function release(
  qmp: QmpClient | undefined,
  qga: QgaClient | undefined,
  record: StateRecord,
  log: (m: string) => void,
  how: { success: boolean; previous?: ReadonlyMap<string, string>; disks?: readonly LiveDisk[] },
): Promise<void> {
  const errors: Array<{ item: string; err: unknown }> = [];
  /** `fn` runs only when `exists()` says the item is there; either way it is then struck off. */
  const step = async (item: StateItem, exists: () => Promise<boolean>, fn: () => Promise<unknown>) => {
    try {
      if (await exists()) await fn();
      await record.remove(item);
    } catch (err) {
      errors.push({ item: label(item), err });
    }
  };
  const items = [...record.items];
  const of = <K extends StateItem["kind"]>(k: K) =>
    items.filter((i): i is Extract<StateItem, { kind: K }> => i.kind === k);
  const live = qmp !== undefined && !qmp.closed;
  if (live && of("freeze").length > 0) {
    if (qga) await thaw(qga, record, log).catch((err: unknown) => errors.push({ item: "freeze", err }));
    else errors.push({ item: "freeze", err: "the guest may be frozen and no guest agent socket is known" });
  }
  if (live) {
    for (const i of of("paused")) {
      await step(
        i,
        async () => {
          const st = await qmp.execute<{ status: string; running: boolean }>("query-status");
          if (!st.running && st.status !== "paused")
            log(`the VM is ${st.status}, not paused: Strata does not resume it`);
          return st.status === "paused";
        },
        () => qmp.execute("cont"),
      );
    }
    for (const i of of("export")) {
      await step(
        i,
        () => present.export(qmp, i.id),
        async () => {
          await qmp.execute("block-export-del", { id: i.id, mode: "hard" });
          await waitExportGone(qmp, i.id);
        },
      );
    }
    for (const i of of("nbd-server"))
      await step(
        i,
        () => present.nbdServer(nbdSocketOf(record, i)),
        () => qmp.execute("nbd-server-stop"),
      );
    for (const i of of("job")) {
      let job: QueryJob | undefined;
      await step(
        i,
        async () => {
          job = await present.job(qmp, i.id);
          return job !== undefined;
        },
        async () => {
          if (job?.status === "concluded") await qmp.execute("job-dismiss", { id: i.id });
          else if (job?.status !== "aborting" && job?.status !== "null")
            await qmp.execute("block-job-cancel", { device: i.id, force: true });
          await waitJobGone(qmp, i.id);
        },
      );
    }
    for (const i of of("node"))
      await step(
        i,
        async () => (await present.node(qmp, i.node)) !== undefined,
        () => qmp.execute("blockdev-del", { "node-name": i.node }),
      );
    for (const i of of("bitmap")) {
      const keep = how.success && i.name !== names.tmpBitmap;
      if (keep) {
        await record.remove(i);
        continue;
      }
      await step(
        i,
        () => present.bitmap(qmp, i.node, i.name),
        () => qmp.execute("block-dirty-bitmap-remove", { node: i.node, name: i.name }),
      );
    }
    if (how.success && how.previous && how.disks) {
      for (const d of how.disks) {
        const prev = how.previous.get(d.name);
        if (prev === undefined) continue;
        try {
          if (await present.bitmap(qmp, d.node, prev))
            await qmp.execute("block-dirty-bitmap-remove", { node: d.node, name: prev });
        } catch (e) {
          // The new checkpoint is in place; an old bitmap left over only costs space.
          log(`could not remove the previous checkpoint bitmap ${prev} of ${d.name}: ${describeError(e)}`);
        }
      }
    }
  } else {
    // QEMU is gone: nothing of ours can be left inside it. Strike off everything but files.
    for (const i of items.filter((x) => x.kind !== "file" && x.kind !== "restart")) {
      await record.remove(i);
    }
  }
  const always = async () => true;
  for (const i of of("file")) await step(i, always, () => fs.rm(i.path, { force: true }));
  for (const i of of("restart")) await step(i, always, () => restartVm(i.argv, record.data.qmp));
  if (errors.length > 0) {
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `cleanup left work undone (state kept in ${record.path}): ${errors
        .map((e) => `${e.item}: ${describeError(e.err)}`)
        .join("; ")}`,
      { cause: errors[0]!.err },
    );
  }
  await record.finish();
}
