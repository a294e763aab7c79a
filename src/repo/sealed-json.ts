/**
 * JSON documents that carry their own checksum (config, manifests, key files).
 *
 * The file is `JSON.stringify(doc, null, 2) + "\n"` where the last field, `seal`, is
 * "sha256:<hex>" (or "hmac-sha256:<hex>" under a key) over the same serialisation of the
 * document without `seal`. Reading re-serialises what it parsed and demands the exact bytes of
 * the file, so any changed byte, whitespace included, is caught.
 */
import { createHash, createHmac, timingSafeEqual } from "node:crypto";

export type SealKey = Buffer | undefined;

function sealOf(body: string, key: SealKey): string {
  return key
    ? `hmac-sha256:${createHmac("sha256", key).update(body).digest("hex")}`
    : `sha256:${createHash("sha256").update(body).digest("hex")}`;
}

/** Serialises `doc` with a seal as its last field. */
export function sealJson(doc: object, key?: SealKey): Buffer {
  const body = JSON.stringify(doc, null, 2);
  return Buffer.from(`${JSON.stringify({ ...doc, seal: sealOf(body, key) }, null, 2)}\n`);
}

export type UnsealResult<T> = { ok: true; doc: T } | { ok: false; why: string };

/**
 * Parses and checks a sealed document. `key` is required when the seal is an HMAC; a document
 * sealed with a plain hash is refused when `requireKey` is set (an attacker can recompute one).
 */
export function unsealJson<T extends object>(
  bytes: Uint8Array,
  key?: SealKey,
  requireKey = false,
): UnsealResult<T> {
  const text = Buffer.from(bytes).toString("utf8");
  let parsed: unknown;
  try {
    parsed = JSON.parse(text);
  } catch (err) {
    return { ok: false, why: `not valid JSON (${(err as Error).message})` };
  }
  if (typeof parsed !== "object" || parsed === null || Array.isArray(parsed))
    return { ok: false, why: "not an object" };
  const { seal, ...doc } = parsed as Record<string, unknown>;
  if (typeof seal !== "string") return { ok: false, why: "no seal" };
  if (`${JSON.stringify(parsed, null, 2)}\n` !== text)
    return { ok: false, why: "not in canonical form (bytes changed)" };
  const isHmac = seal.startsWith("hmac-sha256:");
  if (isHmac && !key) return { ok: false, why: "sealed with a key, none given" };
  if (!isHmac && requireKey) return { ok: false, why: "not signed with the repository key" };
  const expected = sealOf(JSON.stringify(doc, null, 2), isHmac ? key : undefined);
  const a = Buffer.from(seal);
  const b = Buffer.from(expected);
  if (a.length !== b.length || !timingSafeEqual(a, b)) return { ok: false, why: "checksum mismatch" };
  return { ok: true, doc: doc as T };
}
