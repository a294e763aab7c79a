/**
 * Retention (forget): which restore points a keep policy keeps, restic's rules.
 *
 * Restore points are taken newest first. keep-last N keeps the N newest. keep-hourly N keeps the
 * newest restore point of each of the N most recent hours that have one; daily, weekly (ISO
 * weeks, Monday first), monthly and yearly likewise. Periods are in the local time zone of the
 * process (set TZ to change it). A restore point kept by any rule is kept; each keeps a list of
 * the rules that kept it.
 */

export interface KeepPolicy {
  last?: number;
  hourly?: number;
  daily?: number;
  weekly?: number;
  monthly?: number;
  yearly?: number;
}

export type KeepRule = keyof KeepPolicy;

export interface RetentionDecision<T> {
  keep: Array<{ item: T; reasons: KeepRule[] }>;
  remove: T[];
}

export function isEmptyPolicy(p: KeepPolicy): boolean {
  return Object.values(p).every((v) => v === undefined || v <= 0);
}

/** ISO 8601 week of the local date of `d`, e.g. "2026-W47". */
export function isoWeek(d: Date): string {
  const t = new Date(Date.UTC(d.getFullYear(), d.getMonth(), d.getDate()));
  t.setUTCDate(t.getUTCDate() + 4 - (t.getUTCDay() || 7));
  const yearStart = Date.UTC(t.getUTCFullYear(), 0, 1);
  return `${t.getUTCFullYear()}-W${Math.ceil(((t.getTime() - yearStart) / 86_400_000 + 1) / 7)}`;
}

const BUCKETS: Record<Exclude<KeepRule, "last">, (d: Date) => string> = {
  hourly: (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}-${d.getHours()}`,
  daily: (d) => `${d.getFullYear()}-${d.getMonth()}-${d.getDate()}`,
  weekly: isoWeek,
  monthly: (d) => `${d.getFullYear()}-${d.getMonth()}`,
  yearly: (d) => `${d.getFullYear()}`,
};

/** Applies `policy` to `items` (any order); `timeOf` gives each one's time in ms. */
export function applyRetention<T>(
  items: readonly T[],
  policy: KeepPolicy,
  timeOf: (t: T) => number,
): RetentionDecision<T> {
  const sorted = [...items].sort((a, b) => timeOf(b) - timeOf(a));
  const reasons = new Map<T, KeepRule[]>();
  const add = (item: T, rule: KeepRule) => reasons.set(item, [...(reasons.get(item) ?? []), rule]);
  for (const item of sorted.slice(0, Math.max(0, policy.last ?? 0))) add(item, "last");
  for (const rule of ["hourly", "daily", "weekly", "monthly", "yearly"] as const) {
    const n = policy[rule] ?? 0;
    if (n <= 0) continue;
    const seen = new Set<string>();
    for (const item of sorted) {
      if (seen.size >= n) break;
      const b = BUCKETS[rule](new Date(timeOf(item)));
      if (seen.has(b)) continue;
      seen.add(b);
      add(item, rule);
    }
  }
  return {
    keep: sorted.filter((i) => reasons.has(i)).map((item) => ({ item, reasons: reasons.get(item)! })),
    remove: sorted.filter((i) => !reasons.has(i)),
  };
}
