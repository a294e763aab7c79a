/** verify --boot: boot a restore point without a network and ask its guest agent (SureBackup). */
import { resolve } from "node:path";
import type { Command } from "commander";
import { restorePointRow } from "../catalog/rebuild.js";
import { type BootVerifyResult, verifyBoot } from "../engine/instant/boot-verify.js";
import { readVmConfig } from "../engine/vm-restore.js";
import { defaultStateDir } from "../hypervisor/qemu/state.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { buildRegistry } from "./adapters.js";
import { serveCommand } from "./cmd-instant.js";
import { catalogPath, globals, interruptSignal, output, repoPath, withCatalog, withRepo } from "./context.js";

export const BOOT_VERIFY_HELP = `
With --boot VM/TIME the restore point is booted instead (instant recovery, as a clone with no
network: its NICs reach nothing), Strata waits for the guest agent to answer a ping and, with
--check, runs that shell command in the guest through the agent (guest-exec, /bin/sh -c); it
must exit 0. Then the VM, the NBD server and the overlays are removed again. The outcome and
the time from the boot to the agent's answer are recorded with the restore point in the catalog
(--catalog, $STRATA_CATALOG) and shown by strata snapshots. A failed boot exits non-zero.

Example:
  strata verify --boot web1/latest --timeout 300 --check 'systemctl is-system-running'`;

export interface BootFlags {
  boot: string;
  timeout?: number;
  check?: string;
  stateDir?: string;
}

/** The summary of a boot verification for people. */
export function describeBootResult(r: BootVerifyResult): string {
  return r.outcome === "passed"
    ? `${r.restorePoint} boots: its guest agent answered ${(r.answerMs! / 1000).toFixed(1)} s after the boot started` +
        (r.command ? ", the check command exited 0" : "")
    : `${r.restorePoint} FAILED boot verification: ${r.error}`;
}

export async function verifyBootCommand(opts: BootFlags, cmd: Command): Promise<void> {
  const out = output(cmd);
  const g = globals(cmd);
  const stateDir = opts.stateDir ?? defaultStateDir();
  await withRepo(cmd, async (repo) => {
    const snap = await repo.findSnapshot(opts.boot);
    const id = `${snap.vm}/${snap.time}`;
    const stored = await readVmConfig(repo, snap, buildRegistry());
    if (!stored)
      throw new StrataError(
        ErrorCode.USAGE,
        `${id} holds no VM configuration (a file: backup): there is no VM to boot`,
      );
    const result = await verifyBoot(snap, stored, buildRegistry(), {
      repo: repoPath(g),
      ...(g.passwordFile === undefined ? {} : { passwordFile: resolve(g.passwordFile) }),
      serveCommand: serveCommand(cmd, id, "64M"),
      stateDir,
      timeoutMs: (opts.timeout ?? 300) * 1000,
      ...(opts.check === undefined ? {} : { command: ["/bin/sh", "-c", opts.check] }),
      signal: interruptSignal(),
      log: (m) => out.warn(m),
    });
    let recorded: string | null = catalogPath(g);
    try {
      await withCatalog(cmd, (cat) =>
        cat.recordBootVerification(
          { id: repo.config.id, location: repo.store.location },
          restorePointRow(snap.manifest),
          {
            bootVerifiedAt: result.startedAt,
            bootOutcome: result.outcome,
            bootAnswerMs: result.answerMs,
            bootError: result.error,
          },
        ),
      );
    } catch (err) {
      out.warn(`the result is not recorded in the catalog ${recorded}: ${describeError(err)}`);
      recorded = null;
    }
    out.result({ type: "summary", ...result, catalog: recorded }, () => describeBootResult(result));
    if (result.outcome === "failed")
      throw new StrataError(
        result.errorCode === ErrorCode.TIMEOUT ? ErrorCode.TIMEOUT : ErrorCode.BOOT_FAILED,
        `boot verification of ${id} failed: ${result.error}`,
      );
  });
}
