/** restore: whole VMs, clones, single disks, configuration only. */
import { resolve } from "node:path";
import type { Command } from "commander";
import { restoreAtInstant } from "../engine/pit-restore.js";
import { checkRestoreOptions, type PointRestoreResult, restorePoint } from "../engine/point-restore.js";
import type { RestoreDiskResult } from "../engine/restore.js";
import { bootHint, planVmRestore, readVmConfig, renderVmConfig } from "../engine/vm-restore.js";
import { checkName, type Repository, type SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { writeNew } from "../util/files.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry } from "./adapters.js";
import { journalCompleteUntil } from "./cmd-protect.js";
import { interruptSignal, output, withRepo } from "./context.js";
import { parseInstantRef, resolveInstantRef } from "./instant-ref.js";
import type { Output } from "./output.js";

export function registerRestoreCommand(program: Command): void {
  program
    .command("restore")
    .description(
      "restore a whole VM (in place, or as a clone beside it), one disk, or only its configuration",
    )
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots); VM@INSTANT with --journal")
    .option("--journal <dir>", "VM@INSTANT: the VM's write journal (strata protect --journal DIR)")
    .option(
      "--target <dir>",
      "restore into this directory: a VM as a clone (disks, run/, <name>.json), else <disk>.<format> files",
    )
    .option("--name <name>", "name of the clone restored with --target (default: <name>-restored)")
    .option(
      "--format <format>",
      "image format of restored files: raw or qcow2 (default: as backed up; raw for file: backups)",
    )
    .option("--disk <name>", "only this disk (to --target, to --device, or back to its own path)")
    .option("--device <path>", "write the disk (--disk) onto this block device instead, overwriting it")
    .option("--config-only", "print (or write, --to) the VM's definition instead of restoring disks")
    .option(
      "--as <kind>",
      "with --config-only: json (Strata's definition, default), or the platform's own: qemu-args (a QEMU command line), xml (a libvirt domain XML), pve (a Proxmox VMID.conf)",
    )
    .option("--to <file>", "with --config-only: write the definition to this file")
    .option(
      "--start",
      "start the restored VM (QEMU: detached, its QMP socket printed; libvirt: the defined domain)",
    )
    .option("--force", "replace existing files; allow overwriting --device (never the disks of a running VM)")
    .addHelpText(
      "after",
      `
Restore points of VMs (backed up through qmp:, vm:, libvirt: or pve:) carry the VM's configuration:
  strata restore VM/TIME                      every disk back to the path it had, same format;
                                              refused while the VM runs, and over existing
                                              files without --force
  strata restore VM/TIME --target DIR         a clone in DIR: DIR/<disk>.<format>, sockets and
        [--name NEW] [--start]                console in DIR/run/, definition in DIR/NEW.json
                                              (a libvirt domain: DIR/NEW.xml, and defined);
                                              new name, UUID and MAC addresses, so it runs
                                              beside the original
  strata restore VM/TIME --disk NAME [--target DIR | --device DEV]
                                              one disk: back to its path, into DIR, or onto DEV
  strata restore VM/TIME --config-only [--target DIR --name NEW] [--as json|qemu-args|xml|pve] [--to FILE]
                                              the definition only, in place or for a clone

--start runs QEMU with the recorded command line, rewritten for the clone (KVM where the CPU
and /dev/kvm allow it, else TCG), leaves it running and prints its QMP socket; a libvirt
domain is started by libvirt. A VM restored
from a crash-consistent or paused restore point boots as after a power loss; from a
clean-shutdown one, cleanly ("strata snapshots" shows each restore point's consistency).

Any instant of a VM protected by "strata protect" (its write journal in DIR):
  strata restore VM@2026-11-29T08:01:23.250Z --journal DIR --target OUT
  strata restore VM@-90s --journal DIR --target OUT
  strata restore VM@mark:before-upgrade --journal DIR --target OUT
                                              the disks as they were at that instant (host
                                              clock, millisecond resolution), as OUT/<disk>.raw:
                                              the newest base restore point cut before it, and
                                              every write journaled up to it replayed in order

Files are written sparsely to a temporary name and renamed into place when complete and
synced; every chunk is verified before it is written. qcow2 files are written through
qemu-storage-daemon. A block device must be at least as large as the disk; every byte of the
disk is written, zeros included.

Examples:
  strata restore web1/latest
  strata restore web1/latest --target /srv/clones/web1b --name web1b --start
  strata restore web1/latest --config-only --as qemu-args
  strata restore web2/latest --config-only --as xml          # a libvirt domain
  strata restore web1/latest --disk root --target /var/lib/images/restored --format raw
  strata restore web1/latest --disk root --device /dev/vg0/web1-root --force`,
    )
    .action(async (ref: string, opts: RestoreFlags, cmd: Command) => {
      const out = output(cmd);
      if (ref.includes("@") || opts.journal !== undefined) return restoreInstant(out, ref, opts, cmd);
      checkRestoreFlags(opts);
      await withRepo(cmd, async (repo) => {
        const lock = await repo.lock("read", `restore of ${ref}`);
        try {
          if (!opts.configOnly) repo.prepareReads();
          const snap = await repo.findSnapshot(ref);
          if (opts.configOnly) return await printConfig(out, repo, snap, opts);
          const t0 = Date.now();
          const r = await restorePoint(repo, snap, buildRegistry(), {
            ...(opts.target === undefined ? {} : { target: opts.target }),
            ...(opts.name === undefined ? {} : { name: opts.name }),
            ...(opts.format === undefined ? {} : { format: opts.format as "raw" | "qcow2" }),
            ...(opts.disk === undefined ? {} : { disk: opts.disk }),
            ...(opts.device === undefined ? {} : { device: opts.device }),
            ...(opts.start ? { start: true } : {}),
            force: opts.force === true,
            progress: out.progress(),
            signal: interruptSignal(),
            warn: (w) => out.warn(w),
          });
          printRestore(out, snap, r, Date.now() - t0);
        } finally {
          await lock.release();
        }
      });
    });
}

