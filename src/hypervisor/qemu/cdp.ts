/**
 * Capture for continuous data protection: every guest write of a running QEMU VM, as the guest
 * makes it, into a write journal (src/journal).
 *
 *   guest ─write─▶ disk node ─▶ mirror (copy-mode=write-blocking, sync=none)
 *                                  │ the same write, before the guest's completes
 *                                  ▼
 *                    nbd node ──unix socket──▶ Strata's NBD server (one per VM, one export
 *                                                per disk) ─▶ journal.append, then the reply
 *
 * QEMU's active mirror holds each guest write until the target acknowledged it (QEMU-NOTES.md,
 * "CDP: active mirror"), so the journal has every write, in an order consistent with what the
 * guest saw complete; all disks share one server and one journal, so the order across disks is
 * one stream. An NBD FLUSH or FUA write waits for the journal's fdatasync; QEMU 7.2's mirror sends
 * the guest's own flushes to the disk only (measured: every fdatasync came from the writer's
 * interval), so a guest flush does not make the journal durable before the interval does.
 *
 * With sync=full the mirrors first copy each disk whole through the same path (zeroed ranges as
 * WRITE_ZEROES), so that from READY on the journal alone holds every disk at every instant. A
 * base taken by a live backup beside the mirror is not possible on QEMU 7.2: the mirror blocks
 * its source node ("Node is busy: block device is in use by block job: mirror"), and with a
 * backup job running the disk node is no longer a root node a mirror can start from.
 *
 * A dirty bitmap (`strata-cdp`) starts just before the mirrors: it records every write since
 * capture started, so when the journal loses writes (its target failed, the mirror was
 * cancelled) the bitmap still says where. It is removed on a clean stop and kept otherwise.
 *
 * Never harm the guest: the source write happens before the target write in QEMU's active
 * mirror, and a target error only fails the mirror job (on-target-error=report), not the guest's
 * write. So the journal side answers an append it cannot make, or one slower than
 * `appendDeadlineMs`, with EIO, and the caller cancels the mirror; if Strata dies, the socket
 * closes and QEMU's nbd node fails the same way at once.
 *
 * Everything created on the VM (socket file, bitmap, nbd nodes, mirror jobs) is written to a
 * state record (`<vm>.protect.json`) before it is created, and released on stop or by the next
 * protect of the VM / `strata doctor --fix` after a crash. QMP is held only for a step.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { JournalWriter } from "../../journal/writer.js";
import { type BlockSource, NbdServer } from "../../nbd/server.js";
import { processStart } from "../../repo/locks.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { processAlive, socketAccepts } from "../../util/process.js";
import { type LiveDisk, listDisks, present, release, waitJobGone } from "./live.js";
import { QmpClient } from "./qmp.js";
import type { QemuTarget } from "./session.js";
import { StateRecord } from "./state.js";

export const cdpNames = {
  node: (disk: string) => `strata-cdp-${disk}`,
  job: (disk: string) => `strata-cdp-job-${disk}`,
  bitmap: "strata-cdp",
};

export interface CaptureOptions {
  vm: string;
  /**
   * "full": the mirrors first copy every disk whole into the journal (zeroed ranges as zero
   * entries), so that from the moment they are READY the journal alone holds the disks at any
   * instant (its `syncedNs`). "none": only the writes from now on.
   */
  sync: "full" | "none";
  /** How long the initial copy may take (default 1 h). */
  readyTimeoutMs?: number;
  target: QemuTarget;
  stateDir: string;
  /** Opens the journal for the disks the VM has (called once the disks are known). */
  openJournal: (disks: readonly LiveDisk[]) => Promise<JournalWriter>;
  /** An append slower than this is answered with EIO so that the guest never waits longer (default 5 s). */
  appendDeadlineMs?: number;
  log: (message: string) => void;
  /** Called once when the journal side failed: the caller should stop the capture. */
  onBroken?: (why: string) => void;
}

