/**
 * A bounded local read cache in front of a remote store (an S3 bucket): range reads of packs go
 * through a cache directory in blocks of {@link CACHE_BLOCK} bytes, so that restore, serve,
 * files and instant recovery read a pack region from the network once and then from local disk.
 *
 * - Only `packs/` is cached: a pack is named by a random id and never changed (gc writes new
 *   packs and deletes old ones), so a cached block can't go stale. Everything else goes straight
 *   to the store.
 * - Size cap and LRU: the entries' sizes are summed (the directory is scanned once, on first
 *   use); past the cap the least recently used entries are removed. A hit sets the entry's mtime,
 *   which orders entries across processes. Two processes sharing the directory may together pass
 *   the cap briefly; the next one to open it trims it.
 * - The directory is not trusted: an entry is 32 bytes of SHA-256 over (store location, key,
 *   block number, bytes) followed by the bytes; it is opened without following symlinks, its size
 *   bounded before it is read, and one that fails the check (or is shorter than a read needs) is
 *   removed and fetched again. A forger who writes an entry with a matching hash only gets bytes
 *   to the chunk codec, which checks each chunk against its digest: never used, reported damaged.
 * - Writes: a temporary file, then rename; a failure to write the cache is not a failure to read.
 */
import { createHash, randomBytes } from "node:crypto";
import { constants, promises as fs } from "node:fs";
import type { FileHandle } from "node:fs/promises";
import { homedir } from "node:os";
import { dirname, join } from "node:path";
import type { ObjectInfo, PutOptions, Store } from "./store.js";

/** Bytes per cache entry (the last block of a pack is shorter). */
export const CACHE_BLOCK = 1024 * 1024;
/** Default cap of the cache directory. */
export const DEFAULT_CACHE_BYTES = 1024 * 1024 * 1024;
const HASH = 32;

/** $STRATA_S3_CACHE_DIR, else $XDG_CACHE_HOME/strata, else ~/.cache/strata. */
export function defaultCacheDir(env: NodeJS.ProcessEnv = process.env): string {
  if (env.STRATA_S3_CACHE_DIR) return env.STRATA_S3_CACHE_DIR;
  return join(env.XDG_CACHE_HOME || join(homedir(), ".cache"), "strata");
}

export interface CacheStats {
  hits: number;
  misses: number;
  /** Entries that failed their check and were fetched again. */
  corrupt: number;
  evicted: number;
  /** Bytes in the cache directory as this process counts them. */
  bytes: number;
}

export class CachedStore implements Store {
  readonly stats: CacheStats = { hits: 0, misses: 0, corrupt: 0, evicted: 0, bytes: 0 };
  /** Entries by path, least recently used first, with their sizes. */
  private entries: Promise<Map<string, number>> | undefined;
  private readonly sizes = new Map<string, Promise<number>>();
  private readonly loading = new Map<string, Promise<Buffer>>();
  private readonly root: string;

  readonly formatV1: boolean;
  // The store's optional abilities, passed through where it has them.
  declare readonly getInto?: NonNullable<Store["getInto"]>;
  declare readonly objectLock?: NonNullable<Store["objectLock"]>;
  declare readonly retention?: NonNullable<Store["retention"]>;
  declare readonly extendRetention?: NonNullable<Store["extendRetention"]>;
  declare readonly checkDelete?: NonNullable<Store["checkDelete"]>;
  declare readonly isLocked?: NonNullable<Store["isLocked"]>;
  declare readonly isTooLarge?: NonNullable<Store["isTooLarge"]>;

  constructor(
    private readonly inner: Store,
    dir: string,
    private readonly maxBytes: number = DEFAULT_CACHE_BYTES,
  ) {
    // One subdirectory per store, so that two repositories never share entries.
    this.root = join(dir, createHash("sha256").update(inner.location).digest("hex").slice(0, 24));
    this.formatV1 = inner.formatV1 ?? true;
    for (const name of [
      "getInto",
      "objectLock",
      "retention",
      "extendRetention",
      "checkDelete",
      "isLocked",
      "isTooLarge",
    ] as const) {
      const f = inner[name];
      if (f) Object.defineProperty(this, name, { value: f.bind(inner) });
    }
  }

