/**
 * What Strata reads from a libvirt domain XML: identity, size, disks, NICs, and the user QEMU runs
 * as. Every value is validated (the XML may come back from a repository): names and paths are
 * bounded and free of control characters, numbers are finite and in range.
 */
import { ErrorCode, StrataError } from "../../util/errors.js";
import { at, kid, kids, parseXml, textOf, type XElement } from "./xml.js";

export interface DomainDisk {
  /** Target device name (`vda`, `sdb`): the disk's name in the repository. */
  target: string;
  /** disk, cdrom, floppy, lun. */
  device: string;
  /** file, block, network, volume, ... */
  type: string;
  /** The driver's format (qcow2, raw), or "" when not given. */
  format: string;
  /** The source file or block device, or null (an empty drive, a network disk). */
  source: string | null;
  readonly: boolean;
}

export interface DomainInfo {
  name: string;
  uuid: string;
  /** libvirt's domain type (kvm, qemu). */
  type: string;
  cpus: number;
  memoryBytes: number;
  disks: DomainDisk[];
  nics: Array<{ id: string; mac: string | null; type: string; model: string | null }>;
  /** uid:gid QEMU runs as (the DAC label of a running domain), when the XML says. */
  dacLabel: { uid: number; gid: number } | null;
}

/** Domain names Strata accepts: libvirt allows more, but these are safe in file names and logs. */
export const DOMAIN_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$/;
/** Disk targets (`vda`, `sdb`): the disks' names in the repository. */
export const TARGET_RE = /^[a-z]{2,4}[a-z0-9]{0,12}$/;
/** Connection URIs Strata passes to virsh (`qemu:///system`, `qemu+ssh://host/system`). */
export const URI_RE = /^[a-z][a-z0-9+]*:\/\/[A-Za-z0-9._@:[\]-]*\/[A-Za-z0-9._/-]*(\?[A-Za-z0-9._=&/-]*)?$/;
/** Checkpoints Strata makes: `strata-<first 12 hex of the repository id>-<UTC time>`. */
export const CHECKPOINT_RE = /^strata-[0-9a-f]{1,12}-\d{8}t\d{9}z$/;
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;
const MAC_RE = /^[0-9a-f]{2}(:[0-9a-f]{2}){5}$/i;

/** Checks a path taken from XML: absolute, bounded, no control characters or `..` segments. */
export function checkPath(p: string, what: string): string {
  if (
    p.length === 0 ||
    p.length > 4096 ||
    !p.startsWith("/") ||
    /[\0-\x1f\x7f]/.test(p) ||
    /(^|\/)\.\.(\/|$)/.test(p)
  )
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${what}: unusable path ${JSON.stringify(p.slice(0, 200))}`,
    );
  return p;
}

const UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  k: 1024,
  kib: 1024,
  kb: 1000,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  mb: 1000 ** 2,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  gb: 1000 ** 3,
  t: 1024 ** 4,
  tib: 1024 ** 4,
  tb: 1000 ** 4,
};

function memoryBytes(e: XElement | undefined, what: string): number {
  const n = Number(textOf(e));
  const unit = UNITS[(e?.attrs.unit ?? "KiB").toLowerCase()];
  const bytes = n * (unit ?? Number.NaN);
  if (!Number.isSafeInteger(bytes) || bytes <= 0 || bytes > 2 ** 50)
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: bad <memory> ${JSON.stringify(textOf(e))}`);
  return bytes;
}

/** Parses a domain XML (`virsh dumpxml`). */
export function parseDomain(xml: string, what = "domain XML"): DomainInfo {
  const d = parseXml(xml, "domain", what);
  return readDomain(d, what);
}

export function readDomain(d: XElement, what: string): DomainInfo {
  const name = textOf(kid(d, "name")) ?? "";
  if (!DOMAIN_NAME_RE.test(name))
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `${what}: domain name ${JSON.stringify(name.slice(0, 80))} is not one Strata handles (letters, digits, . _ + -; at most 64)`,
    );
  const uuid = (textOf(kid(d, "uuid")) ?? "").toLowerCase();
  if (!UUID_RE.test(uuid)) throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: bad <uuid>`);
  const cpus = Number(textOf(kid(d, "vcpu")) ?? "1");
  if (!Number.isInteger(cpus) || cpus < 1 || cpus > 4096)
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: bad <vcpu>`);
  const devices = kid(d, "devices");
  const disks: DomainDisk[] = [];
  const targets = new Set<string>();
  for (const x of kids(devices, "disk")) {
    const target = kid(x, "target")?.attrs.dev ?? "";
    if (!TARGET_RE.test(target))
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `${what}: disk target ${JSON.stringify(target.slice(0, 40))}`,
      );
    if (targets.has(target))
      throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: two disks are ${target}`);
    targets.add(target);
    const type = x.attrs.type ?? "file";
    const src = kid(x, "source");
    const path = src?.attrs.file ?? src?.attrs.dev ?? null;
    disks.push({
      target,
      device: x.attrs.device ?? "disk",
      type,
      format: kid(x, "driver")?.attrs.type ?? "",
      source: path === null ? null : checkPath(path, `${what}: disk ${target}`),
      readonly: kid(x, "readonly") !== undefined,
    });
  }
  const nics: DomainInfo["nics"] = [];
  for (const [i, x] of kids(devices, "interface").entries()) {
    const mac = kid(x, "mac")?.attrs.address ?? null;
    if (mac !== null && !MAC_RE.test(mac)) throw new StrataError(ErrorCode.DATA_CORRUPT, `${what}: bad MAC`);
    nics.push({
      id: kid(x, "alias")?.attrs.name ?? `net${i}`,
      mac: mac?.toLowerCase() ?? null,
      type: x.attrs.type ?? "",
      model: kid(x, "model")?.attrs.type ?? null,
    });
  }
  let dacLabel: DomainInfo["dacLabel"] = null;
  for (const s of kids(d, "seclabel")) {
    if (s.attrs.model !== "dac") continue;
    const m = /^\+(\d+):\+(\d+)$/.exec(textOf(at(s, "label")) ?? "");
    if (m) dacLabel = { uid: Number(m[1]), gid: Number(m[2]) };
  }
  return {
    name,
    uuid,
    type: d.attrs.type ?? "",
    cpus,
    memoryBytes: memoryBytes(kid(d, "memory"), what),
    disks,
    nics,
    dacLabel,
  };
}

/** The disks a backup reads: guest disks (not CD-ROMs or floppies) with a source, writable. */
export function backupDisks(info: DomainInfo): DomainDisk[] {
  return info.disks.filter(
    (x) => (x.device === "disk" || x.device === "lun") && x.source !== null && !x.readonly,
  );
}