export interface CaptureHealth {
  ok: boolean;
  /** Why not, naming the disk. */
  problems: string[];
}

const message = (err: unknown) => (err instanceof Error ? err.message : String(err));

async function connect(vm: string, target: QemuTarget): Promise<QmpClient> {
  try {
    return await QmpClient.connect(target.qmp, { connectTimeoutMs: 10_000 });
  } catch (err) {
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `cannot reach VM ${vm} at ${target.qmp}: ${message(err)}`,
    );
  }
}

/** The journaling target one disk is exported as. */
function journalSource(
  journal: JournalWriter,
  disk: LiveDisk,
  deadlineMs: number,
  broken: (why: string) => void,
): BlockSource {
  const timed = async (what: string, p: Promise<void>): Promise<void> => {
    let timer: NodeJS.Timeout | undefined;
    try {
      await Promise.race([
        p,
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () =>
              reject(new StrataError(ErrorCode.TIMEOUT, `journal ${what} took more than ${deadlineMs} ms`)),
            deadlineMs,
          );
        }),
      ]);
    } catch (err) {
      broken(`disk ${disk.name}: ${message(err)}`);
      throw err;
    } finally {
      clearTimeout(timer);
    }
  };
  return {
    size: disk.size,
    // The mirror never reads its target with sync=none; whatever is read is not the disk.
    read: async (_offset, length) => Buffer.alloc(length),
    write: (offset, data) => timed("append", journal.write(disk.name, offset, data)),
    writeZeroes: (offset, length) => timed("append", journal.writeZeroes(disk.name, offset, length)),
    trim: (offset, length) => timed("append", journal.trim(disk.name, offset, length)),
    flush: () => timed("sync", journal.sync()),
  };
}

/** A running capture. stop() on every path. */
export class Capture {
  private stopped: Promise<{ bitmapKept: boolean }> | undefined;
  private brokenWhy: string | undefined;

  private constructor(
    private readonly o: CaptureOptions,
    readonly record: StateRecord,
    readonly disks: readonly LiveDisk[],
    readonly journal: JournalWriter,
    private readonly server: NbdServer,
    readonly socket: string,
  ) {}

  /** Why the journal side failed, when it did. */
  get broken(): string | undefined {
    return this.brokenWhy;
  }

