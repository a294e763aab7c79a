/**
 * Proxmox VE storage definitions (`/etc/pve/storage.cfg`) and the mapping of a volume ID
 * (`local-lvm:vm-100-disk-0`, `local:100/vm-100-disk-1.qcow2`) to the path QEMU opens.
 *
 * storage.cfg is a PVE::SectionConfig file: a `TYPE: ID` line, then indented `key value` lines:
 *
 * ```
 * dir: local
 *         path /var/lib/vz
 *         content iso,vztmpl,backup
 *
 * lvmthin: local-lvm
 *         thinpool data
 *         vgname pve
 *         content rootdir,images
 * ```
 *
 * Handled, as PVE's storage plugins map them:
 *  - file storages (`dir`, `nfs`, `cifs`): `ID:VMID/FILE` → PATH/images/VMID/FILE, and linked
 *    clones `ID:BASEID/BASEFILE/VMID/FILE` → PATH/images/VMID/FILE;
 *  - `lvm` and `lvmthin`: `ID:NAME` (or `ID:BASE/NAME`) → /dev/VG/NAME;
 *  - absolute paths (pass-through devices, files outside any storage) as they are.
 * Other types (rbd, zfspool, iscsi, glusterfs, cephfs, btrfs, ...) are reported by name as not
 * handled: a live backup still reads them through QEMU, but Strata can't restore onto them in place.
 */
import { ErrorCode, StrataError } from "../../util/errors.js";

export const MAX_STORAGE_CFG_BYTES = 1024 * 1024;

export interface Storage {
  type: string;
  id: string;
  /** The `key value` lines (a bare `key` has value ""). */
  props: Map<string, string>;
}

/** PVE's storage ID syntax. */
export const STORAGE_ID_RE = /^[a-z][a-z0-9._-]*[a-z0-9]$/i;
const FILE_TYPES = new Set(["dir", "nfs", "cifs"]);
const LVM_TYPES = new Set(["lvm", "lvmthin"]);
export const HANDLED_TYPES = [...FILE_TYPES, ...LVM_TYPES];

/** Parses storage.cfg; malformed lines are errors naming the line. */
export function parseStorageCfg(text: string, where: string): Map<string, Storage> {
  const fail = (n: number | undefined, why: string): never => {
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `Proxmox storage configuration ${where}${n === undefined ? "" : `, line ${n}`}: ${why}`,
    );
  };
  if (Buffer.byteLength(text) > MAX_STORAGE_CFG_BYTES)
    fail(undefined, `larger than ${MAX_STORAGE_CFG_BYTES} bytes`);
  const out = new Map<string, Storage>();
  let cur: Storage | undefined;
  for (const [i, line] of text.split("\n").entries()) {
    const n = i + 1;
    if (/^\s*(#.*)?$/.test(line)) {
      if (line.trim() === "") cur = undefined;
      continue;
    }
    const head = /^([a-z][a-z0-9]*):\s*(\S+)\s*$/.exec(line);
    if (head) {
      const [, type, id] = head as unknown as [string, string, string];
      if (!STORAGE_ID_RE.test(id)) fail(n, `bad storage ID "${id}"`);
      if (out.has(id)) fail(n, `storage ${id} is defined twice`);
      cur = { type, id, props: new Map() };
      out.set(id, cur);
      continue;
    }
    const p = /^\s+(\S+)(?:\s+(.*\S))?\s*$/.exec(line);
    if (p && cur) {
      cur.props.set(p[1]!, p[2] ?? "");
      continue;
    }
    fail(n, `not "TYPE: ID" or an indented "key value": ${JSON.stringify(line.slice(0, 80))}`);
  }
  return out;
}

export type ResolvedVolume =
  | {
      kind: "path";
      path: string;
      /** The storage, or null for an absolute path. */
      storage: Storage | null;
      /** The format its name says (file storages), "raw" for LVM, undefined when unknown. */
      format: string | undefined;
    }
  | { kind: "unhandled"; storage: Storage; reason: string };

const FILE_RE = /^[A-Za-z0-9_+][A-Za-z0-9._+-]*$/;
const LV_RE = /^(?:base-\d+-[A-Za-z0-9._+-]+\/)?((?:vm|base)-\d+-[A-Za-z0-9._+-]+)$/;
const VG_RE = /^[A-Za-z0-9+_.-]+$/;

function formatOf(file: string): string | undefined {
  return /\.(raw|qcow2|vmdk)$/.exec(file)?.[1];
}

/**
 * Maps a volume ID to a path. Throws a clear error for a storage storage.cfg does not define,
 * or a volume name that can't be a disk of that storage.
 */
export function resolveVolume(storages: ReadonlyMap<string, Storage>, volume: string): ResolvedVolume {
  const bad = (why: string): never => {
    throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `Proxmox volume ${volume}: ${why}`);
  };
  if (volume.startsWith("/")) {
    if (volume.split("/").includes("..")) bad("a path with '..'");
    return { kind: "path", path: volume, storage: null, format: formatOf(volume) };
  }
  const colon = volume.indexOf(":");
  if (colon < 0) bad("neither STORAGE:VOLUME nor an absolute path");
  const id = volume.slice(0, colon);
  const name = volume.slice(colon + 1);
  const storage = storages.get(id);
  if (!storage) bad(`storage "${id}" is not defined in storage.cfg`);
  const s = storage!;
  if (FILE_TYPES.has(s.type)) {
    const path = s.props.get("path");
    if (!path?.startsWith("/")) bad(`${s.type} storage ${id} has no absolute path in storage.cfg`);
    const parts = name.split("/");
    // VMID/FILE, or a linked clone's BASEID/BASEFILE/VMID/FILE.
    if ((parts.length !== 2 && parts.length !== 4) || !parts.every((p) => p !== "." && p !== ".."))
      bad(`not an image of ${s.type} storage ${id} (VMID/FILE expected)`);
    const owner = parts.at(-2)!;
    const file = parts.at(-1)!;
    if (!/^\d{1,9}$/.test(owner) || !FILE_RE.test(file))
      bad(`not an image of ${s.type} storage ${id} (VMID/FILE expected)`);
    return {
      kind: "path",
      path: `${path!.replace(/\/+$/, "")}/images/${owner}/${file}`,
      storage: s,
      format: formatOf(file),
    };
  }
  if (LVM_TYPES.has(s.type)) {
    const vg = s.props.get("vgname");
    if (!vg || !VG_RE.test(vg)) bad(`${s.type} storage ${id} has no valid vgname in storage.cfg`);
    const lv = LV_RE.exec(name)?.[1];
    if (!lv) bad(`not a logical volume of ${s.type} storage ${id} (vm-VMID-disk-N expected)`);
    return { kind: "path", path: `/dev/${vg}/${lv}`, storage: s, format: "raw" };
  }
  return {
    kind: "unhandled",
    storage: s,
    reason: `storage ${id} is of type ${s.type}, which Strata does not map to a path (it handles ${HANDLED_TYPES.join(", ")} and absolute paths)`,
  };
}
