/**
 * AES-256-GCM in memory the caller gives: the native addon's seal and open (native/strata.c, see
 * src/util/native.ts).
 *
 * Node's Cipher and Decipher return every output in new memory, zero-filled and freed only when
 * the collector runs. For chunk payloads that is a second pass over every byte and, where a first
 * touch of a page is dear (a paravirtualised guest: ~11 µs a page), most of the cost of
 * encryption: decrypting 550 MB in 500 KiB chunks took 329-331 ms with 9,800 page faults through
 * Node's Decipher, 131-136 ms with 143 through the addon. The addon calls the OpenSSL the node
 * binary is linked with and produces the same bytes; where it is missing (not built, or
 * STRATA_NATIVE_AEAD=0), codec.ts uses Node's crypto as before.
 */
import { type NativeAddon, nativeAddon } from "../util/native.js";

export type NativeAead = Pick<NativeAddon, "seal" | "open">;

const disabled = process.env.STRATA_NATIVE_AEAD === "0";

/** The addon's AES-GCM, or undefined when it isn't built or STRATA_NATIVE_AEAD=0 turns it off. */
export function nativeAead(): NativeAead | undefined {
  return disabled ? undefined : nativeAddon();
}
