/**
 * The service loop: one {@link Daemon} per host.
 *
 * At start it syncs the catalog's jobs with the configuration and the VMs found now, marks the
 * runs a dead daemon left as interrupted and queues their reruns, and adds every timed job to the
 * scheduler with the due time its last run answered (a due time missed while down runs once).
 * Then it sleeps until the scheduler's next wake-up, queues what is due, and starts queued runs
 * while the limits allow: at most `jobs` runs on the host, `jobs-per-repository` per repository,
 * one run per job. A backup that succeeds queues its VM's retention run at the head of the
 * queue, so retention follows its backup before other work takes the slot.
 *
 * Every run is a row in the catalog from start to end: trigger and due time, outcome, bytes,
 * duration, error code and text, progress (stored at most once a second) and log lines. Live
 * progress goes to subscribers (the API's server-sent events) as it happens.
 *
 * Cancelling (the API, or SIGTERM/SIGINT through {@link Daemon.stop}) aborts the run's signal;
 * the runner stops and cleans up (the engine checks the signal per chunk, adapters release the
 * VM), and the run is recorded `cancelled`. A run the process could not end (kill -9, power
 * loss) is found at the next start and rerun.
 *
 * Time comes from an injected clock and the loop's timer can be switched off, so tests move a
 * fake clock and call {@link Daemon.tick}.
 */
import { EventEmitter } from "node:events";
import { readdirSync } from "node:fs";
import { setPriority } from "node:os";
import type { Catalog, Job, Run } from "../catalog/catalog.js";
import type { LogLevel, RunTrigger } from "../catalog/schema.js";
import type { VmSummary } from "../hypervisor/adapter.js";
import { type Clock, systemClock } from "../util/clock.js";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import type { ProgressSink } from "../util/progress.js";
import type { CdpSupervisor, CdpWant } from "./cdp.js";
import { CDP_SOURCE_RE, type DaemonConfig, type Policy, selectVms } from "./config.js";
import { type JobSpec, planJobs, syncJobs } from "./jobs.js";
import { type Notice, Notifier } from "./notify.js";
import { rpoState } from "./rpo.js";
import type { JobRunner, RunOutput } from "./runner.js";
import { jobKey, type Timed } from "./schedule.js";
import { recoverAfterRestart, Scheduler } from "./scheduler.js";

export type DaemonLog = (level: LogLevel, message: string) => void;

export interface ListedVms {
  vms: VmSummary[];
  unreachable: Array<{ adapter: string; error: string }>;
}

/** A VM the daemon knows: found by an adapter, or named by its sources in the configuration. */
export interface KnownVm extends Pick<VmSummary, "name" | "adapter" | "state" | "tags"> {
  sources: string[];
}

/** What subscribers of a run see, in order; `end` comes last. */
export type RunEvent =
  | { type: "progress"; done: number; total: number; bytesNew?: number }
  | { type: "log"; time: number; level: LogLevel; message: string }
  | { type: "end"; run: Run };

export interface DaemonOptions {
  config: DaemonConfig;
  catalog: Catalog;
  runner: JobRunner;
  /**
   * The VMs the platform adapters find now (the CLI's composition root asks every adapter), and
   * the adapters that could not be asked: their VMs seen before are kept, not dropped.
   */
  listVms: () => Promise<ListedVms>;
  /** How often the VMs are listed again and the jobs synced (default 5 minutes; 0: never). */
  resyncMs?: number;
  clock?: Clock;
  log?: DaemonLog;
  /** Sleep until the next due time by itself (default true); tests on a fake clock call tick(). */
  timers?: boolean;
  /** For recovery: this host's name and how to tell a live pid (see recoverAfterRestart). */
  host?: string;
  isAlive?: (pid: number) => boolean;
  /** How often a run's progress is stored in the catalog (default 1000 ms). */
  progressIntervalMs?: number;
  /** Where failures, recoveries and RPOs missed and met again are told (the configuration's notifications). */
  notifier?: Pick<Notifier, "send">;
  /** Keeps the protects of the policies with cdp running (src/server/cdp.ts). */
  cdp?: CdpSupervisor;
}

