/**
 * The catalog layer: the daemon's state in one SQLite file.
 *
 * What it holds and why it is not the repository: the repository says what is protected (its
 * manifests are the truth, and `rebuildRestorePoints` copies them here); the catalog says what
 * the daemon did and will do: jobs made from the configuration's policies, each run of a job
 * (trigger, due time, start and end, outcome, bytes, progress, errors, log lines), and the API
 * tokens that may drive it. The scheduler reads a job's last run to catch up one missed
 * schedule after downtime, and the runs left without an end to find work a dead daemon
 * interrupted (src/server/scheduler.ts).
 *
 * Layering: above the engine (it may describe the engine's results), below the server and the
 * CLI, which open it. It knows nothing of HTTP or of the configuration file's format.
 */
export * from "./catalog.js";
export * from "./rebuild.js";
export * from "./roles.js";
export * from "./schema.js";
export * from "./tokens.js";
