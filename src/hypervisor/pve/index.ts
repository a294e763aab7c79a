/**
 * The Proxmox VE adapter: `pve:VMID`.
 *
 * A Proxmox VM is a QEMU process that qemu-server starts from `/etc/pve/qemu-server/VMID.conf`,
 * with its QMP monitor at `/var/run/qemu-server/VMID.qmp` and its guest agent at `VMID.qga`.
 * Strata backs it up exactly like any QEMU VM (the QEMU session of hypervisor/qemu/session.ts:
 * one transaction cuts every disk, short QMP connections, checkpoint bitmaps) and keeps the
 * VM's own configuration with the restore point: a {@link PveConfigDocument} holding VMID.conf
 * byte for byte, its disks named by their configuration keys (`scsi0`, `virtio0`, `efidisk0`,
 * which are also the names QEMU's device ids give them: qemu-server names the drives
 * `drive-scsi0` and the devices `scsi0`), and the QEMU document of the running process.
 * A VM that is shut off is backed up in offline mode from its volumes, read as they are
 * (crash-consistent: nothing says how it was stopped). Strata never shuts a Proxmox VM down
 * itself: qemu-server would not know, and could not start it again as it was.
 *
 * Restore plans a Proxmox VM again: in place (same VMID, each disk back onto the volume its
 * storage maps it to, VMID.conf rewritten only when a path changes) or as a clone with a new VMID
 * (the next free one, or `--name VMID`), new MACs, smbios1 UUID and vmgenid, and volumes renamed
 * for the new VMID in the target directory (as volumes of a dir storage when the directory is
 * one, else as absolute paths). `define` writes the new VMID.conf and never overwrites one.
 * Strata does not start Proxmox VMs: qemu-server does (`qm start VMID`, the plan's start hint).
 *
 * The root (`/` on a Proxmox host) is a constructor option, so that tests run against fixture
 * directories standing in for /etc/pve and /var/run/qemu-server.
 */
