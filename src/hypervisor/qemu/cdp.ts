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
 * A dirty bitmap (`strata-cdp-<n>`) starts just before the mirrors and anew every `rotateMs`
 * (journal.json's `cover` names those that record every write the durable journal may lack), so
 * when the journal loses writes (its target failed, the mirror was cancelled, Strata died) the
 * bitmaps still say where, and a capture started again on the journal resumes by re-reading only
 * those ranges (see {@link Capture.reread}). They are removed on a clean stop, kept otherwise.
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
import { NbdClient } from "../../nbd/client.js";
import { type BlockSource, NbdServer } from "../../nbd/server.js";
import { processStart } from "../../repo/locks.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { processAlive, socketAccepts } from "../../util/process.js";
import {
  type LiveDisk,
  listDisks,
  present,
  release,
  startNbdServer,
  waitJobGone,
  whilePaused,
} from "./live.js";
import { QmpClient } from "./qmp.js";
import type { QemuTarget } from "./session.js";
import { StateRecord } from "./state.js";

export const cdpNames = {
  node: (disk: string) => `strata-cdp-${disk}`,
  job: (disk: string) => `strata-cdp-job-${disk}`,
  /** The capture's dirty bitmaps, one after the other (see {@link Capture.rotate}). */
  bitmap: (seq: number) => `strata-cdp-${seq}`,
  isBitmap: (name: string) => /^strata-cdp(-\d+)?$/.test(name),
  /** The read-only exports of the disks a resume re-reads. */
  readExport: (disk: string) => `strata-cdp-read-${disk}`,
};

/** Largest range a resume re-reads (and holds guest writes to) at once. */
const REREAD_PIECE = 1024 * 1024;

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
  /**
   * How often the dirty bitmap starts anew (default 10 s): a resume re-reads what was written
   * since the last rotation before the crash, plus what was written until the new mirror ran.
   */
  rotateMs?: number;
}

/** What a resume did: the bitmaps it read, the bytes it re-read, the gap it left in the journal. */
export interface ResumeReport {
  bitmaps: string[];
  bytes: number;
  ranges: number;
  durationMs: number;
  gap: { fromNs: bigint; toNs: bigint };
}

export interface CaptureHealth {
  ok: boolean;
  /** Why not, naming the disk. */
  problems: string[];
}

/** A job as query-jobs lists it (the fields used here). */
interface QemuJob {
  id: string;
  status: string;
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

/**
 * Ranges of the disks being re-read by a resume: a write to the journal target overlapping one
 * waits until the re-read's entry is appended, so that the guest's write comes after it.
 */
export class Holds {
  private readonly held = new Map<string, Array<{ offset: number; end: number; done: Promise<void> }>>();
  private readonly inFlight = new Set<Promise<unknown>>();

  /** Counts `p` as an append in flight until it settles. */
  track(p: Promise<unknown>): void {
    this.inFlight.add(p);
    const done = () => this.inFlight.delete(p);
    p.then(done, done);
  }

  /** Resolves once every append in flight now has settled. */
  async settled(): Promise<void> {
    await Promise.allSettled([...this.inFlight]);
  }

  async wait(disk: string, offset: number, length: number): Promise<void> {
    for (;;) {
      const h = this.held.get(disk)?.find((x) => x.offset < offset + length && offset < x.end);
      if (!h) return;
      await h.done;
    }
  }

