/**
 * The state of a VM's continuous data protection as its journal directory tells it: the
 * status.json a running `strata protect` rewrites every second, the journal's window and its
 * marks. Read by `strata protect status` and by the daemon's API.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { readMarks } from "../journal/marks.js";
import { JournalReader } from "../journal/reader.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { processAlive } from "../util/process.js";
import { protectedFrom } from "./pit.js";

export const STATUS_FILE = "status.json";

/** What a running protect writes to DIR/status.json every second (plain figures, no secrets). */
export interface ProtectStatus {
  pid: number;
  vm: string;
  started: string;
  updated: string;
  syncIntervalMs: number;
  entries: number;
  dataBytes: number;
  journalBytes: number;
  syncs: number;
  maxSyncMs: number;
  lastSyncAt: number;
  oldestUnsyncedAt: number;
  broken?: string;
  stopped?: boolean;
  /** Set on a stop: the journal holds every write made before this instant (ISO). */
  completeUntil?: string;
  /** The newest fold: its restore point, instant and duration. */
  lastFold?: { id: string; at: string; durationMs: number; bytesRead: number; segmentsDropped: number };
  folds?: number;
  foldError?: string;
  /** Set when this protect resumed a dead one's journal. */
  resumed?: {
    bitmaps: string[];
    bytes: number;
    ranges: number;
    durationMs: number;
    gap: { from: string; to: string };
  };
}

/** DIR/status.json as the protect last wrote it; undefined when absent or unreadable. */
export async function readProtectStatus(dir: string): Promise<ProtectStatus | undefined> {
  try {
    return JSON.parse(await fs.readFile(join(dir, STATUS_FILE), "utf8")) as ProtectStatus;
  } catch {
    return undefined;
  }
}

export const isoOf = (ns: bigint | number) =>
  new Date(Number(typeof ns === "bigint" ? ns / 1_000_000n : ns)).toISOString();

/** The protected window of the journal in `dir`, as `strata protect status` shows it. */
export interface CdpWindow {
  vm: string;
  journal: string;
  running: boolean;
  pid?: number;
  /** The first and newest restorable instants (ISO); null while the first copy is not done. */
  from: string | null;
  to: string | null;
  lastWrite: string | null;
  bases: Array<{ snapshot: string; from: string }>;
  /** Times protection was down (a protect died and a later one resumed); `to` null while resuming. */
  gaps: Array<{ from: string; to: string | null }>;
  entries: number;
  dataBytes: number;
  journalBytes: number;
  segments: number;
  /** How long the oldest write not yet fdatasynced had waited at the last status write (running only). */
  lagMs?: number;
  broken?: string;
  lastFold?: ProtectStatus["lastFold"];
  folds?: number;
  marks: Array<{ name: string; at: string; quiesced: boolean }>;
}

/** Reads the window of the journal in `dir` (of VM `vm` when given: another VM's is refused). */
export async function cdpWindow(repo: Repository, dir: string, vm?: string): Promise<CdpWindow> {
  const reader = await JournalReader.open(dir, repo.keys);
  if (vm !== undefined && reader.meta.vm !== vm)
    throw new StrataError(ErrorCode.USAGE, `journal ${dir} belongs to VM ${reader.meta.vm}, not ${vm}`);
  const w = await reader.window();
  const from = await protectedFrom(repo, reader.meta);
  const marks = await readMarks(dir, repo.keys);
  const live = await readProtectStatus(dir);
  const running = live !== undefined && !live.stopped && processAlive(live.pid);
  // As of the protect's last status write (every second).
  const lagMs =
    running && live
      ? live.oldestUnsyncedAt > 0
        ? Math.max(0, Date.parse(live.updated) - live.oldestUnsyncedAt)
        : 0
      : undefined;
  // The newest instant restorable: the last entry, or now while a running protect has had no write since.
  const to = running ? BigInt(Date.now()) * 1_000_000n : w.toNs;
  return {
    vm: reader.meta.vm,
    journal: dir,
    running,
    ...(running && live ? { pid: live.pid } : {}),
    from: from === undefined ? null : isoOf(from),
    to: to === undefined || from === undefined ? null : isoOf(to),
    lastWrite: w.toNs === undefined ? null : isoOf(w.toNs),
    bases: reader.meta.bases.map((b) => ({ snapshot: b.snapshot, from: isoOf(BigInt(b.cutNs)) })),
    gaps: (reader.meta.gaps ?? []).map((g) => ({
      from: isoOf(BigInt(g.fromNs)),
      to: g.toNs === undefined ? null : isoOf(BigInt(g.toNs)),
    })),
    entries: w.entries,
    dataBytes: w.dataBytes,
    journalBytes: w.bytes,
    segments: w.segments,
    ...(lagMs === undefined ? {} : { lagMs }),
    ...(live?.broken ? { broken: live.broken } : {}),
    ...(live?.lastFold
      ? { lastFold: live.lastFold, ...(live.folds === undefined ? {} : { folds: live.folds }) }
      : {}),
    marks: marks.map((m) => ({ name: m.name, at: isoOf(BigInt(m.atNs)), quiesced: m.quiesced })),
  };
}