function diskLines(results: readonly RestoreDiskResult[], ms: number): string[] {
  const seconds = ms / 1000;
  const size = results.reduce((n, r) => n + r.size, 0);
  return [
    ...results.map(
      (r) => `${r.disk}: ${r.path} (${formatBytes(r.size)}, ${formatBytes(r.bytesWritten)} data)`,
    ),
    `restored ${formatBytes(size)} in ${seconds.toFixed(1)} s (${formatBytes(size / Math.max(seconds, 0.001))}/s)`,
  ];
}

/** --config-only: the definition, in place or for a clone, printed or written. */
async function printConfig(
  out: Output,
  repo: Repository,
  snap: SnapshotRef,
  opts: RestoreFlags,
): Promise<void> {
  const id = `${snap.vm}/${snap.time}`;
  if (opts.disk !== undefined && !snap.manifest.disks.some((d) => d.name === opts.disk))
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `restore point ${id} has no disk "${opts.disk}" (it has: ${snap.manifest.disks.map((d) => d.name).join(", ")})`,
    );
  const stored = await readVmConfig(repo, snap, buildRegistry());
  if (!stored)
    throw new StrataError(
      ErrorCode.USAGE,
      `--config-only: restore point ${id} was taken from image files and carries no VM configuration`,
    );
  if (opts.name !== undefined) checkName("clone", opts.name);
  const plan = await planVmRestore(stored, snap, {
    ...(opts.target === undefined ? {} : { target: opts.target }),
    ...(opts.name === undefined ? {} : { name: opts.name }),
    ...(opts.format === undefined ? {} : { format: opts.format as "raw" | "qcow2" }),
    ...(opts.disk === undefined ? {} : { disk: opts.disk }),
  });
  for (const w of plan.warnings) out.warn(w);
  const as = opts.as ?? "json";
  const text = renderVmConfig(stored, plan, as);
  if (opts.to !== undefined) {
    await writeNew(resolve(opts.to), text, opts.force === true);
    out.result({ type: "summary", id, definition: resolve(opts.to), as }, () => `wrote ${resolve(opts.to!)}`);
  } else if (out.json) {
    out.result({ type: "summary", id, as, text }, () => "");
  } else {
    process.stdout.write(text);
  }
}

/** What a restore did, for people and --json. */
function printRestore(out: Output, snap: SnapshotRef, r: PointRestoreResult, ms: number): void {
  const { plan, started, disks: results } = r;
  const id = r.id;
  if (!plan) {
    out.result({ type: "summary", id, disks: results, durationMs: Math.round(ms) }, () =>
      diskLines(results, ms).join("\n"),
    );
    return;
  }
  const consistency = snap.manifest.consistency;
  const definition = plan.definition.file;
  out.result(
    {
      type: "summary",
      id,
      scenario: r.scenario,
      consistency,
      vm: { name: plan.config.name, uuid: plan.config.uuid, nics: plan.config.nics },
      disks: results,
      ...(definition ? { definition } : {}),
      ...(started ? { started: { pid: started.pid, where: started.where, ...started.details } } : {}),
      ...(!started && plan.startHint ? { startHint: plan.startHint } : {}),
      durationMs: Math.round(ms),
    },
    () =>
      [
        ...diskLines(results, ms),
        ...(definition
          ? [
              `${plan.clone ? "clone" : "VM"} "${plan.config.name}" (UUID ${plan.config.uuid}${plan.config.nics.map((n) => `, ${n.id} ${n.mac}`).join("")}) defined in ${definition}`,
            ]
          : []),
        `${id} is ${consistency}: ${bootHint(consistency)}`,
        ...(started
          ? [
              `started ${plan.config.name ?? "the VM"}${started.pid ? ` (pid ${started.pid})` : ""}: ${started.where}`,
              ...Object.entries(started.details ?? {}).map(([k, v]) => `  ${k}: ${v}`),
            ]
          : plan.startHint
            ? [`start it with: ${plan.startHint}`]
            : []),
      ].join("\n"),
  );
}