  /** Holds writes to the range until the returned release is called. */
  hold(disk: string, offset: number, length: number): () => void {
    let release!: () => void;
    const h = { offset, end: offset + length, done: new Promise<void>((r) => (release = r)) };
    const list = this.held.get(disk) ?? [];
    list.push(h);
    this.held.set(disk, list);
    return () => {
      list.splice(list.indexOf(h), 1);
      release();
    };
  }
}

/** The journaling target one disk is exported as. */
export function journalSource(
  journal: JournalWriter,
  disk: LiveDisk,
  deadlineMs: number,
  broken: (why: string) => void,
  holds: Holds,
): BlockSource {
  const timed = async (what: string, p: Promise<void>): Promise<void> => {
    let timer: NodeJS.Timeout | undefined;
    holds.track(p);
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
    write: (offset, data) =>
      timed(
        "append",
        holds.wait(disk.name, offset, data.length).then(() => journal.write(disk.name, offset, data)),
      ),
    writeZeroes: (offset, length) =>
      timed(
        "append",
        holds.wait(disk.name, offset, length).then(() => journal.writeZeroes(disk.name, offset, length)),
      ),
    trim: (offset, length) =>
      timed(
        "append",
        holds.wait(disk.name, offset, length).then(() => journal.trim(disk.name, offset, length)),
      ),
    flush: () => timed("sync", journal.sync()),
  };
}

/** A running capture. stop() on every path. */
export class Capture {
  private stopped: Promise<{ bitmapKept: boolean }> | undefined;
  private brokenWhy: string | undefined;
  /** The number of the newest bitmap (`strata-cdp-<seq>`). */
  private seq = 0;
  private rotation: Promise<void> | undefined;
  private rotateTimer: NodeJS.Timeout | undefined;
  /** Set when this capture resumed an earlier one of the same journal. */
  resumed: ResumeReport | undefined;

  private constructor(
    private readonly o: CaptureOptions,
    readonly record: StateRecord,
    readonly disks: readonly LiveDisk[],
    readonly journal: JournalWriter,
    private readonly server: NbdServer,
    readonly socket: string,
    private readonly holds: Holds,
  ) {}

  /** Why the journal side failed, when it did. */
  get broken(): string | undefined {
    return this.brokenWhy;
  }

  /** The bitmap that records the writes since its creation. */
  get bitmap(): string {
    return cdpNames.bitmap(this.seq);
  }

  /**
   * Starts capturing: cleans up what a dead protect of the VM left, opens the journal, starts
   * the NBD server, then per disk the bitmap, the nbd node and the mirror. When the journal
   * holds an earlier capture whose bitmaps are still on the disks (its protect died), it
   * resumes: the new mirrors journal every write from now on, then what the bitmaps mark is
   * re-read from the disks into the journal (see {@link Capture.reread}).
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
    let old: string[] = [];
    try {
      await recoverProtect(stateDir, o.vm, qmp, o.log);
      const disks = await listDisks(qmp);
      if (disks.length === 0)
        throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `VM ${o.vm} has no writable disks`);
      journal = await o.openJournal(disks);
      const resume = resumable(journal, disks);
      if (resume.why !== undefined)
        throw new StrataError(
          ErrorCode.USAGE,
          `journal ${journal.dir} holds an earlier capture of ${o.vm} that cannot be resumed (${resume.why}): give protect a new --journal directory`,
        );
      old = resume.bitmaps;
      // Bitmaps of earlier captures that record nothing this journal needs.
      for (const d of disks)
        for (const b of d.bitmaps)
          if (cdpNames.isBitmap(b.name) && !old.includes(b.name))
            await qmp.execute("block-dirty-bitmap-remove", { node: d.node, name: b.name });
      let gapFrom: bigint | undefined;
      if (old.length > 0) {
        // From the last entry the dead capture left to the end of the re-read, the journal
        // does not know the disks: recorded before anything else (an interrupted resume's
        // gap stays open and is closed by this one).
        const open = journal.gaps.find((g) => g.toNs === undefined);
        gapFrom = open ? BigInt(open.fromNs) : journal.window.lastNs + 1n;
        if (!open) await journal.openGap(gapFrom);
        o.log(
          `resuming the capture of ${o.vm} from the dirty bitmap${old.length > 1 ? "s" : ""} ${old.join(", ")} (the journal ends at ${new Date(Number(gapFrom / 1_000_000n)).toISOString()})`,
        );
      }
      record = await StateRecord.create(stateDir, o.vm, o.target.qmp, o.target.qga, "protect");
      for (const d of disks) for (const b of old) await record.add({ kind: "bitmap", node: d.node, name: b });
      let cap: Capture | undefined;
      const broken = (why: string) => {
        if (!cap || cap.brokenWhy !== undefined) return;
        cap.brokenWhy = why;
        o.log(`capture failed: ${why}`);
        o.onBroken?.(why);
      };
      const deadline = o.appendDeadlineMs ?? 5000;
      const j = journal;
      const holds = new Holds();
      server = new NbdServer({
        exports: Object.fromEntries(
          disks.map((d) => [d.name, { source: journalSource(j, d, deadline, broken, holds) }]),
        ),
        maxInFlight: 64,
        onError: (err) => o.log(`journal NBD server: ${err.message}`),
      });
      await record.add({ kind: "file", path: socket });
      await fs.rm(socket, { force: true });
      await server.listen({ path: socket });
      await fs.chmod(socket, 0o600);
      cap = new Capture(o, record, disks, journal, server, socket, holds);
      cap.seq = (journal.cover?.seq ?? 0) + 1;
      await cap.addBitmap(qmp, cap.bitmap);
      await journal.setCover([...old, cap.bitmap], cap.seq);
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
          // A resumed journal holds the disks already but for what the bitmaps mark.
          sync: old.length > 0 ? "none" : o.sync,
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
      if (gapFrom !== undefined) cap.resumed = await cap.reread(qmp, old, gapFrom, stateDir);
      else if (o.sync === "full") await journal.markSynced(journal.nowNs());
      const every = o.rotateMs ?? 10_000;
      cap.rotateTimer = setInterval(() => cap.rotateSoon(), every);
      cap.rotateTimer.unref();
      return cap;
    } catch (err) {
      if (record) {
        // A failed resume keeps the bitmaps: the next protect of the journal resumes from them.
        await releaseCapture(qmp, record, o.log, { success: old.length > 0 }).catch((e: unknown) =>
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

  /** Adds `name` on every disk (recorded first). */
  private async addBitmap(qmp: QmpClient, name: string): Promise<void> {
    for (const d of this.disks) {
      await this.record.add({ kind: "bitmap", node: d.node, name });
      await qmp.execute("block-dirty-bitmap-add", { node: d.node, name, persistent: d.format === "qcow2" });
    }
  }

