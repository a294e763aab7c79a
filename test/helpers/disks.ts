/** In-memory disk sources for tests that drive the engine in-process. */
import { type BackupResult, backup, type DiskSource } from "../../src/engine/backup.js";
import type { Repository } from "../../src/repo/repository.js";

/** A disk named "disk" whose bytes are `data` (each read returns a copy). */
export function memoryDisk(data: Buffer): DiskSource {
  return {
    name: "disk",
    source: "memory",
    size: data.length,
    read: async (o, l) => Buffer.from(data.subarray(o, o + l)),
  };
}

/**
 * A disk over `data` whose reads at `gateAt` bytes and later wait until `open()` is called;
 * `atGate` settles once the first such read arrives.
 */
export function gatedDisk(
  data: Buffer,
  gateAt: number,
): { disk: DiskSource; open: () => void; atGate: Promise<void> } {
  let open!: () => void;
  const gate = new Promise<void>((r) => {
    open = r;
  });
  let reached!: () => void;
  const atGate = new Promise<void>((r) => {
    reached = r;
  });
  const disk: DiskSource = {
    ...memoryDisk(data),
    async read(offset, length) {
      if (offset >= gateAt) {
        reached();
        await gate;
      }
      return Buffer.from(data.subarray(offset, offset + length));
    },
  };
  return { disk, open, atGate };
}

/**
 * A backup of `data` as VM `vm` that stops reading at `gateAt` bytes until `open()`: what gc is
 * run against in the tests of gc beside backups. One chunk in flight, so the gate holds exactly.
 */
export function heldBackup(
  repo: Repository,
  vm: string,
  data: Buffer,
  gateAt: number,
): { running: Promise<BackupResult>; open: () => void; atGate: Promise<void> } {
  const g = gatedDisk(data, gateAt);
  const running = backup(repo, {
    vm,
    disks: [g.disk],
    mode: "file",
    consistency: "crash-consistent",
    inflight: 1,
  });
  return { running, open: g.open, atGate: g.atGate };
}
