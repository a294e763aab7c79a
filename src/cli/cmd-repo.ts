/** init, snapshots, verify, forget, gc: commands on the repository itself. */
import { existsSync } from "node:fs";
import { setPriority } from "node:os";
import { resolve } from "node:path";
import type { Command } from "commander";
import { Catalog, type RestorePointRow } from "../catalog/catalog.js";
import { type CdpWindow, cdpWindow } from "../engine/cdp-status.js";
import { bootHint } from "../engine/vm-restore.js";
import { ZSTD_STRONG } from "../repo/codec.js";
import { manifestTotals } from "../repo/manifest.js";
import { forget, forgetIds, gc } from "../repo/prune.js";
import { Repository } from "../repo/repository.js";
import { parseDataSubset, verifyRepository } from "../repo/verify.js";
import { parseDuration } from "../util/durations.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes, parseSize } from "../util/sizes.js";
import { CATALOG_OPTION_HELP } from "./cmd-catalog.js";
import { BOOT_VERIFY_HELP, type BootFlags, verifyBootCommand } from "./cmd-verify-boot.js";
import {
  catalogPath,
  globals,
  interruptSignal,
  openStore,
  output,
  parseCount,
  parseImmutability,
  password,
  withRepo,
} from "./context.js";
import { kdfCacheFromEnv } from "./kdf-cache.js";

/** The boot verifications the catalog holds for a repository's restore points ("vm/time" → row). */
async function bootVerifications(
  cmd: Command,
  repository: string,
  warn: (m: string) => void,
): Promise<Map<string, RestorePointRow>> {
  const path = catalogPath(globals(cmd));
  if (!existsSync(path)) return new Map();
  let cat: Catalog | undefined;
  try {
    // Read-only: listing restore points never writes (or migrates) the daemon's catalog.
    cat = Catalog.open(path, { readonly: true });
    return new Map(cat.restorePoints({ repository }).map((r) => [`${r.vm}/${r.time}`, r]));
  } catch (err) {
    warn(`boot verifications not shown: ${describeError(err)}`);
    return new Map();
  } finally {
    cat?.close();
  }
}

function bootColumn(b: { outcome: string; answerMs: number | null } | null): string {
  if (!b) return "-";
  return b.outcome === "passed" ? `passed ${((b.answerMs ?? 0) / 1000).toFixed(1)} s` : "FAILED";
}

/** Restore points forget left because they are locked, for people. */
function lockedLines(locked: readonly { id: string; until: string }[]): string[] {
  return locked.map((l) => `locked ${l.id}  (immutable until ${l.until}: kept)`);
}