  /** Removes `names` from every disk where they are, and from the record. */
  private async removeBitmaps(qmp: QmpClient, names: readonly string[]): Promise<void> {
    for (const d of this.disks)
      for (const name of names) {
        if (await present.bitmap(qmp, d.node, name))
          await qmp.execute("block-dirty-bitmap-remove", { node: d.node, name });
        await this.record.remove({ kind: "bitmap", node: d.node, name });
      }
  }

  /**
   * Re-reads into the journal what the bitmaps `old` mark (the writes a dead capture may not
   * have journaled), beside the running mirrors: the bitmaps are disabled (the new mirrors and
   * bitmap record every write from here on), the disks exported read-only by QEMU with the
   * bitmaps, and each dirty range read and appended while writes to it are held at the journal
   * target. Whatever the read saw (old, new or torn data), a guest write to the range made
   * meanwhile is appended after the re-read, so the journal replayed in order ends with it.
   * Instants from the dead capture's last entry to the end of the re-read are a gap.
   */
  private async reread(
    qmp: QmpClient,
    old: readonly string[],
    gapFrom: bigint,
    stateDir: string,
  ): Promise<ResumeReport> {
    const t0 = Date.now();
    const sock = join(stateDir, `strata-cdp-read-${this.o.vm}.sock`);
    for (const d of this.disks)
      for (const b of old) await qmp.execute("block-dirty-bitmap-disable", { node: d.node, name: b });
    await startNbdServer(
      qmp,
      this.record,
      sock,
      "to re-read what the journal missed",
      `is a backup of ${this.o.vm} running?`,
    );
    for (const d of this.disks) {
      await this.record.add({ kind: "export", id: cdpNames.readExport(d.name) });
      await qmp.execute("block-export-add", {
        type: "nbd",
        id: cdpNames.readExport(d.name),
        "node-name": d.node,
        name: d.name,
        writable: false,
        bitmaps: [...old],
      });
    }
    let bytes = 0;
    let ranges = 0;
    for (const d of this.disks) {
      const contexts = old.map((b) => `qemu:dirty-bitmap:${b}`);
      const client = await NbdClient.connect({ path: sock }, { exportName: d.name, metaContexts: contexts });
      try {
        const dirty: Array<[number, number]> = [];
        for (const c of contexts)
          for (const e of await client.blockStatus(0, d.size, c))
            if (e.flags & 1) dirty.push([e.offset, e.offset + e.length]);
        dirty.sort((a, b) => a[0] - b[0]);
        const merged: Array<[number, number]> = [];
        for (const r of dirty) {
          const last = merged.at(-1);
          if (last && r[0] <= last[1]) last[1] = Math.max(last[1], r[1]);
          else merged.push([r[0], r[1]]);
        }
        for (const [start, end] of merged)
          for (let at = start; at < end; at += REREAD_PIECE) {
            const len = Math.min(REREAD_PIECE, end - at);
            const unhold = this.holds.hold(d.name, at, len);
            try {
              await this.journal.write(d.name, at, await client.read(at, len));
            } finally {
              unhold();
            }
            bytes += len;
            ranges++;
          }
      } finally {
        await client.close().catch(() => {});
      }
    }
    await this.journal.sync();
    const now = this.journal.nowNs();
    const last = this.journal.window.lastNs + 1n;
    const gapTo = now > last ? now : last;
    await this.journal.closeGap(gapTo);
    await this.journal.setCover([this.bitmap], this.seq);
    for (const d of this.disks) {
      const item = { kind: "export", id: cdpNames.readExport(d.name) } as const;
      await qmp.execute("block-export-del", { id: item.id, mode: "hard" });
      await this.record.remove(item);
    }
    await qmp.execute("nbd-server-stop");
    await this.record.remove({ kind: "nbd-server", socket: sock });
    await fs.rm(sock, { force: true });
    await this.record.remove({ kind: "file", path: sock });
    await this.removeBitmaps(qmp, old);
    return {
      bitmaps: [...old],
      bytes,
      ranges,
      durationMs: Date.now() - t0,
      gap: { fromNs: gapFrom, toNs: gapTo },
    };
  }