interface Entry {
  job: Job;
  spec: JobSpec;
  key: string;
  policy: Policy;
}

interface Pending {
  entry: Entry;
  trigger: RunTrigger;
  scheduledFor?: number;
  rerunOf?: number;
}

/** What a run started on demand (a restore, a migration, gc) does, given its context. */
export type TaskWork = (ctx: {
  runId: number;
  signal: AbortSignal;
  progress: ProgressSink;
  log: (level: LogLevel, message: string) => void;
}) => Promise<RunOutput>;

/** A run the API starts on demand: the job it is recorded under, and its work. */
export interface TaskSpec {
  kind: "restore" | "instant" | "gc";
  /** The VM it concerns ('' for a whole repository). */
  vm: string;
  repository: string;
  work: TaskWork;
}

/** The policy name of jobs made for runs started on demand (no configured policy has it). */
export const ON_DEMAND_POLICY = "(api)";

interface Active {
  run: Run;
  /** The configured job; undefined for a task started on demand. */
  entry: Entry | undefined;
  job: Job;
  key: string;
  work?: TaskWork;
  controller: AbortController;
  events: EventEmitter;
  progress: { done: number; total: number };
  done: Promise<void>;
}

/** The longest setTimeout Node takes (about 24.8 days). */
const MAX_TIMER_MS = 2 ** 31 - 1;

export type RunNowResult =
  | { status: "started"; run: Run }
  | { status: "queued"; job: Job }
  | { status: "running"; run: Run };

export class Daemon {
  private readonly clock: Clock;
  private readonly log: DaemonLog;
  private readonly scheduler: Scheduler;
  private readonly byKey = new Map<string, Entry>();
  private readonly byId = new Map<number, Entry>();
  private readonly active = new Map<number, Active>();
  private pending: Pending[] = [];
  private vms: KnownVm[] = [];
  private timer: NodeJS.Timeout | undefined;
  private resyncTimer: NodeJS.Timeout | undefined;
  private stopping = false;
  private readonly idleWaiters: Array<() => void> = [];
  /** Per policy/VM, the RPO state last seen (for rpo-missed and rpo-met notices). */
  private readonly rpoSeen = new Map<string, "met" | "missed" | "pending">();
  private rpoTimer: NodeJS.Timeout | undefined;
  /** The first listing of the host's VMs, once start() began it. */
  private firstSync: Promise<void> = Promise.resolve();

  constructor(private readonly o: DaemonOptions) {
    this.clock = o.clock ?? systemClock;
    this.log = o.log ?? (() => {});
    this.scheduler = new Scheduler(this.clock);
  }

  get config(): DaemonConfig {
    return this.o.config;
  }

  get catalog(): Catalog {
    return this.o.catalog;
  }

  /** Settles once start() has listed the host's VMs and synced their jobs (at once before start()). */
  get ready(): Promise<void> {
    return this.firstSync.catch(() => {});
  }

  /** Syncs jobs, recovers what a dead daemon left, and starts what is due. */
  async start(): Promise<void> {
    // Set before the first await: the API, listening already, answers after it (a VM list asked
    // for during start-up is the host's, not an empty one).
    this.firstSync = (async () => {
      await this.syncJobs();
      await this.syncCdp();
    })();
    await this.firstSync;
    const timed: Array<{ job: Job; timed: Timed }> = [];
    for (const e of this.byId.values()) if (e.spec.timed) timed.push({ job: e.job, timed: e.spec.timed });
    const interrupted = recoverAfterRestart(this.o.catalog, this.scheduler, timed, {
      clock: this.clock,
      ...(this.o.host === undefined ? {} : { host: this.o.host }),
      ...(this.o.isAlive === undefined ? {} : { isAlive: this.o.isAlive }),
    });
    for (const r of interrupted)
      this.log("warn", `run ${r.id} of job ${r.jobId} was interrupted (${r.error}); it runs again`);
    this.log(
      "info",
      `${this.byId.size} job(s) for ${this.vms.length} VM(s) from ${this.o.config.file}; ${this.o.config.limits.jobs} job(s) at once, ${this.o.config.limits.jobsPerRepository} per repository`,
    );
    this.tick();
    const every = this.o.resyncMs ?? 5 * 60_000;
    if (this.o.timers !== false && every > 0)
      this.resyncTimer = setInterval(() => {
        this.resync().catch((err) => this.log("error", `listing the VMs again: ${describeError(err)}`));
      }, every);
    this.checkRpo();
    const rpoEvery = this.o.config.notifications?.rpoCheckMs;
    if (this.o.timers !== false && this.o.notifier && rpoEvery !== undefined)
      this.rpoTimer = setInterval(() => this.checkRpo(), rpoEvery);
  }

