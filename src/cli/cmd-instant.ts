/** instant: boot a VM straight from a restore point, list, stop, resume, migrate it live. */
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { resumeInstant, stopInstant } from "../engine/instant/control.js";
import { migrateInstant } from "../engine/instant/migrate.js";
import { startInstant } from "../engine/instant/start.js";
import {
  DEFAULT_RECONNECT_DELAY,
  describeInstant,
  instantStateDir,
  listInstantRecords,
  serveCommandLine,
} from "../engine/instant/state.js";
import { bootHint, readVmConfig } from "../engine/vm-restore.js";
import { defaultStateDir } from "../hypervisor/qemu/state.js";
import { checkName } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry } from "./adapters.js";
import { globals, interruptSignal, output, parseCount, repoArgs, repoPath, withRepo } from "./context.js";
import { findRestorePoint, INSTANT_HELP, JOURNAL_OPTION, pointId } from "./instant-ref.js";

interface StartFlags {
  name?: string;
  target?: string;
  stateDir?: string;
  reconnectDelay?: number;
  cacheSize: string;
  journal?: string;
}

const stateDirOption = [
  "--state-dir <dir>",
  "where the records of instantly recovered VMs live (default $STRATA_STATE_DIR or /var/lib/strata/state)",
] as const;

/** `strata serve REF --repo R [--password-file F] [--journal DIR]`: the serving process, run detached. */
export function serveCommand(cmd: Command, ref: string, cacheSize: string, journal?: string): string[] {
  const g = globals(cmd);
  const script = process.argv[1];
  if (!script) throw new StrataError(ErrorCode.EXTERNAL, "cannot tell how strata was started");
  return serveCommandLine([process.execPath, resolve(script)], ref, {
    repoArgs: repoArgs(g),
    cacheSize,
    ...(journal === undefined ? {} : { journal: resolve(journal) }),
  });
}

const stateDirOf = (opts: { stateDir?: string }) => opts.stateDir ?? defaultStateDir();

