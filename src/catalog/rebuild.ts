/**
 * The repository is the truth about restore points: `rebuildRestorePoints` makes the catalog's
 * rows of one repository what its manifests say, after a lost or moved catalog, or a forget run
 * outside the daemon.
 */
import { type Manifest, manifestTotals } from "../repo/manifest.js";
import type { Repository } from "../repo/repository.js";
import type { StrataError } from "../util/errors.js";
import type { Catalog, RestorePointFigures } from "./catalog.js";

export interface RebuildReport {
  repository: string;
  location: string;
  restorePoints: number;
  vms: number;
  added: number;
  removed: number;
  kept: number;
  /** Restore points whose manifest could not be read: left out, named here. */
  damaged: Array<{ id: string; error: string }>;
}

/** The catalog row of a restore point, from its manifest. */
export function restorePointRow(m: Manifest): RestorePointFigures {
  const t = manifestTotals(m);
  return {
    vm: m.vm,
    time: m.time,
    timeMs: Date.parse(m.time),
    mode: m.mode,
    consistency: m.consistency,
    parent: m.parent,
    disks: m.disks.length,
    size: t.size,
    bytesRead: t.bytesRead,
    bytesNew: t.bytesNew,
    bytesStored: t.bytesStored,
    durationMs: m.durationMs,
    host: m.host,
  };
}

/** Recreates the restore-point rows of `repo` from its manifests. */
export async function rebuildRestorePoints(catalog: Catalog, repo: Repository): Promise<RebuildReport> {
  const damaged: RebuildReport["damaged"] = [];
  const snaps = await repo.snapshots(undefined, (vm: string, time: string, err: StrataError) =>
    damaged.push({ id: `${vm}/${time}`, error: err.message }),
  );
  const rows = snaps.map((s) => restorePointRow(s.manifest));
  const repository = { id: repo.config.id, location: repo.store.location };
  const counts = catalog.replaceRestorePoints(repository, rows);
  return {
    repository: repository.id,
    location: repository.location,
    restorePoints: rows.length,
    vms: new Set(rows.map((r) => r.vm)).size,
    ...counts,
    damaged,
  };
}
