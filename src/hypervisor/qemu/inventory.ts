/**
 * The VM inventory of the qemu adapter: names → how to reach them, so that `strata backup vm:NAME`
 * works. An entry's mode and quiesce become the resolved handle's defaults (the command line wins).
 *
 *   # /etc/strata/vms.yaml
 *   vms:
 *     web1:
 *       qmp: /var/run/qemu-server/100.qmp    # Proxmox VE's sockets work as they are
 *       qga: /var/run/qemu-server/100.qga    # optional; X.qga beside X.qmp is found by itself
 *       mode: snapshot                       # optional: snapshot | pause | offline
 *       quiesce: try                         # optional: require | try | off
 *       tags: [production, web]              # optional: the daemon's policies select by them
 *
 * The file is checked against a schema (zod) when read: socket paths are absolute, without `..`;
 * unknown keys and values are refused, naming the file, the VM and the key (USAGE).
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { z } from "zod";
import { NAME_RE } from "../../repo/format.js";
import { checkName } from "../../repo/repository.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { CONTROL, hasDotDot } from "../../util/schema.js";

/** A socket path: absolute (the inventory does not depend on where strata runs), no `..`. */
const socketPath = (key: string, what: string) =>
  z
    .string({ error: `"${key}" (${what}) must be a path` })
    .max(4096, `"${key}" is longer than 4096 characters`)
    .refine((p) => p.startsWith("/"), `"${key}" must be an absolute path`)
    .refine((p) => !hasDotDot(p), `"${key}" must not have a ".." segment`)
    .refine((p) => !CONTROL.test(p), `"${key}" holds control characters`);

const EntrySchema = z.strictObject(
  {
    qmp: socketPath("qmp", "the QMP socket path").optional(),
    qga: socketPath("qga", "the guest agent socket path").optional(),
    mode: z
      .enum(["snapshot", "pause", "offline"], { error: "mode must be snapshot, pause or offline" })
      .optional(),
    quiesce: z.enum(["require", "try", "off"], { error: "quiesce must be require, try or off" }).optional(),
    tags: z
      .array(z.string().regex(NAME_RE, "a tag must be a plain name (letters, digits, . _ -)"), {
        error: "tags must be a list of names",
      })
      .max(64, "at most 64 tags")
      .optional(),
  },
  { error: (iss) => (iss.code === "unrecognized_keys" ? undefined : "settings must be a mapping") },
);

export type InventoryEntry = Omit<z.infer<typeof EntrySchema>, "qmp"> & { qmp: string };

/** At most this many VMs in one inventory. */
const MAX_VMS = 100_000;

export const DEFAULT_INVENTORY = "/etc/strata/vms.yaml";

/** The first problem of an entry, worded for the file's owner. */
function entryProblem(v: unknown): string | undefined {
  const r = EntrySchema.safeParse(v);
  if (r.success) return r.data.qmp === undefined ? `"qmp" (the QMP socket path) is required` : undefined;
  const issue = r.error.issues[0]!;
  if (issue.code === "unrecognized_keys") return `unknown key "${issue.keys[0]}"`;
  return issue.message;
}

/**
 * The YAML parser, loaded on first use: every command imports this module through the adapter
 * registry, few read an inventory, and yaml's 70-odd module files cost a restore that starts
 * with a cold page cache ~0.1 s of its ~2.5 s before its first chunk.
 */
function yaml(): typeof import("yaml") {
  return createRequire(import.meta.url)("yaml") as typeof import("yaml");
}

export function loadInventory(path: string): Map<string, InventoryEntry> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new StrataError(ErrorCode.USAGE, `cannot read the inventory ${path}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = yaml().parse(text);
  } catch (err) {
    throw new StrataError(
      ErrorCode.USAGE,
      `inventory ${path} is not valid YAML: ${(err as Error).message.split("\n")[0]}`,
    );
  }
  const root = (doc as { vms?: unknown } | null)?.vms ?? doc;
  if (typeof root !== "object" || root === null || Array.isArray(root)) {
    throw new StrataError(
      ErrorCode.USAGE,
      `inventory ${path} must map VM names to their settings (see strata backup --help)`,
    );
  }
  const entries = Object.entries(root as Record<string, unknown>);
  if (entries.length > MAX_VMS)
    throw new StrataError(ErrorCode.USAGE, `inventory ${path} lists more than ${MAX_VMS} VMs`);
  const out = new Map<string, InventoryEntry>();
  for (const [name, v] of entries) {
    try {
      checkName("VM", name);
    } catch (err) {
      throw new StrataError(ErrorCode.USAGE, `inventory ${path}: ${(err as Error).message}`);
    }
    const bad = entryProblem(v);
    if (bad !== undefined) throw new StrataError(ErrorCode.USAGE, `inventory ${path}, VM "${name}": ${bad}`);
    out.set(name, EntrySchema.parse(v) as InventoryEntry);
  }
  return out;
}
