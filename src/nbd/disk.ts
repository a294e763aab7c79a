/**
 * A disk read over NBD as a block source (structurally the engine's DiskSource and the adapter
 * interface's SessionDisk): data, allocation from `base:allocation`, and the changes since a
 * restore point from a `qemu:dirty-bitmap:NAME` context. Hypervisor adapters build their backup
 * sessions' disks with it (QEMU's own NBD exports, qemu-storage-daemon).
 */
import { NbdClient } from "./client.js";
import { BASE_ALLOCATION, StateFlag } from "./protocol.js";

/** A run of a disk; `zero` when it reads as zeros (or, for changes, when it is unchanged). */
export interface NbdExtent {
  offset: number;
  length: number;
  zero: boolean;
}

/** The disk as a block source. */
export interface NbdDisk {
  name: string;
  source: string;
  size: number;
  read(offset: number, length: number, into?: Buffer): Promise<Buffer>;
  allocation(): Promise<NbdExtent[]>;
  changes?: { since: string; extents(): Promise<NbdExtent[]> };
  fullReadReason?: string;
}

export interface NbdDiskOptions {
  socket: string;
  exportName: string;
  name: string;
  source: string;
  /** `qemu:dirty-bitmap:NAME` holding the changes since restore point `since`. */
  dirty?: { context: string; since: string };
  /** Why this disk is read whole, when it could have been read incrementally. */
  fullReadReason?: string;
}

/** Connects and returns the source with its client (close the client when done). */
export async function openNbdDisk(o: NbdDiskOptions): Promise<{ disk: NbdDisk; client: NbdClient }> {
  const contexts = [BASE_ALLOCATION, ...(o.dirty ? [o.dirty.context] : [])];
  const client = await NbdClient.connect(
    { path: o.socket },
    { exportName: o.exportName, metaContexts: contexts },
  );
  const extents = async (context: string, zero: (flags: number) => boolean): Promise<NbdExtent[]> =>
    (await client.blockStatus(0, client.size, context)).map((e) => ({
      offset: e.offset,
      length: e.length,
      zero: zero(e.flags),
    }));
  const disk: NbdDisk = {
    name: o.name,
    source: o.source,
    size: client.size,
    read: (off, len) => client.read(off, len),
    allocation: () => extents(BASE_ALLOCATION, (f) => (f & StateFlag.ZERO) !== 0),
    ...(o.dirty
      ? { changes: { since: o.dirty.since, extents: () => extents(o.dirty!.context, (f) => (f & 1) === 0) } }
      : {}),
    ...(o.fullReadReason === undefined ? {} : { fullReadReason: o.fullReadReason }),
  };
  return { disk, client };
}
