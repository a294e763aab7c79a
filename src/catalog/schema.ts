/**
 * The catalog's schema, as a list of migrations. Migration N (1-based) takes a catalog from
 * schema version N-1 to N; the version is SQLite's `user_version`, and `application_id` marks
 * the file as a Strata catalog so that another program's database is never migrated by mistake.
 * Append migrations, never edit one that has shipped: a catalog in the field has run it.
 *
 * Times are integers, milliseconds since the Unix epoch (UTC), except a restore point's `time`,
 * which is the repository's own text ("2026-11-20T02:00:00Z", its folder name) beside `time_ms`.
 */

/** "STRA" in ASCII: `PRAGMA application_id` of every Strata catalog. */
export const APPLICATION_ID = 0x53545241;

/**
 * What each job does; the daemon's policies make them, except `restore` and `instant` (a
 * restore, an instant recovery's migration), whose runs the API starts on demand.
 */
export const JOB_KINDS = [
  "backup",
  "verify",
  "retention",
  "gc",
  "boot-verify",
  "restore",
  "instant",
] as const;
/** The kinds schema version 1 allowed. */
const JOB_KINDS_V1 = ["backup", "verify", "retention", "gc", "boot-verify"] as const;
export type JobKind = (typeof JOB_KINDS)[number];

/** Why a run started. */
export const RUN_TRIGGERS = ["schedule", "missed", "manual", "rerun"] as const;
export type RunTrigger = (typeof RUN_TRIGGERS)[number];

/** How a run ended; `running` until it does. */
export const RUN_OUTCOMES = ["running", "success", "warning", "failed", "cancelled", "interrupted"] as const;
export type RunOutcome = (typeof RUN_OUTCOMES)[number];

export const LOG_LEVELS = ["debug", "info", "warn", "error"] as const;
export type LogLevel = (typeof LOG_LEVELS)[number];

/** The roles an API token can have (what each may do: src/catalog/roles.ts). */
export const ROLES = ["admin", "operator", "backup", "read"] as const;
export type Role = (typeof ROLES)[number];

const oneOf = (values: readonly string[]) => values.map((v) => `'${v}'`).join(", ");

export const MIGRATIONS: readonly string[] = [
  // 1: jobs, runs, run logs, restore points, API tokens.
  `
  CREATE TABLE jobs (
    id INTEGER PRIMARY KEY,
    policy TEXT NOT NULL,
    vm TEXT NOT NULL DEFAULT '',          -- '' for a job on the whole repository (gc)
    kind TEXT NOT NULL CHECK (kind IN (${oneOf(JOB_KINDS_V1)})),
    repository TEXT NOT NULL,             -- the repository's name in the configuration
    schedule TEXT,                        -- as the configuration writes it; NULL: on demand only
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    removed_at INTEGER,                   -- gone from the configuration; its runs stay
    UNIQUE (policy, vm, kind)
  ) STRICT;

  CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    job_id INTEGER NOT NULL REFERENCES jobs(id) ON DELETE CASCADE,
    trigger TEXT NOT NULL CHECK (trigger IN (${oneOf(RUN_TRIGGERS)})),
    scheduled_for INTEGER,                -- the due time this run answers, NULL for manual runs
    rerun_of INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    started_at INTEGER NOT NULL,
    ended_at INTEGER,                     -- NULL while running (or when its process died)
    outcome TEXT NOT NULL DEFAULT 'running' CHECK (outcome IN (${oneOf(RUN_OUTCOMES)})),
    duration_ms INTEGER,
    bytes_read INTEGER NOT NULL DEFAULT 0,
    bytes_new INTEGER NOT NULL DEFAULT 0,
    bytes_stored INTEGER NOT NULL DEFAULT 0,
    progress_done INTEGER NOT NULL DEFAULT 0,
    progress_total INTEGER NOT NULL DEFAULT 0,
    restore_point TEXT,                   -- "vm/time" of the restore point a backup made
    error_code TEXT,
    error TEXT,
    CHECK ((ended_at IS NULL) = (outcome = 'running'))
  ) STRICT;
  CREATE INDEX runs_by_job ON runs (job_id, started_at);
  CREATE INDEX runs_open ON runs (started_at) WHERE ended_at IS NULL;

  CREATE TABLE run_logs (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs(id) ON DELETE CASCADE,
    time INTEGER NOT NULL,
    level TEXT NOT NULL CHECK (level IN (${oneOf(LOG_LEVELS)})),
    message TEXT NOT NULL
  ) STRICT;
  CREATE INDEX run_logs_by_run ON run_logs (run_id, id);

  CREATE TABLE repositories (
    id TEXT PRIMARY KEY,                  -- the repository's own id (its config)
    location TEXT NOT NULL,
    rebuilt_at INTEGER
  ) STRICT;

  -- A copy of what the repository's manifests say, for listing without opening the repository.
  CREATE TABLE restore_points (
    repository TEXT NOT NULL REFERENCES repositories(id) ON DELETE CASCADE,
    vm TEXT NOT NULL,
    time TEXT NOT NULL,
    time_ms INTEGER NOT NULL,
    mode TEXT NOT NULL,
    consistency TEXT NOT NULL,
    parent TEXT,
    disks INTEGER NOT NULL,
    size INTEGER NOT NULL,
    bytes_read INTEGER NOT NULL,
    bytes_new INTEGER NOT NULL,
    bytes_stored INTEGER NOT NULL,
    duration_ms INTEGER NOT NULL,
    host TEXT NOT NULL,
    run_id INTEGER REFERENCES runs(id) ON DELETE SET NULL,
    PRIMARY KEY (repository, vm, time)
  ) STRICT;
  CREATE INDEX restore_points_by_vm ON restore_points (vm, time_ms);

  CREATE TABLE api_tokens (
    id TEXT PRIMARY KEY,                  -- public part of the token, shown in lists and logs
    name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN (${oneOf(ROLES)})),
    secret_sha256 BLOB NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER,
    last_used_at INTEGER,
    revoked_at INTEGER
  ) STRICT;
  `,
  // 2: jobs of kind restore and instant (runs the API starts). SQLite can't change a CHECK, so the
  // table is made anew (foreign keys are off while migrating; runs keep their job ids).
  `
  CREATE TABLE jobs_new (
    id INTEGER PRIMARY KEY,
    policy TEXT NOT NULL,
    vm TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL CHECK (kind IN (${oneOf(JOB_KINDS)})),
    repository TEXT NOT NULL,
    schedule TEXT,
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL,
    removed_at INTEGER,
    UNIQUE (policy, vm, kind)
  ) STRICT;
  INSERT INTO jobs_new SELECT id, policy, vm, kind, repository, schedule, created_at, updated_at, removed_at FROM jobs;
  DROP TABLE jobs;
  ALTER TABLE jobs_new RENAME TO jobs;
  `,
];

/** The schema version this build writes. */
export const SCHEMA_VERSION = MIGRATIONS.length;
