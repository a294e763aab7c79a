/**
 * The storage contract every repository backend (local directory now, S3 later) must keep.
 * Stores do plain I/O on opaque keys ("packs/ab/ab12…", "vms/web1/2026-…/manifest.json");
 * they know nothing of what the bytes mean. Cross-cutting behaviour (retries, throttling,
 * fault injection in tests) wraps a store rather than living in one.
 *
 * Format v2 uses only what an S3 object store offers: get, range get ({@link Store.getRange}),
 * put of a whole object, list (with each object's creation time), delete, and stat (HEAD).
 * {@link Store.touch}, {@link Store.deleteIfUntouched} and {@link Store.getInto} serve format v1
 * repositories (one file per chunk), which only a local directory holds; {@link Store.flush} and
 * {@link Store.sweepTemporary} are a local store's housekeeping and do nothing elsewhere.
 */

export interface ObjectInfo {
  key: string;
  size: number;
  /** Last write or touch, milliseconds since the epoch (an object store: its creation). */
  mtimeMs: number;
}

/**
 * How much earlier than the writer's clock at the moment of writing an object's stored time
 * ({@link ObjectInfo.mtimeMs}) may be: object stores keep whole seconds, some file systems too
 * (ext4 with small inodes, FAT, NFS servers), and Linux stamps files from a clock that lags the
 * one processes read by up to a tick. gc compares stored times against its cutoff less this, so
 * that what a backup wrote just after it started never looks older than the backup. Clock skew
 * between hosts is what gc's grace covers, on top of this.
 */
export const STORE_TIME_SLACK_MS = 2_000;

/** S3 Object Lock modes: COMPLIANCE binds everyone; GOVERNANCE can be lifted with a special permission. */
export type RetentionMode = "COMPLIANCE" | "GOVERNANCE";

/** An object's retention: no one can delete or change it (that version of it) before `untilMs`. */
export interface Retention {
  mode: RetentionMode;
  untilMs: number;
}

export interface PutOptions {
  /** Puts the object under this retention (only on a store whose {@link Store.objectLock} is true). */
  retain?: Retention;
  /** Durable when put returns, not only after the next flush. */
  durable?: boolean;
  /**
   * The data starts on a 4 KiB boundary of memory, and the memory after it up to the next
   * multiple of 4 KiB may be read: a local store may then write it around the page cache
   * (O_DIRECT).
   */
  aligned?: boolean;
  /**
   * Called at most once, when the store no longer reads `data` (it is written, or copied): the
   * caller may reuse that memory before put returns. A store may never call it; the memory is
   * then the caller's again when put settles.
   */
  written?: () => void;
}

export interface Store {
  /** Where the store lives, for messages. */
  readonly location: string;

  /**
   * False for a store that cannot keep format v1's contract ({@link Store.touch},
   * {@link Store.deleteIfUntouched}): an object store. Such a store holds format v2 only.
   */
  readonly formatV1?: boolean;

  /** The object's bytes. Throws an error for which {@link Store.isNotFound} is true if absent. */
  get(key: string): Promise<Buffer>;

  /**
   * Writes an object atomically: readers see the old object, no object, or the whole new one,
   * never a part. The data is durable once {@link Store.flush} returns (or at once with
   * `durable: true`). Overwrites an existing object.
   */
  put(key: string, data: Uint8Array, options?: PutOptions): Promise<void>;

  /**
   * `length` bytes of an object from `offset`. With `into` (page-aligned memory whose length is a
   * multiple of 4 KiB), a local store may read around the page cache into it and return a view
   * of it. A range past the object's end is an error (a short object is damaged, not short).
   */
  getRange(key: string, offset: number, length: number, into?: Uint8Array): Promise<Buffer>;

  /**
   * Reads an object into `into` and returns its length, for stores that can read straight into
   * the caller's memory (around the page cache when `aligned`: `into` starts on a 4 KiB
   * boundary of memory and its length is a multiple of 4 KiB). An object longer than `into` is
   * an error for which {@link Store.isTooLarge} is true.
   */
  getInto?(key: string, into: Uint8Array, options?: { aligned?: boolean }): Promise<number>;

  /**
   * Marks an existing object as used now (its mtime becomes now) and returns true; returns
   * false if it does not exist. Used for "chunk already stored": a touched object is protected
   * from a concurrent {@link Store.deleteIfUntouched}.
   */
  touch(key: string): Promise<boolean>;

  /** Size and time of an object, or undefined if absent. */
  stat(key: string): Promise<ObjectInfo | undefined>;

  /** Every object whose key starts with `prefix` (a folder-like prefix ending in "/"), any order. */
  list(prefix: string): AsyncIterable<ObjectInfo>;

  /** Removes an object; absent is fine. */
  delete(key: string): Promise<void>;

  /** Removes every object under a folder-like prefix; absent is fine. */
  deletePrefix(prefix: string): Promise<void>;

  /**
   * Deletes the object only if it was not written or touched at or after `cutoffMs`, atomically
   * with respect to {@link Store.touch}: after this returns true, a touch that returned true
   * happened before the cutoff check and can't have kept the object. Returns whether it deleted.
   */
  deleteIfUntouched(key: string, cutoffMs: number): Promise<boolean>;

  /**
   * Removes leftovers of interrupted puts (temporary objects) last written before `cutoffMs`.
   * Returns how many it removed.
   */
  sweepTemporary(cutoffMs: number): Promise<number>;

  /** Makes every put since the last flush durable (directory entries included). */
  flush(): Promise<void>;

  /** Lets go of what the store keeps open between calls (read handles); it may be used again after. */
  close?(): Promise<void>;

  /**
   * True when the store can keep objects under a retention (an S3 bucket with Object Lock
   * enabled). Stores without it lack the retention methods or answer false.
   */
  objectLock?(): Promise<boolean>;

  /** The retention of an object's current version, or undefined (none, or absent). */
  retention?(key: string): Promise<Retention | undefined>;

  /**
   * Sets an existing object's retention to `retain` (a later time than it has; a store refuses
   * to shorten one).
   */
  extendRetention?(key: string, retain: Retention): Promise<void>;

  /**
   * Fails with a PERMISSION_DENIED StrataError when these credentials may not delete objects
   * outside `locks/` (a backup-only credential), before a command that deletes starts.
   */
  checkDelete?(): Promise<void>;

  /** True when `err` means "the object is under a retention and can't be deleted yet". */
  isLocked?(err: unknown): boolean;

  /** True when `err` means "no such object". */
  isNotFound(err: unknown): boolean;

  /** True when `err` means "the object is larger than the memory given to {@link Store.getInto}". */
  isTooLarge?(err: unknown): boolean;
}
