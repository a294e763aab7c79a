/**
 * Command lines of instantly recovered QEMU VMs. The recorded command line, rewritten as a
 * restore would (clone.ts) with each disk's file node on an empty qcow2 overlay, is kept as the
 * "base"; {@link instantArgv} derives the one to run from it: each disk's format node (now
 * `driver=qcow2` over the overlay) gets a backing, a raw node over an nbd node on the serving
 * process's socket ({@link attachNbdBacking}), and disks that have moved to production storage
 * run from their production files instead. Pure functions, and the check of the record.
 */
import { resolve } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import {
  absolutePath,
  list,
  matching,
  object,
  oneOf,
  parseDocument,
  text,
  whole,
} from "../../util/schema.js";
import type { InstantVm } from "../adapter.js";
import { instantVmSchema } from "../instant-vm.js";
import { joinOpts, rewriteCommandLine, splitOpts } from "./clone.js";
import { CONFIG_LIMITS, isQemuProgram, PLAIN_NAME, QEMU_ID } from "./config.js";
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

const qemuId = matching("the node-name", QEMU_ID, "a QEMU id");

/** InstantVm.data of a QEMU VM, as read back. */
const QemuInstantDataSchema = object(
  {
    accelerator: oneOf(["kvm", "tcg"], "the accelerator"),
    qmpSocket: absolutePath("the QMP socket"),
    log: absolutePath("the QEMU log"),
    console: absolutePath("the console file").nullable(),
    uuid: text("the UUID").nullable(),
    nbd: object(
      {
        socket: absolutePath("the NBD socket"),
        reconnectDelay: whole("the reconnect delay", 365 * 86400),
      },
      "the NBD backing",
    ),
    baseArgv: list(
      text("an argument of the command line", CONFIG_LIMITS.argBytes),
      "the command line",
      CONFIG_LIMITS.args,
    )
      .min(1, "the command line is empty")
      .refine((argv) => isQemuProgram(argv[0]!), {
        error: (iss) =>
          `the command line runs ${JSON.stringify((iss.input as string[])[0])}, not a qemu-system-* binary: Strata runs only QEMU`,
      }),
    disks: list(
      object(
        {
          name: text("the disk name"),
          export: text("the export"),
          size: whole("the disk size", CONFIG_LIMITS.diskBytes),
          node: qemuId,
          fileNode: qemuId,
          backingNode: qemuId,
          nbdNode: qemuId,
          production: object({ node: qemuId, fileNode: qemuId }, "the production nodes").optional(),
        },
        "the disk's nodes",
      ),
      "the disks' nodes",
      CONFIG_LIMITS.disks,
    ),
  },
  "the QEMU record",
);

const QemuInstantVmSchema = instantVmSchema({
  adapter: "qemu",
  platform: "QEMU",
  diskName: matching("the disk name", PLAIN_NAME, "a plain name"),
  maxDisks: CONFIG_LIMITS.disks,
  data: QemuInstantDataSchema,
}).superRefine((v, ctx) => {
  const disks = v.disks.map((d) => d.name).join(", ");
  const nodes = v.data.disks.map((d) => d.name).join(", ");
  if (disks !== nodes)
    ctx.addIssue({ code: "custom", message: `its disks (${disks}) and their nodes (${nodes}) differ` });
});

/** The record's QEMU part, checked (see {@link checkQemuInstantVm}). */
export function qemuData(vm: InstantVm): QemuInstantData {
  return checkQemuInstantVm(vm).data as unknown as QemuInstantData;
}

/**
 * Checks a QEMU InstantVm read back from the engine's state file against its schema: the
 * generic fields, and `data` (types, bounds, node-names, paths, a qemu-system-* program),
 * consistent with the disks. Throws DATA_CORRUPT naming the first bad field with its path.
 */
export function checkQemuInstantVm(vm: InstantVm): InstantVm {
  return parseDocument(
    QemuInstantVmSchema,
    vm,
    `the instant recovery record of ${JSON.stringify(String(vm?.name))} is damaged`,
  ) as InstantVm;
}
