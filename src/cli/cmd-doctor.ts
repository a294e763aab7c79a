/** doctor: find and remove what interrupted backups left on VMs; report what others left. */
import type { Command } from "commander";
import type { Finding } from "../hypervisor/adapter.js";
import { checkName } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry, DEFAULT_INVENTORY, defaultStateDir, schemeOf } from "./adapters.js";
import { output } from "./context.js";

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
        const fix = opts.fix === true;
        const registry = buildRegistry({ inventory: opts.inventory });
        const found: Finding[] = [];
        if (args.length > 0) {
          const handles = [];
          for (const a of args) {
            const h = await registry.resolve(a);
            const vm = h.defaultName ?? opts.vm;
            if (!vm)
              throw new StrataError(ErrorCode.USAGE, `--vm NAME is needed with a ${schemeOf(a)}: argument`);
            checkName("VM", vm);
            if (!h.leftovers)
              throw new StrataError(
                ErrorCode.USAGE,
                `${a}: ${h.adapter.id} sources leave nothing behind to look for`,
              );
            handles.push({ h, vm, leftovers: h.leftovers });
          }
          for (const { vm, leftovers } of handles) found.push(...(await leftovers(vm, stateDir, fix)));
        } else {
          for (const a of registry.adapters())
            if (a.leftovers) found.push(...(await a.leftovers(stateDir, fix)));
        }
        // Checks that span the state directory answer once per VM inspected: keep one of each.
        const seen = new Set<string>();
        const findings = found.filter((f) => {
          const key = JSON.stringify([f.vm, f.owner, f.what]);
          if (seen.has(key)) return false;
          seen.add(key);
          return true;
        });
        const ours = findings.filter((f) => f.owner === "strata");
        const left = ours.filter((f) => !f.fixed);
        out.result({ type: "summary", findings, clean: left.length === 0 }, () => {
          if (findings.length === 0)
            return `nothing left behind${args.length === 0 ? " (no unfinished runs)" : ""}`;
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