  private rotateSoon(): void {
    if (this.rotation || this.brokenWhy !== undefined || this.stopped) return;
    this.rotation = this.rotate()
      .catch((err: unknown) => this.o.log(`dirty bitmap rotation (tried again later): ${describeError(err)}`))
      .finally(() => {
        this.rotation = undefined;
      });
  }

  /**
   * Starts the next bitmap and drops the ones before it once the journal is durable past the
   * new one's start, so that a resume re-reads only what was written since the last rotation.
   * A write the new bitmap missed was on the disk before it was added; the mirror sends it to
   * the journal at once (the source is written first, then the target), so one second, the end
   * of every append then in flight, and an fdatasync later it is durable in the journal.
   */
  private async rotate(): Promise<void> {
    const old = this.journal.cover?.bitmaps ?? [];
    this.seq++;
    const name = this.bitmap;
    let qmp = await connect(this.o.vm, this.o.target);
    try {
      await this.addBitmap(qmp, name);
    } finally {
      await qmp.close().catch(() => {});
    }
    await this.journal.setCover([...old, name], this.seq);
    await new Promise((r) => setTimeout(r, 1000));
    // An append slower than the deadline breaks the capture: waiting longer says nothing.
    let timer: NodeJS.Timeout | undefined;
    await Promise.race([
      this.holds.settled(),
      new Promise((r) => {
        timer = setTimeout(r, this.o.appendDeadlineMs ?? 5000);
      }),
    ]);
    clearTimeout(timer);
    if (this.brokenWhy !== undefined || this.stopped) return;
    await this.journal.sync();
    if (this.brokenWhy !== undefined || this.stopped) return;
    await this.journal.setCover([name], this.seq);
    qmp = await connect(this.o.vm, this.o.target);
    try {
      await this.removeBitmaps(qmp, old);
    } finally {
      await qmp.close().catch(() => {});
    }
  }

