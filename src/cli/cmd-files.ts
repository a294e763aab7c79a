/** files ls / files get: single files from inside a restore point's disks. */
import { resolve } from "node:path";
import type { Command } from "commander";
import {
  type BtrfsSubvolume,
  type DiskLayout,
  FILES_CACHE_BYTES,
  FileBrowser,
  type FsSelection,
  lvContents,
  parseSelection,
  type RestorePointLayout,
  restoreFiles,
  restorePointLayout,
  tarFiles,
  type VolumeGroupInfo,
} from "../engine/files/index.js";
import type { FsEntry } from "../image/fs-types.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { printable } from "../util/names.js";
import type { ProgressEvent } from "../util/progress.js";
import { formatBytes } from "../util/sizes.js";
import { interruptSignal, output, withRepo } from "./context.js";
import { findRestorePoint, INSTANT_HELP, JOURNAL_OPTION, pointId } from "./instant-ref.js";

interface GetFlags {
  to?: string;
  disk?: string;
  subvolume?: string;
  tar?: boolean;
  overwrite?: boolean;
  sameOwner?: boolean;
  keepSetuid?: boolean;
  journal?: string;
}

const SELECTION_HELP = `Which filesystem (DISK and PART may be left out when there is only one to choose):
  DISK            a disk without a partition table (or with a single partition)
  DISK:PART       partition PART of DISK (numbered as Linux does: 1…, logical ones from 5)
  [DISK:]VG/LV    LVM logical volume LV of volume group VG (its PVs may span several disks)`;

