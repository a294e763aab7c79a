/**
 * The composition root of the hypervisor layer: the one place that knows which VM adapters this
 * build has. Every command that names VMs (backup, doctor, demo) resolves its sources through the
 * registry built here; nothing below the CLI knows the list.
 */
import type { VmSummary } from "../hypervisor/adapter.js";
import { ImageFileAdapter } from "../hypervisor/images/adapter.js";
import { LibvirtAdapter } from "../hypervisor/libvirt/index.js";
import { PveAdapter } from "../hypervisor/pve/index.js";
import { QemuAdapter } from "../hypervisor/qemu/adapter.js";
import { DEFAULT_INVENTORY } from "../hypervisor/qemu/inventory.js";
import { defaultStateDir } from "../hypervisor/qemu/state.js";
import { AdapterRegistry } from "../hypervisor/registry.js";
import { describeError } from "../util/errors.js";

export { DEFAULT_INVENTORY, defaultStateDir };

export interface RegistryOptions {
  /** The VM inventory `vm:NAME` is looked up in (--inventory). */
  inventory?: string;
}

/**
 * Every adapter of this build. Order matters only for messages: an unknown source is answered
 * with the adapters' URI syntaxes in this order.
 */
export function buildRegistry(options: RegistryOptions = {}): AdapterRegistry {
  return new AdapterRegistry()
    .register(new ImageFileAdapter())
    .register(new QemuAdapter(options.inventory ?? DEFAULT_INVENTORY))
    .register(new LibvirtAdapter())
    .register(new PveAdapter());
}

/**
 * Every VM the adapters of this build see on this host. A platform that can't be asked
 * (libvirtd not running, no /etc/pve) is named in `unreachable`; the others are listed all the same.
 */
export async function listHostVms(
  options: RegistryOptions = {},
): Promise<{ vms: VmSummary[]; unreachable: Array<{ adapter: string; error: string }> }> {
  const vms: VmSummary[] = [];
  const unreachable: Array<{ adapter: string; error: string }> = [];
  for (const adapter of buildRegistry(options).adapters()) {
    if (!adapter.list) continue;
    try {
      vms.push(...(await adapter.list()));
    } catch (err) {
      unreachable.push({ adapter: adapter.id, error: describeError(err) });
    }
  }
  return { vms, unreachable };
}

/** The URI syntaxes of every adapter, one per line, for --help. */
export function sourceSyntaxes(): string {
  return buildRegistry()
    .adapters()
    .map((a) => `  ${a.usage}`)
    .join("\n");
}

/** The scheme of a source URI ("qmp" of "qmp:/run/x.qmp"), for messages. */
export function schemeOf(uri: string): string {
  return /^([a-z][a-z0-9+.-]*):/.exec(uri)?.[1] ?? uri;
}
