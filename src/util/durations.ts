/** Durations: parsing user input ("30m", "2d") and printing short human figures. */
import { ErrorCode, StrataError } from "./errors.js";

const UNIT_MS: Record<string, number> = { ms: 1, s: 1000, m: 60_000, h: 3_600_000, d: 86_400_000 };

/** Parses "0s", "30m", "1h", "2d", "500ms" (a bare number is seconds) into milliseconds. */
export function parseDuration(text: string): number {
  const m = /^(\d+)(ms|s|m|h|d)?$/.exec(text.trim());
  if (!m) throw new StrataError(ErrorCode.USAGE, `not a duration: "${text}" (examples: 0s, 30m, 1h, 2d)`);
  return Number(m[1]) * UNIT_MS[m[2] ?? "s"]!;
}

/** "2d", "1h30m", "15m", "45s", "250ms": the largest units, at most two of them. */
export function formatDuration(ms: number): string {
  if (ms < 1000) return `${Math.round(ms)}ms`;
  const parts: string[] = [];
  let rest = Math.round(ms / 1000);
  for (const [unit, secs] of [
    ["d", 86_400],
    ["h", 3_600],
    ["m", 60],
    ["s", 1],
  ] as const) {
    if (rest >= secs) {
      parts.push(`${Math.floor(rest / secs)}${unit}`);
      rest %= secs;
    }
  }
  return parts.slice(0, 2).join("");
}
