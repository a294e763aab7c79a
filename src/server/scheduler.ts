/**
 * The scheduler's core: which jobs are due, decided on an injected clock, with no timers and no
 * I/O of its own, so that the daemon's loop (sleep until {@link Scheduler.nextWakeup}, run what
 * {@link Scheduler.due} returns) and the tests drive it the same way.
 *
 * Rules:
 * - A job is due at each of its schedule's slots plus its jitter offset (src/server/schedule.ts).
 * - Each call to `due()` returns a job at most once, however many of its due times passed since
 *   the last call: a daemon that was busy or asleep catches up with one run, not a burst.
 * - Catch-up after downtime: a job added with `since` (the due time its last run answered, or
 *   when the job was made) whose next due time after `since` has passed runs once, at once
 *   (trigger `missed`), answering the latest due time that passed.
 * - A run the daemon was doing when it died is found in the catalog (a run without an end),
 *   marked `interrupted` and run again (trigger `rerun`); that rerun also stands for any due
 *   time missed meanwhile. {@link recoverAfterRestart} does this at start.
 *
 * Whether a due job may start now (limits, a run of it still going) is the daemon's call.
 */
import { hostname } from "node:os";
import type { Catalog, Job, Run } from "../catalog/catalog.js";
import type { Clock } from "../util/clock.js";
import { nextDue, type Timed } from "./schedule.js";

export type Trigger = "schedule" | "missed" | "rerun";

/** A run the scheduler asks for. */
export interface DueRun {
  key: string;
  trigger: Trigger;
  /** The due time it answers. */
  scheduledFor: number;
  /** For a rerun: the interrupted run. */
  rerunOf?: number;
}

/** The most due times walked when looking for the latest missed one (a year of every 1m is 525,600). */
const MAX_CATCH_UP_STEPS = 1_000_000;

export class Scheduler {
  private readonly jobs = new Map<string, Timed>();
  private readonly next = new Map<string, number | undefined>();
  private readonly queued = new Map<string, DueRun>();

  constructor(private readonly clock: Clock) {}

  /**
   * Adds a job (or replaces one with the same key). `since`: the due time its last run
   * answered, or when the job was made; a due time after it that has passed already queues one
   * `missed` run.
   */
  add(job: Timed, since: number): void {
    const now = this.clock.now();
    this.jobs.set(job.key, job);
    const first = nextDue(job, since);
    if (first !== undefined && first <= now) {
      let latest = first;
      for (let i = 0; i < MAX_CATCH_UP_STEPS; i++) {
        const n = nextDue(job, latest);
        if (n === undefined || n > now) break;
        latest = n;
      }
      this.enqueue({ key: job.key, trigger: "missed", scheduledFor: latest });
    }
    this.next.set(job.key, nextDue(job, now));
  }

  remove(key: string): void {
    this.jobs.delete(key);
    this.next.delete(key);
    this.queued.delete(key);
  }

  /** Queues a run to start at the next `due()` (a rerun of an interrupted run). */
  enqueue(run: DueRun): void {
    const have = this.queued.get(run.key);
    if (!have) {
      this.queued.set(run.key, run);
      return;
    }
    // One run per job, answering the latest due time: a rerun stands for a missed one too.
    const winner = rank(run.trigger) >= rank(have.trigger) ? run : have;
    this.queued.set(run.key, { ...winner, scheduledFor: Math.max(run.scheduledFor, have.scheduledFor) });
  }

  /** The runs due now, each job at most once; scheduled jobs move on to their next due time. */
  due(): DueRun[] {
    const now = this.clock.now();
    const out = new Map<string, DueRun>(this.queued);
    this.queued.clear();
    for (const [key, at] of this.next) {
      if (at === undefined || at > now) continue;
      if (!out.has(key)) out.set(key, { key, trigger: "schedule", scheduledFor: at });
      else out.set(key, { ...out.get(key)!, scheduledFor: Math.max(out.get(key)!.scheduledFor, at) });
      this.next.set(key, nextDue(this.jobs.get(key)!, now));
    }
    return [...out.values()].sort((a, b) => a.scheduledFor - b.scheduledFor || a.key.localeCompare(b.key));
  }

  /** When `due()` next has something: now when runs are queued, else the earliest due time. */
  nextWakeup(): number | undefined {
    if (this.queued.size > 0) return this.clock.now();
    let min: number | undefined;
    for (const at of this.next.values()) if (at !== undefined && (min === undefined || at < min)) min = at;
    return min;
  }

  /** The job's next due time (undefined: never again). */
  nextOf(key: string): number | undefined {
    return this.next.get(key);
  }
}

function rank(t: Trigger): number {
  return t === "rerun" ? 2 : t === "missed" ? 1 : 0;
}

export interface RecoveryOptions {
  clock: Clock;
  /** This host's name (default: os.hostname()). */
  host?: string;
  /** Whether a process of this host runs (default: signal 0). */
  isAlive?: (pid: number) => boolean;
}

function processAlive(pid: number): boolean {
  try {
    process.kill(pid, 0);
    return true;
  } catch (err) {
    return (err as NodeJS.ErrnoException).code === "EPERM";
  }
}

/**
 * Marks as `interrupted` every run without an end whose process is gone (on this host: no such
 * pid, or this very process, which has only just started; a run recorded by another host can't
 * be checked and is taken as dead, since a catalog belongs to one host). Runs of live processes
 * (a backup started by hand through the CLI) are left alone. Returns the runs it marked.
 */
export function interruptDeadRuns(catalog: Catalog, options: RecoveryOptions): Run[] {
  const host = options.host ?? hostname();
  const isAlive = options.isAlive ?? processAlive;
  const out: Run[] = [];
  for (const run of catalog.openRuns()) {
    if (run.host === host && run.pid !== process.pid && isAlive(run.pid)) continue;
    const why =
      run.host === host
        ? `the process that ran it (pid ${run.pid}) ended before the run did`
        : `it was started on host ${run.host}, whose process can't be checked from ${host}`;
    catalog.log(run.id, "error", `interrupted: ${why}`);
    out.push(
      catalog.endRun(run.id, { outcome: "interrupted", errorCode: "ABORTED", error: `interrupted: ${why}` }),
    );
  }
  return out;
}

/**
 * What the daemon does first when it starts: marks the runs a dead daemon left open as
 * interrupted, adds every job to `scheduler` with the due time its last scheduled run answered
 * (or its creation), so that a due time missed while the daemon was down runs once, and queues a
 * rerun of each interrupted run of a job still configured. Returns the interrupted runs.
 */
export function recoverAfterRestart(
  catalog: Catalog,
  scheduler: Scheduler,
  jobs: ReadonlyArray<{ job: Job; timed: Timed }>,
  options: RecoveryOptions,
): Run[] {
  const interrupted = interruptDeadRuns(catalog, options);
  for (const { job, timed } of jobs) scheduler.add(timed, catalog.lastScheduledFor(job.id) ?? job.createdAt);
  const byId = new Map(jobs.map(({ job, timed }) => [job.id, timed.key]));
  for (const run of interrupted) {
    const key = byId.get(run.jobId);
    if (key === undefined) continue;
    scheduler.enqueue({
      key,
      trigger: "rerun",
      scheduledFor: run.scheduledFor ?? run.startedAt,
      rerunOf: run.id,
    });
  }
  return interrupted;
}
