/**
 * What a Proxmox VM configuration says, in Strata's terms: its disks (the `scsi0`, `virtio0`, ...
 * keys and their volumes), NICs (`net0` with model, MAC and bridge), identity (`name`,
 * `smbios1: uuid=`, `vmgenid`), CPUs and memory; and the configuration document Strata keeps
 * with a restore point of a Proxmox VM ({@link PveConfigDocument}), checked against a schema and
 * its own configuration text when read back from a repository.
 */

import { z } from "zod";
import { NAME_RE } from "../../repo/format.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { CONTROL, list, matching, object, oneOf, parseDocument, text, whole } from "../../util/schema.js";
import type { VmConfigDocument } from "../adapter.js";
import { MAX_CONF_BYTES, PveConf, parseProps, prop } from "./conf.js";
import { resolveVolume, type Storage } from "./storage.js";

/** Disk keys of qemu-server: ide0-3, sata0-5, scsi0-30, virtio0-15, efidisk0, tpmstate0. */
export const DISK_KEY_RE =
  /^(?:ide[0-3]|sata[0-5]|scsi(?:[12]?[0-9]|30)|virtio(?:1[0-5]|[0-9])|efidisk0|tpmstate0)$/;
export const NIC_KEY_RE = /^net(?:[12]?[0-9]|3[01])$/;
const NIC_MODELS = new Set([
  "virtio",
  "e1000",
  "e1000e",
  "e1000-82540em",
  "e1000-82544gc",
  "e1000-82545em",
  "rtl8139",
  "vmxnet3",
  "i82551",
  "i82557b",
  "i82559er",
  "ne2k_isa",
  "ne2k_pci",
  "pcnet",
]);
export const VMID_RE = /^[1-9][0-9]{2,8}$/;
const MAC_RE = /^[0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2}){5}$/;
const UUID_RE = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;

export interface PveDrive {
  /** The configuration key: scsi0, virtio0, efidisk0, ... */
  key: string;
  /** The volume: `STORAGE:NAME`, an absolute path, or `none`/`cdrom`. */
  volume: string;
  media: "disk" | "cdrom";
  /** `size=` in bytes, when given. */
  sizeBytes: number | undefined;
  /** `format=`, when given (otherwise the volume's name or storage type says). */
  format: string | undefined;
  /** false for `backup=0`. */
  backup: boolean;
}

export interface PveNic {
  id: string;
  model: string;
  mac: string | null;
  bridge: string | null;
  [key: string]: unknown;
}

/** `32G`, `512M`, `4096` (bytes) as PVE writes disk sizes. */
export function parseSize(s: string): number | undefined {
  const m = /^(\d+(?:\.\d+)?)([KMGT]?)$/.exec(s);
  if (!m) return undefined;
  const mult = { "": 1, K: 2 ** 10, M: 2 ** 20, G: 2 ** 30, T: 2 ** 40 }[m[2] as "" | "K" | "M" | "G" | "T"];
  const n = Math.round(Number(m[1]) * mult);
  return Number.isSafeInteger(n) ? n : undefined;
}

/** The drives of the main section, in file order. */
export function drives(conf: PveConf): PveDrive[] {
  const out: PveDrive[] = [];
  for (const [key, value] of conf.entries()) {
    if (!DISK_KEY_RE.test(key)) continue;
    const props = parseProps(value);
    const volume = prop(props, "file") ?? props.find((p) => p.key === undefined)?.value ?? "";
    const media = prop(props, "media") === "cdrom" || volume === "cdrom" ? "cdrom" : "disk";
    const size = prop(props, "size");
    out.push({
      key,
      volume,
      media,
      sizeBytes: size === undefined ? undefined : parseSize(size),
      format: prop(props, "format"),
      backup: prop(props, "backup") !== "0",
    });
  }
  return out;
}

export function nics(conf: PveConf): PveNic[] {
  const out: PveNic[] = [];
  for (const [key, value] of conf.entries()) {
    if (!NIC_KEY_RE.test(key)) continue;
    const props = parseProps(value);
    const first = props[0];
    let model = prop(props, "model") ?? "";
    let mac = prop(props, "macaddr") ?? null;
    if (first?.key !== undefined && NIC_MODELS.has(first.key)) {
      model = first.key;
      mac = first.value;
    } else if (first?.key === undefined && first && NIC_MODELS.has(first.value)) model = first.value;
    out.push({ id: key, model, mac, bridge: prop(props, "bridge") ?? null });
  }
  return out;
}