  /**
   * Looks at every backed-up VM's RPO and tells the notifier what changed: rpo-missed when a
   * VM's newest restore point became older than its policy allows (a VM never backed up counts
   * once its job is older than one RPO), rpo-met when it is within again. The state lives in
   * memory: after a restart, a VM still missing its RPO is told once more.
   */
  checkRpo(): void {
    const notifier = this.o.notifier;
    if (!notifier) return;
    const now = this.clock.now();
    const seen = new Set<string>();
    for (const e of this.byId.values()) {
      if (e.job.kind !== "backup") continue;
      const key = `${e.policy.name}/${e.job.vm}`;
      seen.add(key);
      let s: ReturnType<typeof rpoState>;
      try {
        s = rpoState(this.o.catalog, this.o.config, e.policy, e.job.vm, now);
      } catch (err) {
        this.log("warn", `RPO of ${key}: ${describeError(err)}`);
        continue;
      }
      if (s.rpoMs === undefined) continue;
      const state = s.met ? "met" : !s.last && now - e.job.createdAt <= s.rpoMs ? "pending" : "missed";
      const before = this.rpoSeen.get(key);
      this.rpoSeen.set(key, state);
      const rpo = {
        vm: e.job.vm,
        policy: e.policy.name,
        repository: e.job.repository,
        rpoMs: s.rpoMs,
        ageMs: s.ageMs,
        lastRestorePoint: s.last ? `${s.last.vm}/${s.last.time}` : null,
      };
      if (state === "missed" && before !== "missed")
        notifier.send(
          Notifier.notice(
            "rpo-missed",
            `${e.job.vm} (policy ${e.policy.name}) missed its RPO of ${Math.round(s.rpoMs / 1000)} s: ${s.last ? `newest restore point ${rpo.lastRestorePoint}, ${Math.round(s.ageMs! / 1000)} s old` : "no restore point"}`,
            { rpo },
          ),
        );
      else if (state === "met" && before === "missed")
        notifier.send(
          Notifier.notice(
            "rpo-met",
            `${e.job.vm} (policy ${e.policy.name}) meets its RPO again: ${rpo.lastRestorePoint}`,
            { rpo },
          ),
        );
    }
    for (const k of [...this.rpoSeen.keys()]) if (!seen.has(k)) this.rpoSeen.delete(k);
  }

  /** Tells the notifier of a failed run, or of a job's first success after a failure. */
  private noticeRun(a: Active, end: Run): void {
    const notifier = this.o.notifier;
    if (!notifier) return;
    const { id, policy, vm, kind, repository } = a.job;
    const common: Omit<Notice, "event" | "time" | "host" | "summary"> = {
      job: { id, policy, vm, kind, repository },
      run: {
        id: end.id,
        outcome: end.outcome,
        startedAt: end.startedAt,
        endedAt: end.endedAt,
        errorCode: end.errorCode,
        error: end.error,
      },
    };
    if (end.outcome === "failed") {
      notifier.send(
        Notifier.notice("failure", `${a.key}: run ${end.id} failed: ${end.error ?? end.errorCode}`, common),
      );
      return;
    }
    if (!a.entry || (end.outcome !== "success" && end.outcome !== "warning")) return;
    const before = this.o.catalog
      .runs(a.job.id, 50)
      .find((r) => r.id !== end.id && r.outcome !== "running" && r.outcome !== "cancelled");
    if (before?.outcome === "failed")
      notifier.send(
        Notifier.notice(
          "recovered",
          `${a.key}: run ${end.id} succeeded after run ${before.id} failed`,
          common,
        ),
      );
  }