  /**
   * Starts capturing: cleans up what a dead protect of the VM left, opens the journal, starts
   * the NBD server, then per disk the bitmap, the nbd node and the mirror.
   */
  static async start(o: CaptureOptions): Promise<Capture> {
    const stateDir = resolve(o.stateDir);
    const socket = join(stateDir, `strata-cdp-${o.vm}.sock`);
    if (socket.length > 107)
      throw new StrataError(ErrorCode.USAGE, `state directory path too long for a socket: ${socket}`);
    await fs.mkdir(stateDir, { recursive: true });
    const qmp = await connect(o.vm, o.target);
    let record: StateRecord | undefined;
    let server: NbdServer | undefined;
    let journal: JournalWriter | undefined;
    try {
      await recoverProtect(stateDir, o.vm, qmp, o.log);
      const disks = await listDisks(qmp);
      if (disks.length === 0)
        throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `VM ${o.vm} has no writable disks`);
      journal = await o.openJournal(disks);
      record = await StateRecord.create(stateDir, o.vm, o.target.qmp, o.target.qga, "protect");
      let cap: Capture | undefined;
      const broken = (why: string) => {
        if (!cap || cap.brokenWhy !== undefined) return;
        cap.brokenWhy = why;
        o.log(`capture failed: ${why}`);
        o.onBroken?.(why);
      };
      const deadline = o.appendDeadlineMs ?? 5000;
      const j = journal;
      server = new NbdServer({
        exports: Object.fromEntries(
          disks.map((d) => [d.name, { source: journalSource(j, d, deadline, broken) }]),
        ),
        maxInFlight: 64,
        onError: (err) => o.log(`journal NBD server: ${err.message}`),
      });
      await record.add({ kind: "file", path: socket });
      await fs.rm(socket, { force: true });
      await server.listen({ path: socket });
      await fs.chmod(socket, 0o600);
      cap = new Capture(o, record, disks, journal, server, socket);
      for (const d of disks) {
        // A bitmap of an earlier capture that stopped badly: what it recorded is in the base
        // backup this protect takes next, so it starts afresh.
        if (await present.bitmap(qmp, d.node, cdpNames.bitmap))
          await qmp.execute("block-dirty-bitmap-remove", { node: d.node, name: cdpNames.bitmap });
        await record.add({ kind: "bitmap", node: d.node, name: cdpNames.bitmap });
        await qmp.execute("block-dirty-bitmap-add", {
          node: d.node,
          name: cdpNames.bitmap,
          persistent: d.format === "qcow2",
        });
      }
      for (const d of disks) {
        await record.add({ kind: "node", node: cdpNames.node(d.name) });
        await qmp.execute("blockdev-add", {
          driver: "nbd",
          "node-name": cdpNames.node(d.name),
          server: { type: "unix", path: socket },
          export: d.name,
        });
        await record.add({ kind: "job", id: cdpNames.job(d.name) });
        await qmp.execute("blockdev-mirror", {
          "job-id": cdpNames.job(d.name),
          device: d.node,
          target: cdpNames.node(d.name),
          sync: o.sync,
          "copy-mode": "write-blocking",
          "on-target-error": "report",
          "auto-dismiss": true,
        });
      }
      // READY: the initial copy (none with sync=none) is done and every write is mirrored as it is
      // made. From then on the journal holds each disk whole at every instant.
      await waitReady(
        qmp,
        disks.map((d) => cdpNames.job(d.name)),
        o.readyTimeoutMs ?? 3_600_000,
        () => cap?.brokenWhy,
      );
      if (o.sync === "full") await journal.markSynced(journal.nowNs());
      return cap;
    } catch (err) {
      if (record) {
        await release(qmp, undefined, record, o.log, { success: false }).catch((e: unknown) =>
          o.log(`cleanup after a failed capture start: ${describeError(e)}`),
        );
      }
      await server?.close().catch(() => {});
      await journal?.close().catch(() => {});
      throw err;
    } finally {
      await qmp.close().catch(() => {});
    }
  }

  /** Asks QEMU whether every mirror still runs (a failed one ended and is gone). */
  async health(): Promise<CaptureHealth> {
    const qmp = await connect(this.o.vm, this.o.target);
    try {
      const jobs = await qmp.execute<Array<{ id: string; status: string }>>("query-jobs");
      const problems: string[] = [];
      for (const d of this.disks) {
        const j = jobs.find((x) => x.id === cdpNames.job(d.name));
        if (!j) problems.push(`disk ${d.name}: its mirror ended (the journal target failed)`);
        else if (j.status !== "ready" && j.status !== "running")
          problems.push(`disk ${d.name}: its mirror is ${j.status}`);
      }
      if (this.brokenWhy) problems.push(this.brokenWhy);
      const failed = this.journal.failed;
      if (failed) problems.push(`journal: ${failed.message}`);
      return { ok: problems.length === 0, problems };
    } finally {
      await qmp.close().catch(() => {});
    }
  }

  /**
   * Stops: cancels the mirrors (the guest's writes go on to its disks alone), removes the nbd
   * nodes, then stops the server and closes the journal. The bitmap goes when the journal holds
   * every write; it stays when something was missed (`keepBitmap`, a broken capture, or a mirror
   * that ended on its own).
   */
  stop(keepBitmap = false): Promise<{ bitmapKept: boolean }> {
    this.stopped ??= (async () => {
      let keep = keepBitmap || this.brokenWhy !== undefined;
      let qmp: QmpClient | undefined;
      let reachable = true;
      try {
        qmp = await connect(this.o.vm, this.o.target);
      } catch (err) {
        reachable = await socketAccepts(this.o.target.qmp);
        if (reachable)
          this.o.log(
            `${message(err)}: what capture made stays listed in ${this.record.path}; run "strata doctor --fix"`,
          );
      }
      try {
        if (qmp) {
          const jobs = await qmp.execute<Array<{ id: string }>>("query-jobs");
          if (this.disks.some((d) => !jobs.some((j) => j.id === cdpNames.job(d.name)))) keep = true;
          await cancelPaused(
            qmp,
            this.record,
            jobs.map((j) => j.id).filter((id) => this.disks.some((d) => cdpNames.job(d.name) === id)),
          );
          // release(): success keeps the bitmaps a record lists, failure removes them.
          await release(qmp, undefined, this.record, this.o.log, { success: keep });
        } else if (!reachable) {
          // QEMU is gone, and with it everything capture made inside it: only files are left.
          await release(undefined, undefined, this.record, this.o.log, { success: false });
        }
      } catch (err) {
        this.o.log(`stopping the capture: ${describeError(err)}`);
      } finally {
        await qmp?.close().catch(() => {});
        await this.server.close().catch(() => {});
        await this.journal.close().catch((err: unknown) => {
          keep = true;
          this.o.log(`journal: ${message(err)}`);
        });
      }
      return { bitmapKept: keep };
    })();
    return this.stopped;
  }
}

