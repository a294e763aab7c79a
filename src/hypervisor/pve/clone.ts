/**
 * Rewrites of a Proxmox VM configuration for a restore:
 *
 *  - a clone ({@link cloneConf}) is a new VM beside the original: new VMID (the caller's), name,
 *    smbios1 UUID, vmgenid and MAC addresses (Proxmox's BC:24:11 prefix), its disks' volumes
 *    renamed to the new VMID; what it would otherwise share with the original is removed with a
 *    warning (the TPM state and unused disks, which were not backed up, snapshots, pending
 *    changes, cloud-init state, a lock);
 *  - in place ({@link rewriteVolumes}), only when a disk's path changes (another format): the
 *    changed volumes, and, as `qmrestore` does, without snapshots (the restored disks hold none)
 *    or a lock.
 *
 * Every other line stays byte for byte as it was.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { joinProps, type PveConf, parseProps, prop, setProp } from "./conf.js";
import { drives, NIC_KEY_RE } from "./model.js";

/** A random MAC with the prefix Proxmox VE assigns (BC:24:11, its own OUI), upper case as PVE writes it. */
export function randomPveMac(): string {
  return [
    "BC",
    "24",
    "11",
    ...[...randomBytes(3)].map((x) => x.toString(16).padStart(2, "0").toUpperCase()),
  ].join(":");
}

/** Replaces a drive's volume (the bare first element or `file=`), and its `format=` when given. */
export function setDriveVolume(conf: PveConf, key: string, volume: string, format?: string): void {
  const value = conf.get(key);
  if (value === undefined) return;
  const props = parseProps(value);
  const explicit = props.find((p) => p.key === "file");
  const bare = props.find((p) => p.key === undefined);
  if (explicit) explicit.value = volume;
  else if (bare) bare.value = volume;
  else props.unshift({ key: undefined, value: volume });
  if (format !== undefined && prop(props, "format") !== undefined) setProp(props, "format", format);
  conf.set(key, joinProps(props));
}

/** Drops what a restored configuration must not keep: snapshots and other sections, `parent`, `lock`. */
function dropHistory(conf: PveConf, warnings: string[]): void {
  const snaps = conf.snapshots();
  const dropped = conf.dropSections();
  conf.delete("parent");
  conf.delete("lock");
  if (snaps.length > 0)
    warnings.push(`snapshots ${snaps.join(", ")} are left out: the restored disks hold no snapshots`);
  const other = dropped.filter((s) => !snaps.includes(s));
  if (other.length > 0) warnings.push(`sections ${other.map((s) => `[${s}]`).join(", ")} are left out`);
}

export interface CloneChanges {
  vmid: number;
  name: string;
  /** Drive key → new volume (and format) for every disk the clone gets. */
  volumes: ReadonlyMap<string, { volume: string; format: string }>;
}

export interface CloneResult {
  conf: PveConf;
  uuid: string;
  /** NIC id → new MAC. */
  macs: Map<string, string>;
  warnings: string[];
}

