/**
 * The repository key: 64 random bytes (32 for AES-256-GCM, 32 for HMAC-SHA-256), stored in
 * `keys/default` wrapped with AES-256-GCM under a key derived from the password by scrypt.
 * A wrong password fails the GCM tag, which is reported as WRONG_PASSWORD.
 */
import {
  createCipheriv,
  createDecipheriv,
  createHash,
  createHmac,
  randomBytes,
  scrypt,
  timingSafeEqual,
} from "node:crypto";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { CodecKeys } from "./codec.js";
import { sealJson, unsealJson } from "./sealed-json.js";

export interface KeyFile {
  format: "strata-key";
  version: 1;
  kdf: "scrypt";
  /** scrypt cost parameters. */
  N: number;
  r: number;
  p: number;
  salt: string;
  nonce: string;
  tag: string;
  /** The 64 key bytes, encrypted, base64. */
  data: string;
  created: string;
  /**
   * "hmac-sha256": the repository's config is sealed with the MAC key, and a config under a
   * plain seal is refused. Bound to the wrapped key (GCM additional data {@link CONFIG_SEAL_AAD}),
   * so removing it fails the tag. Absent in key files written before configs were keyed.
   */
  configSeal?: "hmac-sha256";
}

/** GCM additional data of a key file with `configSeal`: the field can't be removed unnoticed. */
export const CONFIG_SEAL_AAD = "strata key: config sealed with hmac-sha256";

export interface OpenedKey {
  keys: CodecKeys;
  /** The config must carry an HMAC seal (the key file says so, authenticated). */
  configSealed: boolean;
  created: string;
  cost: { N: number; r: number; p: number };
}

/** scrypt cost: 2^17 × 8 × 128 B = 128 MiB and about half a second, the OWASP recommendation. */
export const SCRYPT_DEFAULTS = { N: 2 ** 17, r: 8, p: 1 } as const;

/**
 * Somewhere to keep derived wrapping keys between commands on one host (the kernel keyring; see
 * src/cli/kdf-cache.ts), so that every command does not pay scrypt's half second and 128 MiB.
 * A cache never decides anything: a miss or an error means "derive it".
 */
export interface KdfCache {
  get(name: string): Promise<Buffer | undefined>;
  set(name: string, value: Buffer): Promise<void>;
}

/**
 * The key that wraps the repository key, from scrypt or from `cache`. A cache entry is named by
 * the KDF's salt and cost (not by anything of the password) and holds the derived key with
 * HMAC(derived key, password), so an entry answers only the password it was derived from.
 */
async function derive(
  password: string,
  salt: Buffer,
  N: number,
  r: number,
  p: number,
  cache?: KdfCache,
): Promise<Buffer> {
  const name = createHash("sha256")
    .update(`strata scrypt ${N} ${r} ${p} `)
    .update(salt)
    .digest("hex")
    .slice(0, 32);
  const check = (key: Buffer) =>
    createHmac("sha256", key).update("strata kdf cache ").update(password).digest();
  const hit = await cache?.get(name).catch(() => undefined);
  if (hit?.length === 64) {
    const key = hit.subarray(0, 32);
    if (timingSafeEqual(check(key), hit.subarray(32))) return Buffer.from(key);
  }
  const key = await new Promise<Buffer>((resolve, reject) => {
    scrypt(password, salt, 32, { N, r, p, maxmem: 256 * N * r + 16 * 1024 * 1024 }, (err, k) =>
      err ? reject(err) : resolve(k),
    );
  });
  await cache?.set(name, Buffer.concat([key, check(key)])).catch(() => {});
  return key;
}

export async function createKeyFile(
  password: string,
  created: string,
  cost: { N: number; r: number; p: number } = SCRYPT_DEFAULTS,
  master: Buffer = randomBytes(64),
  cache?: KdfCache,
): Promise<{ file: Buffer; keys: CodecKeys }> {
  const salt = randomBytes(16);
  const nonce = randomBytes(12);
  const wrap = await derive(password, salt, cost.N, cost.r, cost.p, cache);
  const cipher = createCipheriv("aes-256-gcm", wrap, nonce);
  cipher.setAAD(Buffer.from(CONFIG_SEAL_AAD));
  const data = Buffer.concat([cipher.update(master), cipher.final()]);
  const doc: KeyFile = {
    format: "strata-key",
    version: 1,
    kdf: "scrypt",
    ...cost,
    salt: salt.toString("base64"),
    nonce: nonce.toString("base64"),
    tag: cipher.getAuthTag().toString("base64"),
    data: data.toString("base64"),
    created,
    configSeal: "hmac-sha256",
  };
  return { file: sealJson(doc), keys: splitKeys(master) };
}

export async function openKeyFile(
  bytes: Buffer,
  password: string,
  where: string,
  cache?: KdfCache,
): Promise<OpenedKey> {
  const r = unsealJson<KeyFile>(bytes);
  if (!r.ok) throw new StrataError(ErrorCode.REPO_CORRUPT, `key file ${where} is damaged: ${r.why}`);
  const k = r.doc;
  if (k.format !== "strata-key" || k.version !== 1 || k.kdf !== "scrypt") {
    throw new StrataError(ErrorCode.REPO_VERSION, `key file ${where} has an unknown format or version`);
  }
  if (k.configSeal !== undefined && k.configSeal !== "hmac-sha256")
    throw new StrataError(ErrorCode.REPO_VERSION, `key file ${where} names an unknown config seal`);
  const wrap = await derive(password, Buffer.from(k.salt, "base64"), k.N, k.r, k.p, cache);
  const decipher = createDecipheriv("aes-256-gcm", wrap, Buffer.from(k.nonce, "base64"));
  decipher.setAuthTag(Buffer.from(k.tag, "base64"));
  if (k.configSeal !== undefined) decipher.setAAD(Buffer.from(CONFIG_SEAL_AAD));
  let master: Buffer;
  try {
    master = Buffer.concat([decipher.update(Buffer.from(k.data, "base64")), decipher.final()]);
  } catch {
    throw new StrataError(
      ErrorCode.WRONG_PASSWORD,
      `wrong password: it does not open the repository key (or ${where} was changed)`,
    );
  }
  if (master.length !== 64)
    throw new StrataError(ErrorCode.REPO_CORRUPT, `key file ${where} holds a key of the wrong size`);
  return {
    keys: splitKeys(master),
    configSealed: k.configSeal === "hmac-sha256",
    created: k.created,
    cost: { N: k.N, r: k.r, p: k.p },
  };
}

/** The 64 key bytes again, for re-wrapping them (a legacy key file upgraded to `configSeal`). */
export function joinKeys(keys: CodecKeys): Buffer {
  return Buffer.concat([keys.encKey, keys.macKey]);
}

function splitKeys(master: Buffer): CodecKeys {
  return { encKey: Buffer.from(master.subarray(0, 32)), macKey: Buffer.from(master.subarray(32, 64)) };
}

/** A public name of a key that reveals nothing of it: HMAC(macKey, "strata key fingerprint"), 16 bytes. */
export function keyFingerprint(keys: CodecKeys): string {
  return createHmac("sha256", keys.macKey).update("strata key fingerprint").digest("hex").slice(0, 32);
}
