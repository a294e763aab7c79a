/**
 * The qemu adapter: a running QEMU VM reached over its QMP socket (and its guest agent's), named
 * as `qmp:SOCKET[,qga=SOCKET]` or `vm:NAME` from the inventory (/etc/strata/vms.yaml,
 * inventory.ts). Backups are sessions of session.ts (snapshot, pause, offline); leftovers are
 * doctor.ts's: the state records of dead runs, what is named strata-* on the VM, stray files.
 */

import { existsSync } from "node:fs";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { socketAccepts } from "../../util/process.js";
import type { BackupRequest, Finding, VmAdapter, VmHandle, VmSummary } from "../adapter.js";
import { inspectVm, stateDirLeftovers, strayFiles } from "./doctor.js";
import { qemuInstant } from "./instant.js";
import { DEFAULT_INVENTORY, type InventoryEntry, loadInventory } from "./inventory.js";
import { QmpClient } from "./qmp.js";
import { qemuRestore } from "./restore.js";
import { openQemuSession, type QemuTarget } from "./session.js";

export type { QemuTarget };

/** The agent socket `X.qga` beside a QMP socket `X.qmp` (Proxmox VE's layout), when it exists. */
function siblingAgent(qmp: string): string | undefined {
  if (!qmp.endsWith(".qmp")) return undefined;
  const qga = `${qmp.slice(0, -4)}.qga`;
  return existsSync(qga) ? qga : undefined;
}

/** Parses `qmp:PATH[,qga=PATH]`; a sibling `X.qga` of `X.qmp` is used when present. */
export function parseQmpSpec(spec: string): QemuTarget {
  if (!spec.startsWith("qmp:"))
    throw new StrataError(
      ErrorCode.USAGE,
      `not a QMP source: "${spec}" (qmp:/path/to/qmp.sock[,qga=/path/to/qga.sock])`,
    );
  const [path, ...opts] = spec.slice(4).split(",");
  if (!path) throw new StrataError(ErrorCode.USAGE, `source "${spec}" names no QMP socket`);
  const t: QemuTarget = { qmp: path };
  for (const o of opts) {
    const [k, v] = o.split("=", 2);
    if (k === "qga" && v) t.qga = v;
    else throw new StrataError(ErrorCode.USAGE, `unknown option "${o}" in "${spec}" (known: qga=PATH)`);
  }
  const sibling = t.qga === undefined ? siblingAgent(path) : undefined;
  if (sibling !== undefined) t.qga = sibling;
  return t;
}

/** Where the QEMU VM of a `qmp:` or `vm:` source is reached (`vm:NAME` looked up in `inventory`). */
export function resolveQemuTarget(uri: string, inventory: string = DEFAULT_INVENTORY): QemuTarget {
  if (!uri.startsWith("vm:")) return parseQmpSpec(uri);
  const entry = loadInventory(inventory).get(uri.slice(3));
  if (!entry)
    throw new StrataError(ErrorCode.USAGE, `VM "${uri.slice(3)}" is not in the inventory ${inventory}`);
  return entryTarget(entry);
}

/** Where an inventory entry's VM is reached. */
function entryTarget(e: InventoryEntry): QemuTarget {
  const qga = e.qga ?? siblingAgent(e.qmp);
  return { qmp: e.qmp, ...(qga === undefined ? {} : { qga }) };
}

/** What QEMU says about the VM on `qmp`: no listener is "shut off"; a busy monitor is "unknown". */
async function vmState(qmp: string): Promise<VmSummary["state"]> {
  if (!(await socketAccepts(qmp))) return "shut off";
  let c: QmpClient | undefined;
  try {
    c = await QmpClient.connect(qmp, { connectTimeoutMs: 2000, commandTimeoutMs: 2000 });
    const s = await c.execute<{ status: string; running: boolean }>("query-status");
    if (s.running) return "running";
    if (s.status === "shutdown") return "shut off";
    return "paused";
  } catch {
    return "unknown";
  } finally {
    await c?.close().catch(() => {});
  }
}

export class QemuAdapter implements VmAdapter {
  readonly id = "qemu";
  readonly schemes = ["qmp", "vm"] as const;
  readonly usage = "qmp:SOCKET[,qga=SOCKET] (a running QEMU VM), vm:NAME (from the inventory)";

  // Restore (restore.ts) and instant recovery (instant.ts) of VMs from their QEMU configuration.
  readonly parseConfig = qemuRestore.parseConfig;
  readonly planRestore = qemuRestore.planRestore;
  readonly refuseIfRunning = qemuRestore.refuseIfRunning;
  readonly define = qemuRestore.define;
  readonly start = qemuRestore.start;
  readonly renderConfig = qemuRestore.renderConfig;
  readonly instant = qemuInstant;

  /** `inventory`: the YAML file `vm:NAME` is looked up in. */
  constructor(private readonly inventory: string = DEFAULT_INVENTORY) {}

  async resolve(uri: string): Promise<VmHandle> {
    if (uri.startsWith("vm:")) {
      const name = uri.slice(3);
      const entry = loadInventory(this.inventory).get(name);
      if (!entry)
        throw new StrataError(ErrorCode.USAGE, `VM "${name}" is not in the inventory ${this.inventory}`);
      const defaults: NonNullable<VmHandle["defaults"]> = {
        ...(entry.mode === undefined ? {} : { mode: entry.mode }),
        ...(entry.quiesce === undefined ? {} : { quiesce: entry.quiesce }),
      };
      return this.handle(uri, entryTarget(entry), name, defaults);
    }
    return this.handle(uri, parseQmpSpec(uri), undefined, undefined);
  }

  private handle(
    source: string,
    target: QemuTarget,
    defaultName: string | undefined,
    defaults: VmHandle["defaults"],
  ): VmHandle {
    return {
      adapter: this,
      source,
      defaultName,
      ...(defaults === undefined ? {} : { defaults }),
      openBackup: (request: BackupRequest) => openQemuSession(request.vm, target, request),
      leftovers: async (vm: string, stateDir: string, fix: boolean): Promise<Finding[]> => [
        ...(await inspectVm({ vm, ...target }, fix, stateDir)),
        ...(await strayFiles(stateDir, fix)),
      ],
    };
  }

  /** The inventory's VMs (none without an inventory file) and whether QEMU answers for each. */
  async list(): Promise<VmSummary[]> {
    if (!existsSync(this.inventory)) return [];
    const entries = [...loadInventory(this.inventory)];
    return Promise.all(
      entries.map(
        async ([name, e]): Promise<VmSummary> => ({
          adapter: this.id,
          source: `vm:${name}`,
          name,
          state: await vmState(e.qmp),
          ...(e.tags === undefined ? {} : { tags: e.tags }),
        }),
      ),
    );
  }

  leftovers(stateDir: string, fix: boolean): Promise<Finding[]> {
    return stateDirLeftovers(stateDir, fix);
  }
}
