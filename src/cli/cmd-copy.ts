/** copy: restore points from one repository into another (offsite to S3, back, or local to local). */
import type { Command } from "commander";
import { type CopyReport, copySnapshots } from "../engine/copy.js";
import { Repository, type SnapshotRef } from "../repo/repository.js";
import { throttleStore } from "../repo/throttled-store.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes, parseSize } from "../util/sizes.js";
import { TokenBucket } from "../util/throttle.js";
import { globals, interruptSignal, openStore, output, password } from "./context.js";
import { kdfCacheFromEnv } from "./kdf-cache.js";

interface CopyFlags {
  latest?: boolean;
  fromPasswordFile?: string;
  toPasswordFile?: string;
  toUnencrypted?: boolean;
  bandwidth?: string;
}

/**
 * The password of one side: its own flag, else its own variable (explicit), else the global
 * --password-file or STRATA_PASSWORD (shared: used only by a side that is encrypted).
 */
function sidePassword(
  file: string | undefined,
  envName: string,
  shared: string | undefined,
): { password?: string; explicit: boolean } {
  if (file !== undefined) return { password: password({ passwordFile: file })!, explicit: true };
  const env = process.env[envName];
  if (env !== undefined) return { password: env, explicit: true };
  return shared === undefined ? { explicit: false } : { password: shared, explicit: false };
}

async function openSide(
  location: string,
  side: "from" | "to",
  pw: { password?: string; explicit: boolean },
  signal: AbortSignal,
  bandwidth?: number,
): Promise<Repository> {
  let store = await openStore({ repo: location });
  if (bandwidth !== undefined) store = throttleStore(store, new TokenBucket(bandwidth), signal);
  const cache = pw.password === undefined ? undefined : kdfCacheFromEnv();
  try {
    return await Repository.open(store, {
      ...(pw.password === undefined ? {} : { password: pw.password }),
      ...(cache ? { kdfCache: cache } : {}),
    });
  } catch (err) {
    if (!(err instanceof StrataError)) throw err;
    // A shared password serves the side that is encrypted; the other one opens without it.
    if (err.code === ErrorCode.PASSWORD_UNEXPECTED && !pw.explicit) return Repository.open(store);
    if (err.code === ErrorCode.PASSWORD_REQUIRED)
      throw new StrataError(
        ErrorCode.PASSWORD_REQUIRED,
        `the ${side === "from" ? "source" : "target"} repository ${store.location} is encrypted: give its password with ` +
          `--${side}-password-file or STRATA_${side.toUpperCase()}_PASSWORD (or --password-file / STRATA_PASSWORD for both)`,
      );
    throw err;
  }
}

/**
 * The restore points a selection names, oldest first per VM: none given, all of them; a VM name,
 * all of that VM's; VM/TIME or VM/latest, that one. `latest`: only the newest of each VM selected.
 */
