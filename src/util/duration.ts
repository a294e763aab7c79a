/** Durations and instants as people write them: "250ms", "90s", "5m", "24h", "7d"; ISO times. */
import { ErrorCode, StrataError } from "./errors.js";

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Milliseconds of "250ms", "90s", "1.5m", "24h", "7d" (a bare number is seconds). */
export function parseDuration(text: string, what = "duration"): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$/.exec(text);
  if (!m)
    throw new StrataError(
      ErrorCode.USAGE,
      `${what}: not a duration: "${text}" (examples: 250ms, 90s, 5m, 24h, 7d)`,
    );
  return Math.round(Number(m[1]) * UNIT_MS[m[2] ?? "s"]!);
}

/**
 * The instant `text` names, in ms since the Unix epoch: an ISO-8601 time with a zone
 * ("2026-11-29T08:01:23.250Z", "2026-11-29T09:01:23+01:00") or a time before `now` ("-90s",
 * "-5m", "-1.5h").
 */
export function parseInstant(text: string, now: number): number {
  if (text.startsWith("-")) return now - parseDuration(text.slice(1), "instant");
  if (!/^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d(\.\d{1,9})?)?(Z|[+-]\d\d:\d\d)$/.test(text))
    throw new StrataError(
      ErrorCode.USAGE,
      `not an instant: "${text}" (an ISO-8601 time with its zone, e.g. 2026-11-29T08:01:23.250Z, or -90s for 90 seconds ago)`,
    );
  const ms = Date.parse(text);
  if (!Number.isFinite(ms)) throw new StrataError(ErrorCode.USAGE, `not a valid time: "${text}"`);
  return ms;
}

/** "1.2 s", "250 ms", "3 min", "2.5 h" for people. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  if (ms < 120_000) return `${(ms / 1000).toFixed(1)} s`;
  if (ms < 7_200_000) return `${(ms / 60_000).toFixed(1)} min`;
  return `${(ms / 3_600_000).toFixed(1)} h`;
}
