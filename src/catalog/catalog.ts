/**
 * The catalog: the daemon's SQLite database of jobs, their runs (progress, bytes, outcome, logs),
 * a copy of the repositories' restore points, and API tokens.
 *
 * The repository stays the truth about restore points; the catalog is an index for lists, the
 * REST API and the scheduler, and `strata catalog rebuild` recreates its restore-point rows from
 * the manifests. Runs and tokens exist only here.
 *
 * SQLite in WAL mode: readers (the CLI, the API) never block the daemon's writer, and a writer
 * waits up to {@link BUSY_TIMEOUT_MS} for another instead of failing at once. `synchronous =
 * NORMAL` is safe in WAL mode (a power cut may lose the last transactions, never the file's
 * consistency); what a run wrote to the repository does not depend on it. All calls are
 * synchronous (better-sqlite3): each is one short statement or transaction.
 */
import { closeSync, existsSync, mkdirSync, openSync } from "node:fs";
import { createRequire } from "node:module";
import { hostname } from "node:os";
import { dirname } from "node:path";
import type BetterSqlite3 from "better-sqlite3";
import { type Clock, systemClock } from "../util/clock.js";
import { ErrorCode, errnoCode, StrataError } from "../util/errors.js";
import {
  APPLICATION_ID,
  type BootOutcome,
  type JobKind,
  type LogLevel,
  MIGRATIONS,
  type Role,
  type RunOutcome,
  type RunTrigger,
  SCHEMA_VERSION,
} from "./schema.js";

export const DEFAULT_CATALOG = "/var/lib/strata/catalog.db";

/** How long a statement waits for another connection's write lock before failing (LOCKED). */
export const BUSY_TIMEOUT_MS = 5000;

export interface Job {
  id: number;
  policy: string;
  /** '' for a job on a whole repository. */
  vm: string;
  kind: JobKind;
  repository: string;
  schedule: string | null;
  createdAt: number;
  updatedAt: number;
  removedAt: number | null;
}

export interface Run {
  id: number;
  jobId: number;
  trigger: RunTrigger;
  scheduledFor: number | null;
  rerunOf: number | null;
  host: string;
  pid: number;
  startedAt: number;
  endedAt: number | null;
  outcome: RunOutcome;
  durationMs: number | null;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  progressDone: number;
  progressTotal: number;
  restorePoint: string | null;
  errorCode: string | null;
  error: string | null;
}

export interface RunLog {
  id: number;
  runId: number;
  time: number;
  level: LogLevel;
  message: string;
}

/** A restore point as the catalog keeps it: the manifest's figures, not its disks' indexes. */
export interface RestorePointRow {
  repository: string;
  vm: string;
  time: string;
  timeMs: number;
  mode: string;
  consistency: string;
  parent: string | null;
  disks: number;
  size: number;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  durationMs: number;
  host: string;
  runId: number | null;
  /** The last boot verification (see {@link BootVerificationRow}); null when never verified. */
  bootVerifiedAt: number | null;
  bootOutcome: BootOutcome | null;
  bootAnswerMs: number | null;
  bootError: string | null;
}

/** A restore point's figures from its manifest: a row without what the catalog adds. */
export type RestorePointFigures = Omit<RestorePointRow, "repository" | "runId" | keyof BootVerificationRow>;

/** How a boot verification of a restore point went. */
export interface BootVerificationRow {
  bootVerifiedAt: number;
  bootOutcome: BootOutcome;
  /** Milliseconds from the start of the boot to the guest agent's answer; null when it never answered. */
  bootAnswerMs: number | null;
  bootError: string | null;
}

export interface TokenRow {
  id: string;
  name: string;
  role: Role;
  secretSha256: Buffer;
  createdAt: number;
  expiresAt: number | null;
  lastUsedAt: number | null;
  revokedAt: number | null;
}

export interface RunEnd {
  outcome: Exclude<RunOutcome, "running">;
  bytesRead?: number;
  bytesNew?: number;
  bytesStored?: number;
  restorePoint?: string;
  errorCode?: string;
  error?: string;
}

