/**
 * Schedules: when a job is due. Two forms, as the configuration writes them:
 *
 * - `every 15m` (s, m, h, d; at least one minute): slots aligned to the Unix epoch, so every
 *   15 minutes means :00, :15, :30, :45 whenever the daemon started, and a restart does not
 *   move them;
 * - a cron expression of five fields (`0 2 * * *`, `*\/10 8-18 * * 1-5`) or a nickname
 *   (`@daily`, `@hourly`), in the configured time zone or the host's; day of month and day of
 *   week combine as in Vixie cron (either matches). Parsed by croner.
 *
 * Jitter spreads jobs that share a schedule: each job's due times are its slots plus an offset
 * in [0, jitter) derived from the job's key by SHA-256, the same on every start and host, so a
 * job's runs stay evenly spaced and a restart does not reshuffle them.
 */
import { createHash } from "node:crypto";
import { createRequire } from "node:module";
import type { Cron as CronType } from "croner";
import { ErrorCode, StrataError } from "../util/errors.js";

export type Schedule =
  | { kind: "every"; text: string; everyMs: number }
  | { kind: "cron"; text: string; cron: CronType };

/** The shortest `every` interval. */
export const MIN_EVERY_MS = 60_000;

/**
 * The shortest `every` interval allowed now: {@link MIN_EVERY_MS}, unless the environment sets
 * STRATA_TEST_MIN_EVERY (seconds, at least 1), which only tests do, so that a daemon started as a
 * child process runs a scheduled job within seconds.
 */
export function minEveryMs(): number {
  const s = Number(process.env.STRATA_TEST_MIN_EVERY);
  return Number.isInteger(s) && s >= 1 ? Math.min(s * 1000, MIN_EVERY_MS) : MIN_EVERY_MS;
}

const EVERY_RE = /^every\s+(\d+)\s*(s|m|h|d)$/;
const UNIT_MS = { s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 } as const;

/** croner, loaded on first use: only the daemon and `daemon --check` read schedules. */
function croner(): typeof import("croner") {
  return createRequire(import.meta.url)("croner") as typeof import("croner");
}

/** True when `zone` is an IANA time zone this Node knows. */
export function isTimeZone(zone: string): boolean {
  try {
    new Intl.DateTimeFormat("en", { timeZone: zone });
    return true;
  } catch {
    return false;
  }
}

/**
 * Parses a schedule; a USAGE error says what is wrong with it. `timezone` applies to cron
 * expressions (default: the process's, TZ).
 */
export function parseSchedule(text: string, options: { timezone?: string } = {}): Schedule {
  const t = text.trim();
  const every = EVERY_RE.exec(t);
  if (every) {
    const everyMs = Number(every[1]) * UNIT_MS[every[2] as keyof typeof UNIT_MS];
    if (everyMs < minEveryMs())
      throw new StrataError(ErrorCode.USAGE, `schedule "${text}" is shorter than the shortest, every 1m`);
    return { kind: "every", text: t, everyMs };
  }
  if (/^every\b/.test(t))
    throw new StrataError(
      ErrorCode.USAGE,
      `schedule "${text}" is not of the form "every N<unit>" with unit s, m, h or d (e.g. every 15m)`,
    );
  let cron: CronType;
  try {
    cron = new (croner().Cron)(t, {
      paused: true,
      mode: "5-part",
      ...(options.timezone === undefined ? {} : { timezone: options.timezone }),
    });
  } catch (err) {
    const why = (err as Error).message.replace(/^CronPattern:\s*/, "");
    throw new StrataError(
      ErrorCode.USAGE,
      `schedule "${text}" is neither "every N<unit>" nor a cron expression of 5 fields (minute hour day month weekday): ${why}`,
    );
  }
  if (cron.nextRun(new Date(0)) === null)
    throw new StrataError(ErrorCode.USAGE, `cron expression "${text}" never matches a date`);
  return { kind: "cron", text: t, cron };
}

/** The first slot of `s` strictly after `afterMs`, or undefined when there is none. */
export function nextSlot(s: Schedule, afterMs: number): number | undefined {
  if (s.kind === "every") return (Math.floor(afterMs / s.everyMs) + 1) * s.everyMs;
  return s.cron.nextRun(new Date(afterMs))?.getTime();
}

/** The deterministic offset in [0, jitterMs) of the job with this key. */
export function jitterOffset(key: string, jitterMs: number): number {
  if (jitterMs <= 0) return 0;
  const h = createHash("sha256").update(key).digest();
  // 48 bits: uniform enough, and exact in a double.
  return Math.floor((h.readUIntBE(0, 6) / 2 ** 48) * jitterMs);
}

/**
 * A job's key: what its jitter derives from and what the scheduler calls it. The same
 * (policy, VM, kind) gives the same key, in the catalog's jobs and in `daemon --check`.
 */
export function jobKey(job: { policy: string; vm: string; kind: string }): string {
  return `${job.policy}/${job.vm}/${job.kind}`;
}

/** What the scheduler needs of a job: its key, schedule and jitter. */
export interface Timed {
  key: string;
  schedule: Schedule;
  jitterMs: number;
}

/** The job's first due time strictly after `afterMs` (its next slot plus its jitter offset). */
export function nextDue(job: Timed, afterMs: number): number | undefined {
  const offset = jitterOffset(job.key, job.jitterMs);
  const slot = nextSlot(job.schedule, afterMs - offset);
  return slot === undefined ? undefined : slot + offset;
}
