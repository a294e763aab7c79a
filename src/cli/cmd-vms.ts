/** vms: every VM the adapters of this build see on this host, with the source that backs it up. */
import type { Command } from "commander";
import { printable } from "../util/names.js";
import { DEFAULT_INVENTORY, listHostVms } from "./adapters.js";
import { output } from "./context.js";

export function registerVmsCommand(program: Command): void {
  program
    .command("vms")
    .description("list the VMs on this host that Strata can back up, from every platform")
    .option("--inventory <file>", "VM inventory for vm:NAME", DEFAULT_INVENTORY)
    .addHelpText(
      "after",
      `
Asks every platform adapter: the VM inventory (vm:NAME, ${DEFAULT_INVENTORY}), libvirt's domains
(libvirt:NAME) and Proxmox VE's VMs (pve:VMID). The SOURCE column is what strata backup takes.
A platform that can't be asked (libvirtd not running, no /etc/pve) is named in a warning and the
others are listed all the same.

Examples:
  strata vms
  strata vms --json | jq -r '.vms[] | select(.state == "running") | .source'`,
    )
    .action(async (opts: { inventory: string }, cmd: Command) => {
      const out = output(cmd);
      const { vms, unreachable } = await listHostVms({ inventory: opts.inventory });
      for (const u of unreachable) out.warn(`${u.adapter}: cannot list its VMs: ${u.error}`);
      out.result({ vms, unreachable }, () => {
        if (vms.length === 0) return "no VMs found";
        const rows = vms.map((v) => [printable(v.source), printable(v.name), v.state, v.adapter]);
        const head = ["SOURCE", "NAME", "STATE", "ADAPTER"];
        const width = head.map((h, i) => Math.max(h.length, ...rows.map((r) => r[i]!.length)));
        return [head, ...rows]
          .map((r) =>
            r
              .map((c, i) => c.padEnd(width[i]!))
              .join("  ")
              .trimEnd(),
          )
          .join("\n");
      });
    });
}
