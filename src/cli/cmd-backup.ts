/** backup: a VM (running, or its image files) into a new restore point, through its adapter. */
import type { Command } from "commander";
import type { BackupResult } from "../engine/backup.js";
import { backupVm } from "../engine/vm-backup.js";
import type { BackupRequest, QuiescePolicy } from "../hypervisor/adapter.js";
import { manifestTotals } from "../repo/manifest.js";
import { checkName } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry, DEFAULT_INVENTORY, defaultStateDir, schemeOf, sourceSyntaxes } from "./adapters.js";
import { interruptSignal, output, parseImmutability, withRepo } from "./context.js";
import type { Output } from "./output.js";

interface BackupOpts {
  vm?: string;
  mode: string;
  quiesce: string;
  inventory: string;
  stateDir?: string;
  shutdown?: boolean;
  shutdownTimeout: string;
  limitRead?: string;
  immutableFor?: string;
  immutableMode?: string;
}

function printBackupSummary(out: Output, r: BackupResult, ms: number, extra: Record<string, unknown>): void {
  const seconds = ms / 1000;
  const t = manifestTotals(r.manifest);
  const chunksZero = r.manifest.disks.reduce((n, d) => n + d.chunksZero, 0);
  out.result(
    {
      type: "summary",
      id: r.id,
      vm: r.manifest.vm,
      time: r.manifest.time,
      parent: r.manifest.parent,
      mode: r.manifest.mode,
      consistency: r.manifest.consistency,
      size: t.size,
      bytesRead: t.bytesRead,
      bytesNew: t.bytesNew,
      bytesStored: t.bytesStored,
      chunksNew: t.chunksNew,
      chunksReused: t.chunksReused,
      chunksZero,
      disks: r.manifest.disks.map((d) => ({
        name: d.name,
        size: d.size,
        bytesRead: d.bytesRead,
        bytesNew: d.bytesNew,
        ...(d.readMode === undefined ? {} : { readMode: d.readMode }),
        ...(d.fullReadReason === undefined ? {} : { fullReadReason: d.fullReadReason }),
      })),
      durationMs: Math.round(ms),
      ...(r.manifest.immutable ? { immutable: r.manifest.immutable } : {}),
      ...extra,
    },
    () =>
      [
        `restore point ${r.id} created (${r.manifest.consistency})`,
        ...(r.manifest.immutable
          ? [`immutable (${r.manifest.immutable.mode}) until ${r.manifest.immutable.until}`]
          : []),
        `read ${formatBytes(t.bytesRead)} of ${formatBytes(t.size)} in ${seconds.toFixed(1)} s (${formatBytes(t.bytesRead / Math.max(seconds, 0.001))}/s)`,
        `new ${formatBytes(t.bytesNew)} (${formatBytes(t.bytesStored)} stored) in ${t.chunksNew} chunks; ${t.chunksReused} chunks reused, ${chunksZero} all-zero`,
      ].join("\n"),
  );
}

