/**
 * protect: continuous data protection of a running QEMU VM. QEMU's active mirror
 * (src/hypervisor/qemu/cdp.ts) first copies every disk whole into a write journal (src/journal),
 * then every guest write as it is made; `strata restore VM@TIME --journal DIR` replays the
 * journal up to any instant after the copy.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { cdpWindow, type ProtectStatus, readProtectStatus, STATUS_FILE } from "../engine/cdp-status.js";
import { foldJournal } from "../engine/fold.js";
import { resolveQemuTarget } from "../hypervisor/qemu/adapter.js";
import { Capture } from "../hypervisor/qemu/cdp.js";
import { inspectVm } from "../hypervisor/qemu/doctor.js";
import { QgaClient } from "../hypervisor/qemu/qga.js";
import { StateRecord } from "../hypervisor/qemu/state.js";
import { addMark, MARK_NAME_RE, readMarks } from "../journal/marks.js";
import { JournalReader } from "../journal/reader.js";
import { JournalWriter } from "../journal/writer.js";
import { checkName } from "../repo/repository.js";
import { formatDuration, parseDuration } from "../util/duration.js";
import { ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import { processAlive } from "../util/process.js";
import { formatBytes } from "../util/sizes.js";
import { DEFAULT_INVENTORY, defaultStateDir } from "./adapters.js";
import { interruptSignal, openRepo, output, withRepo } from "./context.js";

interface ProtectOpts {
  journal: string;
  vm?: string;
  syncInterval: string;
  inventory: string;
  stateDir?: string;
  appendDeadline: string;
  fold?: string;
  window?: string;
  bitmapInterval: string;
}

/** Freezes the guest's filesystems through its agent, takes the instant (ms), thaws. */
async function freezeInstant(socket: string): Promise<number> {
  const qga = new QgaClient(socket, { timeoutMs: 30_000 });
  try {
    await qga.fsfreezeFreeze();
    try {
      return Date.now();
    } finally {
      await qga.fsfreezeThaw();
    }
  } finally {
    await qga.close().catch(() => {});
  }
}

async function writeStatus(dir: string, s: ProtectStatus): Promise<void> {
  const path = join(dir, STATUS_FILE);
  const tmp = `${path}.tmp`;
  await fs.writeFile(tmp, `${JSON.stringify(s, null, 2)}\n`, { mode: 0o600 });
  await fs.rename(tmp, path);
}

const sleep = (ms: number, signal: AbortSignal) =>
  new Promise<void>((resolve) => {
    const t = setTimeout(done, ms);
    function done() {
      clearTimeout(t);
      signal.removeEventListener("abort", done);
      resolve();
    }
    signal.addEventListener("abort", done, { once: true });
  });

const iso = (ns: bigint | number) =>
  new Date(Number(typeof ns === "bigint" ? ns / 1_000_000n : ns)).toISOString();

