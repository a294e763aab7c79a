/**
 * A restore point's disk as a read-only NBD {@link BlockSource}: the sink behind `strata serve`
 * and, later, instant recovery and file browsing.
 *
 * A read maps to the chunks it touches through the fixed index. All-zero chunks answer zeros
 * with no I/O; any other chunk comes from a bounded LRU cache or is fetched with
 * `repo.readChunk` (verified on a worker thread; a damaged or missing chunk fails the read, so
 * the NBD client gets EIO and never wrong data). Concurrent reads of one chunk share one fetch.
 * When a read continues where an earlier one left off (the chunk before it is cached), the next
 * few chunks are fetched ahead, but only into free fetch slots, so read-ahead never delays a
 * demand read.
 *
 * Memory is bounded whatever the disk size: the cache holds at most `cacheBytes` (keyed by
 * digest, so deduplicated chunks are cached once), and at most `fetchConcurrency` chunks are
 * being fetched at any time; the index itself is 32 bytes per chunk.
 *
 * `base:allocation` block status reports zero chunks as HOLE|ZERO, so `qemu-img convert`,
 * `qemu-img map` and `nbdcopy` skip them.
 */
import { promises as fs } from "node:fs";
import { dirname } from "node:path";
import type { BlockSource, Extent, NbdExport, NbdListenAddress, NbdTlsOptions } from "../nbd/index.js";
import { BASE_ALLOCATION, NbdServer, StateFlag } from "../nbd/index.js";
import type { FixedIndex } from "../repo/fixed-index.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, errnoCode, ioError, isNotFound, StrataError } from "../util/errors.js";
import { socketAccepts } from "../util/process.js";

export const DEFAULT_CACHE_BYTES = 256 * 1024 * 1024;
export const DEFAULT_READ_AHEAD = 4;

export interface ServeSourceOptions {
  /** Upper bound on cached chunk bytes. Default 256 MiB. */
  cacheBytes?: number;
  /** Chunks fetched ahead of a sequential reader. Default 4; 0 turns read-ahead off. */
  readAhead?: number;
  /** Chunks being fetched at once (demand and read-ahead). Default: codec threads × 2 + 2. */
  fetchConcurrency?: number;
}

/** Counters of one source's cache, for tests, logs and tuning. */
export interface CacheStats {
  /** Chunk lookups answered from the cache. */
  hits: number;
  /** Chunk lookups that fetched the chunk. */
  misses: number;
  /** Chunk lookups that joined a fetch already under way (demand or read-ahead). */
  joined: number;
  /** Chunk lookups of all-zero chunks (no I/O). */
  zeroChunks: number;
  /** Fetches started by read-ahead. */
  readAheadFetches: number;
  /** Chunks dropped from the cache to stay within its bound. */
  evictions: number;
  /** Fetches that failed (damaged or missing chunk, I/O error). */
  fetchErrors: number;
  /** Bytes in the cache now, and the most there ever were. */
  cachedBytes: number;
  peakCachedBytes: number;
  /** The bound. */
  cacheBytes: number;
  /** Most fetches in flight at once. */
  peakFetches: number;
}

/** Counters of a cache of `cacheBytes` that has seen nothing yet. */
export function emptyCacheStats(cacheBytes: number): CacheStats {
  return {
    hits: 0,
    misses: 0,
    joined: 0,
    zeroChunks: 0,
    readAheadFetches: 0,
    evictions: 0,
    fetchErrors: 0,
    cachedBytes: 0,
    peakCachedBytes: 0,
    cacheBytes,
    peakFetches: 0,
  };
}

/** A disk as served: read (and block status), with the counters of its chunk cache. */
export interface DiskSource extends BlockSource {
  stats(): CacheStats;
}

/**
 * A restore point whose disks are not (only) its chunks: an instant of a protected VM, its
 * journal over a base (src/engine/pit.ts). Everything that opens a restore point's disks goes
 * through {@link openSnapshotDisk}, so serve, files and instant take either.
 */
export interface DiskViewRef extends SnapshotRef {
  openDisk(disk: string, options: ServeSourceOptions): Promise<DiskSource>;
}

export function isDiskViewRef(snap: SnapshotRef): snap is DiskViewRef {
  return typeof (snap as Partial<DiskViewRef>).openDisk === "function";
}

