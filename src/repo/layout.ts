/**
 * Where a repository keeps its chunks: format v1 stores each chunk as an object of its own
 * (`chunks/ab/<digest>`), format v2 many chunks in a pack (`packs/ab/<id>`) with pack indexes
 * (`index/<name>`). The rest of the repository (manifests, fixed indexes, blobs, locks) is the same
 * in both. {@link Repository} picks the layout from the config's version.
 */

import { DIRECT_IO_ALIGN } from "../util/aligned.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { forEachLimit } from "../util/pool.js";
import type { ChunkPool, SharedSlot } from "./chunk-pool.js";
import { storedSizeBound } from "./codec.js";
import { INDEX_NAME_RE, keys } from "./format.js";
import { PackWriter } from "./pack.js";
import {
  type ChunkLocation,
  decodeIndex,
  encodeIndex,
  INDEX_MAX_BYTES,
  type IndexDocument,
  PackIndex,
  type PackRecord,
} from "./pack-index.js";
import type { Retention, Store } from "./store.js";

/** One writer's access to the chunk store, from its start to its commit. */
export interface ChunkSession {
  /**
   * True when the chunk is stored and the restore point may reference it without storing it
   * (v1 touches it, so gc keeps it; v2 finds it in a live pack).
   */
  has(hex: string): Promise<boolean>;
  /**
   * Stores an encoded chunk; `stored` may be reused once this returns. Unless {@link copies},
   * `stored` is page-aligned, with readable memory up to the next 4 KiB boundary.
   */
  put(hex: string, stored: Uint8Array): Promise<void>;
  /**
   * True when {@link put} copies the bytes (into a pack) rather than writing them from where they
   * are: they need not be page-aligned, and are best encoded where their payload is as aligned
   * as it will be in the pack (pack.ts, payloadPad).
   */
  readonly copies: boolean;
  /** Makes every chunk put so far durable and findable by readers (before the manifest). */
  finish(): Promise<void>;
  /**
   * Makes the chunks already durable findable by later writers and readers, before
   * {@link finish} (a copy that may be killed and run again); returns how many packs it made
   * findable. Absent where chunks are findable at once (v1).
   */
  checkpoint?(): Promise<number>;
  /** Gives up; waits for writes under way. */
  abandon(): Promise<void>;
  /**
   * After {@link finish}: makes every object that holds one of these chunks, and every index
   * object that names such a pack, stay locked at least until `retain.untilMs` (extending the
   * retention of what an earlier restore point stored). Returns how many it extended.
   */
  retain?(hexes: Iterable<string>, retain: Retention): Promise<number>;
}

export interface ChunkLayout {
  readonly version: 1 | 2;
  /**
   * A chunk's stored bytes, read into `scratch` (page-aligned shared memory, a multiple of
   * 4 KiB) when given, around the page cache where the store can.
   */
  read(hex: string, scratch?: SharedSlot): Promise<Buffer>;
  /**
   * The stored bytes of several chunks (a restore's run of consecutive chunks of a disk) with as
   * few reads as their places allow, all into `scratch` (as for {@link read}): one read per pack
   * for those close together there, one per chunk for the others. Undefined when they don't fit
   * in `scratch` that way, or when the layout can't tell: the caller reads them one by one.
   */
  readRun?(hexes: readonly string[], scratch: SharedSlot): Promise<Buffer[] | undefined>;
  /** True when the chunk is stored (metadata only, for verify). */
  exists(hex: string): Promise<boolean>;
  /** Starts reading what {@link read} needs first (the pack index), in the background. */
  prefetch?(): void;
  /**
   * Starts a writer's session; call after the writer's lock is registered. With `retain`, every
   * object it stores is put under that retention.
   */
  session(retain?: Retention): Promise<ChunkSession>;
}

function missing(hex: string): StrataError {
  return new StrataError(ErrorCode.DATA_MISSING, `chunk ${hex} is missing from the repository`);
}

function tooLarge(hex: string): StrataError {
  return new StrataError(ErrorCode.DATA_CORRUPT, `chunk ${hex} is damaged: larger than a chunk can be`);
}