export async function selectSnapshots(
  repo: Repository,
  selection: readonly string[],
  latest: boolean,
  onDamaged: (vm: string, time: string, err: StrataError) => void,
): Promise<SnapshotRef[]> {
  const picked = new Map<string, SnapshotRef>();
  if (selection.length === 0) {
    for (const s of await repo.snapshots(undefined, onDamaged)) picked.set(`${s.vm}/${s.time}`, s);
  }
  for (const sel of selection) {
    if (sel.includes("/")) {
      const s = await repo.findSnapshot(sel);
      picked.set(`${s.vm}/${s.time}`, s);
      continue;
    }
    const all = await repo.snapshots(sel, onDamaged);
    if (all.length === 0)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no restore points of VM "${sel}" in ${repo.store.location}`,
      );
    for (const s of all) picked.set(`${s.vm}/${s.time}`, s);
  }
  let list = [...picked.values()].sort((a, b) =>
    a.vm === b.vm ? a.time.localeCompare(b.time) : a.vm.localeCompare(b.vm),
  );
  if (latest) list = list.filter((s, i) => list[i + 1]?.vm !== s.vm);
  return list;
}

function render(r: CopyReport, ms: number): string {
  const seconds = ms / 1000;
  return [
    ...r.points.map((p) =>
      p.state === "present"
        ? `${p.id}: already in the target`
        : `${p.id}: copied (${p.chunksSent} chunks sent, ${formatBytes(p.bytesSent)}; ${p.chunksPresent} already there)`,
    ),
    `${r.copied} restore point(s) copied, ${r.present} already there; sent ${formatBytes(r.bytesSent)} in ` +
      `${r.chunksSent} chunks in ${seconds.toFixed(1)} s (${formatBytes(r.bytesSent / Math.max(seconds, 0.001))}/s)` +
      (r.renamed ? "; chunks named and encrypted again under the target's key" : ""),
  ].join("\n");
}

export function registerCopyCommand(program: Command): void {
  program
    .command("copy")
    .description("copy restore points into another repository, sending only what it lacks")
    .argument("<from-repo>", "the source repository: a directory or s3:https://HOST[:PORT]/BUCKET[/PREFIX]")
    .argument("<to-repo>", "the target repository (created beforehand with strata init)")
    .argument("[selection...]", "VM names, VM/TIME or VM/latest (default: every restore point)")
    .option("--latest", "only the newest restore point of each VM selected")
    .option("--from-password-file <file>", "the source's password (default: $STRATA_FROM_PASSWORD)")
    .option("--to-password-file <file>", "the target's password (default: $STRATA_TO_PASSWORD)")
    .option("--to-unencrypted", "allow copying from an encrypted repository into an unencrypted one")
    .option(
      "--bandwidth <size>",
      "send at most this many bytes per second to the target, e.g. 20M (MiB/s) or 512K",
    )
    .addHelpText(
      "after",
      `
Restore points keep their names (VM/TIME). One already in the target is skipped; of the others
only the chunks the target lacks are sent. Every chunk is verified against its name in the
source on the way, and stored in the target under the target's own key: repositories with
different passwords, or one encrypted and one not, are fine (chunk names are keyed per
repository, so then every chunk is read from the source and named again; only those the target
lacks are sent). A restore point appears in the target only once all it needs is stored there,
its manifest written last.

Interrupted (Ctrl-C, kill -9, a lost connection): run the same command again. The copy makes
what it stored findable every 30 seconds, so the rerun sends again at most the last 30 seconds'
work; restore points are never left half copied.
The target is locked like a backup: gc may run on it meanwhile and removes nothing the copy
needs. The source takes a read lock, like a restore.

Passwords: --from-password-file / --to-password-file (or STRATA_FROM_PASSWORD /
STRATA_TO_PASSWORD); --password-file or STRATA_PASSWORD serves whichever side is encrypted when
its own is not given. Copying encrypted restore points into an unencrypted repository stores
them in the clear: it needs --to-unencrypted. Both repositories must have the same chunk size.

Examples:
  strata copy /backup/strata s3:https://s3.example.org/offsite/site-a --bandwidth 50M
  strata copy /backup/strata s3:https://s3.example.org/offsite/site-a web1 --latest
  strata copy s3:https://s3.example.org/offsite/site-a /backup/strata web1/2026-11-20T02:00:00Z
  strata copy /backup/a /backup/b --from-password-file /root/a.pass --to-password-file /root/b.pass`,
    )
    .action(async (fromRepo: string, toRepo: string, selection: string[], opts: CopyFlags, cmd: Command) => {
      const out = output(cmd);
      const shared = password(globals(cmd));
      const bandwidth = opts.bandwidth === undefined ? undefined : parseSize(opts.bandwidth);
      if (bandwidth !== undefined && !(bandwidth > 0))
        throw new StrataError(
          ErrorCode.USAGE,
          `--bandwidth takes a size per second above 0, not "${opts.bandwidth}"`,
        );
      const signal = interruptSignal();
      const from = await openSide(
        fromRepo,
        "from",
        sidePassword(opts.fromPasswordFile, "STRATA_FROM_PASSWORD", shared),
        signal,
      );
      try {
        const to = await openSide(
          toRepo,
          "to",
          sidePassword(opts.toPasswordFile, "STRATA_TO_PASSWORD", shared),
          signal,
          bandwidth,
        );
        try {
          if (from.encrypted && !to.encrypted && opts.toUnencrypted !== true)
            throw new StrataError(
              ErrorCode.USAGE,
              `${from.store.location} is encrypted and ${to.store.location} is not: the copy would be stored ` +
                "in the clear; add --to-unencrypted if that is what you want",
            );
          const lock = await from.lock("read", `copy to ${to.store.location}`);
          try {
            const snaps = await selectSnapshots(from, selection, opts.latest === true, (vm, time, err) =>
              out.warn(`${vm}/${time} is not copied: ${err.message}`),
            );
            if (snaps.length === 0) out.warn(`no restore points to copy in ${from.store.location}`);
            const t0 = Date.now();
            const checkpointMs = Number(process.env.STRATA_TEST_COPY_CHECKPOINT_MS);
            const report = await copySnapshots(from, to, snaps, {
              progress: out.progress(),
              signal,
              // Tests make a run's checkpoints frequent, to kill it after one.
              ...(checkpointMs > 0 ? { checkpointMs } : {}),
            });
            const ms = Date.now() - t0;
            out.result({ type: "summary", ...report, durationMs: Math.round(ms) }, () => render(report, ms));
          } finally {
            await lock.release();
          }
        } finally {
          await to.close();
        }
      } finally {
        await from.close();
      }
    });
}