  get location(): string {
    return this.inner.location;
  }

  get(key: string): Promise<Buffer> {
    return this.inner.get(key);
  }

  put(key: string, data: Uint8Array, options?: PutOptions): Promise<void> {
    return this.inner.put(key, data, options);
  }

  async getRange(key: string, offset: number, length: number, into?: Uint8Array): Promise<Buffer> {
    if (!key.startsWith("packs/") || length === 0) return this.inner.getRange(key, offset, length, into);
    const first = Math.floor(offset / CACHE_BLOCK);
    const last = Math.floor((offset + length - 1) / CACHE_BLOCK);
    const out =
      into && into.length >= length
        ? Buffer.from(into.buffer, into.byteOffset, length)
        : Buffer.alloc(length);
    const blocks = await Promise.all(
      Array.from({ length: last - first + 1 }, (_, i) => {
        const b = first + i;
        // How much of this block the read needs: a cached block shorter than that is damaged.
        const need = Math.min(CACHE_BLOCK, offset + length - b * CACHE_BLOCK);
        return this.block(key, b, need);
      }),
    );
    for (let i = 0; i < blocks.length; i++) {
      const b = first + i;
      const from = Math.max(offset, b * CACHE_BLOCK);
      const to = Math.min(offset + length, (b + 1) * CACHE_BLOCK);
      blocks[i]!.copy(out, from - offset, from - b * CACHE_BLOCK, to - b * CACHE_BLOCK);
    }
    return out;
  }

  private path(key: string, block: number): string {
    const h = createHash("sha256").update(key).digest("hex");
    return join(this.root, h.slice(0, 2), `${h}-${block}`);
  }

  private seal(key: string, block: number, data: Uint8Array): Buffer {
    return createHash("sha256").update(`${this.inner.location}\0${key}\0${block}\0`).update(data).digest();
  }

  /** Block `b` of `key`, at least `need` bytes of it, from the cache or else the store. */
  private block(key: string, b: number, need: number): Promise<Buffer> {
    const path = this.path(key, b);
    const pending = this.loading.get(path);
    if (pending) return pending;
    const work = (async () => {
      const cached = await this.readEntry(path, key, b, need);
      if (cached) {
        this.stats.hits++;
        return cached;
      }
      this.stats.misses++;
      const size = await this.size(key);
      const len = Math.min(CACHE_BLOCK, size - b * CACHE_BLOCK);
      if (len < need) return this.inner.getRange(key, b * CACHE_BLOCK, need); // names the short object
      const data = await this.inner.getRange(key, b * CACHE_BLOCK, len);
      await this.writeEntry(path, Buffer.concat([this.seal(key, b, data), data])).catch(() => {});
      return data;
    })();
    this.loading.set(path, work);
    return work.finally(() => this.loading.delete(path));
  }

  private size(key: string): Promise<number> {
    let s = this.sizes.get(key);
    if (!s) {
      s = this.inner.stat(key).then((info) => {
        if (!info) return this.inner.getRange(key, 0, 1).then(() => 0); // throws the store's "not found"
        return info.size;
      });
      s.catch(() => this.sizes.delete(key));
      this.sizes.set(key, s);
    }
    return s;
  }

  private async readEntry(path: string, key: string, b: number, need: number): Promise<Buffer | undefined> {
    let fh: FileHandle;
    try {
      fh = await fs.open(path, constants.O_RDONLY | constants.O_NOFOLLOW);
    } catch {
      return undefined;
    }
    let bytes: Buffer;
    try {
      const st = await fh.stat();
      if (!st.isFile() || st.size > HASH + CACHE_BLOCK) bytes = Buffer.alloc(0);
      else {
        bytes = Buffer.alloc(st.size);
        const { bytesRead } = await fh.read(bytes, 0, st.size, 0);
        bytes = bytes.subarray(0, bytesRead);
      }
    } finally {
      await fh.close();
    }
    const data = bytes.subarray(HASH);
    if (bytes.length < HASH || !this.seal(key, b, data).equals(bytes.subarray(0, HASH))) {
      this.stats.corrupt++;
      await this.forget(path);
      return undefined;
    }
    // A pack's last block, asked for bytes past the pack's end: the store says what is wrong.
    if (data.length < need) return undefined;
    const entries = await this.index();
    // Most recently used now. An entry the map does not hold (evicted while it was read, or
    // written by another process) is counted again: the sum may run high, never low.
    const had = entries.get(path);
    entries.delete(path);
    entries.set(path, bytes.length);
    if (had === undefined) this.stats.bytes += bytes.length;
    const now = new Date();
    await fs.utimes(path, now, now).catch(() => {});
    return data;
  }