/** Format v1: one object per chunk, reuse by touch, gc by {@link Store.deleteIfUntouched}. */
export class ObjectPerChunkLayout implements ChunkLayout {
  readonly version = 1;

  constructor(private readonly store: Store) {}

  async read(hex: string, scratch?: SharedSlot): Promise<Buffer> {
    const key = keys.chunk(hex);
    try {
      if (scratch && this.store.getInto) {
        const into = Buffer.from(scratch.memory, scratch.offset, scratch.capacity);
        return into.subarray(0, await this.store.getInto(key, into, { aligned: true }));
      }
      return await this.store.get(key);
    } catch (err) {
      if (this.store.isNotFound(err)) throw missing(hex);
      if (this.store.isTooLarge?.(err)) throw tooLarge(hex);
      throw err;
    }
  }

  async exists(hex: string): Promise<boolean> {
    return (await this.store.stat(keys.chunk(hex))) !== undefined;
  }

  async session(): Promise<ChunkSession> {
    const store = this.store;
    return {
      has: (hex) => store.touch(keys.chunk(hex)),
      put: (hex, stored) => store.put(keys.chunk(hex), stored, { aligned: true }),
      copies: false,
      finish: async () => {},
      abandon: async () => {},
    };
  }
}

/** Reads every index object under `index/`; retries when gc replaces them mid-way. */
export async function loadPackIndex(store: Store, codec: ChunkPool): Promise<PackIndex> {
  for (let attempt = 0; ; attempt++) {
    const names: string[] = [];
    for await (const o of store.list("index/")) {
      const name = o.key.slice("index/".length);
      if (!INDEX_NAME_RE.test(name)) continue;
      // Others may write the repository: an object larger than an index can be is not read into memory.
      if (o.size > storedSizeBound(INDEX_MAX_BYTES))
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `pack index ${name} is damaged: ${o.size} bytes, larger than an index can be`,
        );
      names.push(name);
    }
    const docs = new Map<string, IndexDocument>();
    let vanished = false;
    for (const name of names) {
      let stored: Buffer;
      try {
        stored = await store.get(keys.packIndex(name));
      } catch (err) {
        // gc deletes the objects it superseded after writing their replacement: list again.
        if (store.isNotFound(err) && attempt < 5) {
          vanished = true;
          break;
        }
        throw err;
      }
      const plain = await codec.decode(stored, Buffer.from(name, "hex"), `index/${name}`);
      docs.set(name, decodeIndex(plain, name));
    }
    if (!vanished) return new PackIndex(docs);
  }
}

/** Pack records one index object holds at most (a few MiB of plaintext). */
const PACKS_PER_INDEX_OBJECT = 256;

/**
 * Stores `packs` in index objects of at most {@link PACKS_PER_INDEX_OBJECT} packs; the last one
 * (written last) names `supersedes`, so that the objects it replaces count until all of the new
 * state is stored. Returns the names written.
 */
export async function writeIndexObjects(
  store: Store,
  codec: ChunkPool,
  packs: readonly PackRecord[],
  supersedes: readonly string[] = [],
  durable = false,
  retain?: Retention,
): Promise<string[]> {
  const names: string[] = [];
  const parts = Math.max(1, Math.ceil(packs.length / PACKS_PER_INDEX_OBJECT));
  for (let i = 0; i < parts; i++) {
    const last = i === parts - 1;
    const doc: IndexDocument = {
      // An earlier part may have the very name of an object it replaces (same content): that
      // name stays in effect.
      supersedes: last ? supersedes.filter((n) => !names.includes(n)) : [],
      packs: packs.slice(i * PACKS_PER_INDEX_OBJECT, (i + 1) * PACKS_PER_INDEX_OBJECT),
    };
    const { digest, data } = await codec.hash(encodeIndex(doc));
    const { blob } = await codec.encode(data);
    const name = digest.toString("hex");
    await store.put(keys.packIndex(name), blob, { durable, ...(retain ? { retain } : {}) });
    names.push(name);
  }
  return names;
}

/** Format v2: chunks in packs, found through pack indexes. */
export class PackLayout implements ChunkLayout {
  readonly version = 2;
  private index: Promise<PackIndex> | undefined;
  private packKeys: Promise<Set<string>> | undefined;