export function registerRepoCommands(program: Command): void {
  program
    .command("init")
    .description("create a repository (encrypted when a password is given)")
    .option("--chunk-size <size>", "chunk size, a power of two from 64K to 64M", "1M")
    .option(
      "--immutable-for <duration>",
      "S3 bucket with Object Lock: lock every restore point for this long, e.g. 30d",
    )
    .option("--immutable-mode <mode>", "compliance (nobody can delete early) or governance", "compliance")
    .addHelpText(
      "after",
      `
A password (--password-file FILE or STRATA_PASSWORD) makes the repository encrypted with
AES-256-GCM; without one it is not encrypted. Keep the password: without it nothing can be restored.

The repository is a local directory, or a bucket (and key prefix) on an S3 service:
  --repo s3:https://HOST[:PORT]/BUCKET[/PREFIX]   (s3:http:// for a local test gateway)
The bucket must exist. Credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, else
from the credentials file STRATA_S3_CREDENTIALS or ~/.aws/credentials (profile AWS_PROFILE),
never from the command line. An S3 repository has format v2 (packs).

Immutable restore points: on a bucket created with S3 Object Lock, --immutable-for locks each
restore point's manifest, indexes and every pack and pack index it needs for that long after its
backup (a backup's own --immutable-for overrides it). Packs a later restore point reuses are
locked longer. forget and gc leave what is locked and say so; nobody, not even the bucket's
owner, can delete a COMPLIANCE-locked object early.

Examples:
  strata init --repo /backup/strata --password-file /root/.strata-pass
  strata init --repo s3:https://s3.example.org/backups/site-a --password-file /root/.strata-pass
  strata init --repo s3:https://s3.example.org/locked-bucket --immutable-for 30d`,
    )
    .action(
      async (opts: { chunkSize: string; immutableFor?: string; immutableMode?: string }, cmd: Command) => {
        const out = output(cmd);
        const g = globals(cmd);
        const pw = password(g);
        const store = await openStore(g);
        const cache = pw === undefined ? undefined : kdfCacheFromEnv();
        const immutable = parseImmutability(
          opts.immutableFor,
          cmd.getOptionValueSource("immutableMode") === "default" ? undefined : opts.immutableMode,
        );
        const config = await Repository.init(store, {
          chunkSize: parseSize(opts.chunkSize),
          ...(immutable ? { immutable } : {}),
          ...(pw === undefined ? {} : { password: pw }),
          ...(cache ? { kdfCache: cache } : {}),
        });
        out.result({ location: store.location, ...config }, () =>
          [
            `created repository ${config.id} at ${store.location}`,
            `chunk size ${formatBytes(config.chunkSize)}, ${config.encryption === "none" ? "NOT encrypted" : "encrypted (AES-256-GCM)"}`,
            ...(config.immutable
              ? [
                  `restore points immutable (${config.immutable.mode}) for ${config.immutable.seconds} s after their backup`,
                ]
              : []),
          ].join("\n"),
        );
      },
    );

  program
    .command("snapshots")
    .description("list restore points")
    .option("--vm <name>", "only this VM's")
    .option("--catalog <file>", `boot verifications recorded here are shown too; ${CATALOG_OPTION_HELP}`)
    .option(
      "--journal <dir...>",
      "also show the protected window of these write journals (strata protect --journal DIR)",
    )
    .addHelpText(
      "after",
      `
With --journal, every instant of a VM that "strata protect" keeps can be restored, besides its
restore points: the window (from the first full copy to the newest write, or to now while protect
runs), the journal's size, the lag and the named marks are listed after the restore points, and
--json prints {"restorePoints": [...], "windows": [...]} instead of the list alone.

Examples:
  strata snapshots --vm web1
  strata snapshots --vm web1 --journal /srv/journal/web1`,
    )
    .action(async (opts: { vm?: string; journal?: string[] }, cmd: Command) => {
      const out = output(cmd);
      await withRepo(cmd, async (repo) => {
        const windows: CdpWindow[] = [];
        for (const dir of opts.journal ?? []) windows.push(await cdpWindow(repo, resolve(dir), opts.vm));
        const snaps = await repo.snapshots(opts.vm, (vm, time, err) =>
          out.warn(`${vm}/${time}: ${err.message}`),
        );
        const boots = await bootVerifications(cmd, repo.config.id, (m) => out.warn(m));
        const rows = snaps.map((s) => {
          const t = manifestTotals(s.manifest);
          const b = boots.get(`${s.vm}/${s.time}`);
          return {
            id: `${s.vm}/${s.time}`,
            vm: s.vm,
            time: s.time,
            mode: s.manifest.mode,
            consistency: s.manifest.consistency,
            parent: s.manifest.parent,
            disks: s.manifest.disks.map((d) => ({ name: d.name, size: d.size })),
            size: t.size,
            bytesNew: t.bytesNew,
            bytesStored: t.bytesStored,
            /** The last boot verification the catalog holds, null when none. */
            boot: b?.bootOutcome
              ? {
                  outcome: b.bootOutcome,
                  at: new Date(b.bootVerifiedAt!).toISOString(),
                  answerMs: b.bootAnswerMs,
                  error: b.bootError,
                }
              : null,
          };
        });
        const windowLines = windows.map((w) =>
          [
            `${w.vm}: ${w.from === null ? "no window yet (the first copy of the disks is not done)" : `any instant ${w.from} .. ${w.to ?? "-"}`}${w.running ? ` (protect runs, pid ${w.pid})` : " (protect not running)"}`,
            `  journal ${w.journal}: ${w.entries} writes (${formatBytes(w.dataBytes)}) in ${formatBytes(w.journalBytes)}${w.lagMs === undefined ? "" : `, lag ${w.lagMs} ms`}`,
            ...w.gaps.map(
              (g) => `  gap ${g.from} .. ${g.to ?? "(resume not finished)"}: instants inside are refused`,
            ),
            ...w.marks.map((m) => `  mark ${m.name} at ${m.at}: ${w.vm}@mark:${m.name}`),
            `  restore an instant: strata restore ${w.vm}@TIME --journal ${w.journal} --target OUT`,
          ].join("\n"),
        );
        const result = opts.journal === undefined ? rows : { restorePoints: rows, windows };
        out.result(result, () => {
          const tail = windowLines.length === 0 ? [] : ["", "protected windows:", ...windowLines];
          if (rows.length === 0) return ["no restore points", ...tail].join("\n");
          const lines = rows.map(
            (r) =>
              `${r.id.padEnd(36)} ${r.mode.padEnd(8)} ${r.consistency.padEnd(22)} ${r.disks
                .map((d) => `${d.name}:${formatBytes(d.size)}`)
                .join(" ")
                .padEnd(24)} new ${formatBytes(r.bytesNew).padEnd(10)} ${bootColumn(r.boot)}`,
          );
          // What a VM restored from each kind of restore point goes through when it boots.
          const kinds = [...new Set(rows.map((r) => r.consistency))];
          return [
            `${"ID".padEnd(36)} ${"MODE".padEnd(8)} ${"CONSISTENCY".padEnd(22)} ${"DISKS".padEnd(24)} ${"ADDED".padEnd(14)} BOOT`,
            ...lines,
            "",
            ...kinds.map((k) => `${k}: ${bootHint(k)}`),
            ...tail,
          ].join("\n");
        });
      });
    });

  program
    .command("verify")
    .description("check that every restore point can be restored (--boot: that one boots)")
    .option("--read-data", "read and check every chunk, not only that it exists")
    .option(
      "--read-data-subset <N/T>",
      "read and check part N of T of the chunks (by digest: parts 1..T together are every chunk once), the others only for presence",
    )
    .option(
      "--boot <snapshot>",
      "boot this restore point (VM/TIME or VM/latest) with no network and ask its guest agent",
    )
    .option(
      "--timeout <s>",
      "--boot: seconds from the boot to the agent's answer (default 300)",
      parseCount("--timeout"),
    )
    .option("--check <command>", "--boot: a shell command run in the guest through the agent; it must exit 0")
    .option(
      "--state-dir <dir>",
      "--boot: where the VM's record lives meanwhile (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .option("--catalog <file>", `--boot: ${CATALOG_OPTION_HELP}`)
    .addHelpText("after", BOOT_VERIFY_HELP)
    .action(
      async (opts: { readData?: boolean; readDataSubset?: string } & Partial<BootFlags>, cmd: Command) => {
        const out = output(cmd);
        if (opts.readData && opts.readDataSubset !== undefined)
          throw new StrataError(
            ErrorCode.USAGE,
            "--read-data reads every chunk: leave out --read-data-subset",
          );
        const subset = opts.readDataSubset === undefined ? undefined : parseDataSubset(opts.readDataSubset);
        if (opts.boot !== undefined) {
          if (opts.readData || subset)
            throw new StrataError(
              ErrorCode.USAGE,
              "--boot and --read-data are separate checks: run them one at a time",
            );
          await verifyBootCommand({ ...opts, boot: opts.boot }, cmd);
          return;
        }
        if (opts.timeout !== undefined || opts.check !== undefined)
          throw new StrataError(ErrorCode.USAGE, "--timeout and --check go with --boot VM/TIME");
        await withRepo(cmd, async (repo) => {
          const lock = await repo.lock("read", "verify");
          try {
            const report = await verifyRepository(repo, {
              readData: opts.readData === true,
              ...(subset ? { readDataSubset: subset } : {}),
              progress: out.progress(),
              signal: interruptSignal(),
            });
            out.result({ type: "summary", ...report }, () => {
              const lines = [
                `${report.snapshotsChecked} restore points, ${report.chunksChecked} chunks checked, ${report.chunksRead} of them read${subset ? ` (part ${subset.part}/${subset.of})` : ""}`,
              ];
              for (const d of report.damagedSnapshots)
                lines.push(`DAMAGED ${d.id}:\n  ${d.problems.join("\n  ")}`);
              for (const c of report.damagedChunks)
                lines.push(`DAMAGED chunk ${c.digest}: ${c.problem} (used by ${c.usedBy.join(", ")})`);
              lines.push(
                report.ok
                  ? "no errors found"
                  : "errors found: the restore points above can't be restored whole",
              );
              return lines.join("\n");
            });
            if (!report.ok) {
              throw new StrataError(
                ErrorCode.DATA_CORRUPT,
                `verify found ${report.damagedSnapshots.length} damaged restore point(s) and ${report.damagedChunks.length} damaged chunk(s)`,
              );
            }
          } finally {
            await lock.release();
          }
        });
      },
    );

  const count = (flag: string) => parseCount(flag);
  program
    .command("forget")
    .description("remove restore points by a retention policy, or by id (run gc to free the space)")
    .argument("[snapshot...]", "restore points to remove by id (VM/TIME), instead of a policy")
    .option("--keep-last <n>", "keep the n newest", count("--keep-last"))
    .option("--keep-hourly <n>", "keep the newest of each of the last n hours", count("--keep-hourly"))
    .option("--keep-daily <n>", "keep the newest of each of the last n days", count("--keep-daily"))
    .option("--keep-weekly <n>", "keep the newest of each of the last n weeks", count("--keep-weekly"))
    .option("--keep-monthly <n>", "keep the newest of each of the last n months", count("--keep-monthly"))
    .option("--keep-yearly <n>", "keep the newest of each of the last n years", count("--keep-yearly"))
    .option("--vm <name>", "only this VM's restore points")
    .option("-n, --dry-run", "show what would go, remove nothing")
    .addHelpText(
      "after",
      `
Rules apply to each VM apart; a restore point kept by any rule stays. Periods count in local time.

Examples:
  strata forget --keep-daily 7 --keep-weekly 4 --keep-monthly 6 --dry-run
  strata forget web1/2026-11-20T02:00:00Z`,
    )
    .action(
      async (ids: string[], opts: Record<string, number | string | boolean | undefined>, cmd: Command) => {
        const out = output(cmd);
        await withRepo(cmd, async (repo) => {
          if (ids.length > 0) {
            if (Object.keys(opts).some((k) => k.startsWith("keep"))) {
              throw new StrataError(ErrorCode.USAGE, "give restore point ids or --keep-* rules, not both");
            }
            const { removed, locked } = await forgetIds(repo, ids, opts.dryRun === true);
            out.result(
              { type: "summary", dryRun: opts.dryRun === true, keep: [], remove: removed, locked },
              () =>
                [
                  ...removed.map((id) => `${opts.dryRun ? "would remove" : "removed"} ${id}`),
                  ...lockedLines(locked),
                ].join("\n"),
            );
            return;
          }
          const policy = {
            ...(opts.keepLast === undefined ? {} : { last: opts.keepLast as number }),
            ...(opts.keepHourly === undefined ? {} : { hourly: opts.keepHourly as number }),
            ...(opts.keepDaily === undefined ? {} : { daily: opts.keepDaily as number }),
            ...(opts.keepWeekly === undefined ? {} : { weekly: opts.keepWeekly as number }),
            ...(opts.keepMonthly === undefined ? {} : { monthly: opts.keepMonthly as number }),
            ...(opts.keepYearly === undefined ? {} : { yearly: opts.keepYearly as number }),
          };
          const plan = await forget(repo, policy, {
            ...(typeof opts.vm === "string" ? { vm: opts.vm } : {}),
            dryRun: opts.dryRun === true,
          });
          out.result({ type: "summary", dryRun: opts.dryRun === true, ...plan }, () =>
            [
              ...plan.keep.map((k) => `keep   ${k.id}  (${k.reasons.join(", ")})`),
              ...plan.remove.map((id) => `${opts.dryRun ? "would remove" : "remove"} ${id}`),
              ...lockedLines(plan.locked),
              `${plan.keep.length} kept, ${plan.remove.length} ${opts.dryRun ? "would be removed" : "removed"}` +
                (plan.locked.length > 0 ? `, ${plan.locked.length} locked (kept)` : ""),
            ].join("\n"),
          );
        });
      },
    );

  program
    .command("gc")
    .description("remove chunks no restore point uses (safe beside running backups)")
    .addHelpText(
      "after",
      `
In a repository of format 2 (chunks in packs), gc works in two passes: a pack that no restore
point needs is first condemned (backups stop reusing its chunks), and deleted by a later gc once
every backup that might have used it has ended and the grace period has passed. Packs mostly
unused are repacked: their needed chunks are copied, verified, into new packs. Run gc
regularly (e.g. daily after forget); each run finishes what the one before started.

Backups compress at a fast zstd level to keep up with the disk. --recompress rewrites every
pack not yet recompressed at a stronger level (default 11), chunk by chunk, each verified on
the way; restore points don't change. It runs at the lowest CPU priority (nice 19): run it when
the host is idle, e.g. nightly.`,
    )
    .option("--grace <duration>", "keep what backups may still rely on for this long, e.g. 1h, 30m, 0s", "1h")
    .option(
      "--repack-unused <percent>",
      "format 2: repack a pack when more than this percentage of its bytes is unused",
      "50",
    )
    .option("--recompress [level]", "format 2: rewrite packs at a stronger zstd level (1-19, default 11)")
    .option("-n, --dry-run", "count what would go, remove nothing")
    .action(
      async (
        opts: { grace: string; repackUnused: string; recompress?: string | true; dryRun?: boolean },
        cmd: Command,
      ) => {
        const out = output(cmd);
        const level =
          opts.recompress === undefined
            ? undefined
            : opts.recompress === true
              ? ZSTD_STRONG
              : Number(opts.recompress);
        if (level !== undefined && (!Number.isInteger(level) || level < 1 || level > 19))
          throw new StrataError(
            ErrorCode.USAGE,
            `--recompress takes a zstd level from 1 to 19, not "${opts.recompress}"`,
          );
        // Lowest priority for the work and for the worker threads started after this.
        if (level !== undefined) setPriority(19);
        const percent = Number(opts.repackUnused);
        if (!Number.isFinite(percent) || percent < 0 || percent > 100)
          throw new StrataError(
            ErrorCode.USAGE,
            `--repack-unused takes a percentage from 0 to 100, not "${opts.repackUnused}"`,
          );
        await withRepo(cmd, async (repo) => {
          const report = await gc(repo, {
            graceMs: parseDuration(opts.grace),
            dryRun: opts.dryRun === true,
            repackUnused: percent / 100,
            ...(level === undefined ? {} : { recompress: level }),
            progress: out.progress(),
            signal: interruptSignal(),
          });
          const verb = opts.dryRun ? "would remove" : "removed";
          for (const why of report.packsNotRepacked ?? [])
            out.warn(`pack kept as it is, not repacked: ${why}; run "strata verify --read-data"`);
          out.result({ type: "summary", ...report }, () =>
            report.packsCondemned === undefined
              ? `${verb} ${report.chunksRemoved} chunks (${formatBytes(report.bytesFreed)}), ` +
                `${report.chunksReferenced} in use, ${report.chunksKeptRecent ?? 0} unreferenced but recent kept, ` +
                `${report.incompleteRemoved} incomplete restore points removed`
              : `${verb} ${report.packsDeleted} pack(s) and ${report.orphansDeleted} unfinished pack(s) ` +
                `(${formatBytes(report.bytesFreed)}, ${report.chunksRemoved} chunks); ` +
                `${report.chunksReferenced} chunks in use; ` +
                `${report.packsCondemned} pack(s) ${opts.dryRun ? "would be " : ""}condemned (deleted by a later gc), ` +
                `${report.packsRepacked} repacked, ${report.packsWaiting} condemned kept for now, ` +
                `${report.packsResurrected} needed again; ` +
                `${report.incompleteRemoved} incomplete restore points removed` +
                (report.packsRecompressed
                  ? `; recompressed ${report.packsRecompressed} pack(s): ${formatBytes(report.repackedBytesBefore ?? 0)} → ${formatBytes(report.repackedBytesAfter ?? 0)}`
                  : "") +
                (report.locked.length > 0
                  ? `\n${report.locked.length} object(s) locked (S3 Object Lock), kept until their retention passes:\n  ${report.locked.join("\n  ")}`
                  : ""),
          );
        });
      },
    );
}
