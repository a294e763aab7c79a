/**
 * AES-256-GCM in memory the caller gives: native/aead.c, built by scripts/build-native.mjs.
 *
 * Node's Cipher and Decipher return every output in new memory, zero-filled and freed only when
 * the collector runs. For chunk payloads that is a second pass over every byte and, where a first
 * touch of a page is dear (a paravirtualised guest: ~11 µs a page), most of the cost of
 * encryption: decrypting 550 MB in 500 KiB chunks took 329-331 ms with 9,800 page faults through
 * Node's Decipher, 131-136 ms with 143 through the addon. The addon calls the OpenSSL the node
 * binary is linked with and produces the same bytes; where it is missing (not built, or
 * STRATA_NATIVE_AEAD=0), codec.ts uses Node's crypto as before.
 */
import { createRequire } from "node:module";
import { fileURLToPath } from "node:url";

export interface NativeAead {
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
}

/** Where the addon is built: the checkout's native/ (dist/src/repo and dist/src/bundle sit three deep). */
export const NATIVE_AEAD_PATH = fileURLToPath(
  new URL("../../../native/build/Release/strata_aead.node", import.meta.url),
);

let loaded: NativeAead | null | undefined;

/** The addon, or undefined when it isn't built or STRATA_NATIVE_AEAD=0 turns it off. */
export function nativeAead(): NativeAead | undefined {
  if (loaded === undefined) {
    loaded = null;
    if (process.env.STRATA_NATIVE_AEAD !== "0") {
      try {
        loaded = createRequire(import.meta.url)(NATIVE_AEAD_PATH) as NativeAead;
      } catch {
        loaded = null;
      }
    }
  }
  return loaded ?? undefined;
}