  /**
   * Lists the VMs again and syncs the jobs: a VM that appeared gets its jobs (scheduled from
   * now), jobs of a VM no adapter lists any more are retired (their runs stay) and unscheduled.
   * VMs of an adapter that could not be asked are kept as they were.
   */
  async resync(): Promise<void> {
    if (this.stopping) return;
    const before = new Set(this.byKey.keys());
    if (!(await this.syncJobs())) return;
    await this.syncCdp();
    for (const [key, e] of this.byKey)
      if (!before.has(key) && e.spec.timed) {
        this.scheduler.add(e.spec.timed, this.o.catalog.lastScheduledFor(e.job.id) ?? e.job.createdAt);
        this.log("info", `new job ${key}`);
      }
    for (const key of before)
      if (!this.byKey.has(key)) {
        this.scheduler.remove(key);
        this.log("info", `job ${key} retired: its VM is not found any more`);
      }
    this.pending = this.pending.filter((p) => this.byId.has(p.entry.job.id));
    this.tick();
  }

  /**
   * Takes a new configuration (checked already): repositories, policies, VMs named by sources,
   * limits and notifications apply from now. Jobs are synced as at a resync: new ones are
   * scheduled from now, gone ones retired and unscheduled, and a job whose schedule or jitter
   * changed is scheduled anew from now (no catch-up run for the change). Runs going on finish
   * under the configuration they started with. The listeners, the catalog and the state folder
   * are the process's: the caller says that those take a restart.
   */
  async reload(config: DaemonConfig, notifier?: Pick<Notifier, "send">): Promise<void> {
    if (this.stopping) return;
    const before = new Map([...this.byKey].map(([k, e]) => [k, e.spec.timed]));
    this.o.config = config;
    if (notifier) this.o.notifier = notifier;
    else delete this.o.notifier;
    await this.syncJobs(true);
    await this.syncCdp();
    const now = this.clock.now();
    for (const [key, e] of this.byKey) {
      const was = before.get(key);
      const timed = e.spec.timed;
      if (!before.has(key)) {
        if (timed) this.scheduler.add(timed, this.o.catalog.lastScheduledFor(e.job.id) ?? e.job.createdAt);
        this.log("info", `new job ${key}`);
      } else if (
        (was === undefined) !== (timed === undefined) ||
        (was && timed && (was.schedule.text !== timed.schedule.text || was.jitterMs !== timed.jitterMs))
      ) {
        this.scheduler.remove(key);
        if (timed) this.scheduler.add(timed, now);
        this.log("info", `job ${key}: ${timed ? `schedule ${timed.schedule.text}` : "no schedule"} from now`);
      }
    }
    for (const key of before.keys())
      if (!this.byKey.has(key)) {
        this.scheduler.remove(key);
        this.log("info", `job ${key} retired: not in the configuration any more`);
      }
    this.pending = this.pending.filter((p) => this.byId.has(p.entry.job.id));
    this.pending = this.pending.map((p) => ({ ...p, entry: this.byId.get(p.entry.job.id)! }));
    clearInterval(this.rpoTimer);
    this.rpoTimer = undefined;
    this.rpoSeen.clear();
    const rpoEvery = config.notifications?.rpoCheckMs;
    if (this.o.timers !== false && this.o.notifier && rpoEvery !== undefined)
      this.rpoTimer = setInterval(() => this.checkRpo(), rpoEvery);
    this.log(
      "info",
      `configuration reloaded from ${config.file}: ${this.byId.size} job(s); ${config.limits.jobs} job(s) at once, ${config.limits.jobsPerRepository} per repository`,
    );
    this.tick();
  }

