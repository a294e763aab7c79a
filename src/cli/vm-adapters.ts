/**
 * The VM adapters this build knows, for commands that restore or boot a VM from a restore point
 * (found by the configuration's `kind`). The QEMU adapter's restore and instant-recovery parts
 * stand here on their own until they join the QEMU adapter that resolves backup sources.
 */
import type { VmAdapter } from "../hypervisor/adapter.js";
import { PveAdapter } from "../hypervisor/pve/index.js";
import { qemuInstant } from "../hypervisor/qemu/instant.js";
import { qemuRestore } from "../hypervisor/qemu/restore.js";
import { AdapterRegistry } from "../hypervisor/registry.js";
import { ErrorCode, StrataError } from "../util/errors.js";

const qemuRestoreAdapter: VmAdapter = {
  id: "qemu",
  schemes: [],
  usage: "qmp:SOCKET",
  resolve: (uri: string) =>
    Promise.reject(new StrataError(ErrorCode.INTERNAL, `${uri}: this QEMU adapter only restores`)),
  ...qemuRestore,
  instant: qemuInstant,
};

let registry: AdapterRegistry | undefined;

/** The registry of adapters that restore and boot VMs. */
export function vmAdapters(): AdapterRegistry {
  registry ??= new AdapterRegistry().register(qemuRestoreAdapter).register(new PveAdapter());
  return registry;
}
