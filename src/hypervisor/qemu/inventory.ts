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
 */
import { readFileSync } from "node:fs";
import { parse } from "yaml";
import { checkName } from "../../repo/repository.js";
import { ErrorCode, StrataError } from "../../util/errors.js";

export interface InventoryEntry {
  qmp: string;
  qga?: string;
  mode?: "snapshot" | "pause" | "offline";
  quiesce?: "require" | "try" | "off";
}

export const DEFAULT_INVENTORY = "/etc/strata/vms.yaml";

export function loadInventory(path: string): Map<string, InventoryEntry> {
  let text: string;
  try {
    text = readFileSync(path, "utf8");
  } catch (err) {
    throw new StrataError(ErrorCode.USAGE, `cannot read the inventory ${path}: ${(err as Error).message}`);
  }
  let doc: unknown;
  try {
    doc = parse(text);
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
  const out = new Map<string, InventoryEntry>();
  for (const [name, v] of Object.entries(root as Record<string, unknown>)) {
    const where = `inventory ${path}, VM "${name}"`;
    checkName("VM", name);
    if (typeof v !== "object" || v === null)
      throw new StrataError(ErrorCode.USAGE, `${where}: settings must be a mapping`);
    const e = v as Record<string, unknown>;
    for (const k of Object.keys(e)) {
      if (!["qmp", "qga", "mode", "quiesce"].includes(k))
        throw new StrataError(ErrorCode.USAGE, `${where}: unknown key "${k}"`);
    }
    if (typeof e.qmp !== "string")
      throw new StrataError(ErrorCode.USAGE, `${where}: "qmp" (the QMP socket path) is required`);
    if (e.qga !== undefined && typeof e.qga !== "string")
      throw new StrataError(ErrorCode.USAGE, `${where}: "qga" must be a path`);
    if (e.mode !== undefined && !["snapshot", "pause", "offline"].includes(e.mode as string)) {
      throw new StrataError(ErrorCode.USAGE, `${where}: mode must be snapshot, pause or offline`);
    }
    if (e.quiesce !== undefined && !["require", "try", "off"].includes(e.quiesce as string)) {
      throw new StrataError(ErrorCode.USAGE, `${where}: quiesce must be require, try or off`);
    }
    out.set(name, e as unknown as InventoryEntry);
  }
  return out;
}
