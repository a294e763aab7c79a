/** doctor: find and remove what interrupted backups left on VMs; report what others left. */
import type { Command } from "commander";
import { parseQmpSpec } from "../engine/live-backup.js";
import { type DoctorTarget, type Finding, inspectVm, strayFiles } from "../hypervisor/qemu/doctor.js";
import { defaultStateDir, StateRecord } from "../hypervisor/qemu/state.js";
import { checkName } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { output } from "./context.js";
import { DEFAULT_INVENTORY, loadInventory } from "./inventory.js";

export function registerDoctorCommand(program: Command): void {
  program
    .command("doctor")
    .description("find (and with --fix remove) what interrupted backups left on VMs")
    .argument(
      "[vm...]",
      "VMs to inspect: qmp:SOCKET[,qga=SOCKET] with --vm, or vm:NAME (default: those with unfinished runs)",
    )
    .option(
      "--fix",
      "remove Strata's leftovers: thaw, resume, drop exports, jobs, fleecing nodes and files, temporary bitmaps",
    )
    .option("--vm <name>", "the VM name for a qmp: argument")
    .option("--inventory <file>", "VM inventory for vm:NAME", DEFAULT_INVENTORY)
    .option(
      "--state-dir <dir>",
      "where backups keep their cleanup records (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .addHelpText(
      "after",
      `
Strata records everything it creates on a VM before creating it. A run that was killed leaves
that record; doctor reads it and, with --fix, releases every item (thaw and resume first). It
also looks at each VM for anything named strata-*, and reports what other tools left behind
(internal snapshots, overlay chains, dirty bitmaps) with the space it holds; those it never touches.

Examples:
  strata doctor                                  # every VM with an unfinished run
  strata doctor --fix vm:web1
  strata doctor --vm web1 qmp:/var/run/qemu-server/100.qmp`,
    )
    .action(
      async (
        args: string[],
        opts: { fix?: boolean; vm?: string; inventory: string; stateDir?: string },
        cmd: Command,
      ) => {
        const out = output(cmd);
        const stateDir = opts.stateDir ?? defaultStateDir();
        const targets: DoctorTarget[] = [];
        for (const a of args) {
          if (a.startsWith("vm:")) {
            const name = a.slice(3);
            const e = loadInventory(opts.inventory).get(name);
            if (!e)
              throw new StrataError(
                ErrorCode.USAGE,
                `VM "${name}" is not in the inventory ${opts.inventory}`,
              );
            targets.push({ vm: name, qmp: e.qmp, ...(e.qga ? { qga: e.qga } : {}) });
          } else {
            if (!opts.vm) throw new StrataError(ErrorCode.USAGE, "--vm NAME is needed with a qmp: argument");
            checkName("VM", opts.vm);
            const t = parseQmpSpec(a);
            targets.push({ vm: opts.vm, qmp: t.qmp, ...(t.qga ? { qga: t.qga } : {}) });
          }
        }
        if (args.length === 0) {
          for (const r of await StateRecord.all(stateDir)) {
            targets.push({ vm: r.data.vm, qmp: r.data.qmp, ...(r.data.qga ? { qga: r.data.qga } : {}) });
          }
        }
        const findings: Finding[] = [];
        for (const t of targets) findings.push(...(await inspectVm(t, opts.fix === true, stateDir)));
        findings.push(...(await strayFiles(stateDir, opts.fix === true)));
        const ours = findings.filter((f) => f.owner === "strata");
        const left = ours.filter((f) => !f.fixed);
        out.result({ type: "summary", findings, clean: left.length === 0 }, () => {
          if (findings.length === 0)
            return `nothing left behind${targets.length === 0 ? " (no unfinished runs)" : ""}`;
          return findings
            .map(
              (f) =>
                `${f.owner === "strata" ? (f.fixed ? "removed " : "LEFTOVER") : "foreign "} ${f.vm}: ${f.what}${f.bytes === undefined ? "" : ` (${formatBytes(f.bytes)})`}`,
            )
            .join("\n");
        });
        if (left.length > 0 && !opts.fix) {
          throw new StrataError(
            ErrorCode.EXTERNAL,
            `${left.length} leftover(s) found: run "strata doctor --fix" to remove them`,
          );
        }
      },
    );
}