/** Opens one disk of a restore point (or of an instant) as a source. */
export function openSnapshotDisk(
  repo: Repository,
  snap: SnapshotRef,
  disk: string,
  options: ServeSourceOptions = {},
): Promise<DiskSource> {
  if (isDiskViewRef(snap)) return snap.openDisk(disk, options);
  return RestorePointSource.open(repo, snap, disk, options);
}

export class RestorePointSource implements DiskSource {
  readonly size: number;
  /** digest hex → plaintext; Map order is recency (oldest first). */
  private readonly cache = new Map<string, Buffer>();
  private readonly fetching = new Map<string, Promise<Buffer>>();
  private readonly waiters: Array<() => void> = [];
  private active = 0;
  private readonly cacheBytes: number;
  private readonly readAhead: number;
  private readonly fetchConcurrency: number;
  private readonly counters: CacheStats;

  private constructor(
    private readonly repo: Repository,
    readonly index: FixedIndex,
    /** `vm/time/disk`, for messages. */
    readonly what: string,
    options: ServeSourceOptions,
  ) {
    this.size = index.size;
    this.cacheBytes = Math.max(0, options.cacheBytes ?? DEFAULT_CACHE_BYTES);
    // Read-ahead may fill at most half the cache, so it cannot evict what a reader is using.
    const fit = Math.floor(this.cacheBytes / index.chunkSize / 2);
    this.readAhead = Math.max(0, Math.min(options.readAhead ?? DEFAULT_READ_AHEAD, fit));
    this.fetchConcurrency = Math.max(1, options.fetchConcurrency ?? repo.codec().threads * 2 + 2);
    this.counters = emptyCacheStats(this.cacheBytes);
  }

  /** Opens one disk of a restore point (its index is read and verified now). */
  static async open(
    repo: Repository,
    snap: SnapshotRef,
    disk: string,
    options: ServeSourceOptions = {},
  ): Promise<RestorePointSource> {
    const index = await repo.index(snap, disk);
    return new RestorePointSource(repo, index, `${snap.vm}/${snap.time}/${disk}`, options);
  }

  stats(): CacheStats {
    return { ...this.counters };
  }

  async read(offset: number, length: number): Promise<Buffer> {
    if (offset < 0 || length < 0 || offset + length > this.size)
      throw new RangeError(`read ${offset}+${length} beyond ${this.what} (${this.size} bytes)`);
    if (length === 0) return Buffer.alloc(0);
    const cs = this.index.chunkSize;
    const first = Math.floor(offset / cs);
    const last = Math.floor((offset + length - 1) / cs);
    const sequential = first === 0 || this.index.isZero(first - 1) || this.cache.has(this.key(first - 1));
    if (this.readAhead > 0 && sequential) {
      this.prefetch(last + 1, last + this.readAhead);
    }
    if (first === last) {
      const chunk = await this.chunk(first);
      const start = offset - first * cs;
      // The cached buffer is never written to, so a view of it is safe to hand out.
      return chunk === undefined ? Buffer.alloc(length) : chunk.subarray(start, start + length);
    }
    const out = Buffer.alloc(length);
    await Promise.all(
      Array.from({ length: last - first + 1 }, async (_, k) => {
        const i = first + k;
        const chunk = await this.chunk(i);
        if (chunk === undefined) return;
        const from = Math.max(offset, i * cs);
        const to = Math.min(offset + length, i * cs + chunk.length);
        chunk.copy(out, from - offset, from - i * cs, to - i * cs);
      }),
    );
    return out;
  }

  async blockStatus(context: string, offset: number, length: number): Promise<Extent[]> {
    if (context !== BASE_ALLOCATION) throw new RangeError(`unknown meta context ${context}`);
    const cs = this.index.chunkSize;
    const end = Math.min(this.size, offset + length);
    const out: Extent[] = [];
    let pos = offset;
    // The server caps extents per reply anyway; stop early on a very fragmented disk.
    while (pos < end && out.length < 65536) {
      const i = Math.floor(pos / cs);
      const flags = this.index.isZero(i) ? StateFlag.HOLE | StateFlag.ZERO : 0;
      const stop = Math.min(end, (i + 1) * cs);
      const prev = out[out.length - 1];
      if (prev && prev.flags === flags) prev.length += stop - pos;
      else out.push({ offset: pos, length: stop - pos, flags });
      pos = stop;
    }
    return out;
  }

