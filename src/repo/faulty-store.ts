/**
 * A store that fails on purpose: it wraps another store and injects errors, full disks, torn
 * writes and slow I/O into chosen methods, from a seeded sequence so that a failing run can be
 * replayed. A test double shipped with the Store contract (as kopia's faulty storage is): the
 * failure tests drive backups, restores and gc through it and check that nothing reported as
 * saved is lost.
 *
 * Faults:
 *  - `error`: the call throws EIO before touching the inner store.
 *  - `enospc`: the call throws ENOSPC (a full disk) before touching the inner store.
 *  - `torn`: a put leaves a truncated temporary object beside the key (what a put that died
 *    mid-way leaves on a real store) and throws EIO; the key itself is not written, as the
 *    contract's atomic put demands.
 *  - `slow`: the call waits `delayMs` first, then goes through.
 */
import { randomBytes } from "node:crypto";
import type { ObjectInfo, PutOptions, Store } from "./store.js";

export type Fault = "error" | "enospc" | "torn" | "slow";
export type FaultyMethod = "get" | "put" | "touch" | "stat" | "delete" | "deleteIfUntouched" | "flush";

export interface FaultRule {
  method: FaultyMethod;
  fault: Fault;
  /** Chance per call, 0..1. */
  probability: number;
  /** Only keys starting with this. */
  prefix?: string;
  /** For `slow`: how long. */
  delayMs?: number;
}

/** An error like the one Node's fs gives, with `code`. */
export function ioFault(code: "EIO" | "ENOSPC", what: string): NodeJS.ErrnoException {
  const message = code === "ENOSPC" ? "no space left on device" : "input/output error";
  const err = new Error(`${code}: ${message} (injected), ${what}`) as NodeJS.ErrnoException;
  err.code = code;
  err.errno = code === "ENOSPC" ? -28 : -5;
  err.syscall = "write";
  return err;
}

export class FaultyStore implements Store {
  private state: number;
  /** Faults injected so far, by kind. */
  readonly injected: Record<Fault, number> = { error: 0, enospc: 0, torn: 0, slow: 0 };
  rules: FaultRule[] = [];

  constructor(
    readonly inner: Store,
    seed: number,
  ) {
    this.state = seed >>> 0 || 1;
  }

  get location(): string {
    return this.inner.location;
  }

  /** xorshift32: the fault sequence follows from the seed alone. */
  private random(): number {
    let x = this.state;
    x ^= x << 13;
    x ^= x >>> 17;
    x ^= x << 5;
    this.state = x >>> 0;
    return this.state / 0x1_0000_0000;
  }

  /** The fault this call gets, if any; throws for error faults. */
  private async inject(method: FaultyMethod, key: string): Promise<Fault | undefined> {
    for (const r of this.rules) {
      if (r.method !== method || (r.prefix !== undefined && !key.startsWith(r.prefix))) continue;
      if (this.random() >= r.probability) continue;
      this.injected[r.fault]++;
      switch (r.fault) {
        case "slow":
          await new Promise((res) => setTimeout(res, r.delayMs ?? 50));
          continue;
        case "error":
          throw ioFault("EIO", `${method} ${key}`);
        case "enospc":
          throw ioFault("ENOSPC", `${method} ${key}`);
        case "torn":
          return "torn";
      }
    }
    return undefined;
  }

  async get(key: string): Promise<Buffer> {
    await this.inject("get", key);
    return this.inner.get(key);
  }

  async getRange(key: string, offset: number, length: number, into?: Uint8Array): Promise<Buffer> {
    await this.inject("get", key);
    return this.inner.getRange(key, offset, length, into);
  }

  async put(key: string, data: Uint8Array, options?: PutOptions): Promise<void> {
    if ((await this.inject("put", key)) === "torn") {
      const part = data.subarray(0, Math.floor(data.length / 2));
      await this.inner.put(`${key}.tmp-torn-${randomBytes(4).toString("hex")}`, Uint8Array.from(part));
      throw ioFault("EIO", `put ${key} (torn after ${part.length} of ${data.length} bytes)`);
    }
    return this.inner.put(key, data, options);
  }

  async touch(key: string): Promise<boolean> {
    await this.inject("touch", key);
    return this.inner.touch(key);
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    await this.inject("stat", key);
    return this.inner.stat(key);
  }

  list(prefix: string): AsyncIterable<ObjectInfo> {
    return this.inner.list(prefix);
  }

  async delete(key: string): Promise<void> {
    await this.inject("delete", key);
    return this.inner.delete(key);
  }

  deletePrefix(prefix: string): Promise<void> {
    return this.inner.deletePrefix(prefix);
  }

  async deleteIfUntouched(key: string, cutoffMs: number): Promise<boolean> {
    await this.inject("deleteIfUntouched", key);
    return this.inner.deleteIfUntouched(key, cutoffMs);
  }

  sweepTemporary(cutoffMs: number): Promise<number> {
    return this.inner.sweepTemporary(cutoffMs);
  }

  async flush(): Promise<void> {
    await this.inject("flush", "");
    return this.inner.flush();
  }

  async close(): Promise<void> {
    await this.inner.close?.();
  }

  isNotFound(err: unknown): boolean {
    return this.inner.isNotFound(err);
  }

  isTooLarge(err: unknown): boolean {
    return this.inner.isTooLarge?.(err) ?? false;
  }
}
