/**
 * verify: checks that every restore point can be restored.
 *
 * Metadata (always): every manifest's seal, every index's header and checksum against its
 * manifest, every blob and referenced chunk present. With readData: every referenced chunk and
 * blob is read and fully decoded (GCM tag, zstd, length, digest); with readDataSubset part N of
 * T, only the chunks of that part (by digest, so the T parts of a repository split its chunks
 * into T sets that together hold each chunk once, whatever restore points come and go) are read
 * and the others checked for presence. The report names each damaged restore point and each
 * damaged chunk with the restore points that need it.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import { noProgress, type ProgressSink } from "../util/progress.js";
import { keys } from "./format.js";
import type { Repository, SnapshotRef } from "./repository.js";

/** Part `part` (1-based) of `of` of a repository's chunks. */
export interface DataSubset {
  part: number;
  of: number;
}

/** Parses "N/T" (1 ≤ N ≤ T ≤ 10000), as restic's --read-data-subset. */
export function parseDataSubset(text: string): DataSubset {
  const m = /^(\d+)\/(\d+)$/.exec(text.trim());
  const part = m ? Number(m[1]) : Number.NaN;
  const of = m ? Number(m[2]) : Number.NaN;
  if (!m || part < 1 || of < 1 || part > of || of > 10_000)
    throw new StrataError(
      ErrorCode.USAGE,
      `"${text}" is not a part of the chunks: give N/T with 1 <= N <= T <= 10000, e.g. 1/7`,
    );
  return { part, of };
}

/** Whether the chunk `hex` (its digest) falls in `subset`. */
export function inSubset(hex: string, subset: DataSubset): boolean {
  return Number.parseInt(hex.slice(0, 8), 16) % subset.of === subset.part - 1;
}

export interface VerifyReport {
  snapshotsChecked: number;
  chunksChecked: number;
  /** Of chunksChecked, those read and decoded whole (all with readData, the part's with a subset). */
  chunksRead: number;
  /** Restore points that can't be restored whole, with every reason found. */
  damagedSnapshots: Array<{ id: string; problems: string[] }>;
  /** Damaged or missing chunks, with the restore points that reference them. */
  damagedChunks: Array<{ digest: string; problem: string; usedBy: string[] }>;
  ok: boolean;
}

export async function verifyRepository(
  repo: Repository,
  options: {
    readData?: boolean;
    /** Read only this part of the chunks (the rest is checked for presence); implies readData. */
    readDataSubset?: DataSubset;
    progress?: ProgressSink;
    signal?: AbortSignal;
  } = {},
): Promise<VerifyReport> {
  const subset = options.readDataSubset;
  const reads = (hex: string) => options.readData === true || (subset !== undefined && inSubset(hex, subset));
  const anyRead = options.readData === true || subset !== undefined;
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
    await checkBlob(repo, snap, anyRead).catch((err: unknown) => addProblem(id, describe(err)));
  }
  const damagedChunks: VerifyReport["damagedChunks"] = [];
  const all = [...usedBy.keys()];
  progress.emit({
    type: "start",
    job: "verify",
    total: all.length,
    message: options.readData
      ? "reading all chunks"
      : subset
        ? `reading part ${subset.part}/${subset.of} of the chunks, checking the others exist`
        : "checking chunks exist",
  });
  let checked = 0;
  let read = 0;
  await forEachLimit(
    all,
    anyRead ? repo.codec().threads * 2 + 2 : 16,
    async (hex) => {
      let problem: string | undefined;
      if (reads(hex)) {
        read++;
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
    chunksRead: read,
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