  constructor(
    private readonly store: Store,
    private readonly codec: () => ChunkPool,
    private readonly chunkSize: number,
    /** Pack size at which a writer seals a pack (tests make it small). */
    private readonly packTarget?: number,
  ) {}

  prefetch(): void {
    // packIndex() handles its own rejection; the first read awaits the same promise and throws.
    void this.packIndex();
  }

  /** The pack index, read once; `fresh` reads it again (another process may have written). */
  packIndex(fresh = false): Promise<PackIndex> {
    if (fresh || !this.index) {
      const loading = loadPackIndex(this.store, this.codec());
      this.index = loading;
      this.packKeys = undefined;
      loading.catch(() => {
        if (this.index === loading) this.index = undefined;
      });
    }
    return this.index;
  }

  async read(hex: string, scratch?: SharedSlot): Promise<Buffer> {
    const index = await this.packIndex();
    try {
      return await this.readFrom(index, hex, scratch);
    } catch (err) {
      // Written since the index was read (a backup that finished meanwhile), or moved by a gc
      // (repacked, the old pack deleted): read the index again, once.
      if (!(err instanceof StrataError && err.code === ErrorCode.DATA_MISSING)) throw err;
      const fresh =
        this.index === undefined || (await this.index) === index
          ? await this.packIndex(true)
          : await this.packIndex();
      return this.readFrom(fresh, hex, scratch);
    }
  }

  async readRun(hexes: readonly string[], scratch: SharedSlot): Promise<Buffer[] | undefined> {
    const index = await this.packIndex();
    const at = hexes.map((hex) => index.locate(hex));
    // A chunk twice in the run (repeated content) is read once: decoding leaves stored bytes as
    // they are, so both decode from the same place.
    if (at.some((a) => a === undefined)) return undefined;
    const located = at as ChunkLocation[];
    // The chunks of a run were packed in the order the backup's workers finished them: mostly
    // near each other in one pack, seldom back to back. A pack's chunks are read as one span
    // when the span holds at most twice their bytes (the rest is other chunks, read and
    // ignored), else one by one; each read gets a page-aligned region of `scratch`.
    const reads: Array<{ pack: string; offset: number; length: number; chunks: number[] }> = [];
    const byPack = new Map<string, number[]>();
    for (const [k, a] of located.entries()) byPack.set(a.pack, [...(byPack.get(a.pack) ?? []), k]);
    for (const [pack, ks] of byPack) {
      const lo = Math.min(...ks.map((k) => located[k]!.offset));
      const hi = Math.max(...ks.map((k) => located[k]!.offset + located[k]!.length));
      const bytes = ks.reduce((sum, k) => sum + located[k]!.length, 0);
      if (hi - lo <= 2 * bytes) reads.push({ pack, offset: lo, length: hi - lo, chunks: ks });
      else for (const k of ks) reads.push({ ...located[k]!, chunks: [k] });
    }
    const aligned = (offset: number, length: number) =>
      Math.ceil((offset + length) / DIRECT_IO_ALIGN) * DIRECT_IO_ALIGN -
      (offset - (offset % DIRECT_IO_ALIGN));
    let room = 0;
    const regions = reads.map((r) => {
      const start = room;
      room += aligned(r.offset, r.length);
      return start;
    });
    if (room > scratch.capacity) return undefined;
    const out: Buffer[] = [];
    // Every read ends before this returns: a caller that then reads one by one reuses `scratch`.
    const settled = await Promise.allSettled(
      reads.map(async (r, i) => {
        const span = await this.store.getRange(
          keys.pack(r.pack),
          r.offset,
          r.length,
          new Uint8Array(scratch.memory, scratch.offset + regions[i]!, aligned(r.offset, r.length)),
        );
        for (const k of r.chunks) {
          const a = located[k]!;
          out[k] = span.subarray(a.offset - r.offset, a.offset - r.offset + a.length);
        }
      }),
    );
    // Moved by a gc, or damaged: the one-by-one reads retry and name what is wrong.
    if (settled.some((x) => x.status === "rejected")) return undefined;
    return out;
  }

