/**
 * The QEMU configuration document stored with a restore point (`config.blob`, kind "qemu"), read
 * back. A repository can be written by others than the host that restores from it, and a
 * restore runs the recorded command line and writes to the recorded paths, so nothing is taken
 * on trust: the document is checked against a schema (zod), every field typed and bounded,
 * names that become file names are plain names, paths hold no `..`, the command line's program
 * is a `qemu-system-*` binary, and its options pass the command-line policy (cmdline-policy.ts).
 */
import { basename } from "node:path";
import { z } from "zod";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { CONTROL, hasDotDot, list, matching, object, parseDocument, text, whole } from "../../util/schema.js";
import { checkRecordedCommandLine, QEMU_PROGRAM } from "./cmdline-policy.js";
import type { VmConfig } from "./live.js";

/** Limits on what a stored configuration may hold; far above any real VM. */
export const CONFIG_LIMITS = {
  disks: 256,
  nics: 256,
  cpus: 4096,
  memoryBytes: 2 ** 46, // 64 TiB
  diskBytes: Number.MAX_SAFE_INTEGER,
  string: 4096,
  args: 8192,
  argBytes: 64 * 1024,
  commandLineBytes: 1024 * 1024,
} as const;

/** A name that may become a file name: what repository names allow, up to 128 characters. */
export const PLAIN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** QEMU's own rule for ids and node-names: a letter first, then letters, digits, `-`, `.`, `_`. */
export const QEMU_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const MAC = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const FORMAT = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const NIC_TYPE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** `json:{...}`, `nbd://...`: a QEMU filename that is not a local path. */
const PSEUDO_PROTOCOL = /^[a-z][a-z0-9+.-]*:/;

const CONTEXT = "the restore point's QEMU configuration is not usable (was it written by Strata?)";

/** `schema`, or null when the field is null or absent. */
const orNull = <T extends z.ZodType>(schema: T) => schema.nullish().transform((v) => v ?? null);

/** A VM name as QEMU reports it: any text, but nothing that walks out of a directory. */
const vmName = text("the VM name").refine(
  (n) => n !== "" && n !== "." && n !== ".." && !n.includes("/") && !CONTROL.test(n),
  { error: (iss) => `the VM name ${JSON.stringify(iss.input)} is not a plain name` },
);

/** A disk's file: a path without `..`, or a QEMU pseudo-protocol filename. */
const diskFile = text("the disk file")
  .refine((f) => f !== "", "the disk file is empty")
  .refine((f) => !CONTROL.test(f), "the disk file holds control characters")
  .refine((f) => PSEUDO_PROTOCOL.test(f) || !hasDotDot(f), {
    error: (iss) => `the disk file ${JSON.stringify(iss.input)} has a ".." segment`,
  });

/** Names in `items` that appear twice are refused, naming the second. */
const unique =
  <T>(key: (x: T) => string, field: string, what: string) =>
  (items: T[], ctx: z.RefinementCtx) => {
    const seen = new Set<string>();
    for (const [i, x] of items.entries()) {
      const k = key(x);
      if (seen.has(k))
        ctx.addIssue({ code: "custom", path: [i, field], message: `${what} ${k} appears twice` });
      seen.add(k);
    }
  };

/**
 * The program of a recorded command line: `qemu-system-<arch>` (or Proxmox VE's `kvm`), by name
 * or absolute path. Where such a path lies is checked when it is about to run (cmdline-policy.ts).
 */
export function isQemuProgram(bin: string): boolean {
  return (
    QEMU_PROGRAM.test(basename(bin)) && (bin === basename(bin) || (bin.startsWith("/") && !hasDotDot(bin)))
  );
}

const commandLine = orNull(
  list(
    text("an argument of the command line", CONFIG_LIMITS.argBytes),
    "the command line",
    CONFIG_LIMITS.args,
  )
    .refine((argv) => argv.length === 0 || isQemuProgram(argv[0]!), {
      error: (iss) =>
        `the command line runs ${JSON.stringify((iss.input as string[])[0])}, not a qemu-system-* binary: Strata runs only QEMU`,
      abort: true,
    })
    .refine(
      (argv) => argv.reduce((n, a) => n + a.length, 0) <= CONFIG_LIMITS.commandLineBytes,
      `the command line is longer than ${CONFIG_LIMITS.commandLineBytes} bytes`,
    ),
).transform((argv) => (argv === null || argv.length === 0 ? null : argv));

/** A stored QEMU configuration document: only the fields Strata knows are kept. */
const QemuConfigSchema = object(
  {
    kind: z.literal("qemu", { error: (iss) => `its kind is ${JSON.stringify(iss.input)}, not "qemu"` }),
    name: orNull(vmName),
    uuid: orNull(matching("the UUID", UUID, "a UUID")),
    machine: orNull(text("the machine type")),
    cpus: orNull(whole("the CPU count", CONFIG_LIMITS.cpus)).transform((v) => v ?? 0),
    memoryBytes: orNull(whole("the memory size", CONFIG_LIMITS.memoryBytes)).transform((v) => v ?? 0),
    disks: list(
      object(
        {
          name: matching("the disk name", PLAIN_NAME, 'a plain name (letters, digits, ".", "_", "-")'),
          node: matching("the node-name", QEMU_ID, "a QEMU id"),
          device: text("the device"),
          format: matching("the format", FORMAT, "an image format"),
          file: diskFile,
          size: whole("the disk size", CONFIG_LIMITS.diskBytes),
        },
        "the disk",
      ),
      "the disk list",
      CONFIG_LIMITS.disks,
    ).superRefine(unique((d) => d.name, "name", "disk name")),
    nics: list(
      object(
        {
          id: matching("the NIC id", QEMU_ID, "a QEMU id"),
          type: matching("the NIC type", NIC_TYPE, "a device type"),
          mac: orNull(matching("the MAC", MAC, "a MAC address")),
        },
        "the NIC",
      ),
      "the NIC list",
      CONFIG_LIMITS.nics,
    ).superRefine(unique((n) => n.id, "id", "NIC id")),
    firmware: orNull(text("the firmware")),
    commandLine,
  },
  "the configuration",
);

/**
 * Checks a stored QEMU configuration document against its schema, and its command line against
 * the command-line policy, and returns it typed, holding only the fields Strata knows. Throws
 * DATA_CORRUPT naming the first field that is wrong, with its path.
 */
export function parseQemuConfig(doc: unknown): VmConfig {
  const c = parseDocument(QemuConfigSchema, doc, CONTEXT);
  if (c.commandLine !== null)
    checkRecordedCommandLine(
      c.commandLine,
      c.disks.map((d) => d.file),
      (what) => {
        throw new StrataError(ErrorCode.DATA_CORRUPT, `${CONTEXT}: commandLine: its command line: ${what}`);
      },
    );
  return c;
}
