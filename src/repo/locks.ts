/**
 * Repository locks: one object per holder under `locks/`.
 *
 * | kind      | taken by                     | conflicts with     |
 * |-----------|------------------------------|--------------------|
 * | backup    | backup (a writer)            | nothing            |
 * | read      | restore, verify, serve       | exclusive          |
 * | exclusive | forget, gc                   | read, exclusive    |
 *
 * Backups run beside gc: gc never sweeps a chunk written or touched at or after the oldest live
 * writer's start minus a grace period (see gc.ts), so writers only need to be seen, not excluded.
 *
 * A lock is stale, and anybody may remove it, when its process is gone: on the same host the PID
 * is dead or belongs to a newer process (start time differs); from another host, it has not
 * been refreshed for {@link STALE_AFTER_MS}. Holders refresh every {@link REFRESH_EVERY_MS}.
 *
 * A refresh that fails (the lock object can't be written, or is gone because another host
 * judged it stale) loses the lock: {@link Lock.check} throws LOCK_LOST from then on, and writers
 * stop rather than go on unseen by gc.
 *
 * A read lock on a repository that can't be written (read-only media, a directory the user may
 * only read) is not written at all: nobody can change such a repository through this path, and
 * readers must be able to restore from it. Conflicting locks are still looked for.
 */
import { randomBytes } from "node:crypto";
import { readFileSync } from "node:fs";
import { hostname } from "node:os";
import { z } from "zod";
import type { Clock } from "../util/clock.js";
import { ErrorCode, isStrataError, StrataError } from "../util/errors.js";
import { processAlive } from "../util/process.js";
import { keys } from "./format.js";
import type { Store } from "./store.js";

export type LockKind = "backup" | "read" | "exclusive";

export interface LockInfo {
  id: string;
  kind: LockKind;
  host: string;
  pid: number;
  /** The process's start time (from /proc), to tell a reused PID from the holder. */
  pidStart: string;
  started: number;
  refreshed: number;
  /** What the holder does, for messages: "backup web1", "gc". */
  what: string;
  /** For backups: the restore point folder it is writing, "vm/time". */
  claim?: string;
}

const time = z.number().int().min(0).max(8.64e15);

/**
 * What a lock object must hold. Others may write the repository: a lock that does not fit is
 * treated like one a crash left half-written (ignored, removed once old), never used in gc's
 * arithmetic.
 */
const LockSchema = z.object({
  id: z.string().regex(/^[0-9a-z-]{1,64}$/),
  kind: z.enum(["backup", "read", "exclusive"]),
  host: z.string().min(1).max(255),
  pid: z
    .number()
    .int()
    .min(1)
    .max(2 ** 31),
  pidStart: z.string().max(32),
  started: time,
  refreshed: time,
  what: z.string().max(1024),
  claim: z.string().max(256).optional(),
});

export const REFRESH_EVERY_MS = 5 * 60_000;
export const STALE_AFTER_MS = 30 * 60_000;

function conflicts(a: LockKind, b: LockKind): boolean {
  if (a === "exclusive") return b !== "backup";
  if (b === "exclusive") return a !== "backup";
  return false;
}

/** Start time of a process from /proc/PID/stat (field 22), or "" where unknown. */
export function processStart(pid: number): string {
  try {
    const stat = readFileSync(`/proc/${pid}/stat`, "utf8");
    const fields = stat.slice(stat.lastIndexOf(")") + 2).split(" ");
    return fields[19] ?? "";
  } catch {
    return "";
  }
}

export function isStale(lock: LockInfo, clock: Clock, host = hostname()): boolean {
  if (lock.host === host) {
    if (!processAlive(lock.pid)) return true;
    const start = processStart(lock.pid);
    return start !== "" && lock.pidStart !== "" && start !== lock.pidStart;
  }
  return clock.now() - lock.refreshed > STALE_AFTER_MS;
}

/** Every lock in the repository; unreadable ones (half-written by a crash) are removed when old. */
export async function listLocks(store: Store, clock: Clock, removeBroken = true): Promise<LockInfo[]> {
  const out: LockInfo[] = [];
  for await (const obj of store.list("locks/")) {
    try {
      out.push(LockSchema.parse(JSON.parse((await store.get(obj.key)).toString("utf8"))) as LockInfo);
    } catch (err) {
      if (store.isNotFound(err)) continue;
      if (removeBroken && clock.now() - obj.mtimeMs > STALE_AFTER_MS) await store.delete(obj.key);
    }
  }
  return out;
}