  /** The protect of each VM of a policy with cdp: started, stopped, restarted (src/server/cdp.ts). */
  private async syncCdp(): Promise<void> {
    const sup = this.o.cdp;
    if (!sup || this.stopping) return;
    const wants = new Map<string, CdpWant>();
    for (const policy of this.o.config.policies.values()) {
      const repository = this.o.config.repositories.get(policy.repository);
      if (!policy.cdp || !repository) continue;
      for (const vm of selectVms(policy.vms, this.vms)) {
        const source =
          vm.sources.find((s) => CDP_SOURCE_RE.test(s)) ??
          (vm.adapter === "qemu" ? `vm:${vm.name}` : undefined);
        if (source === undefined) {
          this.log(
            "warn",
            `cdp ${vm.name} (policy ${policy.name}): not a running QEMU VM (${vm.sources.join(", ")}): not protected`,
          );
          continue;
        }
        if (wants.has(vm.name)) {
          this.log(
            "warn",
            `cdp ${vm.name}: policy ${policy.name} protects it too: the first policy's protect runs`,
          );
          continue;
        }
        wants.set(vm.name, { vm: vm.name, source, policy: policy.name, cdp: policy.cdp, repository });
      }
    }
    await sup.sync([...wants.values()]);
  }

  /** The protect of a VM under a policy with cdp, as the daemon keeps it. */
  cdpStatus(vm: string): ReturnType<CdpSupervisor["status"]> {
    return this.o.cdp?.status(vm);
  }

  /** The VMs found at the last sync, with the configuration's own. */
  knownVms(): readonly KnownVm[] {
    return this.vms;
  }

  /** The jobs of the configuration now, with their policies. */
  entries(): ReadonlyArray<Readonly<Entry>> {
    return [...this.byId.values()];
  }

  /** The job's next due time, when it has a schedule. */
  nextDue(jobId: number): number | undefined {
    const e = this.byId.get(jobId);
    return e?.spec.timed ? this.scheduler.nextOf(e.key) : undefined;
  }

  /** Lists the VMs and syncs the catalog's jobs; false (nothing changed) when listing failed. */
  private async syncJobs(evenIfUnlisted = false): Promise<boolean> {
    let listed: ListedVms;
    try {
      listed = await this.o.listVms();
    } catch (err) {
      this.log("warn", `cannot list the host's VMs: ${describeError(err)}`);
      if (this.byId.size > 0 && !evenIfUnlisted) return false;
      // Keep the VMs found before (a reload must not retire them for a failed listing).
      listed = {
        vms: [],
        unreachable: [...new Set(this.vms.map((v) => v.adapter))].map((adapter) => ({
          adapter,
          error: describeError(err),
        })),
      };
    }
    for (const u of listed.unreachable) this.log("warn", `${u.adapter}: cannot list its VMs: ${u.error}`);
    const vms = new Map<string, KnownVm>();
    // An adapter that could not be asked keeps the VMs it had: a libvirtd restart retires nothing.
    const down = new Set(listed.unreachable.map((u) => u.adapter));
    for (const v of this.vms) if (down.has(v.adapter)) vms.set(v.name, v);
    for (const v of listed.vms)
      vms.set(v.name, {
        name: v.name,
        adapter: v.adapter,
        state: v.state,
        sources: [v.source],
        ...(v.tags ? { tags: v.tags } : {}),
      });
    for (const v of this.o.config.vms.values())
      vms.set(v.name, {
        name: v.name,
        adapter: /^([a-z][a-z0-9+.-]*):/.exec(v.sources[0]!)?.[1] ?? "file",
        state: "unknown",
        sources: v.sources,
        tags: v.tags,
      });
    this.vms = [...vms.values()];
    const synced = syncJobs(this.o.catalog, planJobs(this.o.config, this.vms));
    this.byKey.clear();
    this.byId.clear();
    for (const { job, spec } of synced) {
      const entry = { job, spec, key: jobKey(spec), policy: this.o.config.policies.get(spec.policy)! };
      this.byKey.set(entry.key, entry);
      this.byId.set(job.id, entry);
    }
    return true;
  }

