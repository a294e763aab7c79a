/**
 * Command lines of instantly recovered QEMU VMs. The recorded command line, rewritten as a
 * restore would (clone.ts) with each disk's file node on an empty qcow2 overlay, is kept as the
 * "base"; {@link instantArgv} derives the one to run from it: each disk's format node (now
 * `driver=qcow2` over the overlay) gets a backing, a raw node over an nbd node on the serving
 * process's socket ({@link attachNbdBacking}), and disks that have moved to production storage
 * run from their production files instead. Pure functions, and the check of the record.
 */
import { resolve } from "node:path";
import { checker } from "../../util/check.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import type { InstantVm } from "../adapter.js";
import { joinOpts, rewriteCommandLine, splitOpts } from "./clone.js";
import { CONFIG_LIMITS, emulator, PLAIN_NAME, QEMU_ID } from "./config.js";
import type { Accelerator } from "./launcher.js";

/** One disk of a QEMU instant VM: its nodes (the adapter's part of the record). */
export interface QemuInstantDisk {
  /** Disk name in the restore point (also in InstantVm.disks). */
  name: string;
  size: number;
  /** The NBD export that backs it. */
  export: string;
  /** Node-name of the disk's format node (the device's drive; the overlay's qcow2 node). */
  node: string;
  /** Node-name of the overlay's file (protocol) node. */
  fileNode: string;
  /** The raw node over the nbd node: the overlay's backing. */
  backingNode: string;
  nbdNode: string;
  /** Node-names on production storage, once the disk has moved there. */
  production?: { node: string; fileNode: string };
}

/** InstantVm.data of a QEMU VM. */
export interface QemuInstantData {
  accelerator: Accelerator;
  qmpSocket: string;
  /** QEMU's stdout and stderr. */
  log: string;
  /** The guest's serial console file, when the command line names one. */
  console: string | null;
  uuid: string | null;
  /** The serving process's socket, and how long QEMU's NBD client waits for it to come back. */
  nbd: { socket: string; reconnectDelay: number };
  /** The command line with the overlays as plain qcow2 files, before {@link attachNbdBacking}. */
  baseArgv: string[];
  disks: QemuInstantDisk[];
}

/** What {@link attachNbdBacking} needs per disk. */
export interface NbdBacking {
  node: string;
  backingNode: string;
  nbdNode: string;
  socket: string;
  export: string;
  reconnectDelay: number;
}

/**
 * Gives each disk's format node (`node-name=<node>`, already `driver=qcow2` over the overlay file)
 * a backing: `-blockdev driver=nbd,...,read-only=on,reconnect-delay=N` and
 * `-blockdev driver=raw,file=<nbd>,read-only=on` inserted just before it, and `backing=<raw>` on
 * it. Handles QEMU's key=value and JSON `-blockdev` syntax. Pure.
 */
export function attachNbdBacking(argv: readonly string[], disks: readonly NbdBacking[]): string[] {
  const out: string[] = [argv[0]!];
  const done = new Set<string>();
  for (let i = 1; i < argv.length; i++) {
    const flag = argv[i]!;
    const val = argv[i + 1];
    if (flag !== "-blockdev" || val === undefined) {
      out.push(flag);
      continue;
    }
    i++;
    let nodeName: string | undefined;
    let json: Record<string, unknown> | undefined;
    if (val.startsWith("{")) {
      json = JSON.parse(val) as Record<string, unknown>;
      nodeName = typeof json["node-name"] === "string" ? (json["node-name"] as string) : undefined;
    } else nodeName = splitOpts(val).find((o) => o.key === "node-name")?.value;
    const d = disks.find((x) => x.node === nodeName);
    if (!d) {
      out.push(flag, val);
      continue;
    }
    const q = (s: string) => s.replaceAll(",", ",,");
    out.push(
      "-blockdev",
      `driver=nbd,node-name=${d.nbdNode},server.type=unix,server.path=${q(d.socket)},export=${q(d.export)},read-only=on,reconnect-delay=${d.reconnectDelay}`,
      "-blockdev",
      `driver=raw,file=${d.nbdNode},node-name=${d.backingNode},read-only=on`,
    );
    if (json) out.push(flag, JSON.stringify({ ...json, backing: d.backingNode }));
    else {
      const o = splitOpts(val).filter((x) => x.key !== "backing");
      o.push({ key: "backing", value: d.backingNode });
      out.push(flag, joinOpts(o));
    }
    done.add(d.node);
  }
  const missing = disks.filter((d) => !done.has(d.node));
  if (missing.length > 0)
    throw new StrataError(
      ErrorCode.USAGE,
      `the command line has no -blockdev with node-name ${missing.map((d) => d.node).join(", ")}: instant recovery needs -blockdev disks (a -drive line cannot take an NBD backing here)`,
    );
  return out;
}

/** The `file=` child of a format node in an argv (key=value or JSON -blockdev). */
export function fileChildOf(argv: readonly string[], node: string): string | undefined {
  for (let i = 1; i < argv.length - 1; i++) {
    if (argv[i] !== "-blockdev") continue;
    const val = argv[i + 1]!;
    if (val.startsWith("{")) {
      const j = JSON.parse(val) as Record<string, unknown>;
      if (j["node-name"] === node) return typeof j.file === "string" ? j.file : undefined;
    } else {
      const o = splitOpts(val);
      if (o.find((x) => x.key === "node-name")?.value === node) return o.find((x) => x.key === "file")?.value;
    }
  }
  return undefined;
}

