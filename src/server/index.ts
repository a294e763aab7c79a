/**
 * The server layer: the daemon, one per host, that protects VMs by policy.
 *
 * Built so far are the pieces it is made of, each usable and tested on its own:
 * - config.ts: the configuration file, checked with every problem on its line;
 * - jobs.ts: the jobs a configuration makes for the VMs found, synced into the catalog;
 * - schedule.ts: when a job is due (cron, every N, a per-job jitter);
 * - scheduler.ts: which jobs are due on an injected clock, catch-up after downtime, and runs a
 *   dead daemon left, rerun.
 *
 * The service loop (sleep until the scheduler's next wake-up, start due jobs within the
 * configured limits, record runs in the catalog), the REST API and its token checks
 * (src/catalog/tokens.ts, roles.ts) come next. Platforms are reached only through the adapter
 * interface; the CLI's composition root builds the adapter registry and hands it down.
 */
export * from "./config.js";
export * from "./jobs.js";
export * from "./schedule.js";
export * from "./scheduler.js";