export interface OpenOptions {
  /** Create the file (and its folder) when missing. Default true. */
  create?: boolean;
  readonly?: boolean;
  clock?: Clock;
  /** How long a statement waits for another connection's write lock (default {@link BUSY_TIMEOUT_MS}). */
  busyTimeoutMs?: number;
}

type Db = BetterSqlite3.Database;

/** better-sqlite3, loaded on first use: most commands never open the catalog. */
function sqlite(): typeof BetterSqlite3 {
  return createRequire(import.meta.url)("better-sqlite3") as typeof BetterSqlite3;
}

/**
 * A StrataError for an SQLite or file-system failure on the catalog at `path`, naming the real
 * cause: a file that is not a database or is damaged (CATALOG_CORRUPT), busy (LOCKED), full,
 * read-only or not permitted.
 */
export function catalogError(
  path: string,
  what: string,
  err: unknown,
  busyTimeoutMs = BUSY_TIMEOUT_MS,
): StrataError {
  if (err instanceof StrataError) return err;
  const code = errnoCode(err) ?? "";
  const message = err instanceof Error ? err.message : String(err);
  const at = `catalog ${path}`;
  if (code === "SQLITE_NOTADB")
    return new StrataError(
      ErrorCode.CATALOG_CORRUPT,
      `${at} is not an SQLite database (${message}); move it aside to start a new catalog, then run "strata catalog rebuild"`,
      { cause: err },
    );
  if (code.startsWith("SQLITE_CORRUPT"))
    return new StrataError(
      ErrorCode.CATALOG_CORRUPT,
      `${at} is damaged (${message}); move it aside to start a new catalog, then run "strata catalog rebuild"`,
      { cause: err },
    );
  if (code.startsWith("SQLITE_BUSY") || code.startsWith("SQLITE_LOCKED"))
    return new StrataError(
      ErrorCode.LOCKED,
      `${at}: ${what}: another process kept the database busy for more than ${busyTimeoutMs / 1000} s`,
      { cause: err },
    );
  if (code === "SQLITE_FULL" || code === "ENOSPC")
    return new StrataError(ErrorCode.NO_SPACE, `${at}: ${what}: no space left on device`, { cause: err });
  if (code.startsWith("SQLITE_READONLY") || code === "EROFS")
    return new StrataError(ErrorCode.READ_ONLY, `${at}: ${what}: the database is read-only (${message})`, {
      cause: err,
    });
  if (
    code.startsWith("SQLITE_PERM") ||
    code.startsWith("SQLITE_AUTH") ||
    code === "EACCES" ||
    code === "EPERM"
  )
    return new StrataError(ErrorCode.PERMISSION_DENIED, `${at}: ${what}: permission denied (${message})`, {
      cause: err,
    });
  if (code.startsWith("SQLITE_CANTOPEN"))
    return new StrataError(ErrorCode.IO_ERROR, `${at}: ${what}: cannot open the file (${message})`, {
      cause: err,
    });
  return new StrataError(ErrorCode.IO_ERROR, `${at}: ${what}: ${message}`, { cause: err });
}

export class Catalog {
  private constructor(
    private readonly db: Db,
    /** The file, for messages. */
    readonly path: string,
    private readonly clock: Clock,
    private readonly busyTimeoutMs: number,
  ) {}