  /** Drops every cached chunk (fetches under way finish but are not kept). */
  clear(): void {
    this.cache.clear();
    this.counters.cachedBytes = 0;
  }

  // ---- chunks ---------------------------------------------------------------------------------

  private key(i: number): string {
    return this.index.digest(i).toString("hex");
  }

  /** Plaintext of chunk i, or undefined for an all-zero chunk. */
  private async chunk(i: number): Promise<Buffer | undefined> {
    if (this.index.isZero(i)) {
      this.counters.zeroChunks++;
      return undefined;
    }
    const key = this.key(i);
    const hit = this.cache.get(key);
    if (hit) {
      this.counters.hits++;
      this.cache.delete(key);
      this.cache.set(key, hit);
      return hit;
    }
    const pending = this.fetching.get(key);
    if (pending) {
      this.counters.joined++;
      return pending;
    }
    // Taking a free slot and registering the fetch happen in the same tick, so a concurrent
    // reader of the same chunk always finds the fetch under way.
    if (this.active < this.fetchConcurrency) this.active++;
    else {
      await new Promise<void>((resolve) => this.waiters.push(resolve));
      // Someone else may have fetched it, or started to, while this waited for a slot.
      const cached = this.cache.get(key);
      const other = cached === undefined ? this.fetching.get(key) : undefined;
      if (cached || other) {
        this.release();
        if (cached) this.counters.hits++;
        else this.counters.joined++;
        return cached ?? other!;
      }
    }
    this.counters.misses++;
    return this.fetch(i, key);
  }

  /** Fetches chunk i in a slot already taken; the slot is released when done. */
  private fetch(i: number, key: string): Promise<Buffer> {
    this.counters.peakFetches = Math.max(this.counters.peakFetches, this.active);
    const p = this.repo
      .readChunk(this.index.digest(i))
      .then((data) => {
        if (data.length !== this.index.chunkLength(i)) {
          throw new StrataError(
            ErrorCode.DATA_CORRUPT,
            `chunk ${key} has ${data.length} bytes, ${this.what} needs ${this.index.chunkLength(i)} at chunk ${i}`,
          );
        }
        this.remember(key, data);
        return data;
      })
      .catch((err: unknown) => {
        this.counters.fetchErrors++;
        throw err;
      })
      .finally(() => {
        this.fetching.delete(key);
        this.release();
      });
    this.fetching.set(key, p);
    return p;
  }

  /** Starts fetches of chunks first..last that are neither zero, cached nor under way, in free slots only. */
  private prefetch(first: number, last: number): void {
    for (let i = first; i <= Math.min(last, this.index.count - 1); i++) {
      if (this.active >= this.fetchConcurrency) return;
      if (this.index.isZero(i)) continue;
      const key = this.key(i);
      if (this.cache.has(key) || this.fetching.has(key)) continue;
      this.active++;
      this.counters.readAheadFetches++;
      // A failed read-ahead is not an error: the demand read will try again and report it.
      this.fetch(i, key).catch(() => {});
    }
  }

  private remember(key: string, data: Buffer): void {
    if (data.length > this.cacheBytes) return;
    const old = this.cache.get(key);
    if (old) {
      this.cache.delete(key);
      this.counters.cachedBytes -= old.length;
    }
    while (this.counters.cachedBytes + data.length > this.cacheBytes) {
      const oldest = this.cache.keys().next();
      if (oldest.done) break;
      this.counters.cachedBytes -= this.cache.get(oldest.value)!.length;
      this.cache.delete(oldest.value);
      this.counters.evictions++;
    }
    this.cache.set(key, data);
    this.counters.cachedBytes += data.length;
    this.counters.peakCachedBytes = Math.max(this.counters.peakCachedBytes, this.counters.cachedBytes);
  }

  private release(): void {
    const next = this.waiters.shift();
    if (next) next();
    else this.active--;
  }
}

// ---- serving ----------------------------------------------------------------------------------

