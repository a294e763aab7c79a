/**
 * The manifest of a restore point: what was backed up, when, how consistent, and the checksum
 * of every index and blob it names. Written last; a restore point exists once its manifest does.
 * Sealed (src/repo/sealed-json.ts): SHA-256, or HMAC-SHA-256 under the key when encrypted.
 */

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