export function registerFilesCommands(program: Command): void {
  const files = program
    .command("files")
    .description(
      "list and restore single files from inside a restore point's disks (ext2/3/4, FAT; XFS, Btrfs, NTFS and LVM through libguestfs)",
    );

  files
    .command("ls")
    .description("list partitions and logical volumes, or a directory inside a restore point's filesystem")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots); VM@INSTANT with --journal")
    .argument("[where...]", "[DISK[:PART] | [DISK:]VG/LV] [PATH]: PATH starts with /")
    .option(
      "--subvolume <path>",
      "Btrfs: browse this subvolume (from the top level; / for the top level) instead of the default one",
    )
    .option(...JOURNAL_OPTION)
    .addHelpText(
      "after",
      `
With no PATH, lists the partitions of each disk (or of DISK), the filesystem found in each, and
the LVM volume groups and logical volumes on them. With a PATH, lists that directory (or shows
that file); listing / of a Btrfs filesystem also lists its subvolumes.

${SELECTION_HELP}

${INSTANT_HELP}

ext2/3/4 and FAT are read in-process; XFS, Btrfs, NTFS and logical volumes (whatever they hold)
through libguestfs, whose appliance VM boots first (~20 s without KVM).

Examples:
  strata files ls web1/latest
  strata files ls web1/latest /etc
  strata files ls web1/2026-11-22T01:02:03Z root:2 /var/log
  strata files ls web1/latest vg0/root /etc
  strata files ls web1/latest root:2 --subvolume @home /
  strata files ls web1@-5m --journal /srv/journal/web1 /etc`,
    )
    .action(
      async (ref: string, where: string[], opts: { subvolume?: string; journal?: string }, cmd: Command) => {
        const out = output(cmd);
        if (where.length > 2)
          throw new StrataError(ErrorCode.USAGE, "files ls takes at most a selection and a PATH");
        const path = where.find((w) => w.startsWith("/"));
        const specs = where.filter((w) => !w.startsWith("/"));
        if (specs.length > 1 || where.filter((w) => w.startsWith("/")).length > 1)
          throw new StrataError(
            ErrorCode.USAGE,
            "files ls takes one DISK[:PART] or [DISK:]VG/LV and one PATH (starting with /)",
          );
        const sel: FsSelection = {
          ...(specs[0] === undefined ? {} : parseSelection(specs[0])),
          ...(opts.subvolume === undefined ? {} : { subvolume: opts.subvolume }),
        };
        const signal = interruptSignal();
        await withReadLock(cmd, `files ls of ${ref}`, ref, opts.journal, async (repo, snap) => {
          const id = pointId(snap);
          if (
            path === undefined &&
            sel.partition === undefined &&
            !sel.volume &&
            sel.subvolume === undefined
          ) {
            const layout = await restorePointLayout(repo, snap, sel.disk, undefined, signal);
            out.result({ id, ...layout }, () => renderLayout(layout));
            return;
          }
          const browser = await FileBrowser.open(repo, snap, sel, { signal });
          try {
            const entries = await browser.list(path ?? "/", signal);
            const subvolumes = (path ?? "/") === "/" ? await browser.subvolumes() : [];
            out.result(
              {
                id,
                disk: browser.disk,
                ...(browser.partition ? { partition: browser.partition.number } : {}),
                ...(browser.volume ? { volume: browser.volume } : {}),
                filesystem: browser.fs.type,
                ...(sel.subvolume === undefined ? {} : { subvolume: sel.subvolume }),
                ...(browser.fs.type === "btrfs" && (path ?? "/") === "/" ? { subvolumes } : {}),
                path: path ?? "/",
                entries,
              },
              () => [...entries.map(renderEntry), ...renderSubvolumes(subvolumes)].join("\n"),
            );
          } finally {
            await browser.close();
          }
        });
      },
    );

  files
    .command("get")
    .description("restore files and directories (recursively) from inside a restore point")
    .argument("<snapshot>", "VM/TIME or VM/latest (see strata snapshots); VM@INSTANT with --journal")
    .argument("<paths...>", "absolute paths inside the filesystem")
    .option("--to <dir>", "write them into this directory (created if missing)")
    .option("--tar", "write a tar stream to stdout instead of --to")
    .option(
      "--disk <selection>",
      "which filesystem: DISK[:PART] or [DISK:]VG/LV (needed when there are several)",
    )
    .option(
      "--subvolume <path>",
      "Btrfs: this subvolume (from the top level; / for the top level) instead of the default one",
    )
    .option(...JOURNAL_OPTION)
    .option("--overwrite", "replace files and symlinks that exist under --to")
    .option("--same-owner", "give files the owners recorded in the guest (root only; default: yours)")
    .option("--keep-setuid", "keep setuid and setgid bits (default: dropped)")
    .addHelpText(
      "after",
      `
Each PATH lands under --to by its last name (like cp -r): /etc/hosts becomes DIR/hosts, /etc
becomes DIR/etc/…, / becomes the contents of DIR. Modes, times and symlinks are kept; files
belong to you and setuid/setgid bits are dropped unless --same-owner and --keep-setuid say
otherwise. Chunks are fetched from the repository on demand and verified: a damaged chunk stops
the restore. Device nodes, fifos and sockets are skipped with a warning.

Nothing is written outside DIR, whatever the guest's files are: symlinks are created as symlinks
and never followed, names with "/", "..", NUL or more than 255 bytes are skipped with a warning
(in --tar too), and existing symlinks in DIR are replaced (--overwrite) or refused, never
followed. DIR is created mode 0700 if missing, and refused if another user owns or could write
it or its parent (a sticky directory like /tmp is fine); its own mode is never changed.

${SELECTION_HELP}

${INSTANT_HELP}

Examples:
  strata files get web1/latest /etc/nginx --to /tmp/nginx-restored
  strata files get web1/latest /home/alice --disk root:2 --tar > alice.tar
  strata files get web1/latest /var/lib/pgsql --disk vg0/data --to /tmp/pg
  strata files get web1/latest /alice --disk root:2 --subvolume @home --to /tmp/home
  strata files get web1@2026-11-29T08:01:23Z /etc/nginx --journal /srv/journal/web1 --to /tmp/nginx`,
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
      const sel: FsSelection = {
        ...(opts.disk === undefined ? {} : parseSelection(opts.disk)),
        ...(opts.subvolume === undefined ? {} : { subvolume: opts.subvolume }),
      };
      const signal = interruptSignal();
      await withReadLock(cmd, `files get of ${ref}`, ref, opts.journal, async (repo, snap) => {
        const browser = await FileBrowser.open(repo, snap, sel, { signal });
        try {
          if (opts.tar) {
            if (opts.sameOwner || opts.keepSetuid || opts.overwrite)
              throw new StrataError(
                ErrorCode.USAGE,
                "--same-owner, --keep-setuid and --overwrite are for --to; a tar keeps the guest's owners and modes",
              );
            const progress = {
              emit: (e: ProgressEvent) => {
                if (e.type === "log" && e.level === "warn") out.warn(e.message);
              },
            };
            const s = await tarFiles(browser, paths, process.stdout, { signal, progress });
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
            sameOwner: opts.sameOwner === true,
            keepSetuid: opts.keepSetuid === true,
            progress: out.progress(),
            signal,
          });
          out.result(
            {
              type: "summary",
              id: pointId(snap),
              disk: browser.disk,
              ...(browser.partition ? { partition: browser.partition.number } : {}),
              ...(browser.volume ? { volume: browser.volume } : {}),
              to,
              ...s,
            },
            () =>
              `restored ${s.files} files, ${s.directories} directories, ${s.symlinks} symlinks ` +
              `(${formatBytes(s.bytes)}) from ${browser.where} to ${to} in ${(s.durationMs / 1000).toFixed(1)} s` +
              (s.skipped > 0 ? `; skipped ${s.skipped} entries (see the warnings)` : "") +
              (s.setuidDropped > 0
                ? `; dropped the setuid/setgid bits of ${s.setuidDropped} (--keep-setuid keeps them)`
                : ""),
          );
        } finally {
          await browser.close();
        }
      });
    });
}

