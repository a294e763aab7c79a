/** files ls / files get: single files from inside a restore point's disks. */
import { resolve } from "node:path";
import type { Command } from "commander";
import {
  type DiskLayout,
  diskLayout,
  FileBrowser,
  type FsSelection,
  openDisk,
  parseSelection,
  restoreFiles,
  tarFiles,
} from "../engine/files.js";
import type { FsEntry } from "../image/fs-types.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { interruptSignal, output, withRepo } from "./context.js";

interface GetFlags {
  to?: string;
  disk?: string;
  tar?: boolean;
  overwrite?: boolean;
}

export function registerFilesCommands(program: Command): void {
  const files = program
    .command("files")
    .description("list and restore single files from inside a restore point's disks (ext2/3/4, FAT)");

  files
    .command("ls")
    .description("list partitions, or a directory inside a restore point's filesystem")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots)")
    .argument("[where...]", "[DISK[:PART]] [PATH]: PATH starts with /")
    .addHelpText(
      "after",
      `
With no PATH, lists the partitions of each disk (or of DISK) and the filesystem found in each.
With a PATH, lists that directory (or shows that file). DISK[:PART] may be left out when the
restore point has one disk with one partition (or none); otherwise the error lists the choices.

Examples:
  strata files ls web1/latest
  strata files ls web1/latest /etc
  strata files ls web1/2026-11-22T01:02:03Z root:2 /var/log`,
    )
    .action(async (ref: string, where: string[], _opts: unknown, cmd: Command) => {
      const out = output(cmd);
      if (where.length > 2)
        throw new StrataError(ErrorCode.USAGE, "files ls takes at most DISK[:PART] and PATH");
      const path = where.find((w) => w.startsWith("/"));
      const specs = where.filter((w) => !w.startsWith("/"));
      if (specs.length > 1 || where.filter((w) => w.startsWith("/")).length > 1)
        throw new StrataError(
          ErrorCode.USAGE,
          "files ls takes one DISK[:PART] and one PATH (starting with /)",
        );
      const sel: FsSelection = specs[0] === undefined ? {} : parseSelection(specs[0]);
      await withReadLock(cmd, `files ls of ${ref}`, async (repo) => {
        const snap = await repo.findSnapshot(ref);
        const id = `${snap.vm}/${snap.time}`;
        if (path === undefined && sel.partition === undefined) {
          const names = sel.disk === undefined ? snap.manifest.disks.map((d) => d.name) : [sel.disk];
          const layouts: DiskLayout[] = [];
          for (const name of names) layouts.push(await diskLayout(name, await openDisk(repo, snap, name)));
          out.result({ id, disks: layouts }, () => layouts.map(renderLayout).join("\n"));
          return;
        }
        const browser = await FileBrowser.open(repo, snap, sel);
        try {
          const entries = await browser.list(path ?? "/");
          out.result(
            {
              id,
              disk: browser.disk,
              partition: browser.partition.number,
              filesystem: browser.fs.type,
              path: path ?? "/",
              entries,
            },
            () => entries.map(renderEntry).join("\n"),
          );
        } finally {
          await browser.close();
        }
      });
    });

  files
    .command("get")
    .description("restore files and directories (recursively) from inside a restore point")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots)")
    .argument("<paths...>", "absolute paths inside the filesystem")
    .option("--to <dir>", "write them into this directory (created if missing)")
    .option("--tar", "write a tar stream to stdout instead of --to")
    .option("--disk <disk[:part]>", "which disk and partition (needed when there are several)")
    .option("--overwrite", "replace files and symlinks that exist under --to")
    .addHelpText(
      "after",
      `
Each PATH lands under --to by its last name (like cp -r): /etc/hosts becomes DIR/hosts, /etc
becomes DIR/etc/…, / becomes the contents of DIR. Mode, times and symlinks are kept, owners too
when running as root. Chunks are fetched from the repository on demand and verified: a damaged
chunk stops the restore. Device nodes, fifos and sockets are skipped with a warning.

Examples:
  strata files get web1/latest /etc/nginx --to /tmp/nginx-restored
  strata files get web1/latest /home/alice --disk root:2 --tar > alice.tar`,
    )
    .action(async (ref: string, paths: string[], opts: GetFlags, cmd: Command) => {
      const out = output(cmd);
      if ((opts.to === undefined) === (opts.tar === undefined))
        throw new StrataError(ErrorCode.USAGE, "give exactly one of --to DIR or --tar");
      if (opts.tar && process.stdout.isTTY)
        throw new StrataError(
          ErrorCode.USAGE,
          "--tar writes a binary archive to stdout: redirect it to a file or a pipe",
        );
      if (opts.tar && out.json)
        throw new StrataError(
          ErrorCode.USAGE,
          "--tar writes the archive to stdout, so --json cannot be used with it",
        );
      for (const p of paths)
        if (!p.startsWith("/"))
          throw new StrataError(ErrorCode.USAGE, `"${p}" is not an absolute path inside the filesystem`);
      const sel = opts.disk === undefined ? {} : parseSelection(opts.disk);
      const signal = interruptSignal();
      await withReadLock(cmd, `files get of ${ref}`, async (repo) => {
        const snap = await repo.findSnapshot(ref);
        const browser = await FileBrowser.open(repo, snap, sel);
        try {
          if (opts.tar) {
            const s = await tarFiles(browser, paths, process.stdout, { signal });
            if (!out.quiet)
              process.stderr.write(
                `${s.files} files, ${s.directories} directories, ${s.symlinks} symlinks, ${formatBytes(s.bytes)} from ${browser.where}\n`,
              );
            return;
          }
          const to = resolve(opts.to!);
          const s = await restoreFiles(browser, paths, {
            to,
            overwrite: opts.overwrite === true,
            progress: out.progress(),
            signal,
          });
          out.result(
            {
              type: "summary",
              id: `${snap.vm}/${snap.time}`,
              disk: browser.disk,
              partition: browser.partition.number,
              to,
              ...s,
            },
            () =>
              `restored ${s.files} files, ${s.directories} directories, ${s.symlinks} symlinks ` +
              `(${formatBytes(s.bytes)}) from ${browser.where} to ${to} in ${(s.durationMs / 1000).toFixed(1)} s` +
              (s.skipped > 0 ? `; skipped ${s.skipped} special files` : ""),
          );
        } finally {
          await browser.close();
        }
      });
    });
}