export function registerInstantCommands(program: Command): void {
  const instant = program
    .command("instant")
    .description("boot a VM straight from a restore point, then move it to production storage live")
    .addHelpText(
      "after",
      `
strata instant VM/TIME [--name NEW] [--target DIR] boots the VM on local qcow2 overlays whose
backing is the restore point, served read-only over NBD by a detached strata serve. Guest writes
go to the overlays, never to the repository; data is fetched on demand, so the VM runs in
seconds whatever its disk sizes. Then:

  strata instant list
  strata instant migrate NAME --target /var/lib/images [--format qcow2|raw] [--limit 50]
  strata instant resume NAME          # the server (or QEMU) died: start it again
  strata instant stop NAME [--discard]`,
    );

  instant
    .command("start", { isDefault: true })
    .description("boot a VM from a restore point (the default: strata instant VM/TIME)")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots); VM@INSTANT with --journal")
    .option(...JOURNAL_OPTION)
    .option("--name <name>", "run as a clone with this name (new UUID and MAC addresses)")
    .option("--target <dir>", "directory for the overlays and run files (default <state dir>/instant/NAME)")
    .option(...stateDirOption)
    .option(
      "--reconnect-delay <s>",
      `seconds QEMU holds disk requests while the server restarts (default ${DEFAULT_RECONNECT_DELAY})`,
      parseCount("--reconnect-delay"),
    )
    .option("--cache-size <size>", "the server's chunk cache per disk", "256M")
    .addHelpText(
      "after",
      `
Without --name it is known to strata instant by its VM name in the repository and keeps its
name, UUID and MAC addresses (the original must not run on the same network); with --name
it is a clone that runs beside the original (new UUID and MACs). Its sockets, console and
logs go to DIR/run/. Where it runs (QEMU: its QMP socket; libvirt: a transient domain) and its
console are printed.

${INSTANT_HELP}
The VM's configuration is that of its newest restore point at or before the instant.

Examples:
  strata instant web1/latest --name web1-ir --target /srv/ir/web1
  strata instant web1@-2m --journal /srv/journal/web1 --name web1-2m
  strata instant migrate web1-ir --target /var/lib/images/web1 --limit 100`,
    )
    .action(async (ref: string, opts: StartFlags, cmd: Command) => {
      const out = output(cmd);
      if (opts.name !== undefined) checkName("VM", opts.name);
      await withRepo(cmd, async (repo) => {
        const found = await findRestorePoint(repo, ref, opts.journal);
        // The serving process opens the instant itself; here only its disks and time are needed.
        await found.release();
        const snap = found.snap;
        const configFrom = found.instant ? found.instant.instant.configFrom : snap;
        if (!configFrom)
          throw new StrataError(
            ErrorCode.USAGE,
            `${pointId(snap)}: VM ${snap.vm} has no restore point in the repository whose configuration it could boot with (run strata backup of it once)`,
          );
        const stored = await readVmConfig(repo, configFrom, buildRegistry());
        if (!stored)
          throw new StrataError(
            ErrorCode.USAGE,
            `${pointId(configFrom)} holds no VM configuration (a file: backup): serve its disks with strata serve instead`,
          );
        // What the user typed names it (list, stop, migrate); QEMU keeps its recorded -name.
        const name = opts.name ?? snap.vm;
        checkName("VM", name);
        const id = pointId(snap);
        const dir = resolve(opts.target ?? join(instantStateDir(stateDirOf(opts)), name));
        const started = await startInstant(snap, stored, buildRegistry(), {
          dir,
          name,
          clone: opts.name !== undefined,
          repo: repoPath(globals(cmd)),
          ...(globals(cmd).passwordFile === undefined
            ? {}
            : { passwordFile: resolve(globals(cmd).passwordFile!) }),
          serveCommand: serveCommand(cmd, id, opts.cacheSize, found.instant ? opts.journal : undefined),
          stateDir: stateDirOf(opts),
          ...(opts.reconnectDelay === undefined ? {} : { reconnectDelay: opts.reconnectDelay }),
          log: (m) => out.warn(m),
        });
        const s = await describeInstant(started.record, buildRegistry());
        for (const w of s.warnings) out.warn(w);
        out.result({ type: "summary", id, ...s, startMs: started.startMs }, () =>
          [
            `"${s.name}" runs from ${id} (pid ${s.vm.pid}: ${s.vm.where}), started in ${(started.startMs / 1000).toFixed(1)} s`,
            ...s.disks.map(
              (d) =>
                `  ${d.name} (${formatBytes(d.size)}): overlay ${d.overlay} over nbd+unix:///${d.name}?socket=${s.serve.socket}`,
            ),
            ...Object.entries(started.record.vm?.details ?? {}).map(([k, v]) => `${k}: ${v}`),
            `NBD server pid ${s.serve.pid}, log ${s.serve.log}`,
            `${id} is ${snap.manifest.consistency}: ${bootHint(snap.manifest.consistency)}`,
            `guest writes go to the overlays; to keep them: strata instant migrate ${s.name} --target DIR`,
          ].join("\n"),
        );
      });
    });

  instant
    .command("list")
    .description("instantly recovered VMs: what runs, where, and how far migrated")
    .option(...stateDirOption)
    .action(async (opts: { stateDir?: string }, cmd: Command) => {
      const out = output(cmd);
      const { records, unreadable } = await listInstantRecords(stateDirOf(opts), buildRegistry());
      for (const u of unreadable) out.warn(`${u.file} not listed: ${u.error}`);
      const states = await Promise.all(records.map((r) => describeInstant(r, buildRegistry())));
      out.result(states, () =>
        states.length === 0
          ? "no instantly recovered VMs"
          : states
              .map((s) =>
                [
                  `${s.name}  ${s.phase}  from ${s.restorePoint}  VM ${s.vm.running ? `pid ${s.vm.pid}` : "not running"}, server ${s.serve.running ? `pid ${s.serve.pid}` : "not running"}`,
                  ...(s.vm.where
                    ? [`  ${s.vm.where}${s.vm.console ? `, console ${s.vm.console}` : ""}`]
                    : []),
                  ...s.disks.map(
                    (d) =>
                      `  ${d.name} (${formatBytes(d.size)}): ${"production" in d ? d.production : d.overlay}`,
                  ),
                ].join("\n"),
              )
              .join("\n"),
      );
    });

  instant
    .command("stop")
    .description("stop an instantly recovered VM and its server")
    .argument("<name>")
    .option("--discard", "also remove the overlays (the guest's unmigrated writes) and the record")
    .option(
      "--powerdown <s>",
      "ask the guest to power down first, waiting this long before quitting",
      parseCount("--powerdown"),
    )
    .option(...stateDirOption)
    .action(
      async (
        name: string,
        opts: { discard?: boolean; powerdown?: number; stateDir?: string },
        cmd: Command,
      ) => {
        const out = output(cmd);
        const r = await stopInstant(
          name,
          {
            discard: opts.discard === true,
            powerdownMs: (opts.powerdown ?? 0) * 1000,
            stateDir: stateDirOf(opts),
          },
          buildRegistry(),
        );
        out.result({ type: "summary", name, vm: r.vm, discarded: r.discarded }, () =>
          [
            `stopped "${name}" (VM: ${r.vm})`,
            ...(opts.discard
              ? [`removed ${r.discarded.length === 0 ? "its record" : r.discarded.join(", ")}`]
              : (r.record.vm?.disks ?? []).some((d) => !d.production)
                ? [
                    `overlays kept (strata instant resume ${name} starts it again; stop --discard removes them)`,
                  ]
                : []),
          ].join("\n"),
        );
      },
    );

  instant
    .command("resume")
    .description("start the server (and QEMU) of an instantly recovered VM again after they died")
    .argument("<name>")
    .option(...stateDirOption)
    .action(async (name: string, opts: { stateDir?: string }, cmd: Command) => {
      const out = output(cmd);
      const r = await resumeInstant(
        name,
        { stateDir: stateDirOf(opts), log: (m) => out.warn(m) },
        buildRegistry(),
      );
      const m = r.interruptedMigration;
      out.result(
        { type: "summary", restarted: r.restarted, ...(await describeInstant(r.record, buildRegistry())) },
        () =>
          [
            r.restarted.length === 0
              ? `"${name}" runs: nothing to restart`
              : `restarted ${r.restarted.map((x) => (x === "serve" ? `the NBD server (pid ${r.record.serve.pid})` : `the VM (pid ${r.record.vm?.pid})`)).join(" and ")}`,
            ...(m
              ? [
                  `a migration to ${m.target} did not finish: run strata instant migrate ${name} --target ${m.target} --format ${m.format} again`,
                ]
              : []),
          ].join("\n"),
      );
    });

  instant
    .command("migrate")
    .description("move a running instantly recovered VM's disks to production storage, live")
    .argument("<name>")
    .requiredOption("--target <dir>", "directory for the disks (DIR/<disk>.<format>)")
    .option("--format <fmt>", "qcow2 or raw", "qcow2")
    .option("--limit <MiB/s>", "copy at most this fast (MiB/s)")
    .option("--active", "mirror every guest write synchronously, so the copy converges under any write load")
    .option(...stateDirOption)
    .addHelpText(
      "after",
      `
Each disk is mirrored (QEMU: blockdev-mirror sync=full; libvirt: virsh blockcopy) from its
overlay and backing to the new file while the guest runs and writes; when the copy has caught
up the device pivots to it, the overlay and NBD backing are released and, once every disk is
local, the server stops and the overlays are removed (a libvirt domain is then defined
persistently). An interrupted migration can be run again.
With --limit below the guest's write rate a background copy may never catch up: --active makes
each guest write wait for both copies instead.`,
    )
    .action(
      async (
        name: string,
        opts: { target: string; format: string; limit?: string; active?: boolean; stateDir?: string },
        cmd: Command,
      ) => {
        const out = output(cmd);
        if (opts.format !== "qcow2" && opts.format !== "raw")
          throw new StrataError(ErrorCode.USAGE, `--format ${opts.format}: migrate writes qcow2 or raw`);
        let limitBytes: number | undefined;
        if (opts.limit !== undefined) {
          const n = Number(opts.limit);
          if (!Number.isFinite(n) || n <= 0)
            throw new StrataError(ErrorCode.USAGE, `--limit takes MiB/s above 0, not "${opts.limit}"`);
          limitBytes = n * 1024 * 1024;
        }
        const t0 = Date.now();
        const disks = await migrateInstant(
          name,
          {
            target: opts.target,
            format: opts.format,
            ...(limitBytes === undefined ? {} : { limitBytes }),
            active: opts.active === true,
            stateDir: stateDirOf(opts),
            progress: out.progress(),
            signal: interruptSignal(),
            log: (m) => out.warn(m),
          },
          buildRegistry(),
        );
        const ms = Date.now() - t0;
        out.result(
          {
            type: "summary",
            name,
            disks: disks.map((d) => ({
              ...d,
              bytesPerSecond: d.readyMs > 0 ? Math.round(d.size / (d.readyMs / 1000)) : null,
            })),
            durationMs: ms,
          },
          () =>
            [
              ...disks.map((d) =>
                d.skipped
                  ? `${d.disk}: already on ${d.path}`
                  : `${d.disk}: ${d.path} (${d.format}, ${formatBytes(d.size)}) ready in ${(d.readyMs / 1000).toFixed(1)} s (${formatBytes(d.size / Math.max(0.001, d.readyMs / 1000))}/s), pivoted at ${(d.pivotMs / 1000).toFixed(1)} s`,
              ),
              `"${name}" runs on local storage; the NBD server is stopped and the overlays are removed`,
            ].join("\n"),
        );
      },
    );
}
