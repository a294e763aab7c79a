/**
 * A disk source whose reads wait for a bandwidth limiter first (src/util/throttle.ts): only
 * `read` changes; allocation and change tracking are the source's own, so skipped chunks cost
 * nothing against the limit.
 */
import { type Limiter, takeWith } from "../util/throttle.js";
import type { DiskSource } from "./backup.js";

export function throttleDisk<D extends DiskSource>(disk: D, limiter: Limiter, signal?: AbortSignal): D {
  const take = takeWith(limiter, signal);
  const read = async (offset: number, length: number, into?: Buffer) => {
    await take(length);
    return disk.read(offset, length, into);
  };
  return new Proxy(disk, {
    get(target, prop) {
      if (prop === "read") return read;
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