/** Name, UUID (smbios1), CPUs and memory as qemu-server computes them (with its defaults). */
export function identity(conf: PveConf): {
  name: string | null;
  uuid: string | null;
  cpus: number;
  memoryBytes: number;
} {
  const int = (v: string | undefined, dflt: number) =>
    v !== undefined && /^\d{1,6}$/.test(v) ? Number(v) : dflt;
  const uuid = prop(parseProps(conf.get("smbios1") ?? ""), "uuid") ?? null;
  // `memory: 2048`, or since PVE 8.1 a property string `memory: current=2048`.
  const mem = conf.get("memory");
  const memMiB = int(mem === undefined ? undefined : (prop(parseProps(mem), "current") ?? mem), 512);
  const vcpus = int(conf.get("vcpus"), 0);
  const cpus = vcpus > 0 ? vcpus : int(conf.get("cores"), 1) * int(conf.get("sockets"), 1);
  return { name: conf.get("name") ?? null, uuid, cpus, memoryBytes: memMiB * 2 ** 20 };
}

/** A disk as the configuration document records it. */
export interface PveDocDisk {
  /** The configuration key (scsi0, virtio0, efidisk0): the disk's name in the repository. */
  name: string;
  volume: string;
  /** The path QEMU had open. */
  file: string;
  format: string;
  size: number;
  /** The storage's ID and type, null for an absolute path or a volume of unknown storage. */
  storage: string | null;
  storageType: string | null;
  [key: string]: unknown;
}

/** The configuration document of a restore point of a Proxmox VM. */
export interface PveConfigDocument extends VmConfigDocument {
  kind: "pve";
  vmid: number;
  disks: PveDocDisk[];
  nics: PveNic[];
  /** The VMID.conf text at backup time, byte for byte. */
  conf: string;
  /** The QEMU configuration document of the running VM (command line, devices), when there was one. */
  qemu: VmConfigDocument | null;
}

const MAX_DISKS = 64;
const MAX_NICS = 32;
const MAX_PATH = 4096;

/** The JSON shape of a configuration document; what its configuration text says is checked after. */
const PveDocumentSchema = object(
  {
    kind: z.literal("pve", { error: (iss) => `kind is ${JSON.stringify(iss.input)}, not "pve"` }),
    vmid: z
      .number({ error: (iss) => `the vmid ${JSON.stringify(iss.input)} is not a Proxmox VM id` })
      .refine((v) => VMID_RE.test(String(v)), {
        error: (iss) => `the vmid ${JSON.stringify(iss.input)} is not a Proxmox VM id`,
      }),
    conf: z
      .string({ error: "the configuration text is not a string of at most 1 MiB" })
      .refine(
        (c) => Buffer.byteLength(c) <= MAX_CONF_BYTES,
        "the configuration text is not a string of at most 1 MiB",
      ),
    name: text("the name", 128).nullable(),
    uuid: matching("the UUID", UUID_RE, "a UUID").nullable(),
    cpus: whole("the CPU count", Number.MAX_SAFE_INTEGER),
    memoryBytes: whole("the memory size", Number.MAX_SAFE_INTEGER),
    disks: list(
      object(
        {
          name: matching("the disk name", DISK_KEY_RE, "a Proxmox drive key").refine((n) => NAME_RE.test(n), {
            error: (iss) => `the disk name ${JSON.stringify(iss.input)} is not a Proxmox drive key`,
          }),
          volume: text("the volume", MAX_PATH),
          file: text("the file", MAX_PATH).refine(
            (f) => !CONTROL.test(f),
            "the file holds control characters",
          ),
          format: oneOf(["raw", "qcow2", "vmdk"], "the format"),
          size: whole("the size", Number.MAX_SAFE_INTEGER),
          storage: text("the storage", 128).nullable(),
          storageType: text("the storage type", 128).nullable(),
        },
        "the disk",
      ),
      "the disk list",
      MAX_DISKS,
    ).superRefine((disks, ctx) => {
      const seen = new Set<string>();
      for (const [i, d] of disks.entries()) {
        if (seen.has(d.name))
          ctx.addIssue({ code: "custom", path: [i, "name"], message: `disk ${d.name} appears twice` });
        seen.add(d.name);
      }
    }),
    nics: list(object({ id: text("the NIC id", 64) }, "the NIC"), "the NIC list", MAX_NICS),
    qemu: z.record(z.string(), z.unknown(), { error: "qemu is not an object" }).nullish(),
  },
  "the document",
);

/**
 * Checks a configuration document read from a repository: its JSON shape against a schema
 * (every field typed and bounded), then the configuration text parseable, every disk a drive key
 * of that text and every NIC one of its NICs. Throws DATA_CORRUPT naming what is wrong (with
 * the field's path).
 */
