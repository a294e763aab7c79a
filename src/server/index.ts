/**
 * The server layer: the daemon, one per host, that protects VMs by policy.
 *
 * - config.ts: the configuration file, checked with every problem on its line;
 * - jobs.ts: the jobs a configuration makes for the VMs found, synced into the catalog;
 * - schedule.ts: when a job is due (cron, every N, a per-job jitter);
 * - scheduler.ts: which jobs are due on an injected clock, catch-up after downtime, and runs a
 *   dead daemon left, rerun;
 * - service.ts: the service loop: sleeps until the scheduler's next wake-up, starts due jobs
 *   within the host's limits, records every run in the catalog, cancels on stop;
 * - runner.ts: what each job kind does (backup through an adapter, retention, verify); the
 *   daemon takes it injected, so tests run it over a real repository or replace it.
 * - api.ts: the REST API (token roles, OpenAPI document, server-sent events, metrics);
 *   api-data.ts: its routes on data (restore runs, files, downloads, instant recovery, forget,
 *   gc); listen.ts: its unix socket and HTTPS listeners, with a self-signed certificate made once.
 * - rpo.ts: the RPO rule; notify.ts: webhooks and e-mail on failure, recovery and RPO changes;
 * - sd-notify.ts: systemd readiness (READY=1, STATUS=, RELOADING=1, STOPPING=1).
 *
 * Platforms are reached only through the adapter interface; the CLI's composition root builds
 * the adapter registry and hands it down.
 */
export * from "./api.js";
export * from "./api-data.js";
export * from "./config.js";
export * from "./jobs.js";
export * from "./listen.js";
export * from "./notify.js";
export * from "./rpo.js";
export * from "./runner.js";
export * from "./schedule.js";
export * from "./scheduler.js";
export * from "./sd-notify.js";
export * from "./service.js";
