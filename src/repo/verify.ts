/**
 * verify: checks that every restore point can be restored.
 *
 * Metadata (always): every manifest's seal, every index's header and checksum against its
 * manifest, every blob and referenced chunk present. With readData: every referenced chunk and
 * blob is read and fully decoded (GCM tag, zstd, length, digest). The report names each damaged
 * restore point and each damaged chunk with the restore points that need it.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { keys } from "./format.js";
import type { Repository, SnapshotRef } from "./repository.js";

export interface VerifyReport {
  snapshotsChecked: number;
  chunksChecked: number;
  /** Restore points that can't be restored whole, with every reason found. */
  damagedSnapshots: Array<{ id: string; problems: string[] }>;
  /** Damaged or missing chunks, with the restore points that reference them. */
  damagedChunks: Array<{ digest: string; problem: string; usedBy: string[] }>;
  ok: boolean;
}

export async function verifyRepository(
  repo: Repository,
  options: { readData?: boolean; progress?: ProgressSink; signal?: AbortSignal } = {},
): Promise<VerifyReport> {
  const progress = options.progress ?? noProgress;
  const problems = new Map<string, string[]>();
  const addProblem = (id: string, p: string) => problems.set(id, [...(problems.get(id) ?? []), p]);
  const snaps = await repo.snapshots(undefined, (vm, time, err) => addProblem(`${vm}/${time}`, err.message));
  const usedBy = new Map<string, Set<string>>();
  for (const snap of snaps) {
    const id = `${snap.vm}/${snap.time}`;
    for (const d of snap.manifest.disks) {
      try {
        const index = await repo.index(snap, d.name);
        for (let i = 0; i < index.count; i++) {
          if (index.isZero(i)) continue;
          const hex = index.digest(i).toString("hex");
          let set = usedBy.get(hex);
          if (!set) {
            set = new Set();
            usedBy.set(hex, set);
          }
          set.add(id);
        }
      } catch (err) {
        addProblem(id, describe(err));
      }
    }
    await checkBlob(repo, snap, options.readData === true).catch((err: unknown) =>
      addProblem(id, describe(err)),
    );
  }
  const damagedChunks: VerifyReport["damagedChunks"] = [];
  const all = [...usedBy.keys()];
  progress.emit({
    type: "start",
    job: "verify",
    total: all.length,
    message: options.readData ? "reading all chunks" : "checking chunks exist",
  });
  let checked = 0;
  await forEachLimit(
    all,
    options.readData ? repo.codec().threads * 2 + 2 : 16,
    async (hex) => {
      let problem: string | undefined;
      if (options.readData) {
        try {
          await repo.readChunk(Buffer.from(hex, "hex"));
        } catch (err) {
          problem = describe(err);
        }
      } else if (!(await repo.layout.exists(hex))) {
        problem = `chunk ${hex} is missing from the repository`;
      }
      if (problem) {
        const users = [...(usedBy.get(hex) ?? [])].sort();
        damagedChunks.push({ digest: hex, problem, usedBy: users });
        for (const u of users) addProblem(u, problem);
      }
      checked++;
      progress.emit({ type: "progress", job: "verify", done: checked, total: all.length });
    },
    options.signal,
  );
  progress.emit({ type: "end", job: "verify" });
  damagedChunks.sort((a, b) => a.digest.localeCompare(b.digest));
  const damagedSnapshots = [...problems.entries()]
    .map(([id, p]) => ({ id, problems: p }))
    .sort((a, b) => a.id.localeCompare(b.id));
  return {
    snapshotsChecked:
      snaps.length + damagedSnapshots.filter((d) => !snaps.some((s) => `${s.vm}/${s.time}` === d.id)).length,
    chunksChecked: checked,
    damagedSnapshots,
    damagedChunks,
    ok: damagedSnapshots.length === 0 && damagedChunks.length === 0,
  };
}

async function checkBlob(repo: Repository, snap: SnapshotRef, readData: boolean): Promise<void> {
  const blob = snap.manifest.config;
  if (!blob) return;
  if (readData) {
    await repo.blob(snap, blob);
  } else if (!(await repo.store.stat(keys.blob(snap.vm, snap.time, blob.name)))) {
    throw new StrataError(ErrorCode.DATA_MISSING, `${snap.vm}/${snap.time}: blob ${blob.name} is missing`);
  }
}

function describe(err: unknown): string {
  return err instanceof Error ? err.message : String(err);
}