export interface ServeOptions extends ServeSourceOptions {
  /** Disks to export (export name = disk name). Default: every disk of the restore point. */
  disks?: readonly string[];
  /** A unix socket path, or a TCP port (0 picks one) on `host` (default 127.0.0.1). */
  listen: { path: string } | { port: number; host?: string };
  /** NBD requests handled at once per connection. Default 16. */
  maxInFlight?: number;
  /** Errors of single connections (the connection is closed; serving goes on). */
  onError?: (err: Error) => void;
  /**
   * TLS with required client certificates (NBD_OPT_STARTTLS). Required for TCP: a decrypted
   * disk is never offered to whoever can reach a port. A unix socket is made owner-only instead.
   */
  tls?: NbdTlsOptions;
}

export interface ServedDisk {
  name: string;
  size: number;
  source: DiskSource;
}

/** A running read-only NBD server over a restore point. */
export interface RunningServe {
  exports: ServedDisk[];
  address: NbdListenAddress;
  /** Stops listening, drops connections and removes the socket file. */
  close(): Promise<void>;
}

/**
 * Exports disks of a restore point read-only over NBD. The caller holds the repository's read
 * lock for as long as this serves.
 */
export async function serveRestorePoint(
  repo: Repository,
  snap: SnapshotRef,
  options: ServeOptions,
): Promise<RunningServe> {
  if (!("path" in options.listen) && options.tls === undefined) {
    throw new StrataError(
      ErrorCode.USAGE,
      "serving over TCP needs TLS with client certificates (--tls-cert, --tls-key, --tls-ca): anyone who can reach the port could read the disks; use a unix socket (--socket) otherwise",
    );
  }
  const names = options.disks ?? snap.manifest.disks.map((d) => d.name);
  if (names.length === 0)
    throw new StrataError(ErrorCode.NOT_FOUND, `restore point ${snap.vm}/${snap.time} has no disks`);
  const served: ServedDisk[] = [];
  for (const name of names) {
    const source = await openSnapshotDisk(repo, snap, name, options);
    served.push({ name, size: source.size, source });
  }
  const exports: Record<string, NbdExport> = {};
  for (const d of served)
    exports[d.name] = { source: d.source, readOnly: true, description: `${snap.vm}/${snap.time} ${d.name}` };
  const server = new NbdServer({
    exports,
    ...(options.maxInFlight === undefined ? {} : { maxInFlight: options.maxInFlight }),
    ...(options.onError === undefined ? {} : { onError: options.onError }),
    ...(options.tls === undefined ? {} : { tls: options.tls }),
  });
  const where = options.listen;
  if ("path" in where) await prepareSocketPath(where.path);
  let address: NbdListenAddress;
  // The socket is created owner-only (connecting to a unix socket needs write permission on it):
  // no window in which another local user could connect.
  const umask = "path" in where ? process.umask(0o077) : undefined;
  try {
    address = await server.listen(where);
  } catch (err) {
    await server.close().catch(() => {});
    const at = "path" in where ? where.path : `${where.host ?? "127.0.0.1"}:${where.port}`;
    if (errnoCode(err) === "EADDRINUSE")
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `cannot listen on ${at}: already in use`, {
        cause: err,
      });
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot listen on ${at}`, err);
  } finally {
    if (umask !== undefined) process.umask(umask);
  }
  let closed: Promise<void> | undefined;
  return {
    exports: served,
    address,
    close() {
      closed ??= (async () => {
        await server.close();
        if ("path" in where) await fs.rm(where.path, { force: true });
      })();
      return closed;
    },
  };
}

/** Checks a socket path's directory, and removes a stale socket nobody listens on. */
async function prepareSocketPath(path: string): Promise<void> {
  const dir = dirname(path);
  const d = await fs.stat(dir).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw ioError(ErrorCode.USAGE, `cannot use socket directory ${dir}`, err);
  });
  if (!d?.isDirectory())
    throw new StrataError(ErrorCode.USAGE, `socket directory ${dir} does not exist (create it first)`);
  const st = await fs.lstat(path).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw ioError(ErrorCode.TARGET_CONFLICT, `cannot inspect ${path}`, err);
  });
  if (!st) return;
  if (!st.isSocket())
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists and is not a socket: not replacing it`);
  if (await socketAccepts(path))
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `something is already listening on ${path}`);
  await fs.rm(path, { force: true });
}