import { existsSync, promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import { NAME_RE } from "../../repo/format.js";
import { ErrorCode, isNotFound, StrataError } from "../../util/errors.js";
import { socketAccepts } from "../../util/process.js";
import type {
  BackupRequest,
  BackupSession,
  PlannedDisk,
  RestorePlan,
  RestorePlanOptions,
  VmAdapter,
  VmConfigDocument,
  VmHandle,
  VmSummary,
} from "../adapter.js";
import { openFileDisks } from "../images/index.js";
import { inspectVm, strayFiles } from "../qemu/doctor.js";
import { QmpClient } from "../qemu/qmp.js";
import { openQemuSession, type QemuTarget } from "../qemu/session.js";
import { qemuProcessesUsing } from "../qemu/start.js";
import { cloneConf, nextFreeVmid, renameVolume, rewriteVolumes, usedVmids } from "./clone.js";
import { PveConf } from "./conf.js";
import { buildDocument, checkDocument, drives, identity, type PveConfigDocument, VMID_RE } from "./model.js";
import { parseStorageCfg, resolveVolume, type Storage } from "./storage.js";

export { PveConf } from "./conf.js";
export { checkDocument, type PveConfigDocument } from "./model.js";

export interface PveAdapterOptions {
  /** The host's root: `/` on Proxmox VE; a fixture directory in tests. */
  root?: string;
}

/**
 * What define does with VMID.conf: write a clone's new one (`create`), put back a deleted VM's
 * (`restore`), rewrite an existing one whose disk paths changed (`rewrite`), or nothing (`keep`:
 * in place, paths unchanged, the configuration there; `none`: one disk).
 */
type ConfAction = "create" | "restore" | "rewrite" | "keep" | "none";

const DNS_NAME_RE = /^(?=.{1,63}$)[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$/;

export class PveAdapter implements VmAdapter {
  readonly id = "pve";
  readonly schemes = ["pve"] as const;
  readonly usage = "pve:VMID (a Proxmox VE VM)";
  readonly etcPve: string;
  readonly runDir: string;

  constructor(o: PveAdapterOptions = {}) {
    const root = resolve(o.root ?? "/");
    this.etcPve = join(root, "etc", "pve");
    this.runDir = join(root, "var", "run", "qemu-server");
  }

  confPath(vmid: number): string {
    return join(this.etcPve, "qemu-server", `${vmid}.conf`);
  }

  qmpSocket(vmid: number): string {
    return join(this.runDir, `${vmid}.qmp`);
  }

  qgaSocket(vmid: number): string {
    return join(this.runDir, `${vmid}.qga`);
  }

  /** VMID.conf, parsed; NOT_FOUND when the VM does not exist. */
  async readConf(vmid: number): Promise<PveConf> {
    const path = this.confPath(vmid);
    let buf: Buffer;
    try {
      buf = await fs.readFile(path);
    } catch (err) {
      if (isNotFound(err))
        throw new StrataError(ErrorCode.NOT_FOUND, `no Proxmox VM ${vmid}: ${path} does not exist`);
      throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `cannot read ${path}: ${(err as Error).message}`);
    }
    return PveConf.parse(buf, { where: path });
  }

  /** storage.cfg, parsed (empty when the file does not exist). */
  async storages(): Promise<Map<string, Storage>> {
    const path = join(this.etcPve, "storage.cfg");
    let text: string;
    try {
      text = await fs.readFile(path, "utf8");
    } catch (err) {
      if (isNotFound(err)) return new Map();
      throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `cannot read ${path}: ${(err as Error).message}`);
    }
    return parseStorageCfg(text, path);
  }

  parseVmid(uri: string): number {
    const m = /^pve:(\d+)$/.exec(uri);
    if (!m || !VMID_RE.test(m[1]!))
      throw new StrataError(ErrorCode.USAGE, `bad source "${uri}": ${this.usage}, VMID 100 to 999999999`);
    return Number(m[1]);
  }

  async resolve(uri: string): Promise<VmHandle> {
    const vmid = this.parseVmid(uri);
    const conf = await this.readConf(vmid);
    const name = conf.get("name");
    return {
      adapter: this,
      source: uri,
      defaultName: name !== undefined && NAME_RE.test(name) ? name : `vm-${vmid}`,
      openBackup: (request) => this.openBackup(vmid, request),
      leftovers: async (vm, stateDir, fix) => [
        ...(await inspectVm({ vm, ...this.target(vmid) }, fix, stateDir)),
        ...(await strayFiles(stateDir, fix)),
      ],
    };
  }

  /** VMID's QMP socket, and its agent's when qemu-server made one (`agent: 1`). */
  target(vmid: number): QemuTarget {
    const qga = this.qgaSocket(vmid);
    return { qmp: this.qmpSocket(vmid), ...(existsSync(qga) ? { qga } : {}) };
  }

  /**
   * A backup session of VM `vmid`: the QEMU session of its running process, with the
   * configuration document replaced by the Proxmox one (VMID.conf as it was when the backup
   * started, disks named by their configuration keys, the QEMU document inside). A VM that is
   * shut off is read from its volumes in offline mode (crash-consistent: Strata can't tell how
   * it was stopped).
   */
  async openBackup(vmid: number, request: BackupRequest): Promise<BackupSession> {
    const conf = await this.readConf(vmid);
    const text = conf.toString();
    const storages = await this.storages().catch((err: unknown) => {
      request.log(`${(err as Error).message}: volumes are recorded without their storage`);
      return new Map<string, Storage>();
    });
    const target = this.target(vmid);
    if (!(await socketAccepts(target.qmp))) {
      if (request.mode === "offline") return this.openStopped(vmid, text, conf, storages, request);
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `Proxmox VM ${vmid}${conf.get("name") ? ` (${conf.get("name")})` : ""} is not running: no QEMU answers on ${target.qmp}; back it up with --mode offline, or start it ("qm start ${vmid}")`,
      );
    }
    if (request.mode === "offline")
      throw new StrataError(
        ErrorCode.USAGE,
        `Proxmox VM ${vmid} is running: Strata does not shut down Proxmox VMs (qemu-server would not know); use --mode snapshot or pause, or stop it first ("qm shutdown ${vmid}")`,
      );
    const session = await openQemuSession(request.vm, target, request);
    let config: PveConfigDocument;
    try {
      const qemu = session.config;
      config = buildDocument(
        vmid,
        text,
        conf,
        storages,
        qemu ? { doc: qemu, disks: qemu.disks } : null,
        request.log,
      );
      const named = new Set(config.disks.map((d) => d.name));
      const unnamed = session.disks.filter((d) => !named.has(d.name)).map((d) => d.name);
      if (unnamed.length === session.disks.length)
        throw new StrataError(
          ErrorCode.SOURCE_UNREADABLE,
          `no disk of the QEMU process on ${target.qmp} (${unnamed.join(", ")}) is a drive of ${this.confPath(vmid)}: is it Proxmox VM ${vmid}?`,
        );
    } catch (err) {
      await session.finish(false);
      throw err;
    }
    // Disks marked `backup=0` stay out of the restore point, as vzdump leaves them out. The
    // checkpoint record keeps them, so that their bitmaps are handed over like the others' and
    // none piles up; a disk later included is read whole (the restore point before has none).
    const skipped = new Set(
      drives(conf)
        .filter((d) => !d.backup)
        .map((d) => d.key),
    );
    for (const d of session.disks.filter((x) => skipped.has(x.name)))
      request.log(`${d.name} (${d.source}) has backup=0 in ${this.confPath(vmid)}: not backed up`);
    config.disks = config.disks.filter((d) => !skipped.has(d.name));
    const disks = session.disks.filter((d) => !skipped.has(d.name));
    if (disks.length === 0) {
      await session.finish(false);
      throw new StrataError(
        ErrorCode.USAGE,
        `every disk of Proxmox VM ${vmid} has backup=0: there is nothing to back up`,
      );
    }
    return {
      disks,
      mode: session.mode,
      consistency: session.consistency,
      checkpoint: session.checkpoint,
      config,
      details: { ...session.details, vmid },
      finish: (ok) => session.finish(ok),
    };
  }

  /** A VM that is shut off: its volumes read as they are. */
  private async openStopped(
    vmid: number,
    text: string,
    conf: PveConf,
    storages: ReadonlyMap<string, Storage>,
    request: BackupRequest,
  ): Promise<BackupSession> {
    const config = buildDocument(vmid, text, conf, storages, null, request.log);
    const skipped = drives(conf).filter((d) => !d.backup);
    for (const d of skipped) request.log(`${d.key} (${d.volume}) has backup=0: not backed up`);
    config.disks = config.disks.filter((d) => !skipped.some((x) => x.key === d.name));
    if (config.disks.length === 0)
      throw new StrataError(ErrorCode.USAGE, `Proxmox VM ${vmid} has no disk to back up`);
    const readable = config.disks.filter((d) => d.file.startsWith("/"));
    if (readable.length === 0)
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `Proxmox VM ${vmid} is shut off and none of its disks is on a storage Strata can read (${config.disks.map((d) => d.volume).join(", ") || "no disks"})`,
      );
    if (readable.length < config.disks.length)
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `Proxmox VM ${vmid} is shut off and disks ${config.disks
          .filter((d) => !readable.includes(d))
          .map((d) => `${d.name} (${d.volume})`)
          .join(", ")} are on storages Strata can't read: start the VM for a live backup`,
      );
    for (const d of readable) {
      if (d.storageType?.startsWith("lvm") && !existsSync(d.file))
        throw new StrataError(
          ErrorCode.SOURCE_UNREADABLE,
          `Proxmox VM ${vmid} is shut off and the logical volume of ${d.name} (${d.volume}) is not active: ${d.file} does not exist (activate it with "lvchange -ay ${d.file.slice(5)}")`,
        );
    }
    const opened = await openFileDisks(
      readable.map((d) => ({ path: d.file, name: d.name, format: d.format })),
    );
    config.disks = config.disks.map((d) => {
      const o = opened.find((x) => x.name === d.name)!;
      return { ...d, format: /^(raw|qcow2|vmdk)$/.test(o.format) ? o.format : d.format, size: o.size };
    });
    let closing: Promise<void> | undefined;
    request.log(`Proxmox VM ${vmid} is shut off: its disks are read as they are (crash-consistent)`);
    return {
      disks: opened.map((d) => ({
        name: d.name,
        source: d.source,
        size: d.size,
        read: (offset: number, length: number, into?: Buffer) => d.read(offset, length, into),
        ...(d.allocation ? { allocation: d.allocation.bind(d) } : {}),
      })),
      mode: "offline",
      consistency: "crash-consistent",
      checkpoint: null,
      config,
      details: { vmid },
      finish: () => {
        closing ??= Promise.all(opened.map((d) => d.close().catch(() => {}))).then(() => {});
        return closing;
      },
    };
  }

  /** Whether VMID's QEMU runs: its QMP socket answers, and `query-status` says how. */
  async state(vmid: number): Promise<VmSummary["state"]> {
    const socket = this.qmpSocket(vmid);
    if (!(await socketAccepts(socket))) return "shut off";
    let qmp: QmpClient | undefined;
    try {
      qmp = await QmpClient.connect(socket, { connectTimeoutMs: 3000 });
      const s = await qmp.execute<{ running: boolean; status: string }>("query-status", undefined, {
        timeoutMs: 3000,
      });
      return s.running ? "running" : "paused";
    } catch {
      // Another client holds the monitor (QEMU serves one at a time), or it is going away.
      return "unknown";
    } finally {
      await qmp?.close().catch(() => {});
    }
  }

  async list(): Promise<VmSummary[]> {
    const dir = join(this.etcPve, "qemu-server");
    const files = await fs.readdir(dir).catch((err: unknown) => {
      if (isNotFound(err)) return [] as string[];
      throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `cannot list ${dir}: ${(err as Error).message}`);
    });
    const ids = files
      .flatMap((f) => (/^[1-9]\d{2,8}\.conf$/.test(f) ? [Number(f.slice(0, -5))] : []))
      .sort((a, b) => a - b);
    const out: VmSummary[] = [];
    for (const vmid of ids) {
      let name = `vm-${vmid}`;
      try {
        name = (await this.readConf(vmid)).get("name") ?? name;
      } catch {
        // Listed all the same; a backup of it says what is wrong with its configuration.
      }
      out.push({ adapter: this.id, source: `pve:${vmid}`, name, state: await this.state(vmid) });
    }
    return out;
  }

  parseConfig(doc: VmConfigDocument): PveConfigDocument {
    return checkDocument(doc);
  }

  async planRestore(config: VmConfigDocument, o: RestorePlanOptions): Promise<RestorePlan> {
    const doc = checkDocument(config);
    const conf = PveConf.parse(doc.conf, { where: `of VM ${doc.vmid}`, code: ErrorCode.DATA_CORRUPT });
    const inRepo = new Map(o.available.map((d) => [d.name, d.size]));
    let disks = doc.disks.filter((d) => inRepo.has(d.name));
    if (o.disk !== undefined) {
      disks = disks.filter((d) => d.name === o.disk);
      if (disks.length === 0)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `the restore point has no disk "${o.disk}" (it has: ${[...inRepo.keys()].join(", ")})`,
        );
    }
    const storages = await this.storages();
    const warnings: string[] = [];
    for (const d of drives(conf)) {
      if (
        d.media === "disk" &&
        d.volume !== "none" &&
        !disks.some((x) => x.name === d.key) &&
        o.disk === undefined
      )
        warnings.push(`${d.key} (${d.volume}) is not in the restore point and is not restored`);
    }
    const formatOf = (d: (typeof disks)[number]): "raw" | "qcow2" =>
      o.format ?? (d.format === "qcow2" ? "qcow2" : "raw");
    const planned: PlannedDisk[] = [];
    const volumes = new Map<string, { volume: string; format: string }>();
    let vmid = doc.vmid;
    let action: ConfAction;
    let text: string;
    let result: PveConfigDocument;

    if (o.target === undefined) {
      // In place: each disk onto the volume its storage maps it to now.
      for (const d of disks) {
        const fmt = formatOf(d);
        const conflict = (why: string): never => {
          throw new StrataError(
            ErrorCode.TARGET_CONFLICT,
            `disk ${d.name} (${d.volume}) can't be restored in place: ${why}; restore it as a clone with --target DIR`,
          );
        };
        let r: ReturnType<typeof resolveVolume>;
        try {
          r = resolveVolume(storages, d.volume);
        } catch (err) {
          return conflict((err as Error).message);
        }
        if (r.kind === "unhandled") return conflict(r.reason);
        if (r.storage === null && !insideStorage(r.path, storages)) {
          // A path outside every storage comes only from the document: it could name any file.
          const st = await fs.stat(r.path).catch(() => undefined);
          if (!r.path.startsWith("/dev/") || !st?.isBlockDevice())
            conflict(
              `${r.path} is neither a block device nor inside a file storage of storage.cfg, and Strata does not write to other paths a stored configuration names`,
            );
        }
        let path = r.path;
        let volume = d.volume;
        const block = r.storage !== null && /^lvm/.test(r.storage.type);
        if (block) {
          if (fmt !== "raw")
            throw new StrataError(
              ErrorCode.USAGE,
              `disk ${d.name} lives on ${r.storage!.type} storage ${r.storage!.id}, which holds raw volumes only: leave out --format qcow2`,
            );
          const st = await fs.stat(path).catch(() => undefined);
          if (!st?.isBlockDevice())
            conflict(
              `its logical volume ${path} does not exist; create it first (lvcreate -n ${path.split("/").at(-1)} -L ${d.size}b ${path.split("/")[2]}${r.storage!.type === "lvmthin" ? ` --thinpool ${r.storage!.props.get("thinpool") ?? "data"}` : ""})`,
            );
        } else if (r.format !== undefined && r.format !== fmt) {
          // A file whose name says its format: the restored file gets the new format's name.
          volume = d.volume.replace(/\.(raw|qcow2|vmdk)$/, `.${fmt}`);
          path = path.replace(/\.(raw|qcow2|vmdk)$/, `.${fmt}`);
          volumes.set(d.name, { volume, format: fmt });
        } else if (r.format === undefined && d.format !== fmt) {
          volumes.set(d.name, { volume, format: fmt });
        }
        planned.push({ name: d.name, format: fmt, path, size: d.size });
      }
      if (volumes.size > 0) {
        const rw = rewriteVolumes(conf, volumes);
        warnings.push(...rw.warnings);
        text = rw.conf.toString();
        action = "rewrite";
      } else {
        text = doc.conf;
        const exists = await fs.stat(this.confPath(vmid)).then(
          () => true,
          () => false,
        );
        action = exists ? "keep" : "restore";
        const current = exists ? await this.readConf(vmid).catch(() => undefined) : undefined;
        const snaps = current?.snapshots() ?? [];
        const uuid = current && identity(current).uuid;
        if (uuid && doc.uuid && uuid !== doc.uuid)
          warnings.push(
            `${this.confPath(vmid)} now describes another VM (smbios1 UUID ${uuid}, the restore point's is ${doc.uuid}): its disks are the ones overwritten`,
          );
        if (snaps.length > 0)
          warnings.push(
            `${this.confPath(vmid)} lists snapshots (${snaps.join(", ")}) that the restored disks no longer hold: remove them with "qm delsnapshot ${vmid} NAME --force"`,
          );
      }
      result = {
        ...doc,
        disks: doc.disks.map((d) => {
          const p = planned.find((x) => x.name === d.name);
          const v = volumes.get(d.name);
          return p ? { ...d, file: p.path, format: p.format, ...(v ? { volume: v.volume } : {}) } : d;
        }),
        conf: text,
      };
    } else {
      // A clone: a new VMID, identity and volumes.
      const wanted = o.name;
      if (wanted !== undefined && /^\d+$/.test(wanted)) {
        if (!VMID_RE.test(wanted))
          throw new StrataError(ErrorCode.USAGE, `VMID ${wanted} is out of range (100 to 999999999)`);
        vmid = Number(wanted);
        if ((await usedVmids(this.etcPve)).includes(vmid))
          throw new StrataError(
            ErrorCode.TARGET_CONFLICT,
            `VMID ${vmid} is taken on this Proxmox host or cluster: choose a free one, or leave out --name for the next free one`,
          );
      } else vmid = await nextFreeVmid(this.etcPve);
      const name =
        wanted !== undefined && !/^\d+$/.test(wanted) ? wanted : `${doc.name ?? `vm-${doc.vmid}`}-restored`;
      if (!DNS_NAME_RE.test(name))
        throw new StrataError(
          ErrorCode.USAGE,
          `"${name}" is not a valid Proxmox VM name (a DNS name: letters, digits, '-' and '.')`,
        );
      const target = resolve(o.target);
      // A dir storage's own directory (or its images/VMID): the clone's disks become its volumes.
      const store = [...storages.values()].find((s) => {
        const p = s.props.get("path");
        return (
          /^(dir|nfs|cifs)$/.test(s.type) &&
          p !== undefined &&
          (resolve(p) === target || resolve(p, "images", String(vmid)) === target)
        );
      });
      const dir = store ? resolve(store.props.get("path")!, "images", String(vmid)) : target;
      const taken = new Set<string>();
      for (const d of disks) {
        const fmt = formatOf(d);
        const file = `${renameVolume(d.volume, vmid, taken)}.${fmt}`;
        const path = join(dir, file);
        volumes.set(d.name, { volume: store ? `${store.id}:${vmid}/${file}` : path, format: fmt });
        planned.push({ name: d.name, format: fmt, path, size: d.size });
      }
      if (!store)
        warnings.push(
          `${target} is not the directory of a dir storage in storage.cfg: the clone's disks are absolute paths, which Proxmox does not manage (move them with "qm disk move ${vmid} DISK STORAGE")`,
        );
      const c = cloneConf(conf, { vmid, name, volumes });
      warnings.push(...c.warnings);
      text = c.conf.toString();
      action = "create";
      result = {
        ...doc,
        vmid,
        name,
        uuid: c.uuid,
        disks: doc.disks.flatMap((d) => {
          const p = planned.find((x) => x.name === d.name);
          const v = volumes.get(d.name)!;
          return p
            ? [
                {
                  ...d,
                  file: p.path,
                  format: p.format,
                  volume: v.volume,
                  storage: store?.id ?? null,
                  storageType: store?.type ?? null,
                },
              ]
            : [];
        }),
        nics: doc.nics.map((n) => ({ ...n, mac: c.macs.get(n.id) ?? n.mac })),
        conf: text,
        qemu: null,
      };
    }
    const file = this.confPath(vmid);
    const confAction: ConfAction = o.disk === undefined ? action : "none";
    return {
      kind: "pve",
      clone: o.target !== undefined,
      config: result,
      disks: planned,
      definition: {
        text,
        mediaType: "text/x-proxmox-qemu-server-conf",
        // The file only when the restore writes it.
        ...(confAction === "keep" || confAction === "none" ? {} : { file }),
      },
      warnings,
      startHint: `qm start ${vmid}`,
      vmid,
      confAction,
    };
  }

  /** Refuses when the VM the plan restores (or the clone's VMID) runs. */
  async refuseIfRunning(plan: RestorePlan): Promise<void> {
    const vmid = planVmid(plan);
    const socket = this.qmpSocket(vmid);
    if (await socketAccepts(socket))
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `Proxmox VM ${vmid} is running (its QMP socket ${socket} answers): stop it first ("qm stop ${vmid}"); --force never overwrites the disks of a running VM`,
      );
    const procs = await qemuProcessesUsing([...plan.disks.map((d) => d.path), socket]);
    if (procs.length > 0)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `QEMU process ${procs[0]!.pid} is using ${procs[0]!.path}: stop that VM first; --force never overwrites the disks of a running VM`,
      );
  }

  /**
   * Writes VMID.conf: a clone's always as a new file (never over an existing one, --force or
   * not); in place only when it is missing, or when the restore changed disk paths (then over
   * the existing one with `force`).
   */
  async define(plan: RestorePlan, force: boolean): Promise<void> {
    const vmid = planVmid(plan);
    const action = plan.confAction;
    if (
      action !== "create" &&
      action !== "restore" &&
      action !== "rewrite" &&
      action !== "keep" &&
      action !== "none"
    )
      throw new StrataError(ErrorCode.INTERNAL, `not a Proxmox restore plan (confAction ${String(action)})`);
    if (action === "none" || action === "keep") return;
    const file = this.confPath(vmid);
    const text = plan.definition.text;
    PveConf.parse(text, { where: file, code: ErrorCode.INTERNAL });
    if (action === "create" && (await usedVmids(this.etcPve)).includes(vmid))
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `VMID ${vmid} was taken meanwhile (${file} or another node's configuration exists): restore again for the next free VMID`,
      );
    const exists = await fs.stat(file).then(
      () => true,
      () => false,
    );
    if (action === "rewrite" && exists && !force)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `${file} exists and the restored disks have other paths: use --force to rewrite it`,
      );
    await fs.mkdir(join(this.etcPve, "qemu-server"), { recursive: true });
    try {
      await fs.writeFile(file, text, { flag: action === "rewrite" ? "w" : "wx" });
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code === "EEXIST")
        throw new StrataError(
          ErrorCode.TARGET_CONFLICT,
          `${file} exists: Strata never overwrites a Proxmox VM's configuration`,
        );
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `cannot write ${file}: ${(err as Error).message}`);
    }
  }

  /** "pve": the VMID.conf text; "json": the document. */
  renderConfig(config: VmConfigDocument, as: string): string {
    const doc = checkDocument(config);
    if (as === "pve") return doc.conf;
    if (as === "json") return `${JSON.stringify(doc, null, 2)}\n`;
    throw new StrataError(ErrorCode.USAGE, `a Proxmox VM's configuration renders as pve or json, not ${as}`);
  }
}

/** Whether `path` lies inside the directory of a file storage (dir, nfs, cifs). */
function insideStorage(path: string, storages: ReadonlyMap<string, Storage>): boolean {
  const p = resolve(path);
  for (const s of storages.values()) {
    const dir = s.props.get("path");
    if (/^(dir|nfs|cifs)$/.test(s.type) && dir?.startsWith("/") && p.startsWith(`${resolve(dir)}/`))
      return true;
  }
  return false;
}

function planVmid(plan: RestorePlan): number {
  const v = plan.vmid;
  if (plan.kind !== "pve" || typeof v !== "number" || !VMID_RE.test(String(v)))
    throw new StrataError(ErrorCode.INTERNAL, "not a Proxmox restore plan");
  return v;
}