/** The clone's configuration (see the module comment); `conf` is not changed. */
export function cloneConf(original: PveConf, c: CloneChanges): CloneResult {
  const conf = original.clone();
  const warnings: string[] = [];
  dropHistory(conf, warnings);
  conf.set("name", c.name);
  const uuid = randomUUID();
  const smbios = parseProps(conf.get("smbios1") ?? "");
  if (smbios.length === 1 && smbios[0]!.value === "") smbios.length = 0;
  setProp(smbios, "uuid", uuid);
  conf.set("smbios1", joinProps(smbios));
  const genid = conf.get("vmgenid");
  if (genid !== undefined && genid !== "0") conf.set("vmgenid", randomUUID());
  const macs = new Map<string, string>();
  const taken = new Set<string>();
  for (const [key, value] of conf.entries()) {
    if (!NIC_KEY_RE.test(key)) continue;
    let mac = randomPveMac();
    while (taken.has(mac)) mac = randomPveMac();
    taken.add(mac);
    macs.set(key, mac);
    const props = parseProps(value);
    const first = props[0]!;
    if (prop(props, "macaddr") !== undefined || first.key === "model") setProp(props, "macaddr", mac);
    else if (first.key === undefined) props[0] = { key: first.value, value: mac };
    else first.value = mac;
    conf.set(key, joinProps(props));
  }
  for (const d of drives(conf)) {
    const v = c.volumes.get(d.key);
    if (v) {
      setDriveVolume(conf, d.key, v.volume, v.format);
      continue;
    }
    const ci = /^([^:]+:(?:\d+\/)?)vm-\d+-cloudinit(\.[a-z0-9]+)?$/.exec(d.volume);
    if (ci) {
      // qemu-server's cloud-init drive is per VM: the clone gets its own, made at its first start.
      const volume = `${ci[1]!.replace(/^([^:]+:)\d+\//, `$1${c.vmid}/`)}vm-${c.vmid}-cloudinit${ci[2] ?? ""}`;
      setDriveVolume(conf, d.key, volume);
      warnings.push(
        `${d.key}: the clone's cloud-init drive is ${volume}; "qm cloudinit update ${c.vmid}" makes it`,
      );
      continue;
    }
    if (d.media === "cdrom" || d.volume === "none") continue;
    conf.delete(d.key);
    warnings.push(
      d.key === "tpmstate0"
        ? `tpmstate0 (${d.volume}) is left out: the TPM state is not in the restore point; add a new one with "qm set ${c.vmid} --tpmstate0 STORAGE:1"`
        : `${d.key} (${d.volume}) is left out: it is not in the restore point`,
    );
  }
  for (const [key, value] of conf.entries()) {
    if (/^unused\d+$/.test(key)) {
      conf.delete(key);
      warnings.push(`${key} (${value}) is left out: unused disks are not backed up`);
    }
  }
  if (conf.get("args") !== undefined)
    warnings.push(`"args: ${conf.get("args")}" is kept as it was: check it names nothing of the original VM`);
  return { conf, uuid, macs, warnings };
}

/** In place with changed paths: the new volumes, without snapshots or a lock. */
export function rewriteVolumes(
  original: PveConf,
  volumes: ReadonlyMap<string, { volume: string; format: string }>,
): { conf: PveConf; warnings: string[] } {
  const conf = original.clone();
  const warnings: string[] = [];
  dropHistory(conf, warnings);
  for (const [key, v] of volumes) setDriveVolume(conf, key, v.volume, v.format);
  return { conf, warnings };
}

/** A disk's volume name for VMID `vmid`: `vm-100-disk-1` → `vm-NEW-disk-1`; others get a free `vm-NEW-disk-N`. */
export function renameVolume(volume: string, vmid: number, taken: Set<string>): string {
  const base = volume
    .split(/[/:]/)
    .at(-1)!
    .replace(/\.(raw|qcow2|vmdk)$/, "");
  const m = /^(?:vm|base)-\d+-(disk-\d+|cloudinit|[A-Za-z0-9._+-]+)$/.exec(base);
  let name = m ? `vm-${vmid}-${m[1]}` : undefined;
  if (name === undefined || taken.has(name)) {
    let n = 0;
    while (taken.has(`vm-${vmid}-disk-${n}`)) n++;
    name = `vm-${vmid}-disk-${n}`;
  }
  taken.add(name);
  return name;
}

/**
 * The next free VMID: one above the highest of every VM and container configuration this node
 * sees (its own and, in a cluster, every node's under /etc/pve/nodes), and at least 100.
 */
export async function nextFreeVmid(etcPve: string): Promise<number> {
  return Math.max(99, ...(await usedVmids(etcPve))) + 1;
}

export async function usedVmids(etcPve: string): Promise<number[]> {
  const dirs = [join(etcPve, "qemu-server"), join(etcPve, "lxc")];
  const nodes = await fs.readdir(join(etcPve, "nodes")).catch(() => [] as string[]);
  for (const n of nodes) dirs.push(join(etcPve, "nodes", n, "qemu-server"), join(etcPve, "nodes", n, "lxc"));
  const ids: number[] = [];
  for (const d of dirs) {
    for (const f of await fs.readdir(d).catch(() => [] as string[])) {
      const m = /^([1-9]\d{2,8})\.conf$/.exec(f);
      if (m) ids.push(Number(m[1]));
    }
  }
  return ids;
}