export function registerProtectCommand(program: Command): void {
  const protect = program
    .command("protect")
    .description("protect a running QEMU VM continuously: every write journaled, any instant restorable")
    .argument("<source>", "the running VM: qmp:SOCKET[,qga=SOCKET] or vm:NAME")
    .requiredOption("--journal <dir>", "directory of the VM's write journal (a fast local disk)")
    .option(
      "--vm <name>",
      "the VM's name in the journal and in restores (VM@TIME) (default: NAME of vm:NAME)",
    )
    .option(
      "--sync-interval <duration>",
      "fdatasync the journal at least this often (the RPO on a host crash)",
      "250ms",
    )
    .option(
      "--append-deadline <duration>",
      "a guest write the journal has not taken by then fails the capture, never the guest",
      "5s",
    )
    .option(
      "--fold <duration>",
      "every this often, the journal up to now becomes a restore point in the repository (e.g. 5m)",
    )
    .option(
      "--window <duration>",
      "with --fold: drop journal segments no instant of the last DURATION needs (e.g. 24h)",
    )
    .option(
      "--bitmap-interval <duration>",
      "start a new dirty bitmap this often: a resume after a crash re-reads what was written since the last one",
      "10s",
    )
    .option("--inventory <file>", "VM inventory for vm:NAME", DEFAULT_INVENTORY)
    .option(
      "--state-dir <dir>",
      "where the journal socket and the cleanup record live (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .addHelpText(
      "after",
      `
How it works: per disk, QEMU mirrors the disk (blockdev-mirror, copy-mode=write-blocking) to an
NBD server Strata runs for the VM: first the whole disk (zeroed ranges cost a few bytes), then
every guest write, each appended to the journal (host time, disk, offset, data: zstd, and
AES-256-GCM when the repository is encrypted) before QEMU lets the guest's write complete. All
disks share one journal, so one instant cuts every disk. Once the first copy is done, any
instant can be restored:

  strata restore VM@2026-11-29T08:01:23.250Z --journal DIR --target /srv/restored
  strata restore VM@-90s --journal DIR --target /srv/restored

Durability: a write is acknowledged once it is in the journal file; fdatasync runs at least
every --sync-interval (QEMU's mirror does not pass the guest's flushes on to the journal). After a
host crash the journal holds everything acknowledged up to one interval (plus one fdatasync)
before it, whether the guest flushed or not; Strata itself dying loses nothing acknowledged.

The guest is never harmed: a journal that fails or takes longer than --append-deadline ends
the mirror (the guest's writes go on to its disks), protect stops with an error, and a dirty
bitmap (strata-cdp-N, started anew every --bitmap-interval) keeps the record of what the
journal missed. Ctrl-C (SIGINT) or SIGTERM stops cleanly and leaves nothing on the VM.

Resume: if protect is killed (or its journal failed), run it again with the same --journal
DIR. It starts new mirrors first (every write from then on is journaled), then re-reads from
the disks only the ranges the bitmaps mark (written since the last bitmap started before the
crash) into the journal, and reports how much it read. Instants from the journal's last entry
before the crash to the end of the re-read are a gap: restores inside it are refused, naming
it; every instant after it is exact. "strata protect stop VM" or "strata doctor --fix" instead
removes what the dead protect left, bitmaps included (a journal stopped that way, or cleanly,
cannot be resumed).

Folding (--fold 5m): every interval, the disks at that instant (journal over the previous fold)
become an ordinary restore point, deduplicated, listed by strata snapshots, crash-consistent
(filesystem-consistent when the source names the guest agent, qmp:SOCKET,qga=SOCKET: the
instant is taken while the guest's filesystems are frozen for a moment);
later instants replay the journal from it. --window 24h then drops the journal's segments
older than the window (keeping the fold the window starts from): instants stay restorable for
the whole window, restore points for as long as retention keeps them. forget and gc work beside
a running protect; an instant whose fold was forgotten is served from an older one if the
journal still reaches back to it.

Runs in the foreground; see "strata protect status VM --journal DIR" from another shell. DIR
must be new, or the journal of a protect of the VM that died (it is resumed). The repository gives the
journal its encryption keys (and will take its folded restore points).

Examples:
  strata protect --repo /backup/strata --vm web1 qmp:/run/web1.qmp --journal /var/lib/strata/journal/web1
  strata protect vm:db1 --journal /srv/journal/db1 --sync-interval 100ms
  strata protect vm:web1 --journal /srv/journal/web1 --fold 5m --window 24h`,
    )
    .action(async (source: string, opts: ProtectOpts, cmd: Command) => {
      const out = output(cmd);
      const target = resolveQemuTarget(source, opts.inventory);
      const vm = opts.vm ?? (source.startsWith("vm:") ? source.slice(3) : undefined);
      if (!vm) throw new StrataError(ErrorCode.USAGE, "--vm NAME is required for a qmp: source");
      checkName("VM", vm);
      const syncIntervalMs = parseDuration(opts.syncInterval, "--sync-interval");
      if (syncIntervalMs < 1 || syncIntervalMs > 60_000)
        throw new StrataError(ErrorCode.USAGE, "--sync-interval must be between 1ms and 60s");
      const appendDeadlineMs = parseDuration(opts.appendDeadline, "--append-deadline");
      const foldMs = opts.fold === undefined ? undefined : parseDuration(opts.fold, "--fold");
      const windowMs = opts.window === undefined ? undefined : parseDuration(opts.window, "--window");
      if (foldMs !== undefined && foldMs < 1000)
        throw new StrataError(ErrorCode.USAGE, "--fold must be at least 1s");
      if (windowMs !== undefined && foldMs === undefined)
        throw new StrataError(
          ErrorCode.USAGE,
          "--window needs --fold: segments are dropped only once a fold holds what they held",
        );
      if (windowMs !== undefined && foldMs !== undefined && windowMs < foldMs)
        throw new StrataError(ErrorCode.USAGE, "--window must be at least as long as --fold");
      // Segments small enough in time that the window drops in steps of an eighth of it.
      const maxSegmentAgeMs =
        windowMs === undefined ? undefined : Math.max(1000, Math.min(600_000, Math.floor(windowMs / 8)));
      const dir = resolve(opts.journal);
      const used = await fs.readdir(dir).then(
        (names) => names.length > 0,
        (err: unknown) => {
          if (isNotFound(err)) return false;
          throw err;
        },
      );
      if (
        used &&
        !(await fs.stat(join(dir, "journal.json")).then(
          () => true,
          () => false,
        ))
      )
        throw new StrataError(
          ErrorCode.USAGE,
          `--journal ${dir} is not empty and holds no journal: give each protect a new directory`,
        );
      const rotateMs = parseDuration(opts.bitmapInterval, "--bitmap-interval");
      if (rotateMs < 2000) throw new StrataError(ErrorCode.USAGE, "--bitmap-interval must be at least 2s");
      const stateDir = opts.stateDir ?? defaultStateDir();
      const signal = interruptSignal();
      await withRepo(cmd, async (repo) => {
        let brokenWhy: string | undefined;
        const wake = new AbortController();
        signal.addEventListener("abort", () => wake.abort(), { once: true });
        const capture = await Capture.start({
          vm,
          target,
          sync: "full",
          stateDir,
          appendDeadlineMs,
          rotateMs,
          openJournal: (disks) =>
            JournalWriter.open({
              dir,
              keys: repo.keys,
              vm,
              repository: repo.config.id,
              disks: disks.map((d) => ({ name: d.name, size: d.size })),
              syncIntervalMs,
              ...(maxSegmentAgeMs === undefined ? {} : { maxSegmentAgeMs }),
              onError: (err) => out.warn(`journal: ${err.message}`),
            }),
          log: (m) => out.warn(m),
          onBroken: (why) => {
            brokenWhy = why;
            wake.abort();
          },
        });
        const started = new Date().toISOString();
        const r = capture.resumed;
        const resumed: ProtectStatus["resumed"] =
          r === undefined
            ? undefined
            : {
                bitmaps: r.bitmaps,
                bytes: r.bytes,
                ranges: r.ranges,
                durationMs: r.durationMs,
                gap: { from: iso(r.gap.fromNs), to: iso(r.gap.toNs) },
              };
        let lastFold: ProtectStatus["lastFold"];
        let folds = 0;
        let foldError: string | undefined;
        let folding: Promise<void> | undefined;
        let nextFoldAt = foldMs === undefined ? Number.POSITIVE_INFINITY : Date.now() + foldMs;
        // One fold at a time; a failed fold is reported and tried again at the next interval.
        const fold = () => {
          nextFoldAt = Date.now() + foldMs!;
          const run = async () => {
            // With the guest agent: the instant is taken while the filesystems are frozen (every
            // write before the freeze is journaled by then). Without it, or when the freeze
            // fails: half a second back, crash-consistent (every write acknowledged before it is
            // in the journal file).
            let frozenMs: number | undefined;
            if (target.qga !== undefined)
              frozenMs = await freezeInstant(target.qga).catch((err: unknown) => {
                out.warn(
                  `fold: the guest agent could not freeze ${vm}'s filesystems, folding crash-consistent: ${err instanceof Error ? err.message : String(err)}`,
                );
                return undefined;
              });
            return foldJournal(repo, {
              vm,
              journal: dir,
              writer: capture.journal,
              atNs: BigInt(frozenMs ?? Date.now() - 500) * 1_000_000n,
              consistency: frozenMs === undefined ? "crash-consistent" : "filesystem-consistent",
              ...(windowMs === undefined
                ? {}
                : { windowStartNs: BigInt(Date.now() - windowMs) * 1_000_000n }),
              log: (m) => out.warn(`fold: ${m}`),
            });
          };
          folding = run()
            .then(
              (r) => {
                folds++;
                foldError = undefined;
                lastFold = {
                  id: r.id,
                  at: iso(r.atNs),
                  durationMs: r.durationMs,
                  bytesRead: r.bytesRead,
                  segmentsDropped: r.segmentsDropped,
                };
                out.info(
                  `folded ${vm} at ${iso(r.atNs)} into ${r.id} in ${formatDuration(r.durationMs)} (${formatBytes(r.bytesRead)} read${r.segmentsDropped > 0 ? `, ${r.segmentsDropped} journal segment(s) dropped` : ""})`,
                );
              },
              (err: unknown) => {
                foldError = err instanceof Error ? err.message : String(err);
                out.warn(`fold of ${vm} failed (tried again in ${formatDuration(foldMs!)}): ${foldError}`);
              },
            )
            .finally(() => {
              folding = undefined;
            });
        };
        const status = (extra: Partial<ProtectStatus> = {}): ProtectStatus => {
          const s = capture.journal.stats();
          return {
            pid: process.pid,
            vm,
            started,
            updated: new Date().toISOString(),
            syncIntervalMs,
            entries: s.entries,
            dataBytes: s.dataBytes,
            journalBytes: s.journalBytes,
            syncs: s.syncs,
            maxSyncMs: s.maxSyncMs,
            lastSyncAt: s.lastSyncAt,
            oldestUnsyncedAt: s.oldestUnsyncedAt,
            ...(brokenWhy === undefined ? {} : { broken: brokenWhy }),
            ...(lastFold === undefined ? {} : { lastFold, folds }),
            ...(foldError === undefined ? {} : { foldError }),
            ...(resumed === undefined ? {} : { resumed }),
            ...extra,
          };
        };
        let failure: unknown;
        try {
          out.info(
            `journaling ${capture.disks.map((d) => `${d.name} (${formatBytes(d.size)})`).join(", ")} of ${vm} into ${dir}`,
          );
          await writeStatus(dir, status());
          if (resumed)
            out.info(
              `resumed from the dirty bitmap${resumed.bitmaps.length > 1 ? "s" : ""} ${resumed.bitmaps.join(", ")}: re-read ${resumed.bytes} bytes (${formatBytes(resumed.bytes)}) in ${resumed.ranges} range(s) of ${capture.disks.length} disk(s) in ${formatDuration(resumed.durationMs)}, not the whole disks; the journal has a gap ${resumed.gap.from} .. ${resumed.gap.to} (instants inside are refused); any instant from ${resumed.gap.to} on can be restored`,
            );
          else out.info(`every disk copied: any instant from ${new Date().toISOString()} on can be restored`);
          let lastHealth = Date.now();
          while (!wake.signal.aborted) {
            await sleep(1000, wake.signal);
            await writeStatus(dir, status());
            if (folding === undefined && Date.now() >= nextFoldAt && !wake.signal.aborted) fold();
            if (Date.now() - lastHealth >= 5000 && !wake.signal.aborted) {
              lastHealth = Date.now();
              // QMP busy (another client holds it) is no reason to stop: ask again next time.
              const h = await capture.health().catch((err: unknown) => {
                out.warn(`health check: ${err instanceof Error ? err.message : String(err)}`);
                return undefined;
              });
              if (h && !h.ok) {
                brokenWhy = h.problems.join("; ");
                break;
              }
            }
          }
        } catch (err) {
          failure = err;
        } finally {
          // A fold under way finishes first (its restore point is recorded as a base, or not at all).
          await folding;
          // Writes after the mirrors are cancelled are not journaled: the journal is complete up to now.
          const completeUntil = new Date().toISOString();
          const { bitmapKept } = await capture.stop(brokenWhy !== undefined || failure !== undefined);
          await writeStatus(dir, status({ stopped: true, completeUntil })).catch(() => {});
          if (bitmapKept)
            out.warn(
              `the dirty bitmap ${capture.bitmap} stays on ${vm}'s disks: it records what the journal may lack; run protect again with --journal ${dir} to resume`,
            );
        }
        if (failure !== undefined) throw failure;
        if (brokenWhy !== undefined)
          throw new StrataError(ErrorCode.EXTERNAL, `protection of ${vm} stopped: ${brokenWhy}`);
        const s = capture.journal.stats();
        out.result(
          {
            type: "summary",
            vm,
            journal: dir,
            entries: s.entries,
            dataBytes: s.dataBytes,
            journalBytes: s.journalBytes,
            syncs: s.syncs,
            maxSyncMs: s.maxSyncMs,
          },
          () =>
            `stopped protecting ${vm}: ${s.entries} writes (${formatBytes(s.dataBytes)}) journaled in ${formatBytes(s.journalBytes)}; longest fdatasync ${s.maxSyncMs} ms`,
        );
      });
    });

  protect
    .command("mark")
    .description("name the current instant of a protected VM (restorable as VM@mark:NAME)")
    .argument("<vm>", "the VM's name")
    .argument("<name>", "the mark's name: letters, digits, . _ - (e.g. before-upgrade)")
    .option("--quiesce", "freeze the guest's filesystems through its agent for the instant")
    .option(
      "--state-dir <dir>",
      "where protect's record lives (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .addHelpText(
      "after",
      `
Records the instant now (host time, the journal's clock) under NAME in DIR/marks.json. With
--quiesce the guest's filesystems are frozen through the guest agent first (the protect's
source must name it: qmp:SOCKET,qga=SOCKET), the instant taken while they are frozen (every
write before the freeze is journaled by then), then thawed: restoring the mark gives clean
filesystems. The protect of the VM must be running.

Examples:
  strata protect mark web1 before-upgrade --quiesce --journal /srv/journal/web1
  strata restore web1@mark:before-upgrade --journal /srv/journal/web1 --target /srv/restored`,
    )
    .action(
      async (vm: string, name: string, opts: { quiesce?: boolean; stateDir?: string }, cmd: Command) => {
        const out = output(cmd);
        if (!MARK_NAME_RE.test(name))
          throw new StrataError(
            ErrorCode.USAGE,
            `"${name}" is not a mark name: 1-64 letters, digits, ".", "_" or "-", starting with a letter or digit`,
          );
        const dir = resolve((cmd.optsWithGlobals() as { journal: string }).journal);
        const repo = await openRepo(cmd);
        try {
          const reader = await JournalReader.open(dir, repo.keys);
          if (reader.meta.vm !== vm)
            throw new StrataError(
              ErrorCode.USAGE,
              `journal ${dir} belongs to VM ${reader.meta.vm}, not ${vm}`,
            );
          const live = await readProtectStatus(dir);
          if (!live || live.stopped || !processAlive(live.pid))
            throw new StrataError(
              ErrorCode.USAGE,
              `${vm} is not being protected into ${dir} (no running strata protect): a mark names an instant the journal holds`,
            );
          if ((await readMarks(dir, repo.keys)).some((m) => m.name === name))
            throw new StrataError(ErrorCode.TARGET_CONFLICT, `${vm} has a mark named ${name} already`);
          let atMs: number;
          if (opts.quiesce) {
            const rec = await StateRecord.load(
              StateRecord.pathOf(opts.stateDir ?? defaultStateDir(), vm, "protect"),
            );
            const socket = rec?.data.qga;
            if (!socket)
              throw new StrataError(
                ErrorCode.USAGE,
                `--quiesce needs ${vm}'s guest agent: protect it with qmp:SOCKET,qga=SOCKET`,
              );
            try {
              atMs = await freezeInstant(socket);
            } catch (err) {
              throw new StrataError(
                ErrorCode.EXTERNAL,
                `--quiesce: ${vm}'s guest agent could not freeze and thaw its filesystems: ${err instanceof Error ? err.message : String(err)}`,
              );
            }
          } else atMs = Date.now();
          const mark = {
            name,
            atNs: (BigInt(atMs) * 1_000_000n).toString(),
            quiesced: opts.quiesce === true,
            created: new Date().toISOString(),
          };
          await addMark(dir, repo.keys, mark);
          out.result(
            { vm, name, at: iso(atMs), quiesced: mark.quiesced, id: `${vm}@mark:${name}` },
            () =>
              `marked ${vm} at ${iso(atMs)} as ${name}${mark.quiesced ? " (filesystems frozen)" : ""}: restore it as ${vm}@mark:${name}`,
          );
        } finally {
          await repo.close();
        }
      },
    );

  protect
    .command("stop")
    .description("stop the protection of a VM and leave nothing on it")
    .argument("<vm>", "the VM's name")
    .option(
      "--state-dir <dir>",
      "where protect's record lives (default $STRATA_STATE_DIR or /var/lib/strata/state)",
    )
    .option("--timeout <duration>", "how long to wait for the running protect to stop", "2m")
    .addHelpText(
      "after",
      `
Asks the running strata protect of the VM to stop (SIGTERM: it cancels its mirrors, removes
its nodes and bitmap, syncs the journal and exits), and waits for it. If it is not running
(killed), what it left on the VM (mirror jobs, NBD nodes, the strata-cdp-N bitmaps) is removed, as
strata doctor --fix would.

Example:
  strata protect stop web1 --journal /srv/journal/web1`,
    )
    .action(async (vm: string, opts: { stateDir?: string; timeout: string }, cmd: Command) => {
      const out = output(cmd);
      checkName("VM", vm);
      const stateDir = opts.stateDir ?? defaultStateDir();
      const timeoutMs = parseDuration(opts.timeout, "--timeout");
      const path = StateRecord.pathOf(stateDir, vm, "protect");
      const rec = await StateRecord.load(path);
      if (!rec) {
        out.result(
          { vm, stopped: false, removed: [] },
          () => `${vm} is not protected (no record in ${stateDir})`,
        );
        return;
      }
      let stopped = false;
      if (rec.data.pid !== process.pid && processAlive(rec.data.pid)) {
        process.kill(rec.data.pid, "SIGTERM");
        const end = Date.now() + timeoutMs;
        while (processAlive(rec.data.pid)) {
          if (Date.now() > end)
            throw new StrataError(
              ErrorCode.TIMEOUT,
              `strata protect of ${vm} (pid ${rec.data.pid}) did not stop within ${formatDuration(timeoutMs)}`,
            );
          await new Promise((r) => setTimeout(r, 200));
        }
        stopped = true;
      }
      // A clean stop removed its record; a dead protect's leftovers are removed here.
      const removed: string[] = [];
      if (await StateRecord.load(path)) {
        const findings = await inspectVm(
          { vm, qmp: rec.data.qmp, ...(rec.data.qga === undefined ? {} : { qga: rec.data.qga }) },
          true,
          stateDir,
        );
        const left = findings.filter((f) => f.owner === "strata" && !f.fixed);
        removed.push(...findings.filter((f) => f.fixed).map((f) => f.what));
        if (left.length > 0)
          throw new StrataError(
            ErrorCode.EXTERNAL,
            `could not remove what protect left on ${vm}: ${left.map((f) => f.what).join("; ")}`,
          );
      }
      out.result({ vm, stopped, pid: rec.data.pid, removed }, () =>
        [
          stopped ? `stopped protecting ${vm} (pid ${rec.data.pid})` : `the protect of ${vm} was not running`,
          ...removed.map((r) => `removed ${r}`),
        ].join("\n"),
      );
    });

  protect
    .command("status")
    .description("the protected window of a VM: from, to, journal size, lag")
    .argument("<vm>", "the VM's name")
    .addHelpText(
      "after",
      `
--journal DIR names the VM's write journal (as given to strata protect). Shows the window that
can be restored (from the moment the first copy of the disks was done to the newest write, or to
now while protect runs), the journal's size, and the lag: how long the oldest write not yet
fdatasynced has waited.

Example:
  strata protect status web1 --journal /srv/journal/web1`,
    )
    .action(async (vm: string, _opts: unknown, cmd: Command) => {
      const out = output(cmd);
      // --journal is the parent's option (commander hands it to "protect"), required there.
      const dir = resolve((cmd.optsWithGlobals() as { journal: string }).journal);
      const repo = await openRepo(cmd);
      try {
        const w = await cdpWindow(repo, dir, vm);
        out.result(w, () =>
          [
            `${vm}: ${w.running ? `protected (pid ${w.pid})` : "not running"}`,
            w.from === null
              ? "window: none yet (the first copy of the disks is not done)"
              : `window: ${w.from} .. ${w.to ?? "-"}`,
            `journal: ${w.entries} writes (${formatBytes(w.dataBytes)}) in ${formatBytes(w.journalBytes)}, ${w.segments} segment(s), ${w.bases.length} base(s)`,
            ...w.gaps.map(
              (g) =>
                `gap: ${g.from} .. ${g.to ?? "(resume not finished)"} (protection was down; instants inside are refused)`,
            ),
            ...(w.lagMs === undefined
              ? []
              : [`lag: ${formatDuration(w.lagMs)} (oldest write not yet fdatasynced)`]),
            ...(w.broken ? [`stopped because: ${w.broken}`] : []),
            ...(w.lastFold
              ? [
                  `folds: ${w.folds}, the last at ${w.lastFold.at} into ${w.lastFold.id} (${formatDuration(w.lastFold.durationMs)})`,
                ]
              : []),
            ...w.marks.map(
              (m) =>
                `mark ${m.name}: ${m.at}${m.quiesced ? " (filesystems frozen)" : ""}, restore as ${vm}@mark:${m.name}`,
            ),
          ].join("\n"),
        );
      } finally {
        await repo.close();
      }
    });
}

/**
 * Up to when the journal in `dir` is known to hold every write (ns): now while its protect runs
 * (no entry since means no write since), the moment its stop began when it stopped cleanly, else
 * undefined (the last entry is the limit). From status.json, which only widens the window to
 * quiet moments: the entries themselves are checked when they are replayed.
 */
export async function journalCompleteUntil(dir: string): Promise<bigint | undefined> {
  let s: Partial<ProtectStatus>;
  try {
    s = JSON.parse(await fs.readFile(join(dir, STATUS_FILE), "utf8")) as Partial<ProtectStatus>;
  } catch {
    return undefined;
  }
  if (typeof s.pid !== "number" || typeof s.updated !== "string" || s.broken !== undefined) return undefined;
  if (!s.stopped && processAlive(s.pid)) return BigInt(Date.now()) * 1_000_000n;
  const t = Date.parse(s.completeUntil ?? "");
  return s.stopped && Number.isFinite(t) ? BigInt(t) * 1_000_000n : undefined;
}