/** VM@INSTANT --journal DIR --target OUT: a base restore point plus the journal replayed up to the instant. */
async function restoreInstant(out: Output, ref: string, opts: RestoreFlags, cmd: Command): Promise<void> {
  const usage = (m: string) => new StrataError(ErrorCode.USAGE, m);
  if (opts.journal === undefined) throw usage(`${ref}: give the VM's write journal with --journal DIR`);
  if (!parseInstantRef(ref))
    throw usage(
      `"${ref}" with --journal: name an instant as VM@TIME (e.g. web1@2026-11-29T08:01:23.250Z or web1@-90s) or VM@mark:NAME`,
    );
  if (opts.target === undefined) throw usage(`${ref}: give the directory the disks go to with --target DIR`);
  const other = [
    ["--disk", opts.disk],
    ["--device", opts.device],
    ["--name", opts.name],
    ["--config-only", opts.configOnly],
    ["--start", opts.start],
    ["--as", opts.as],
    ["--to", opts.to],
  ].find(([, v]) => v !== undefined);
  if (other)
    throw usage(`${other[0]} does not apply to a restore at an instant (it restores every disk to --target)`);
  if (opts.format !== undefined && opts.format !== "raw")
    throw usage("a restore at an instant writes raw files");
  const journal = resolve(opts.journal);
  await withRepo(cmd, async (repo) => {
    const { vm, atMs, quiesced } = (await resolveInstantRef(ref, journal, repo.keys))!;
    const lock = await repo.lock("read", `restore of ${ref}`);
    try {
      const t0 = Date.now();
      const completeUntilNs = await journalCompleteUntil(journal);
      const r = await restoreAtInstant(repo, {
        journal,
        vm,
        atNs: BigInt(atMs) * 1_000_000n,
        ...(completeUntilNs === undefined ? {} : { completeUntilNs }),
        target: resolve(opts.target!),
        force: opts.force === true,
        progress: out.progress(),
        signal: interruptSignal(),
      });
      const ms = Date.now() - t0;
      const at = new Date(atMs).toISOString();
      out.result(
        {
          type: "summary",
          id: `${vm}@${at}`,
          at,
          base: r.base,
          disks: r.disks,
          replayed: {
            entries: r.replay.entries,
            bytes: r.replay.bytes,
            lastWrite:
              r.replay.lastNs === undefined
                ? null
                : new Date(Number(r.replay.lastNs / 1_000_000n)).toISOString(),
          },
          durationMs: Math.round(ms),
        },
        () =>
          [
            ...diskLines(r.disks, ms),
            `${vm} at ${at}: base ${r.base} + ${r.replay.entries} journaled writes (${formatBytes(r.replay.bytes)})${r.replay.lastNs === undefined ? "" : `, the last one at ${new Date(Number(r.replay.lastNs / 1_000_000n)).toISOString()}`}; ${quiesced ? "filesystem-consistent (a mark made with --quiesce)" : "crash-consistent"}`,
          ].join("\n"),
      );
    } finally {
      await lock.release();
    }
  });
}

interface RestoreFlags {
  journal?: string;
  target?: string;
  name?: string;
  format?: string;
  device?: string;
  disk?: string;
  configOnly?: boolean;
  as?: string;
  to?: string;
  start?: boolean;
  force?: boolean;
}

function checkRestoreFlags(opts: RestoreFlags): void {
  const usage = (m: string) => new StrataError(ErrorCode.USAGE, m);
  if (opts.device !== undefined && opts.configOnly)
    throw usage("--device restores one disk: --name, --config-only and --start do not apply");
  if (opts.disk !== undefined && opts.configOnly)
    throw usage("--disk restores one disk, not a VM: --name, --start and --config-only do not apply");
  checkRestoreOptions({ ...opts, start: opts.start === true });
  if (!opts.configOnly && (opts.as !== undefined || opts.to !== undefined))
    throw usage("--as and --to go with --config-only");
  if (opts.configOnly && opts.start) throw usage("--config-only restores nothing to start");
}