export function checkDocument(doc: unknown): PveConfigDocument {
  const CONTEXT = "Proxmox VM configuration document";
  const bad = (why: string): never => {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${CONTEXT}: ${why}`);
  };
  const d = parseDocument(PveDocumentSchema, doc, CONTEXT);
  const conf = PveConf.parse(d.conf, {
    where: `of VM ${d.vmid} in the repository`,
    code: ErrorCode.DATA_CORRUPT,
  });
  const keys = new Map(drives(conf).map((x) => [x.key, x]));
  const disks: PveDocDisk[] = d.disks.map((e, i) => {
    const drive = keys.get(e.name);
    if (!drive) return bad(`disks.${i}.name: disk ${e.name} is not in the configuration text`);
    if (e.volume !== drive.volume)
      bad(`disks.${i}.volume: disk ${e.name}'s volume differs from the configuration text's`);
    return { ...e, volume: drive.volume };
  });
  const confNics = nics(conf);
  for (const [i, x] of d.nics.entries())
    if (!confNics.some((c) => c.id === x.id))
      bad(`nics.${i}.id: NIC ${JSON.stringify(x.id)} is not in the configuration text`);
  for (const n of confNics)
    if (n.mac !== null && !MAC_RE.test(n.mac)) bad(`conf: NIC ${n.id} has a bad MAC ${n.mac}`);
  return {
    kind: "pve",
    vmid: d.vmid,
    name: d.name,
    uuid: d.uuid,
    cpus: d.cpus,
    memoryBytes: d.memoryBytes,
    disks,
    nics: confNics,
    conf: d.conf,
    qemu: (d.qemu ?? null) as VmConfigDocument | null,
  };
}

/** A disk of the running VM as the QEMU session names and describes it. */
export interface QemuDiskFacts {
  name: string;
  file: string;
  format: string;
  size: number;
}

/**
 * The configuration document of VM `vmid`: identity, CPUs and memory from its configuration;
 * disks named by their configuration keys. With `qemuDisks` (a running VM's disks as the QEMU
 * session names them) the disks are those, matched to their keys by name, with the path, format
 * and size QEMU reports; disks of one side only are reported through `log`. Without, every
 * non-CD-ROM drive of the configuration, located through storage.cfg.
 */
export function buildDocument(
  vmid: number,
  confText: string,
  conf: PveConf,
  storages: ReadonlyMap<string, Storage>,
  qemu: { doc: VmConfigDocument; disks: readonly QemuDiskFacts[] } | null,
  log: (message: string) => void,
): PveConfigDocument {
  const all = drives(conf).filter((d) => d.media === "disk" && d.volume !== "none");
  const byKey = new Map(all.map((d) => [d.key, d]));
  const locate = (volume: string) => {
    try {
      const r = resolveVolume(storages, volume);
      return r.kind === "path"
        ? { path: r.path, storage: r.storage?.id ?? null, type: r.storage?.type ?? null, format: r.format }
        : { path: undefined, storage: r.storage.id, type: r.storage.type, format: undefined, why: r.reason };
    } catch (err) {
      return { path: undefined, storage: null, type: null, format: undefined, why: (err as Error).message };
    }
  };
  const disks: PveDocDisk[] = [];
  if (qemu) {
    for (const q of qemu.disks) {
      const d = byKey.get(q.name);
      if (!d) {
        log(
          `disk ${q.name} (${q.file}) of the running VM is not a drive of ${vmid}.conf (hot-plugged, or not named drive-KEY by qemu-server?): it is backed up, but a VM restore won't attach it`,
        );
        continue;
      }
      const at = locate(d.volume);
      if (at.path !== undefined && at.path !== q.file)
        log(
          `${q.name}: storage.cfg maps ${d.volume} to ${at.path}, QEMU has ${q.file} open; recorded as QEMU's`,
        );
      disks.push({
        name: d.key,
        volume: d.volume,
        file: q.file,
        format: /^(raw|qcow2|vmdk)$/.test(q.format) ? q.format : "raw",
        size: q.size,
        storage: at.storage,
        storageType: at.type,
      });
    }
    for (const d of all) {
      if (qemu.disks.some((q) => q.name === d.key)) continue;
      log(
        d.key === "tpmstate0"
          ? `tpmstate0 (${d.volume}) is swtpm's state, not a QEMU disk: it is not backed up`
          : `${d.key} (${d.volume}) is in ${vmid}.conf but not attached to the running VM (pending?): not backed up`,
      );
    }
  } else {
    for (const d of all) {
      const at = locate(d.volume);
      if (at.path === undefined) {
        log(`${d.key} (${d.volume}): ${"why" in at ? at.why : "no path"}`);
      }
      disks.push({
        name: d.key,
        volume: d.volume,
        file: at.path ?? d.volume,
        format: d.format ?? at.format ?? "raw",
        size: d.sizeBytes ?? 0,
        storage: at.storage,
        storageType: at.type,
      });
    }
  }
  return {
    kind: "pve",
    vmid,
    ...identity(conf),
    disks,
    nics: nics(conf),
    conf: confText,
    qemu: qemu?.doc ?? null,
  };
}
