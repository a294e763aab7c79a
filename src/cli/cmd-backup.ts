/** backup and restore. */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { backup } from "../engine/backup.js";
import { restoreDiskToFile } from "../engine/restore.js";
import { restoreDiskToDevice, restoreDiskToQcow2 } from "../engine/restore-sinks.js";
import { openFileDisks, parseFileSpecs } from "../hypervisor/files/index.js";
import { manifestTotals } from "../repo/manifest.js";
import { checkName } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { interruptSignal, output, withRepo } from "./context.js";

export function registerBackupCommands(program: Command): void {
  program
    .command("backup")
    .description("back up a VM's disks as a new restore point")
    .argument("<source...>", "disks: file:PATH[,name=DISK] (raw image or block device), repeatable")
    .requiredOption("--vm <name>", "VM name the restore point belongs to")
    .addHelpText(
      "after",
      `
Every restore point is complete: unchanged chunks are reused, not stored again, so the
second and later backups store only what changed. All-zero regions cost nothing.

Examples:
  strata backup --vm web1 file:/var/lib/images/web1.img
  strata backup --vm db1 file:/dev/vg0/db1-root,name=root file:/dev/vg0/db1-data,name=data`,
    )
    .action(async (sources: string[], opts: { vm: string }, cmd: Command) => {
      const out = output(cmd);
      checkName("VM", opts.vm);
      const specs = parseFileSpecs(sources);
      await withRepo(cmd, async (repo) => {
        const disks = await openFileDisks(specs);
        try {
          const config = Buffer.from(
            JSON.stringify({
              kind: "files",
              disks: disks.map((d) => ({ name: d.name, source: d.source, size: d.size })),
            }),
          );
          const t0 = Date.now();
          const r = await backup(repo, {
            vm: opts.vm,
            disks,
            mode: "file",
            consistency: "crash-consistent",
            config,
            progress: out.progress(),
            signal: interruptSignal(),
          });
          const seconds = (Date.now() - t0) / 1000;
          const t = manifestTotals(r.manifest);
          const chunksZero = r.manifest.disks.reduce((n, d) => n + d.chunksZero, 0);
          out.result(
            {
              type: "summary",
              id: r.id,
              vm: r.manifest.vm,
              time: r.manifest.time,
              parent: r.manifest.parent,
              consistency: r.manifest.consistency,
              size: t.size,
              bytesRead: t.bytesRead,
              bytesNew: t.bytesNew,
              bytesStored: t.bytesStored,
              chunksNew: t.chunksNew,
              chunksReused: t.chunksReused,
              chunksZero,
              durationMs: Math.round(seconds * 1000),
            },
            () =>
              [
                `restore point ${r.id} created`,
                `read ${formatBytes(t.bytesRead)} in ${seconds.toFixed(1)} s (${formatBytes(t.bytesRead / Math.max(seconds, 0.001))}/s)`,
                `new ${formatBytes(t.bytesNew)} (${formatBytes(t.bytesStored)} stored) in ${t.chunksNew} chunks; ${t.chunksReused} chunks reused, ${chunksZero} all-zero`,
              ].join("\n"),
          );
        } finally {
          await Promise.all(disks.map((d) => d.close()));
        }
      });
    });

  program
    .command("restore")
    .description("restore a restore point's disks as raw or qcow2 image files, or onto a block device")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots)")
    .option("--target <dir>", "directory to write <disk>.raw or <disk>.qcow2 files into (created if missing)")
    .option("--format <format>", "image format of the files: raw or qcow2", "raw")
    .option("--device <path>", "write the disk (--disk) onto this block device instead, overwriting it")
    .option("--disk <name>", "only this disk")
    .option("--force", "replace existing files; allow overwriting --device")
    .addHelpText(
      "after",
      `
Files are written sparsely (all-zero regions become holes) to a temporary name and renamed
into place when complete and synced. Every chunk is verified before it is written.

qcow2 files are written through qemu-storage-daemon; all-zero regions stay unallocated.
A block device (disk, partition, LV) must be at least as large as the disk; every byte of
the disk is written, zeros included, and the device is synced at the end.

Examples:
  strata restore web1/latest --target /var/lib/images/restored
  strata restore web1/latest --target /var/lib/images/restored --format qcow2
  strata restore web1/latest --disk root --device /dev/vg0/web1-root --force`,
    )
    .action(async (ref: string, opts: RestoreFlags, cmd: Command) => {
      const out = output(cmd);
      checkRestoreFlags(opts);
      await withRepo(cmd, async (repo) => {
        const lock = await repo.lock("read", `restore of ${ref}`);
        try {
          const snap = await repo.findSnapshot(ref);
          const names = opts.disk === undefined ? snap.manifest.disks.map((d) => d.name) : [opts.disk];
          if (opts.disk !== undefined && !snap.manifest.disks.some((d) => d.name === opts.disk)) {
            throw new StrataError(
              ErrorCode.NOT_FOUND,
              `restore point ${snap.vm}/${snap.time} has no disk "${opts.disk}" (it has: ${snap.manifest.disks.map((d) => d.name).join(", ")})`,
            );
          }
          const signal = interruptSignal();
          const t0 = Date.now();
          const results: Array<Awaited<ReturnType<typeof restoreDiskToFile>>> = [];
          const common = { force: opts.force === true, progress: out.progress(), signal };
          if (opts.device !== undefined) {
            results.push(await restoreDiskToDevice(repo, snap, names[0]!, opts.device, common));
          } else {
            const dir = resolve(opts.target!);
            await fs.mkdir(dir, { recursive: true });
            const sink = opts.format === "qcow2" ? restoreDiskToQcow2 : restoreDiskToFile;
            for (const name of names) {
              results.push(await sink(repo, snap, name, join(dir, `${name}.${opts.format}`), common));
            }
          }
          const seconds = (Date.now() - t0) / 1000;
          const size = results.reduce((n, r) => n + r.size, 0);
          out.result(
            {
              type: "summary",
              id: `${snap.vm}/${snap.time}`,
              disks: results,
              durationMs: Math.round(seconds * 1000),
            },
            () =>
              [
                ...results.map(
                  (r) => `${r.disk}: ${r.path} (${formatBytes(r.size)}, ${formatBytes(r.bytesWritten)} data)`,
                ),
                `restored ${formatBytes(size)} in ${seconds.toFixed(1)} s (${formatBytes(size / Math.max(seconds, 0.001))}/s)`,
              ].join("\n"),
          );
        } finally {
          await lock.release();
        }
      });
    });
}

interface RestoreFlags {
  target?: string;
  format: string;
  device?: string;
  disk?: string;
  force?: boolean;
}

function checkRestoreFlags(opts: RestoreFlags): void {
  if ((opts.target === undefined) === (opts.device === undefined))
    throw new StrataError(ErrorCode.USAGE, "give exactly one of --target DIR or --device PATH");
  if (opts.format !== "raw" && opts.format !== "qcow2")
    throw new StrataError(ErrorCode.USAGE, `--format ${opts.format}: restores write raw or qcow2`);
  if (opts.device !== undefined && opts.disk === undefined)
    throw new StrataError(ErrorCode.USAGE, "--device needs --disk NAME: one disk goes onto one device");
  if (opts.device !== undefined && opts.format !== "raw")
    throw new StrataError(
      ErrorCode.USAGE,
      "--format does not apply to --device (a device holds the raw disk)",
    );
}