/** Runs `fn` on the restore point (or instant) `ref` under the repository's read lock. */
async function withReadLock(
  cmd: Command,
  what: string,
  ref: string,
  journal: string | undefined,
  fn: (repo: Repository, snap: SnapshotRef) => Promise<void>,
): Promise<void> {
  await withRepo(cmd, async (repo) => {
    const lock = await repo.lock("read", what);
    try {
      const found = await findRestorePoint(repo, ref, journal, { cacheBytes: FILES_CACHE_BYTES });
      try {
        await fn(repo, found.snap);
      } finally {
        await found.release();
      }
    } finally {
      await lock.release();
    }
  });
}

function renderLayout(layout: RestorePointLayout): string {
  return [
    ...layout.disks.map(renderDisk),
    ...layout.volumeGroups.map(renderVolumeGroup),
    ...layout.warnings.map((w) => `warning: ${printable(w)}`),
  ].join("\n");
}

function renderDisk(l: DiskLayout): string {
  const head = `disk ${l.disk} (${formatBytes(l.size)}), ${l.scheme === "none" ? "no partition table" : l.scheme.toUpperCase()}`;
  const rows = l.partitions.map(
    (p) =>
      `  ${p.number === 0 ? `${l.disk}` : `${l.disk}:${p.number}`}  start ${p.start}  size ${formatBytes(p.size)}  ` +
      `${p.typeName}${p.label ? ` "${printable(p.label)}"` : ""}  ${p.filesystem ?? "no known filesystem"}` +
      (p.volumeGroup === undefined ? "" : ` (volume group ${printable(p.volumeGroup)})`),
  );
  return [head, ...rows].join("\n");
}

function renderVolumeGroup(g: VolumeGroupInfo): string {
  const on = g.pvs.filter((p) => p.location !== null).map((p) => p.location);
  const missing = g.pvs.filter((p) => p.location === null);
  const head =
    `LVM volume group ${printable(g.name)} (${formatBytes(g.size)}), PVs on ${on.join(", ") || "no disk"}` +
    (missing.length > 0
      ? `; missing: ${missing.map((p) => printable(`${p.uuid}${p.device ? ` (${p.device} in the guest)` : ""}`)).join(", ")}`
      : "");
  const rows = g.lvs.map(
    (lv) =>
      `  ${printable(lv.name)}  size ${formatBytes(lv.size)}  ${printable(lv.layout)}  ${printable(lvContents(lv))}`,
  );
  return [head, ...(rows.length > 0 ? rows : ["  (no logical volumes)"])].join("\n");
}

function renderSubvolumes(subs: BtrfsSubvolume[]): string[] {
  if (subs.length === 0) return [];
  return [
    "",
    "Btrfs subvolumes (browse one with --subvolume PATH; / is the top level):",
    ...subs.map(
      (s) =>
        `  ${printable(s.path)}  id ${s.id}${s.default ? "  (default: mounted without --subvolume)" : ""}`,
    ),
  ];
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
  // Guest names may hold terminal escape sequences: escaped here (--json keeps them exact).
  const name = `${printable(e.name)}${e.target !== undefined ? ` -> ${printable(e.target)}` : ""}`;
  return `${kind}${perms} ${String(e.uid).padStart(5)} ${String(e.gid).padStart(5)} ${String(e.size).padStart(12)} ${time} ${name}${e.invalid ? `  (${printable(e.invalid)})` : ""}`;
}