async function withReadLock(
  cmd: Command,
  what: string,
  fn: (repo: Repository) => Promise<void>,
): Promise<void> {
  await withRepo(cmd, async (repo) => {
    const lock = await repo.lock("read", what);
    try {
      await fn(repo);
    } finally {
      await lock.release();
    }
  });
}

function renderLayout(l: DiskLayout): string {
  const head = `disk ${l.disk} (${formatBytes(l.size)}), ${l.scheme === "none" ? "no partition table" : l.scheme.toUpperCase()}`;
  const rows = l.partitions.map(
    (p) =>
      `  ${p.number === 0 ? `${l.disk}` : `${l.disk}:${p.number}`}  start ${p.start}  size ${formatBytes(p.size)}  ` +
      `${p.typeName}${p.label ? ` "${p.label}"` : ""}  ${p.filesystem ?? "no known filesystem"}`,
  );
  return [head, ...rows].join("\n");
}

function renderEntry(e: FsEntry): string {
  const kind = e.kind === "directory" ? "d" : e.kind === "symlink" ? "l" : e.kind === "file" ? "-" : "?";
  const perms = [6, 3, 0]
    .map((s) => {
      const v = (e.mode >> s) & 7;
      return `${v & 4 ? "r" : "-"}${v & 2 ? "w" : "-"}${v & 1 ? "x" : "-"}`;
    })
    .join("");
  const time = new Date(e.mtime).toISOString().replace("T", " ").slice(0, 19);
  return `${kind}${perms} ${String(e.uid).padStart(5)} ${String(e.gid).padStart(5)} ${String(e.size).padStart(12)} ${time} ${e.name}${e.target !== undefined ? ` -> ${e.target}` : ""}`;
}