  private async readFrom(index: PackIndex, hex: string, scratch?: SharedSlot): Promise<Buffer> {
    const at = index.locate(hex);
    if (!at) throw missing(hex);
    const into = scratch ? new Uint8Array(scratch.memory, scratch.offset, scratch.capacity) : undefined;
    try {
      return await this.store.getRange(keys.pack(at.pack), at.offset, at.length, into);
    } catch (err) {
      if (this.store.isNotFound(err))
        throw new StrataError(
          ErrorCode.DATA_MISSING,
          `chunk ${hex} is missing from the repository: its pack ${at.pack} is gone`,
        );
      if ((err as { code?: string }).code === "ESTRATASHORT")
        throw new StrataError(
          ErrorCode.DATA_CORRUPT,
          `chunk ${hex} is damaged: its pack ${at.pack} is shorter than its index says`,
        );
      throw err;
    }
  }

  async exists(hex: string): Promise<boolean> {
    const at = (await this.packIndex()).locate(hex);
    if (!at) return false;
    this.packKeys ??= (async () => {
      const set = new Set<string>();
      for await (const o of this.store.list("packs/")) set.add(o.key);
      return set;
    })();
    return (await this.packKeys).has(keys.pack(at.pack));
  }

  async session(retain?: Retention): Promise<ChunkSession> {
    // Read now, after the writer's lock exists: gc protects what this index shows live (gc-packs.ts).
    const index = await this.packIndex(true);
    const codec = this.codec();
    const packs = new PackWriter(this.store, codec, this.chunkSize, this.packTarget, 0, retain);
    const store = this.store;
    const mine = new Set<string>();
    // Packs already named by an index object this session wrote (checkpoints), and the
    // checkpoint under way: one at a time, and finish waits for it.
    let indexed = 0;
    let indexing: Promise<void> = Promise.resolve();
    const indexStored = (records: readonly PackRecord[]) => {
      const run = indexing.then(async () => {
        const todo = records.slice(indexed);
        if (todo.length === 0) return 0;
        await writeIndexObjects(this.store, codec, todo, [], false, retain);
        indexed += todo.length;
        return todo.length;
      });
      // A failed checkpoint is reported to its caller; the next one tries the same packs again.
      indexing = run.then(
        () => {},
        () => {},
      );
      return run;
    };
    return {
      has: async (hex) => mine.has(hex) || index.hasLive(hex),
      put: async (hex, stored) => {
        await packs.add(hex, stored);
        mine.add(hex);
      },
      copies: true,
      checkpoint: async () => {
        // Only packs whose put has returned are in `written`: each is whole in the store.
        return packs.written.length > indexed ? indexStored([...packs.written]) : 0;
      },
      finish: async () => {
        const written = await packs.finish();
        await indexStored(written);
        // Readers of this repository object see the new chunks.
        this.index = undefined;
      },
      abandon: () => packs.abandon(),
      retain: async (hexes, until) => {
        // Packs this session wrote carry the retention already; the others held chunks it reused.
        const wrote = new Set(packs.written.map((p) => p.id));
        const reused = new Set<string>();
        for (const hex of hexes) {
          const at = index.locate(hex);
          if (at && !wrote.has(at.pack)) reused.add(at.pack);
        }
        const objects = new Set<string>([...reused].map((id) => keys.pack(id)));
        // An index object naming such a pack must outlive the restore point too, or the pack
        // could not be found.
        const superseded = new Set(index.superseded);
        for (const [name, doc] of index.objects)
          if (!superseded.has(name) && doc.packs.some((p) => reused.has(p.id)))
            objects.add(keys.packIndex(name));
        let extended = 0;
        await forEachLimit([...objects], 16, async (key) => {
          if (!store.retention || !store.extendRetention) return;
          const held = await store.retention(key);
          if (held && held.untilMs >= until.untilMs) return;
          // A COMPLIANCE retention can't become GOVERNANCE: it is extended in its own mode.
          const mode = held?.mode === "COMPLIANCE" ? "COMPLIANCE" : until.mode;
          await store.extendRetention(key, { mode, untilMs: until.untilMs });
          extended++;
        });
        return extended;
      },
    };
  }
}