  private async writeEntry(path: string, bytes: Buffer): Promise<void> {
    if (bytes.length > this.maxBytes) return;
    const entries = await this.index();
    await fs.mkdir(dirname(path), { recursive: true });
    const tmp = `${path}.tmp-${randomBytes(6).toString("hex")}`;
    await fs.writeFile(tmp, bytes, { flag: "wx", mode: 0o600 });
    await fs.rename(tmp, path);
    const had = entries.get(path);
    if (had !== undefined) this.stats.bytes -= had;
    entries.delete(path);
    entries.set(path, bytes.length);
    this.stats.bytes += bytes.length;
    for (const [p, size] of entries) {
      if (this.stats.bytes <= this.maxBytes) break;
      entries.delete(p);
      this.stats.bytes -= size;
      this.stats.evicted++;
      await fs.rm(p, { force: true }).catch(() => {});
    }
  }

  private async forget(path: string): Promise<void> {
    const entries = await this.index();
    const size = entries.get(path);
    if (size !== undefined) {
      entries.delete(path);
      this.stats.bytes -= size;
    }
    await fs.rm(path, { force: true }).catch(() => {});
  }

  /** The entries on disk, least recently used first (scanned once). */
  private index(): Promise<Map<string, number>> {
    this.entries ??= (async () => {
      const found: Array<{ path: string; size: number; mtime: number }> = [];
      const subdirs = await fs.readdir(this.root).catch(() => [] as string[]);
      for (const sub of subdirs) {
        const names = await fs.readdir(join(this.root, sub)).catch(() => [] as string[]);
        for (const name of names) {
          const path = join(this.root, sub, name);
          const st = await fs.lstat(path).catch(() => undefined);
          if (!st?.isFile()) continue;
          // Leftovers of a write that died are not entries.
          if (name.includes(".tmp-")) {
            if (Date.now() - st.mtimeMs > 3_600_000) await fs.rm(path, { force: true }).catch(() => {});
            continue;
          }
          found.push({ path, size: st.size, mtime: st.mtimeMs });
        }
      }
      found.sort((a, b) => a.mtime - b.mtime);
      const map = new Map<string, number>();
      for (const f of found) {
        map.set(f.path, f.size);
        this.stats.bytes += f.size;
      }
      // Trimmed to the cap at once (another process, or a larger cap before).
      for (const [p, size] of map) {
        if (this.stats.bytes <= this.maxBytes) break;
        map.delete(p);
        this.stats.bytes -= size;
        this.stats.evicted++;
        await fs.rm(p, { force: true }).catch(() => {});
      }
      return map;
    })();
    return this.entries;
  }

  touch(key: string): Promise<boolean> {
    return this.inner.touch(key);
  }

  stat(key: string): Promise<ObjectInfo | undefined> {
    return this.inner.stat(key);
  }

  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.inner.list(prefix);
  }

  delete(key: string): Promise<void> {
    return this.inner.delete(key);
  }

  deletePrefix(prefix: string): Promise<void> {
    return this.inner.deletePrefix(prefix);
  }

  deleteIfUntouched(key: string, cutoffMs: number): Promise<boolean> {
    return this.inner.deleteIfUntouched(key, cutoffMs);
  }

  sweepTemporary(cutoffMs: number): Promise<number> {
    return this.inner.sweepTemporary(cutoffMs);
  }

  flush(): Promise<void> {
    return this.inner.flush();
  }

  async close(): Promise<void> {
    await this.inner.close?.();
  }

  isNotFound(err: unknown): boolean {
    return this.inner.isNotFound(err);
  }
}