  /** Queues the runs due now, starts what the limits allow, and sets the timer for the next. */
  tick(): void {
    if (this.stopping) return;
    for (const d of this.scheduler.due()) {
      const entry = this.byKey.get(d.key);
      if (!entry) continue;
      this.enqueue({
        entry,
        trigger: d.trigger,
        scheduledFor: d.scheduledFor,
        ...(d.rerunOf === undefined ? {} : { rerunOf: d.rerunOf }),
      });
    }
    this.pump();
    this.arm();
  }

  private arm(): void {
    if (this.o.timers === false || this.stopping) return;
    clearTimeout(this.timer);
    const at = this.scheduler.nextWakeup();
    if (at === undefined) return;
    const wait = Math.min(Math.max(0, at - this.clock.now()), MAX_TIMER_MS);
    this.timer = setTimeout(() => this.tick(), wait);
  }

  /** One queued run per job: a job already queued keeps its place. */
  private enqueue(p: Pending, first = false): void {
    if (this.pending.some((q) => q.entry.job.id === p.entry.job.id)) return;
    if (first) this.pending.unshift(p);
    else this.pending.push(p);
  }

  private fits(entry: Entry): boolean {
    const l = this.o.config.limits;
    if (this.active.size >= l.jobs) return false;
    let sameRepo = 0;
    for (const a of this.active.values()) {
      if (a.job.id === entry.job.id) return false;
      if (a.job.repository === entry.job.repository) sameRepo++;
    }
    return sameRepo < l.jobsPerRepository;
  }

  /** Starts queued runs, in order, while the limits allow. */
  private pump(): void {
    if (this.stopping) return;
    const still: Pending[] = [];
    for (const p of this.pending) {
      if (this.fits(p.entry)) this.begin(p);
      else still.push(p);
    }
    this.pending = still;
    this.checkIdle();
  }