async function waitReady(
  qmp: QmpClient,
  ids: readonly string[],
  timeoutMs: number,
  broken: () => string | undefined,
): Promise<void> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const jobs = await qmp.execute<Array<{ device: string; ready: boolean }>>("query-block-jobs");
    if (ids.every((id) => jobs.some((j) => j.device === id && j.ready))) return;
    const gone = ids.filter((id) => !jobs.some((j) => j.device === id));
    const why = broken();
    if (gone.length > 0 || why !== undefined)
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the mirror${gone.length > 1 ? "s" : ""} ${gone.join(", ")} ended before the initial copy was done${why ? `: ${why}` : ""}`,
      );
    if (Date.now() > end)
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `the mirrors ${ids.join(", ")} were not ready within ${timeoutMs} ms`,
      );
    await new Promise((r) => setTimeout(r, 100));
  }
}

/** Releases what a dead protect of `vm` left; refuses when one is still running. */
async function recoverProtect(
  stateDir: string,
  vm: string,
  qmp: QmpClient,
  log: (m: string) => void,
): Promise<void> {
  const rec = await StateRecord.load(StateRecord.pathOf(stateDir, vm, "protect"));
  if (!rec) return;
  const pid = rec.data.pid;
  if (pid !== process.pid && processAlive(pid) && processStart(pid) !== "")
    throw new StrataError(
      ErrorCode.LOCKED,
      `VM ${vm} is already protected by another Strata process (pid ${pid})`,
    );
  log(`cleaning up after a protect of ${vm} that did not stop (${rec.items.length} item(s) in ${rec.path})`);
  await release(qmp, undefined, rec, log, { success: false });
}

/**
 * Cancels the active mirrors with the VM paused: QEMU 7.2 corrupted its heap (and died) when a
 * write-blocking mirror was cancelled while guest writes were in flight through it. `stop`
 * drains every request first; the pause lasts as long as the cancel (milliseconds), and is
 * recorded so that a Strata that dies inside it leaves a VM that `release` resumes.
 */
async function cancelPaused(qmp: QmpClient, record: StateRecord, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return;
  const status = await qmp.execute<{ running: boolean }>("query-status");
  if (status.running) {
    await record.add({ kind: "paused" });
    await qmp.execute("stop");
  }
  try {
    for (const id of ids) await qmp.execute("block-job-cancel", { device: id, force: true });
    for (const id of ids) await waitJobGone(qmp, id);
  } finally {
    if (status.running) {
      await qmp.execute("cont");
      await record.remove({ kind: "paused" });
    }
  }
}