/** The argv to run now: moved disks on their production files, the others on overlay + NBD. */
export function instantArgv(vm: InstantVm, data: QemuInstantData): string[] {
  const nodes = new Map(data.disks.map((d) => [d.name, d]));
  const node = (name: string): QemuInstantDisk => {
    const n = nodes.get(name);
    if (!n)
      throw new StrataError(ErrorCode.DATA_CORRUPT, `the record of ${vm.name} has no nodes for disk ${name}`);
    return n;
  };
  const moved = vm.disks.filter((d) => d.production);
  let argv = data.baseArgv;
  if (moved.length > 0) {
    const files = new Map(moved.map((d) => [resolve(d.overlay), d.production!.path]));
    const formats = new Map(moved.map((d) => [node(d.name).node, d.production!.format]));
    const fileFormats = new Map(moved.map((d) => [resolve(d.overlay), d.production!.format]));
    argv = rewriteCommandLine(argv, { files, formats, fileFormats, accel: data.accelerator }).argv;
  }
  return attachNbdBacking(
    argv,
    vm.disks
      .filter((d) => !d.production)
      .map((d) => {
        const n = node(d.name);
        return {
          node: n.node,
          backingNode: n.backingNode,
          nbdNode: n.nbdNode,
          socket: data.nbd.socket,
          export: n.export,
          reconnectDelay: data.nbd.reconnectDelay,
        };
      }),
  );
}

/** The record's QEMU part, checked (see {@link checkQemuInstantVm}). */
export function qemuData(vm: InstantVm): QemuInstantData {
  return checkQemuInstantVm(vm).data as unknown as QemuInstantData;
}

/**
 * Checks a QEMU InstantVm read back from the engine's state file: the generic fields, and
 * `data` field by field (types, node-names, paths, a qemu-system-* program), consistent with
 * the disks. Throws DATA_CORRUPT naming what is wrong.
 */
export function checkQemuInstantVm(vm: InstantVm): InstantVm {
  const c = checker(`the instant recovery record of ${JSON.stringify(String(vm?.name))} is damaged`);
  const v = c.obj(vm, "the VM record");
  if (v.adapter !== "qemu") c.refuse(`it belongs to the ${JSON.stringify(v.adapter)} adapter, not QEMU`);
  c.str(v.name, "the name");
  c.str(v.where, "where it runs");
  if (v.pid !== null) c.int(v.pid, "the QEMU pid", 2 ** 31);
  const disks = c.arr(v.disks, "the disk list", CONFIG_LIMITS.disks).map((x, i) => {
    const d = c.obj(x, `disk ${i}`);
    const name = c.str(d.name, `the name of disk ${i}`);
    if (!PLAIN_NAME.test(name)) c.refuse(`disk name ${JSON.stringify(name)} is not a plain name`);
    c.path(d.overlay, `disk ${name}'s overlay`);
    if (d.production !== undefined) {
      const p = c.obj(d.production, `disk ${name}'s production file`);
      c.path(p.path, `disk ${name}'s production file`);
      if (p.format !== "raw" && p.format !== "qcow2")
        c.refuse(`disk ${name}'s production format is not raw or qcow2`);
    }
    return name;
  });
  const details = c.obj(v.details, "the details");
  for (const [k, x] of Object.entries(details)) c.str(x, `detail ${k}`);
  for (const [i, w] of c.arr(v.warnings, "the warnings", 1000).entries()) c.str(w, `warning ${i}`);
  const data = c.obj(v.data, "the QEMU record");
  if (data.accelerator !== "kvm" && data.accelerator !== "tcg") c.refuse("the accelerator is not kvm or tcg");
  c.path(data.qmpSocket, "the QMP socket");
  c.path(data.log, "the QEMU log");
  if (data.console !== null) c.path(data.console, "the console file");
  c.strOrNull(data.uuid, "the UUID");
  const nbd = c.obj(data.nbd, "the NBD backing");
  c.path(nbd.socket, "the NBD socket");
  c.int(nbd.reconnectDelay, "the reconnect delay", 365 * 86400);
  const argv = c.arr(data.baseArgv, "the command line", CONFIG_LIMITS.args);
  for (const [i, a] of argv.entries()) c.str(a, `argument ${i} of the command line`, CONFIG_LIMITS.argBytes);
  emulator(argv[0], c);
  const nodes = c.arr(data.disks, "the disks' nodes", CONFIG_LIMITS.disks).map((x, i) => {
    const d = c.obj(x, `the nodes of disk ${i}`);
    const name = c.str(d.name, `the name of disk ${i}'s nodes`);
    c.str(d.export, `disk ${name}'s export`);
    c.int(d.size, `disk ${name}'s size`, CONFIG_LIMITS.diskBytes);
    const ids = [d.node, d.fileNode, d.backingNode, d.nbdNode];
    if (d.production !== undefined) {
      const p = c.obj(d.production, `disk ${name}'s production nodes`);
      ids.push(p.node, p.fileNode);
    }
    for (const id of ids) {
      if (!QEMU_ID.test(c.str(id, `a node-name of disk ${name}`)))
        c.refuse(`disk ${name}'s node-name ${JSON.stringify(id)} is not a QEMU id`);
    }
    return name;
  });
  if (disks.join("\0") !== nodes.join("\0"))
    c.refuse(`its disks (${disks.join(", ")}) and their nodes (${nodes.join(", ")}) differ`);
  return vm;
}
