/**
 * A store whose uploads wait for a bandwidth limiter first (src/util/throttle.ts): only `put`
 * changes, so what a command sends to the store is held to the limit, and reads, listings and
 * deletes are not counted. `strata copy --limit` puts one around the target repository's store.
 */
import { type Limiter, takeWith } from "../util/throttle.js";
import type { Store } from "./store.js";

export function throttleStore(store: Store, limiter: Limiter, signal?: AbortSignal): Store {
  const take = takeWith(limiter, signal);
  const put: Store["put"] = async (key, data, options) => {
    await take(data.length);
    return store.put(key, data, options);
  };
  return new Proxy(store, {
    get(target, prop) {
      if (prop === "put") return put;
      const v = Reflect.get(target, prop, target) as unknown;
      return typeof v === "function" ? (v as (...a: unknown[]) => unknown).bind(target) : v;
    },
  });
}
