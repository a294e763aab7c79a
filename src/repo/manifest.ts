/**
 * The manifest of a restore point: what was backed up, when, how consistent, and the checksum
 * of every index and blob it names. Written last; a restore point exists once its manifest does.
 * Sealed (src/repo/sealed-json.ts): SHA-256, or HMAC-SHA-256 under the key when encrypted.
 *
 * A plain SHA-256 seal only catches accidents: whoever can write an unencrypted repository can
 * recompute it. So every manifest read is also checked against {@link ManifestSchema} before it
 * is used: names that become file names (disks, blobs) are plain names, sizes and counts are
 * safe integers, times have the restore-point form.
 */
import { z } from "zod";
import { NAME_RE } from "./format.js";

/** How a restore point was taken. */
export type BackupMode = "offline" | "pause" | "snapshot" | "file";

/** What a restored VM will find, weakest last. */
export type Consistency =
  | "clean-shutdown"
  | "application-consistent"
  | "filesystem-consistent"
  | "paused"
  | "crash-consistent";

export interface ManifestDisk {
  /** Disk name, unique within the VM (file name of the index is `<name>.fidx`). */
  name: string;
  /** Size in bytes. */
  size: number;
  /** SHA-256 of the index's digest array. */
  indexChecksum: string;
  /** Where it came from (path, node name), for people. */
  source: string;
  /** Bytes read from the source (allocated, non-skipped data). */
  bytesRead: number;
  /** Plaintext bytes of chunks this backup stored new. */
  bytesNew: number;
  /** Bytes written to the repository for those chunks (compressed, encrypted). */
  bytesStored: number;
  chunksNew: number;
  chunksReused: number;
  chunksZero: number;
  /** "changed": only changed chunks were read (dirty bitmap); "full": the whole disk was read. */
  readMode?: "full" | "changed";
  /** Why a disk with change tracking was read whole. */
  fullReadReason?: string;
}

export interface ManifestBlob {
  name: string;
  size: number;
  /** SHA-256 (HMAC when encrypted) of the plaintext. */
  checksum: string;
}

export interface Manifest {
  format: "strata-manifest";
  version: 1;
  vm: string;
  /** UTC time of the point in time, "YYYY-MM-DDTHH:MM:SSZ"; also the folder name. */
  time: string;
  mode: BackupMode;
  consistency: Consistency;
  /** Time of the restore point this one was derived from, or null. */
  parent: string | null;
  disks: ManifestDisk[];
  /** The VM configuration blob (stored encrypted like a chunk), or null. */
  config: ManifestBlob | null;
  /** Dirty-bitmap hand-over state, for incremental-forever reads; null when none. */
  bitmap: null | Record<string, unknown>;
  host: string;
  durationMs: number;
  tool: string;
  /**
   * Set when the restore point was stored under S3 Object Lock: the retention its manifest,
   * indexes, blobs and every pack and index object it needs are locked under, at least.
   */
  immutable?: { mode: "COMPLIANCE" | "GOVERNANCE"; until: string };
}

export function manifestTotals(m: Manifest): {
  size: number;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  chunksNew: number;
  chunksReused: number;
} {
  const t = { size: 0, bytesRead: 0, bytesNew: 0, bytesStored: 0, chunksNew: 0, chunksReused: 0 };
  for (const d of m.disks) {
    t.size += d.size;
    t.bytesRead += d.bytesRead;
    t.bytesNew += d.bytesNew;
    t.bytesStored += d.bytesStored;
    t.chunksNew += d.chunksNew;
    t.chunksReused += d.chunksReused;
  }
  return t;
}

const count = z.number().int().min(0).max(Number.MAX_SAFE_INTEGER);
const plainName = z.string().regex(NAME_RE, "not a plain name (letters, digits, . _ -; 64 at most)");
const hex64 = z.string().regex(/^[0-9a-f]{64}$/, "not a hex SHA-256");
const TIME_RE = /^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z$/;

/** The shape every manifest read from a repository must have. */
export const ManifestSchema = z.object({
  format: z.literal("strata-manifest"),
  version: z.literal(1),
  vm: plainName,
  time: z.string().regex(TIME_RE, "not a restore-point time"),
  mode: z.enum(["offline", "pause", "snapshot", "file"]),
  consistency: z.enum([
    "clean-shutdown",
    "application-consistent",
    "filesystem-consistent",
    "paused",
    "crash-consistent",
  ]),
  parent: z.string().regex(TIME_RE).nullable(),
  immutable: z.object({ mode: z.enum(["COMPLIANCE", "GOVERNANCE"]), until: z.iso.datetime() }).optional(),
  disks: z
    .array(
      z.object({
        name: plainName,
        size: count,
        indexChecksum: hex64,
        source: z.string().max(4096),
        bytesRead: count,
        bytesNew: count,
        bytesStored: count,
        chunksNew: count,
        chunksReused: count,
        chunksZero: count,
        readMode: z.enum(["full", "changed"]).optional(),
        fullReadReason: z.string().max(4096).optional(),
      }),
    )
    .max(256)
    .refine((d) => new Set(d.map((x) => x.name)).size === d.length, "two disks share a name"),
  config: z.object({ name: plainName, size: count, checksum: hex64 }).nullable(),
  bitmap: z.record(z.string(), z.unknown()).nullable(),
  host: z.string().max(255),
  durationMs: count,
  tool: z.string().max(64),
});

/**
 * Checks a document against {@link ManifestSchema}; returns why not (the first problem, with its
 * path), or undefined when it is a manifest.
 */
export function manifestProblem(doc: unknown): string | undefined {
  const r = ManifestSchema.safeParse(doc);
  if (r.success) return undefined;
  const issue = r.error.issues[0]!;
  return `${issue.path.length > 0 ? issue.path.join(".") : "document"}: ${issue.message}`;
}
