/**
 * Recovery point objectives: how long a VM may go without a new restore point under a policy,
 * and whether its newest restore point is within that now. The API's protection state, the
 * metrics and the RPO notifications all ask here.
 */
import type { Catalog, RestorePointRow } from "../catalog/catalog.js";
import type { DaemonConfig, Policy } from "./config.js";
import { nextSlot } from "./schedule.js";

/** How long a VM may go without a new restore point under `p`: one interval plus the jitter. */
export function rpoOf(p: Policy, now: number): number | undefined {
  const s = p.schedule;
  if (s.kind === "every") return s.everyMs + p.jitterMs;
  const a = nextSlot(s, now);
  const b = a === undefined ? undefined : nextSlot(s, a);
  return a === undefined || b === undefined ? undefined : b - a + p.jitterMs;
}

export interface RpoState {
  rpoMs: number | undefined;
  last: RestorePointRow | undefined;
  ageMs: number | null;
  /** A restore point made within one interval (plus jitter) and the time it took to make. */
  met: boolean;
}

/** The RPO state of `vm` under policy `p` at `now`, from the catalog's restore points. */
export function rpoState(
  catalog: Catalog,
  config: DaemonConfig,
  p: Policy,
  vm: string,
  now: number,
): RpoState {
  const r = config.repositories.get(p.repository);
  const id = r && catalog.repositoryAt(r.path);
  const points = id === undefined ? [] : catalog.restorePoints({ repository: id, vm });
  return rpoStateOf(rpoOf(p, now), points.at(-1), now);
}

/** The RPO state at `now` given the RPO and the newest restore point (read once for many VMs). */
export function rpoStateOf(
  rpoMs: number | undefined,
  last: RestorePointRow | undefined,
  now: number,
): RpoState {
  const ageMs = last ? now - last.timeMs : null;
  const met = last !== undefined && rpoMs !== undefined && ageMs! <= rpoMs + last.durationMs;
  return { rpoMs, last, ageMs, met };
}