  /**
   * Opens the catalog at `path`, creating it (mode 0600: it holds token hashes) and migrating
   * it to this build's schema. A file that is not a Strata catalog is refused, never changed.
   */
  static open(path: string, options: OpenOptions = {}): Catalog {
    const create = options.create !== false && options.readonly !== true;
    if (!existsSync(path)) {
      if (!create)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `no catalog at ${path} (give another with --catalog or STRATA_CATALOG)`,
        );
      try {
        mkdirSync(dirname(path), { recursive: true, mode: 0o700 });
        closeSync(openSync(path, "a", 0o600));
      } catch (err) {
        throw catalogError(path, "creating it", err);
      }
    }
    let db: Db | undefined;
    try {
      const Database = sqlite();
      db = new Database(path, {
        fileMustExist: true,
        readonly: options.readonly === true,
        timeout: options.busyTimeoutMs ?? BUSY_TIMEOUT_MS,
      });
      const catalog = new Catalog(
        db,
        path,
        options.clock ?? systemClock,
        options.busyTimeoutMs ?? BUSY_TIMEOUT_MS,
      );
      catalog.prepare(options.readonly === true);
      return catalog;
    } catch (err) {
      db?.close();
      throw catalogError(path, "opening it", err, options.busyTimeoutMs);
    }
  }

  private prepare(readonly: boolean): void {
    const db = this.db;
    // The first read of the file: a file that is not a database fails here (SQLITE_NOTADB).
    const appId = db.pragma("application_id", { simple: true }) as number;
    const version = db.pragma("user_version", { simple: true }) as number;
    if (appId !== APPLICATION_ID) {
      const tables = db.prepare("SELECT count(*) AS n FROM sqlite_schema").get() as { n: number };
      if (appId !== 0 || version !== 0 || tables.n > 0)
        throw new StrataError(
          ErrorCode.CATALOG_CORRUPT,
          `${this.path} is an SQLite database of another program, not a Strata catalog ` +
            `(application_id ${appId}, ${tables.n} schema objects); give another path with --catalog`,
        );
    }
    if (version > SCHEMA_VERSION)
      throw new StrataError(
        ErrorCode.CATALOG_VERSION,
        `catalog ${this.path} has schema version ${version}, written by a newer Strata; this one knows versions up to ${SCHEMA_VERSION}`,
      );
    if (readonly) {
      db.pragma("foreign_keys = ON");
      if (version < SCHEMA_VERSION)
        throw new StrataError(
          ErrorCode.CATALOG_VERSION,
          `catalog ${this.path} has schema version ${version} and is opened read-only: open it writable once to migrate it to version ${SCHEMA_VERSION}`,
        );
      return;
    }
    db.pragma("journal_mode = WAL");
    db.pragma("synchronous = NORMAL");
    // Off while migrating: a migration that makes a table anew must not cascade into its children.
    db.pragma("foreign_keys = OFF");
    for (let v = version; v < SCHEMA_VERSION; v++) {
      // Each step in its own transaction: a crash leaves the catalog at a version, never between.
      db.transaction(() => {
        const now = db.pragma("user_version", { simple: true }) as number;
        if (now !== v) return; // another process migrated it meanwhile
        db.exec(MIGRATIONS[v]!);
        db.pragma(`application_id = ${APPLICATION_ID}`);
        db.pragma(`user_version = ${v + 1}`);
        const broken = db.pragma("foreign_key_check") as unknown[];
        if (broken.length > 0)
          throw new StrataError(
            ErrorCode.CATALOG_CORRUPT,
            `migrating ${this.path} to version ${v + 1} left ${broken.length} broken reference(s)`,
          );
      }).immediate();
    }
    db.pragma("foreign_keys = ON");
    // Migration 3 made a table anew, which leaves the schema spread over several pages: VACUUM
    // writes it compact again. Only space is at stake, so a busy catalog is left as it is.
    if (version < SCHEMA_VERSION && version < 3) {
      try {
        db.exec("VACUUM");
      } catch {
        // another process holds the catalog open; the schema stays as the migration left it
      }
    }
  }

  /** The schema version of the open catalog. */
  get schemaVersion(): number {
    return this.db.pragma("user_version", { simple: true }) as number;
  }

  close(): void {
    if (this.db.open) this.db.close();
  }

  /** Runs `fn`, turning SQLite errors into StrataErrors that name the catalog and `what`. */
  private guard<T>(what: string, fn: () => T): T {
    try {
      return fn();
    } catch (err) {
      throw catalogError(this.path, what, err, this.busyTimeoutMs);
    }
  }

  // ---- jobs ----

  /**
   * The job for (policy, vm, kind), created when new, updated when its repository or schedule
   * changed; a job that had been removed from the configuration and comes back keeps its runs.
   */
  ensureJob(spec: {
    policy: string;
    vm?: string;
    kind: JobKind;
    repository: string;
    schedule: string | null;
  }): Job {
    const now = this.clock.now();
    return this.guard("saving a job", () =>
      camel<Job>(
        this.db
          .prepare(
            `INSERT INTO jobs (policy, vm, kind, repository, schedule, created_at, updated_at)
             VALUES (@policy, @vm, @kind, @repository, @schedule, @now, @now)
             ON CONFLICT (policy, vm, kind) DO UPDATE SET
               repository = excluded.repository, schedule = excluded.schedule, removed_at = NULL,
               updated_at = CASE WHEN repository IS excluded.repository AND schedule IS excluded.schedule
                                 AND removed_at IS NULL THEN updated_at ELSE excluded.updated_at END
             RETURNING *`,
          )
          .get({ ...spec, vm: spec.vm ?? "", now }) as Record<string, unknown>,
      ),
    );
  }

  /** Marks every job not in `keep` (ids) as removed from the configuration. */
  retireJobsExcept(keep: readonly number[]): number {
    const now = this.clock.now();
    return this.guard("retiring jobs", () => {
      const stmt = this.db.prepare(
        `UPDATE jobs SET removed_at = ?, updated_at = ?
         WHERE removed_at IS NULL AND id NOT IN (SELECT value FROM json_each(?))`,
      );
      return stmt.run(now, now, JSON.stringify(keep)).changes;
    });
  }

  jobs(options: { includeRemoved?: boolean } = {}): Job[] {
    return this.guard("listing jobs", () =>
      (
        this.db
          .prepare(
            `SELECT * FROM jobs ${options.includeRemoved ? "" : "WHERE removed_at IS NULL"} ORDER BY policy, vm, kind`,
          )
          .all() as unknown[]
      ).map((r) => camel<Job>(r)),
    );
  }

  job(id: number): Job | undefined {
    const row = this.guard("reading a job", () =>
      this.db.prepare("SELECT * FROM jobs WHERE id = ?").get(id),
    ) as Record<string, unknown> | undefined;
    return row && camel<Job>(row);
  }

  // ---- runs ----

  /** Records that a run of `jobId` starts now in this process. */
  startRun(
    jobId: number,
    options: { trigger: RunTrigger; scheduledFor?: number; rerunOf?: number; pid?: number; host?: string },
  ): Run {
    const now = this.clock.now();
    return this.guard("starting a run", () =>
      camel<Run>(
        this.db
          .prepare(
            `INSERT INTO runs (job_id, trigger, scheduled_for, rerun_of, host, pid, started_at)
             VALUES (?, ?, ?, ?, ?, ?, ?) RETURNING *`,
          )
          .get(
            jobId,
            options.trigger,
            options.scheduledFor ?? null,
            options.rerunOf ?? null,
            options.host ?? hostname(),
            options.pid ?? process.pid,
            now,
          ) as Record<string, unknown>,
      ),
    );
  }

  /** Stores a running job's progress (the caller throttles: a few times a second at most). */
  progress(runId: number, done: number, total: number): void {
    this.guard("saving progress", () =>
      this.db
        .prepare("UPDATE runs SET progress_done = ?, progress_total = ? WHERE id = ? AND ended_at IS NULL")
        .run(done, total, runId),
    );
  }

  /** Records how a run ended. A run ends once: ending it again is an INTERNAL error. */
  endRun(runId: number, end: RunEnd): Run {
    const now = this.clock.now();
    const row = this.guard("ending a run", () =>
      this.db
        .prepare(
          `UPDATE runs SET ended_at = @now, duration_ms = @now - started_at, outcome = @outcome,
             bytes_read = coalesce(@bytesRead, bytes_read), bytes_new = coalesce(@bytesNew, bytes_new),
             bytes_stored = coalesce(@bytesStored, bytes_stored), restore_point = @restorePoint,
             error_code = @errorCode, error = @error
           WHERE id = @id AND ended_at IS NULL RETURNING *`,
        )
        .get({
          id: runId,
          now,
          outcome: end.outcome,
          bytesRead: end.bytesRead ?? null,
          bytesNew: end.bytesNew ?? null,
          bytesStored: end.bytesStored ?? null,
          restorePoint: end.restorePoint ?? null,
          errorCode: end.errorCode ?? null,
          error: end.error ?? null,
        }),
    ) as Record<string, unknown> | undefined;
    if (!row) throw new StrataError(ErrorCode.INTERNAL, `run ${runId} does not exist or has ended already`);
    return camel<Run>(row);
  }

  run(id: number): Run | undefined {
    const row = this.guard("reading a run", () =>
      this.db.prepare("SELECT * FROM runs WHERE id = ?").get(id),
    ) as Record<string, unknown> | undefined;
    return row && camel<Run>(row);
  }

  /** A job's runs, newest first. */
  runs(jobId: number, limit = 100): Run[] {
    return this.guard("listing runs", () =>
      (
        this.db
          .prepare("SELECT * FROM runs WHERE job_id = ? ORDER BY started_at DESC, id DESC LIMIT ?")
          .all(jobId, limit) as unknown[]
      ).map((r) => camel<Run>(r)),
    );
  }

  /** How many runs of the job before run `before` ended with an outcome of their own (not cancelled or interrupted). */
  completedRunsBefore(jobId: number, before: number): number {
    const row = this.guard("counting runs", () =>
      this.db
        .prepare(
          "SELECT COUNT(*) AS n FROM runs WHERE job_id = ? AND id < ? AND outcome IN ('success', 'warning', 'failed')",
        )
        .get(jobId, before),
    ) as { n: number };
    return row.n;
  }

  /** The job's newest run, whatever its outcome. */
  lastRun(jobId: number): Run | undefined {
    return this.runs(jobId, 1)[0];
  }

  /** The latest due time a run of the job answered (manual runs answer none), or undefined. */
  lastScheduledFor(jobId: number): number | undefined {
    const row = this.guard("reading a job's last due time", () =>
      this.db.prepare("SELECT max(scheduled_for) AS t FROM runs WHERE job_id = ?").get(jobId),
    ) as { t: number | null };
    return row.t ?? undefined;
  }

  /** How many runs each job has had, by outcome. */
  runCounts(): Array<{ jobId: number; outcome: RunOutcome; n: number }> {
    return this.guard("counting runs", () =>
      (
        this.db
          .prepare("SELECT job_id, outcome, count(*) AS n FROM runs GROUP BY job_id, outcome")
          .all() as unknown[]
      ).map((r) => camel<{ jobId: number; outcome: RunOutcome; n: number }>(r)),
    );
  }

  /** The job's newest run that succeeded. */
  lastSuccess(jobId: number): Run | undefined {
    const row = this.guard("reading a job's last success", () =>
      this.db
        .prepare(
          "SELECT * FROM runs WHERE job_id = ? AND outcome IN ('success', 'warning') ORDER BY ended_at DESC, id DESC LIMIT 1",
        )
        .get(jobId),
    ) as Record<string, unknown> | undefined;
    return row && camel<Run>(row);
  }

  /** Runs without an end: running now, or their process died. */
  openRuns(): Run[] {
    return this.guard("listing open runs", () =>
      (
        this.db.prepare("SELECT * FROM runs WHERE ended_at IS NULL ORDER BY started_at, id").all() as Record<
          string,
          unknown
        >[]
      ).map((r) => camel<Run>(r)),
    );
  }

  // ---- run logs ----

  log(runId: number, level: LogLevel, message: string): void {
    const now = this.clock.now();
    this.guard("writing a run log", () =>
      this.db
        .prepare("INSERT INTO run_logs (run_id, time, level, message) VALUES (?, ?, ?, ?)")
        .run(runId, now, level, message),
    );
  }

  /** A run's log lines in the order written; `afterId` pages on (live views). */
  logs(runId: number, afterId = 0): RunLog[] {
    return this.guard("reading a run log", () =>
      (
        this.db
          .prepare("SELECT * FROM run_logs WHERE run_id = ? AND id > ? ORDER BY id")
          .all(runId, afterId) as unknown[]
      ).map((r) => camel<RunLog>(r)),
    );
  }

  // ---- restore points ----

  /** Adds (or refreshes) one restore point, e.g. the one a backup run just made. */
  putRestorePoint(
    repository: { id: string; location: string },
    row: RestorePointFigures & { runId: number | null },
  ): void {
    this.guard("saving a restore point", () =>
      this.db.transaction(() => {
        this.upsertRepository(repository);
        this.upsertPoint({ ...row, repository: repository.id });
      })(),
    );
  }

  /**
   * Makes the catalog's restore points of `repository` exactly `rows` (what its manifests say):
   * rows no longer in the repository go, new ones come, the others are refreshed and keep the
   * run that made them. One transaction: readers see the old list or the new one.
   */
  replaceRestorePoints(
    repository: { id: string; location: string },
    rows: ReadonlyArray<RestorePointFigures>,
  ): { added: number; removed: number; kept: number } {
    return this.guard("rebuilding restore points", () =>
      this.db.transaction(() => {
        this.upsertRepository(repository, this.clock.now());
        const before = new Set(
          (
            this.db
              .prepare("SELECT vm, time FROM restore_points WHERE repository = ?")
              .all(repository.id) as Array<{
              vm: string;
              time: string;
            }>
          ).map((r) => `${r.vm}/${r.time}`),
        );
        const after = new Set(rows.map((r) => `${r.vm}/${r.time}`));
        const del = this.db.prepare(
          "DELETE FROM restore_points WHERE repository = ? AND vm = ? AND time = ?",
        );
        let removed = 0;
        for (const id of before) {
          if (after.has(id)) continue;
          const [vm, time] = id.split("/") as [string, string];
          removed += del.run(repository.id, vm, time).changes;
        }
        for (const r of rows) this.upsertPoint({ ...r, repository: repository.id, runId: null });
        const kept = [...after].filter((id) => before.has(id)).length;
        return { added: after.size - kept, removed, kept };
      })(),
    );
  }

  private upsertRepository(repository: { id: string; location: string }, rebuiltAt?: number): void {
    this.db
      .prepare(
        `INSERT INTO repositories (id, location, rebuilt_at) VALUES (?, ?, ?)
         ON CONFLICT (id) DO UPDATE SET location = excluded.location,
           rebuilt_at = coalesce(excluded.rebuilt_at, rebuilt_at)`,
      )
      .run(repository.id, repository.location, rebuiltAt ?? null);
  }

  /**
   * Records a boot verification of a restore point, adding its row (from the manifest's
   * figures) when the catalog does not have it yet.
   */
  recordBootVerification(
    repository: { id: string; location: string },
    point: RestorePointFigures,
    result: BootVerificationRow,
  ): void {
    this.guard("saving a boot verification", () =>
      this.db.transaction(() => {
        this.upsertRepository(repository);
        this.upsertPoint({ ...point, repository: repository.id, runId: null });
        this.db
          .prepare(
            `UPDATE restore_points SET boot_verified_at = @bootVerifiedAt, boot_outcome = @bootOutcome,
               boot_answer_ms = @bootAnswerMs, boot_error = @bootError
             WHERE repository = @repository AND vm = @vm AND time = @time`,
          )
          .run({ ...result, repository: repository.id, vm: point.vm, time: point.time });
      })(),
    );
  }

  /** One restore point of a repository (id), if the catalog has it. */
  restorePoint(repository: string, vm: string, time: string): RestorePointRow | undefined {
    const row = this.guard("reading a restore point", () =>
      this.db
        .prepare("SELECT * FROM restore_points WHERE repository = ? AND vm = ? AND time = ?")
        .get(repository, vm, time),
    );
    return row === undefined ? undefined : camel<RestorePointRow>(row);
  }

  private upsertPoint(r: Omit<RestorePointRow, keyof BootVerificationRow>): void {
    this.db
      .prepare(
        `INSERT INTO restore_points (repository, vm, time, time_ms, mode, consistency, parent, disks, size,
           bytes_read, bytes_new, bytes_stored, duration_ms, host, run_id)
         VALUES (@repository, @vm, @time, @timeMs, @mode, @consistency, @parent, @disks, @size,
           @bytesRead, @bytesNew, @bytesStored, @durationMs, @host, @runId)
         ON CONFLICT (repository, vm, time) DO UPDATE SET time_ms = excluded.time_ms, mode = excluded.mode,
           consistency = excluded.consistency, parent = excluded.parent, disks = excluded.disks,
           size = excluded.size, bytes_read = excluded.bytes_read, bytes_new = excluded.bytes_new,
           bytes_stored = excluded.bytes_stored, duration_ms = excluded.duration_ms, host = excluded.host,
           run_id = coalesce(excluded.run_id, run_id)`,
      )
      .run(r);
  }

  /** The id of the repository the catalog knows at `location` (its path), if any. */
  repositoryAt(location: string): string | undefined {
    const row = this.guard("reading a repository", () =>
      this.db.prepare("SELECT id FROM repositories WHERE location = ?").get(location),
    ) as { id: string } | undefined;
    return row?.id;
  }

  /** Restore points, oldest first; of one repository (id) and/or one VM when given. */
  restorePoints(filter: { repository?: string; vm?: string } = {}): RestorePointRow[] {
    return this.guard("listing restore points", () =>
      (
        this.db
          .prepare(
            `SELECT * FROM restore_points
             WHERE (@repository IS NULL OR repository = @repository) AND (@vm IS NULL OR vm = @vm)
             ORDER BY vm, time_ms`,
          )
          .all({ repository: filter.repository ?? null, vm: filter.vm ?? null }) as unknown[]
      ).map((r) => camel<RestorePointRow>(r)),
    );
  }

  /** The newest restore point of each VM in `repository` (one query, for lists of many VMs). */
  newestRestorePoints(repository: string): Map<string, RestorePointRow> {
    return this.guard("listing restore points", () => {
      const rows = this.db
        .prepare(
          `SELECT r.* FROM restore_points r
           JOIN (SELECT vm, max(time_ms) AS newest FROM restore_points WHERE repository = ? GROUP BY vm) n
             ON r.vm = n.vm AND r.time_ms = n.newest
           WHERE r.repository = ?
           ORDER BY r.vm, r.time`,
        )
        .all(repository, repository) as unknown[];
      const out = new Map<string, RestorePointRow>();
      for (const r of rows) {
        const row = camel<RestorePointRow>(r);
        out.set(row.vm, row); // same millisecond twice: the later time text wins, as in restorePoints
      }
      return out;
    });
  }

  // ---- API tokens (hashing and checking: src/catalog/tokens.ts) ----

  insertToken(row: Omit<TokenRow, "lastUsedAt" | "revokedAt">): void {
    this.guard("saving a token", () =>
      this.db
        .prepare(
          `INSERT INTO api_tokens (id, name, role, secret_sha256, created_at, expires_at)
           VALUES (@id, @name, @role, @secretSha256, @createdAt, @expiresAt)`,
        )
        .run(row),
    );
  }

  token(id: string): TokenRow | undefined {
    const row = this.guard("reading a token", () =>
      this.db.prepare("SELECT * FROM api_tokens WHERE id = ?").get(id),
    ) as Record<string, unknown> | undefined;
    return row && camel<TokenRow>(row);
  }

  tokens(): TokenRow[] {
    return this.guard("listing tokens", () =>
      (this.db.prepare("SELECT * FROM api_tokens ORDER BY created_at, id").all() as unknown[]).map((r) =>
        camel<TokenRow>(r),
      ),
    );
  }

  /** Revokes a token (by id); false when there is no such token or it was revoked already. */
  revokeToken(id: string): boolean {
    const now = this.clock.now();
    return this.guard(
      "revoking a token",
      () =>
        this.db
          .prepare("UPDATE api_tokens SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL")
          .run(now, id).changes === 1,
    );
  }

  touchToken(id: string): void {
    const now = this.clock.now();
    this.guard("saving a token's last use", () =>
      this.db.prepare("UPDATE api_tokens SET last_used_at = ? WHERE id = ?").run(now, id),
    );
  }
}

/**
 * A row with its snake_case columns under camelCase keys (`job_id` → `jobId`): the catalog's
 * interfaces name each column so, and the tables' CHECK constraints hold the value types.
 */
function camel<T>(row: unknown): T {
  return Object.fromEntries(
    Object.entries(row as Record<string, unknown>).map(([k, v]) => [
      k.replace(/_([a-z0-9])/g, (_, c: string) => c.toUpperCase()),
      v,
    ]),
  ) as T;
}
