/**
 * What a job does, apart from when and how many: the {@link JobRunner} the daemon calls for each
 * run. The daemon decides when a job runs, holds the limits, records the run, its progress and
 * its log; the runner does the work and says what it made. Tests give the daemon their own
 * runner, or this one over a real repository with `file:` sources.
 *
 * {@link createJobRunner} is the runner of the real daemon:
 * - backup: resolves the VM's sources through the adapter registry (the CLI's composition root
 *   builds it), backs it up (src/engine/vm-backup.ts) and adds the restore point to the catalog
 *   with the run that made it;
 * - retention: the policy's keep rules on the VM's restore points (strata forget), then the
 *   catalog's rows of that repository made what its manifests say;
 * - verify: the repository's metadata (and every chunk with read-data);
 * - boot-verify: boots the VM's newest restore point with no network and asks its guest agent
 *   (src/engine/instant/boot-verify.ts); the outcome and the time to answer go to the restore
 *   point's catalog row, and a failed boot fails the run (BOOT_FAILED, or TIMEOUT).
 */
import type { Catalog, Job } from "../catalog/catalog.js";
import { rebuildRestorePoints, restorePointRow } from "../catalog/rebuild.js";
import type { LogLevel } from "../catalog/schema.js";
import { verifyBoot } from "../engine/instant/boot-verify.js";
import { backupVm } from "../engine/vm-backup.js";
import { readVmConfig } from "../engine/vm-restore.js";
import type { AdapterRegistry } from "../hypervisor/registry.js";
import { manifestTotals } from "../repo/manifest.js";
import { openStoreAt } from "../repo/open-store.js";
import { forget } from "../repo/prune.js";
import { type Immutability, Repository } from "../repo/repository.js";
import { verifyRepository } from "../repo/verify.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { ProgressSink } from "../util/progress.js";
import { type Limiter, MiB, TokenBucket } from "../util/throttle.js";
import type { JobLimits, Policy, RepositoryConfig } from "./config.js";
import { readPassword } from "./repositories.js";

/** Everything a runner gets for one run. */
export interface RunContext {
  job: Job;
  runId: number;
  /** Runs of this job that ended before this one (cancelled and interrupted ones not counted). */
  completedBefore: number;
  policy: Policy;
  repository: RepositoryConfig;
  /** The VM's source URIs (backup and retention jobs of a VM found now); [] for verify. */
  sources: readonly string[];
  /** The policy's limits over the host's. */
  limits: JobLimits;
  /** Fires when the run is cancelled (API, SIGTERM); the runner stops and cleans up. */
  signal: AbortSignal;
  progress: ProgressSink;
  log: (level: LogLevel, message: string) => void;
}

/** What a run made. A runner that fails throws (a StrataError with its code, ideally). */
export interface RunOutput {
  outcome?: "success" | "warning";
  bytesRead?: number;
  bytesNew?: number;
  bytesStored?: number;
  /** "vm/time" of the restore point a backup made. */
  restorePoint?: string;
}

export interface JobRunner {
  run(ctx: RunContext): Promise<RunOutput>;
}

export interface RunnerOptions {
  registry: AdapterRegistry;
  catalog: Catalog;
  /** Where adapters keep their cleanup records. */
  stateDir: string;
  /** MiB/s read by all jobs together (the host's bandwidth limit), shared by every run. */
  hostBandwidth?: number;
  /**
   * The serving process of boot verification: `strata serve REF --repo ...` (argv, binary
   * first, without --socket); the CLI's composition root knows the binary.
   */
  serveCommand?: (ref: string, repository: RepositoryConfig) => string[];
}

/**
 * Opens a configured repository (a directory or an S3 bucket) with the job's worker threads, at
 * the job's nice; restore points written through it are kept `immutable` so when that is given.
 */