  /** Runs a job now (the API's "start now"): started, queued behind the limits, or already running. */
  runNow(jobId: number): RunNowResult {
    const entry = this.byId.get(jobId);
    if (!entry)
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `no job ${jobId} in the configuration now (GET /api/v1/jobs lists them)`,
      );
    if (this.stopping) throw new StrataError(ErrorCode.ABORTED, "the daemon is stopping");
    for (const a of this.active.values())
      if (a.job.id === jobId) return { status: "running", run: this.o.catalog.run(a.run.id)! };
    if (this.fits(entry)) return { status: "started", run: this.begin({ entry, trigger: "manual" }) };
    this.enqueue({ entry, trigger: "manual" });
    return { status: "queued", job: entry.job };
  }

  /**
   * Starts a run on demand (a restore, an instant recovery's migration, gc), recorded like any
   * other under a job of policy {@link ON_DEMAND_POLICY}, followed and cancelled the same way.
   * It starts at once, beside the limits' jobs: a person is waiting for it.
   */
  startTask(spec: TaskSpec, who: string): Run {
    if (this.stopping) throw new StrataError(ErrorCode.ABORTED, "the daemon is stopping");
    const job = this.o.catalog.ensureJob({
      policy: ON_DEMAND_POLICY,
      vm: spec.vm,
      kind: spec.kind,
      repository: spec.repository,
      schedule: null,
    });
    return this.launch(
      { job, key: `${spec.kind}${spec.vm === "" ? "" : `/${spec.vm}`}@${spec.repository}`, work: spec.work },
      { trigger: "manual" },
      `started by ${who}`,
    );
  }

  /** Cancels a running run; false when it is not running in this daemon. */
  cancel(runId: number, why: string): boolean {
    const a = this.active.get(runId);
    if (!a) return false;
    this.runLog(a, "warn", `cancelled: ${why}`);
    a.controller.abort(new StrataError(ErrorCode.ABORTED, `cancelled: ${why}`));
    return true;
  }

  /**
   * Follows a running run: `listener` gets its events until `end`. Returns the progress so far
   * and an unsubscribe function, or undefined when the run is not running here.
   */
  subscribe(
    runId: number,
    listener: (e: RunEvent) => void,
  ): { progress: { done: number; total: number }; unsubscribe: () => void } | undefined {
    const a = this.active.get(runId);
    if (!a) return undefined;
    a.events.on("event", listener);
    return { progress: { ...a.progress }, unsubscribe: () => a.events.off("event", listener) };
  }

  /** The runs going on now. */
  running(): Run[] {
    return [...this.active.values()].map((a) => this.o.catalog.run(a.run.id) ?? a.run);
  }

  /** Jobs waiting for a slot. */
  queued(): Job[] {
    return this.pending.map((p) => p.entry.job);
  }

  /** Resolves once nothing runs and nothing is queued. */
  idle(): Promise<void> {
    return new Promise((resolve) => {
      this.idleWaiters.push(resolve);
      this.checkIdle();
    });
  }

  private checkIdle(): void {
    if (this.active.size > 0 || this.pending.length > 0) return;
    for (const w of this.idleWaiters.splice(0)) w();
  }

  /** Stops: no new runs; running ones are cancelled, recorded, and waited for. */
  async stop(why = "the daemon is stopping"): Promise<void> {
    this.stopping = true;
    clearTimeout(this.timer);
    clearInterval(this.resyncTimer);
    clearInterval(this.rpoTimer);
    this.pending = [];
    const runs = [...this.active.values()];
    for (const a of runs) {
      this.runLog(a, "warn", `cancelled: ${why}`);
      a.controller.abort(new StrataError(ErrorCode.ABORTED, `cancelled: ${why}`));
    }
    await Promise.all([...runs.map((a) => a.done), this.o.cdp?.stop()]);
  }

  private runLog(a: Active, level: LogLevel, message: string): void {
    try {
      this.o.catalog.log(a.run.id, level, message);
    } catch (err) {
      this.log("error", `run ${a.run.id}: cannot write its log: ${describeError(err)}`);
    }
    a.events.emit("event", { type: "log", time: this.clock.now(), level, message } satisfies RunEvent);
    this.log(level, `${a.key} run ${a.run.id}: ${message}`);
  }

  private begin(p: Pending): Run {
    return this.launch(
      { entry: p.entry, job: p.entry.job, key: p.entry.key },
      p,
      `started (${p.trigger}${p.rerunOf === undefined ? "" : ` of run ${p.rerunOf}`})`,
    );
  }

  private launch(
    what: { entry?: Entry; job: Job; key: string; work?: TaskWork },
    p: { trigger: RunTrigger; scheduledFor?: number; rerunOf?: number },
    first: string,
  ): Run {
    const run = this.o.catalog.startRun(what.job.id, {
      trigger: p.trigger,
      ...(p.scheduledFor === undefined ? {} : { scheduledFor: p.scheduledFor }),
      ...(p.rerunOf === undefined ? {} : { rerunOf: p.rerunOf }),
    });
    const events = new EventEmitter();
    events.setMaxListeners(0);
    const a: Active = {
      run,
      entry: what.entry,
      job: what.job,
      key: what.key,
      ...(what.work ? { work: what.work } : {}),
      controller: new AbortController(),
      events,
      progress: { done: 0, total: 0 },
      done: Promise.resolve(),
    };
    this.active.set(run.id, a);
    this.runLog(a, "info", first);
    a.done = this.execute(a)
      .catch((err) => this.log("error", `run ${run.id}: ${describeError(err)}`))
      .finally(() => {
        this.active.delete(run.id);
        this.pump();
      });
    return run;
  }

  private progressSink(a: Active): ProgressSink {
    const interval = this.o.progressIntervalMs ?? 1000;
    let stored = 0;
    return {
      emit: (e) => {
        if (e.type === "log") {
          this.runLog(a, e.level, e.message);
          return;
        }
        if (e.type === "start") a.progress = { done: 0, total: e.total };
        else if (e.type === "progress") a.progress = { done: e.done, total: e.total };
        else return;
        const now = this.clock.now();
        if (now - stored >= interval || a.progress.done >= a.progress.total) {
          stored = now;
          this.o.catalog.progress(a.run.id, a.progress.done, a.progress.total);
        }
        a.events.emit("event", {
          type: "progress",
          ...a.progress,
          ...(e.type === "progress" && e.bytesNew !== undefined ? { bytesNew: e.bytesNew } : {}),
        } satisfies RunEvent);
      },
    };
  }

  /** What a configured job's run does: the runner, with the job's policy and repository. */
  private runJob(a: Active, entry: Entry): Promise<RunOutput> {
    const repository = this.o.config.repositories.get(entry.job.repository);
    if (!repository)
      throw new StrataError(
        ErrorCode.USAGE,
        `repository ${entry.job.repository} is not in the configuration`,
      );
    const vm = this.vms.find((v) => v.name === entry.job.vm);
    return this.o.runner.run({
      job: entry.job,
      runId: a.run.id,
      completedBefore: this.o.catalog.completedRunsBefore(entry.job.id, a.run.id),
      policy: entry.policy,
      repository,
      sources: vm?.sources ?? [],
      limits: entry.policy.limits,
      signal: a.controller.signal,
      progress: this.progressSink(a),
      log: (level, message) => this.runLog(a, level, message),
    });
  }

  private async execute(a: Active): Promise<void> {
    const { entry } = a;
    let end: Run;
    try {
      const out = a.work
        ? await a.work({
            runId: a.run.id,
            signal: a.controller.signal,
            progress: this.progressSink(a),
            log: (level, message) => this.runLog(a, level, message),
          })
        : await this.runJob(a, entry!);
      this.o.catalog.progress(a.run.id, a.progress.done, a.progress.total);
      end = this.o.catalog.endRun(a.run.id, {
        outcome: out.outcome ?? "success",
        ...(out.bytesRead === undefined ? {} : { bytesRead: out.bytesRead }),
        ...(out.bytesNew === undefined ? {} : { bytesNew: out.bytesNew }),
        ...(out.bytesStored === undefined ? {} : { bytesStored: out.bytesStored }),
        ...(out.restorePoint === undefined ? {} : { restorePoint: out.restorePoint }),
      });
      this.log("info", `${a.key} run ${end.id}: ${end.outcome} in ${end.durationMs} ms`);
    } catch (err) {
      const cancelled = a.controller.signal.aborted;
      const code = err instanceof StrataError ? err.code : cancelled ? ErrorCode.ABORTED : ErrorCode.INTERNAL;
      const message = cancelled ? describeError(a.controller.signal.reason) : describeError(err);
      this.runLog(a, "error", message);
      end = this.o.catalog.endRun(a.run.id, {
        outcome: cancelled ? "cancelled" : "failed",
        errorCode: cancelled ? ErrorCode.ABORTED : code,
        error: message,
      });
    }
    a.events.emit("event", { type: "end", run: end } satisfies RunEvent);
    try {
      this.noticeRun(a, end);
      if (entry?.job.kind === "backup" && end.outcome !== "failed") this.checkRpo();
    } catch (err) {
      this.log("error", `run ${end.id}: notifying: ${describeError(err)}`);
    }
    if (
      entry &&
      end.outcome === "success" &&
      entry.job.kind === "backup" &&
      entry.policy.retention &&
      !this.stopping
    ) {
      const retention = this.byKey.get(jobKey({ ...entry.spec, kind: "retention" }));
      if (retention) this.enqueue({ entry: retention, trigger: a.run.trigger }, true);
    }
  }
}

/**
 * Sets the nice value of every thread of this process (Linux applies nice per thread; threads
 * started later inherit their creator's), so that the daemon's hashing and compression workers
 * yield the CPU to the VMs. Returns how many threads were set and the first refusal (lowering
 * nice needs CAP_SYS_NICE), if any.
 */
export function reniceProcess(nice: number): { set: number; refused?: string } {
  let tids: number[];
  try {
    tids = readdirSync("/proc/self/task").map(Number);
  } catch {
    tids = [process.pid];
  }
  let set = 0;
  let refused: string | undefined;
  for (const tid of tids) {
    try {
      setPriority(tid, nice);
      set++;
    } catch (err) {
      // ESRCH: a thread that ended meanwhile; anything else is worth saying.
      if ((err as { info?: { code?: string } }).info?.code !== "ESRCH") refused ??= describeError(err);
    }
  }
  return refused === undefined ? { set } : { set, refused };
}
