/**
 * Strata's native addon: native/strata.c, built by scripts/build-native.mjs (`npm run build`).
 * Everything it does has a slower fallback here: Strata runs without it.
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

export interface NativeAddon {
  /** Encrypts `data` in place with AES-256-GCM; writes the 16-byte tag into `tag`. */
  seal(key: Uint8Array, nonce: Uint8Array, aad: Uint8Array, data: Uint8Array, tag: Uint8Array): void;
  /** Decrypts `src` into `dst` (as long; may be the same memory); false when the tag doesn't match. */
  open(
    key: Uint8Array,
    nonce: Uint8Array,
    aad: Uint8Array,
    src: Uint8Array,
    dst: Uint8Array,
    tag: Uint8Array,
  ): boolean;
  /** Asks for transparent huge pages over `memory`'s whole 2 MiB pages; returns the bytes covered. */
  adviseHuge(memory: Uint8Array): number;
}

/** Where the addon is built: the checkout's native/ (dist/src/util and dist/src/bundle sit three deep). */
export const NATIVE_ADDON_PATH = fileURLToPath(
  new URL("../../../native/build/Release/strata_native.node", import.meta.url),
);

let loaded: NativeAddon | null | undefined;

/** The addon, or undefined when it isn't built (or doesn't load). */
export function nativeAddon(): NativeAddon | undefined {
  if (loaded === undefined) {
    try {
      loaded = createRequire(import.meta.url)(NATIVE_ADDON_PATH) as NativeAddon;
    } catch {
      loaded = null;
    }
  }
  return loaded ?? undefined;
}