export async function openRepository(
  r: RepositoryConfig,
  threads?: number,
  workerNice?: number,
  immutable?: Immutability,
): Promise<Repository> {
  const password = r.passwordFile === undefined ? undefined : readPassword(r);
  const store = await openStoreAt(r.path, r.s3 ?? {}).catch((err: unknown) => {
    throw err instanceof StrataError
      ? new StrataError(err.code, `repository ${r.name}: ${err.message}`, { cause: err })
      : err;
  });
  return Repository.open(store, {
    ...(password === undefined ? {} : { password }),
    ...(threads === undefined ? {} : { threads }),
    ...(workerNice === undefined ? {} : { workerNice }),
    ...(immutable === undefined ? {} : { immutable }),
  });
}

/** The daemon's runner: backups through the adapters, retention and verification on the repository. */
export function createJobRunner(options: RunnerOptions): JobRunner {
  const host = options.hostBandwidth === undefined ? undefined : new TokenBucket(options.hostBandwidth * MiB);
  return {
    async run(ctx) {
      const repo = await openRepository(
        ctx.repository,
        ctx.limits.workerThreads,
        ctx.limits.nice,
        // Only backups write restore points; the others open the repository as it is configured.
        ctx.job.kind === "backup" ? ctx.policy.immutable : undefined,
      );
      try {
        if (ctx.job.kind === "backup") return await runBackup(repo, ctx, options, host);
        if (ctx.job.kind === "retention") return await runRetention(repo, ctx, options.catalog);
        if (ctx.job.kind === "verify") return await runVerify(repo, ctx);
        if (ctx.job.kind === "boot-verify") return await runBootVerify(repo, ctx, options);
        throw new StrataError(ErrorCode.USAGE, `jobs of kind ${ctx.job.kind} are not run by this build`);
      } finally {
        await repo.close();
      }
    },
  };
}

async function runBackup(
  repo: Repository,
  ctx: RunContext,
  options: RunnerOptions,
  readLimit: Limiter | undefined,
): Promise<RunOutput> {
  if (ctx.sources.length === 0)
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `VM ${ctx.job.vm} is not found on this host now (no adapter lists it and the configuration names no sources for it)`,
    );
  const handle = await options.registry.resolveAll(ctx.sources);
  const mode = ctx.policy.mode ?? handle.defaults?.mode ?? "snapshot";
  const quiesce = ctx.policy.quiesce ?? handle.defaults?.quiesce ?? "try";
  ctx.log(
    "info",
    `backup of ${ctx.job.vm} (${ctx.sources.join(" ")}) to ${ctx.repository.name}, ${mode}` +
      (ctx.limits.jobBandwidth === undefined ? "" : `, reads at most ${ctx.limits.jobBandwidth} MiB/s`) +
      (options.hostBandwidth === undefined ? "" : `, ${options.hostBandwidth} MiB/s for all jobs`) +
      (ctx.policy.immutable === undefined
        ? ""
        : `, immutable (${ctx.policy.immutable.mode}) for ${ctx.policy.immutable.seconds} s`),
  );
  const r = await backupVm(repo, handle, {
    vm: ctx.job.vm,
    mode,
    quiesce,
    stateDir: options.stateDir,
    progress: ctx.progress,
    signal: ctx.signal,
    log: (m) => ctx.log("warn", m),
    ...(readLimit === undefined ? {} : { readLimit }),
    ...(ctx.limits.jobBandwidth === undefined ? {} : { jobMiBs: ctx.limits.jobBandwidth }),
  });
  const t = manifestTotals(r.manifest);
  options.catalog.putRestorePoint(
    { id: repo.config.id, location: repo.store.location },
    { ...restorePointRow(r.manifest), runId: ctx.runId },
  );
  ctx.log(
    "info",
    `restore point ${r.id} created (${r.manifest.consistency})` +
      (r.manifest.immutable
        ? `, immutable (${r.manifest.immutable.mode}) until ${r.manifest.immutable.until}`
        : ""),
  );
  return {
    bytesRead: t.bytesRead,
    bytesNew: t.bytesNew,
    bytesStored: t.bytesStored,
    restorePoint: r.id,
  };
}