  /** Asks QEMU whether every mirror still runs (a failed one ended and is gone). */
  async health(): Promise<CaptureHealth> {
    const qmp = await connect(this.o.vm, this.o.target);
    try {
      const jobs = await qmp.execute<QemuJob[]>("query-jobs");
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
      clearInterval(this.rotateTimer);
      await this.rotation;
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
          const jobs = await qmp.execute<QemuJob[]>("query-jobs");
          if (this.disks.some((d) => !jobs.some((j) => j.id === cdpNames.job(d.name)))) keep = true;
          // release(): success keeps the bitmaps a record lists, failure removes them.
          await releaseCapture(qmp, this.record, this.o.log, { success: keep }, jobs);
        } else if (!reachable) {
          // QEMU is gone, and with it everything capture made inside it: only files are left.
          await release(undefined, undefined, this.record, this.o.log, { success: false });
        }
      } catch (err) {
        this.o.log(`stopping the capture: ${describeError(err)}`);
      } finally {
        await qmp?.close().catch(() => {});
        await this.server.close().catch(() => {});
        // Stopped with every write journaled: no bitmap is left to resume from.
        if (!keep) await this.journal.setCover([], this.seq).catch(() => {});
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

/**
 * Whether the capture can resume the journal: an earlier capture's bitmaps (journal.json's
 * `cover`) are on every disk. `bitmaps` is empty for a new journal; `why` says why a journal
 * that holds a capture cannot be resumed.
 */
function resumable(journal: JournalWriter, disks: readonly LiveDisk[]): { bitmaps: string[]; why?: string } {
  const meta = journal.metadata;
  const used = meta.syncedNs !== undefined || journal.window.nextSeq > 1n || meta.bases.length > 0;
  if (!used) return { bitmaps: [] };
  const cover = meta.cover?.bitmaps ?? [];
  if (meta.syncedNs === undefined)
    return { bitmaps: [], why: "its first copy of the disks was never finished" };
  if (cover.length === 0)
    return { bitmaps: [], why: "it was stopped cleanly: no dirty bitmap records what came after" };
  for (const d of disks)
    for (const b of cover) {
      const have = d.bitmaps.find((x) => x.name === b);
      if (!have)
        return {
          bitmaps: [],
          why: `disk ${d.name} lacks the dirty bitmap ${b} that records what the journal missed (was the VM restarted?)`,
        };
      if (have.inconsistent)
        return {
          bitmaps: [],
          why: `the dirty bitmap ${b} of disk ${d.name} is inconsistent (QEMU did not stop cleanly): it cannot say what the journal missed`,
        };
    }
  return { bitmaps: cover };
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
  // Its bitmaps stay: they record what its journal may lack, for a resume (the capture starting
  // next removes those its journal does not name).
  await releaseCapture(qmp, rec, log, { success: true });
}

/**
 * {@link release} for what a capture made, its mirrors first cancelled with the VM paused
 * (`cancelPaused`). `qmp` undefined: QEMU is gone, only files are left to remove. `jobs`: what
 * query-jobs answered just now, when the caller asked already.
 */
export async function releaseCapture(
  qmp: QmpClient | undefined,
  record: StateRecord,
  log: (m: string) => void,
  how: { success: boolean },
  jobs?: readonly QemuJob[],
): Promise<void> {
  if (qmp && !qmp.closed) {
    const listed = jobs ?? (await qmp.execute<QemuJob[]>("query-jobs"));
    const running = record.items
      .flatMap((i) => (i.kind === "job" ? [i.id] : []))
      .filter((id) =>
        listed.some((j) => j.id === id && !["concluded", "aborting", "null"].includes(j.status)),
      );
    await cancelPaused(qmp, record, running);
  }
  await release(qmp, undefined, record, log, how);
}

/**
 * Cancels the active mirrors with the VM paused: QEMU 7.2 corrupted its heap (and died) when a
 * write-blocking mirror was cancelled while guest writes were in flight through it. The pause
 * ({@link whilePaused}) lasts as long as the cancel, milliseconds.
 */
function cancelPaused(qmp: QmpClient, record: StateRecord, ids: readonly string[]): Promise<void> {
  if (ids.length === 0) return Promise.resolve();
  return whilePaused(qmp, record, async () => {
    for (const id of ids) await qmp.execute("block-job-cancel", { device: id, force: true });
    for (const id of ids) await waitJobGone(qmp, id);
  });
}
