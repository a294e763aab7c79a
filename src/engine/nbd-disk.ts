/** A disk read over NBD as the engine's DiskSource: data, allocation, and changes from a bitmap context. */
import { BASE_ALLOCATION, NbdClient, StateFlag } from "../nbd/index.js";
import type { DataExtent, DiskSource } from "./backup.js";

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
export async function openNbdDisk(o: NbdDiskOptions): Promise<{ disk: DiskSource; client: NbdClient }> {
  const contexts = [BASE_ALLOCATION, ...(o.dirty ? [o.dirty.context] : [])];
  const client = await NbdClient.connect(
    { path: o.socket },
    { exportName: o.exportName, metaContexts: contexts },
  );
  const extents = async (context: string, zero: (flags: number) => boolean): Promise<DataExtent[]> =>
    (await client.blockStatus(0, client.size, context)).map((e) => ({
      offset: e.offset,
      length: e.length,
      zero: zero(e.flags),
    }));
  const disk: DiskSource = {
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