async function runRetention(repo: Repository, ctx: RunContext, catalog: Catalog): Promise<RunOutput> {
  const keep = ctx.policy.retention;
  if (!keep) throw new StrataError(ErrorCode.USAGE, `policy ${ctx.policy.name} has no retention`);
  const plan = await forget(repo, keep, { vm: ctx.job.vm });
  for (const id of plan.remove) ctx.log("info", `removed ${id}`);
  ctx.log("info", `retention kept ${plan.keep.length}, removed ${plan.remove.length} restore point(s)`);
  const report = await rebuildRestorePoints(catalog, repo);
  for (const d of report.damaged) ctx.log("warn", `damaged restore point ${d.id}: ${d.error}`);
  return report.damaged.length > 0 ? { outcome: "warning" } : {};
}

async function runBootVerify(repo: Repository, ctx: RunContext, options: RunnerOptions): Promise<RunOutput> {
  const boot = ctx.policy.verify?.boot;
  if (!boot) throw new StrataError(ErrorCode.USAGE, `policy ${ctx.policy.name} has no boot verification`);
  if (!options.serveCommand)
    throw new StrataError(ErrorCode.INTERNAL, "this daemon was built without a way to start strata serve");
  const snap = await repo.findSnapshot(`${ctx.job.vm}/latest`);
  const id = `${snap.vm}/${snap.time}`;
  const stored = await readVmConfig(repo, snap, options.registry);
  if (!stored)
    throw new StrataError(
      ErrorCode.USAGE,
      `${id} holds no VM configuration (a file: backup): there is no VM to boot`,
    );
  const result = await verifyBoot(snap, stored, options.registry, {
    repo: ctx.repository.path,
    ...(ctx.repository.passwordFile === undefined ? {} : { passwordFile: ctx.repository.passwordFile }),
    serveCommand: options.serveCommand(id, ctx.repository),
    stateDir: options.stateDir,
    timeoutMs: boot.timeoutMs,
    ...(boot.command === undefined ? {} : { command: boot.command }),
    signal: ctx.signal,
    log: (m) => ctx.log("info", m),
  });
  options.catalog.recordBootVerification(
    { id: repo.config.id, location: repo.store.location },
    restorePointRow(snap.manifest),
    {
      bootVerifiedAt: result.startedAt,
      bootOutcome: result.outcome,
      bootAnswerMs: result.answerMs,
      bootError: result.error,
    },
  );
  if (result.command)
    for (const [stream, text] of [
      ["stdout", result.command.stdout],
      ["stderr", result.command.stderr],
    ] as const)
      if (text.trim()) ctx.log("info", `check command ${stream}: ${text.trim().slice(-1000)}`);
  if (result.outcome === "failed")
    throw new StrataError(
      result.errorCode === ErrorCode.TIMEOUT ? ErrorCode.TIMEOUT : ErrorCode.BOOT_FAILED,
      `boot verification of ${id} failed: ${result.error}`,
    );
  ctx.log("info", `${id} boots: its guest agent answered after ${result.answerMs} ms`);
  return { restorePoint: id };
}

async function runVerify(repo: Repository, ctx: RunContext): Promise<RunOutput> {
  const lock = await repo.lock("read", "verify");
  try {
    // A rotating sample: the k-th completed run reads part k mod T + 1, so T runs read every chunk.
    const parts = ctx.policy.verify?.readDataParts;
    const subset = parts === undefined ? undefined : { part: (ctx.completedBefore % parts) + 1, of: parts };
    if (subset) ctx.log("info", `reading part ${subset.part}/${subset.of} of the chunks (a rotating sample)`);
    const report = await verifyRepository(repo, {
      readData: ctx.policy.verify?.readData === true,
      ...(subset ? { readDataSubset: subset } : {}),
      progress: ctx.progress,
      signal: ctx.signal,
    });
    for (const d of report.damagedSnapshots) ctx.log("error", `DAMAGED ${d.id}: ${d.problems.join("; ")}`);
    for (const c of report.damagedChunks) ctx.log("error", `DAMAGED chunk ${c.digest}: ${c.problem}`);
    ctx.log(
      "info",
      `${report.snapshotsChecked} restore points, ${report.chunksChecked} chunks checked, ${report.chunksRead} of them read`,
    );
    if (!report.ok)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `verify found ${report.damagedSnapshots.length} damaged restore point(s) and ${report.damagedChunks.length} damaged chunk(s)`,
      );
    return {};
  } finally {
    await lock.release();
  }
}