export function registerBackupCommands(program: Command): void {
  program
    .command("backup")
    .description("back up a VM's disks as a new restore point")
    .argument("<source...>", "the VM: one source, or several file: sources (its disks); see below")
    .option("--vm <name>", "VM name the restore point belongs to (default: NAME of vm:NAME)")
    .option(
      "--mode <mode>",
      "running VMs: snapshot (no downtime), pause (milliseconds of pause) or offline (shut down)",
      "snapshot",
    )
    .option("--shutdown", "offline mode: shut the VM down for the backup and start it again afterwards")
    .option("--shutdown-timeout <seconds>", "offline mode: how long the guest may take to shut down", "120")
    .option(
      "--quiesce <policy>",
      "snapshot mode: freeze guest filesystems through the agent: require, try or off",
      "try",
    )
    .option("--inventory <file>", "VM inventory for vm:NAME", DEFAULT_INVENTORY)
    .option(
      "--limit-read <MiB/s>",
      "read the VM's disks at most this fast (live backups: also QEMU's block-job speed)",
    )
    .option(
      "--state-dir <dir>",
      "where fleecing images and the cleanup record live (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .option(
      "--immutable-for <duration>",
      "lock the restore point (S3 Object Lock) for this long, e.g. 30d (default: the repository's setting)",
    )
    .option("--immutable-mode <mode>", "compliance (nobody can delete early) or governance", "compliance")
    .addHelpText(
      "after",
      () => `
Sources:
${sourceSyntaxes()}

Running VMs are backed up live: all disks are cut at one instant (one QMP transaction), the guest
is frozen through its agent (snapshot mode) or paused (pause mode) only for those milliseconds,
and Strata reads the point-in-time view over NBD while the guest keeps running. A checkpoint
bitmap per disk makes the next backup read only what changed; when it can't be trusted (the VM
was restarted with a raw disk, the bitmap is gone) the whole disk is read and the log says why.
Nothing is left on the VM; if Strata is killed, the next run or "strata doctor --fix" cleans up.

Image files and block devices (file:...) are read as they are; their restore points are
crash-consistent. They are read as raw unless ,format=FMT says otherwise (qcow2, vmdk, vhdx, vpc,
vdi, ...): a format is never guessed from the first bytes, which the guest wrote (a raw disk
beginning like an image header only gets a warning). Images that refer to other files (backing
files, external data files, VMDK extents, json: names) are refused; flatten them first. Every restore point is complete: unchanged chunks are reused, not stored again.

Examples:
  strata backup --vm web1 qmp:/var/run/qemu-server/100.qmp
  strata backup vm:web1 --mode pause
  strata backup vm:db1 --mode offline --shutdown
  strata backup vm:web1 --limit-read 50         # keep the host's disks free for the VMs
  strata backup --vm web1 file:/var/lib/images/web1.qcow2,format=qcow2
  strata backup --vm db1 file:/dev/vg0/db1-root,name=root file:/dev/vg0/db1-data,name=data`,
    )
    .action(async (sources: string[], opts: BackupOpts, cmd: Command) => {
      const out = output(cmd);
      const vmHandle = await buildRegistry({ inventory: opts.inventory }).resolveAll(sources);
      const vm = opts.vm ?? vmHandle.defaultName;
      if (!vm)
        throw new StrataError(ErrorCode.USAGE, `--vm NAME is required for ${schemeOf(sources[0]!)}: sources`);
      checkName("VM", vm);
      let mode = opts.mode;
      let quiesce = opts.quiesce;
      if (cmd.getOptionValueSource("mode") === "default" && vmHandle.defaults?.mode)
        mode = vmHandle.defaults.mode;
      if (cmd.getOptionValueSource("quiesce") === "default" && vmHandle.defaults?.quiesce)
        quiesce = vmHandle.defaults.quiesce;
      if (mode !== "snapshot" && mode !== "pause" && mode !== "offline") {
        throw new StrataError(ErrorCode.USAGE, `--mode ${mode} is not one of snapshot, pause, offline`);
      }
      if (quiesce !== "require" && quiesce !== "try" && quiesce !== "off") {
        throw new StrataError(ErrorCode.USAGE, `--quiesce ${quiesce} is not one of require, try, off`);
      }
      const timeout = Number(opts.shutdownTimeout);
      if (mode === "offline" && (!Number.isFinite(timeout) || timeout <= 0)) {
        throw new StrataError(
          ErrorCode.USAGE,
          `--shutdown-timeout takes seconds, not "${opts.shutdownTimeout}"`,
        );
      }
      const limitRead = opts.limitRead === undefined ? undefined : Number(opts.limitRead);
      if (limitRead !== undefined && !(Number.isFinite(limitRead) && limitRead > 0 && limitRead <= 1_000_000))
        throw new StrataError(
          ErrorCode.USAGE,
          `--limit-read takes MiB/s above 0 (up to 1000000), not "${opts.limitRead}"`,
        );
      const request: { mode: BackupRequest["mode"]; quiesce: QuiescePolicy } = { mode, quiesce };
      const immutable = parseImmutability(
        opts.immutableFor,
        cmd.getOptionValueSource("immutableMode") === "default" ? undefined : opts.immutableMode,
      );
      // The sources' own checks run while the repository opens.
      vmHandle.prepare?.((m) => out.warn(m));
      await withRepo(
        cmd,
        async (repo) => {
          const t0 = Date.now();
          const r = await backupVm(repo, vmHandle, {
            vm,
            ...request,
            ...(mode === "offline"
              ? { shutdown: opts.shutdown === true, shutdownTimeoutMs: timeout * 1000 }
              : {}),
            stateDir: opts.stateDir ?? defaultStateDir(),
            ...(limitRead === undefined ? {} : { jobMiBs: limitRead }),
            progress: out.progress(),
            signal: interruptSignal(),
            log: (m) => out.warn(m),
          });
          printBackupSummary(out, r, Date.now() - t0, r.details);
        },
        immutable ? { immutable } : {},
      );
    });
}
