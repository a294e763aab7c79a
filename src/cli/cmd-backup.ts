/** backup and restore. */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { backup } from "../engine/backup.js";
import { restoreDiskToFile } from "../engine/restore.js";
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
    .description("restore a restore point's disks as raw image files")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots)")
    .requiredOption("--target <dir>", "directory to write <disk>.raw files into (created if missing)")
    .option("--disk <name>", "only this disk")
    .option("--force", "replace existing files")
    .addHelpText(
      "after",
      `
Files are written sparsely (all-zero regions become holes) to a temporary name and renamed
into place when complete and synced. Every chunk is verified before it is written.

Example:
  strata restore web1/latest --target /var/lib/images/restored`,
    )
    .action(async (ref: string, opts: { target: string; disk?: string; force?: boolean }, cmd: Command) => {
      const out = output(cmd);
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
          const dir = resolve(opts.target);
          await fs.mkdir(dir, { recursive: true });
          const signal = interruptSignal();
          const t0 = Date.now();
          const results: Array<Awaited<ReturnType<typeof restoreDiskToFile>>> = [];
          for (const name of names) {
            results.push(
              await restoreDiskToFile(repo, snap, name, join(dir, `${name}.raw`), {
                force: opts.force === true,
                progress: out.progress(),
                signal,
              }),
            );
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