export interface LockOptions {
  /** How often the lock is refreshed (default {@link REFRESH_EVERY_MS}). */
  refreshEveryMs?: number;
}

export class Lock {
  private timer: NodeJS.Timeout | undefined;
  private released = false;
  /** Set when a refresh failed: the lock no longer protects its holder. */
  private lostError: StrataError | undefined;
  /** Not written: a read lock on a repository that can't be written. */
  private unwritten = false;

  private constructor(
    private readonly store: Store,
    readonly info: LockInfo,
  ) {}

  /** True when this is a read lock that could not be written (read-only repository). */
  get notWritten(): boolean {
    return this.unwritten;
  }

  /** Throws LOCK_LOST if a refresh failed. Writers call it before each step. */
  check(): void {
    if (this.lostError) throw this.lostError;
  }

  /**
   * Takes a lock of `kind`, or throws LOCKED naming the holder of a conflicting one. Stale
   * conflicting locks are removed first.
   */
  static async acquire(
    store: Store,
    clock: Clock,
    kind: LockKind,
    what: string,
    claim?: string,
    options: LockOptions = {},
  ): Promise<Lock> {
    const now = clock.now();
    const info: LockInfo = {
      id: `${now.toString(36)}-${randomBytes(6).toString("hex")}`,
      kind,
      host: hostname(),
      pid: process.pid,
      pidStart: processStart(process.pid),
      started: now,
      refreshed: now,
      what,
      ...(claim === undefined ? {} : { claim }),
    };
    const lock = new Lock(store, info);
    try {
      await lock.write();
    } catch (err) {
      if (
        kind !== "read" ||
        !isStrataError(err) ||
        (err.code !== ErrorCode.READ_ONLY && err.code !== ErrorCode.PERMISSION_DENIED)
      )
        throw err;
      lock.unwritten = true;
    }
    try {
      for (const other of await listLocks(store, clock, !lock.unwritten)) {
        if (other.id === info.id) continue;
        const clash = conflicts(kind, other.kind) || (claim !== undefined && other.claim === claim);
        if (!clash) continue;
        if (isStale(other, clock)) {
          if (!lock.unwritten) await store.delete(keys.lock(other.id));
          continue;
        }
        throw new StrataError(
          ErrorCode.LOCKED,
          `repository is locked by ${other.what} (${other.kind} lock, pid ${other.pid} on ${other.host}, since ${new Date(other.started).toISOString()})`,
        );
      }
    } catch (err) {
      await lock.release();
      throw err;
    }
    if (lock.unwritten) return lock;
    lock.timer = setInterval(() => {
      lock.refresh(clock).catch((err: unknown) => {
        lock.lostError ??= new StrataError(
          ErrorCode.LOCK_LOST,
          `lost the repository lock of ${what} in ${store.location}: ${err instanceof Error ? err.message : String(err)}; stopping, since another host's gc could now take it for dead`,
          { cause: err },
        );
        if (lock.timer) clearInterval(lock.timer);
      });
    }, options.refreshEveryMs ?? REFRESH_EVERY_MS);
    lock.timer.unref();
    return lock;
  }

  /** Rewrites the lock with a new time, if it is still there (gone: someone took it for stale). */
  private async refresh(clock: Clock): Promise<void> {
    if (this.released || this.lostError) return;
    if ((await this.store.stat(keys.lock(this.info.id))) === undefined)
      throw new Error("the lock object was removed (taken for stale by someone else)");
    this.info.refreshed = clock.now();
    await this.write();
  }

  private write(): Promise<void> {
    return this.store.put(keys.lock(this.info.id), Buffer.from(JSON.stringify(this.info)), { durable: true });
  }

  async release(): Promise<void> {
    if (this.released) return;
    this.released = true;
    if (this.timer) clearInterval(this.timer);
    if (!this.unwritten) await this.store.delete(keys.lock(this.info.id));
  }
}
