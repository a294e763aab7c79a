/**
 * The repository key: 64 random bytes (32 for AES-256-GCM, 32 for HMAC-SHA-256), stored in
 * `keys/default` wrapped with AES-256-GCM under a key derived from the password by scrypt.
 * A wrong password fails the GCM tag, which is reported as WRONG_PASSWORD.
 */
import { createCipheriv, createDecipheriv, createHmac, randomBytes, scrypt } from "node:crypto";
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
}

/** scrypt cost: 2^17 × 8 × 128 B = 128 MiB and about half a second, the OWASP recommendation. */
export const SCRYPT_DEFAULTS = { N: 2 ** 17, r: 8, p: 1 } as const;

function derive(password: string, salt: Buffer, N: number, r: number, p: number): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    scrypt(password, salt, 32, { N, r, p, maxmem: 256 * N * r + 16 * 1024 * 1024 }, (err, key) =>
      err ? reject(err) : resolve(key),
    );
  });
}

export async function createKeyFile(
  password: string,
  created: string,
  cost: { N: number; r: number; p: number } = SCRYPT_DEFAULTS,
): Promise<{ file: Buffer; keys: CodecKeys }> {
  const master = randomBytes(64);
  const salt = randomBytes(16);
  const nonce = randomBytes(12);
  const wrap = await derive(password, salt, cost.N, cost.r, cost.p);
  const cipher = createCipheriv("aes-256-gcm", wrap, nonce);
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
  };
  return { file: sealJson(doc), keys: splitKeys(master) };
}

export async function openKeyFile(bytes: Buffer, password: string, where: string): Promise<CodecKeys> {
  const r = unsealJson<KeyFile>(bytes);
  if (!r.ok) throw new StrataError(ErrorCode.REPO_CORRUPT, `key file ${where} is damaged: ${r.why}`);
  const k = r.doc;
  if (k.format !== "strata-key" || k.version !== 1 || k.kdf !== "scrypt") {
    throw new StrataError(ErrorCode.REPO_VERSION, `key file ${where} has an unknown format or version`);
  }
  const wrap = await derive(password, Buffer.from(k.salt, "base64"), k.N, k.r, k.p);
  const decipher = createDecipheriv("aes-256-gcm", wrap, Buffer.from(k.nonce, "base64"));
  decipher.setAuthTag(Buffer.from(k.tag, "base64"));
  let master: Buffer;
  try {
    master = Buffer.concat([decipher.update(Buffer.from(k.data, "base64")), decipher.final()]);
  } catch {
    throw new StrataError(ErrorCode.WRONG_PASSWORD, "wrong password: it does not open the repository key");
  }
  if (master.length !== 64)
    throw new StrataError(ErrorCode.REPO_CORRUPT, `key file ${where} holds a key of the wrong size`);
  return splitKeys(master);
}

function splitKeys(master: Buffer): CodecKeys {
  return { encKey: Buffer.from(master.subarray(0, 32)), macKey: Buffer.from(master.subarray(32, 64)) };
}

/** A public name of a key that reveals nothing of it: HMAC(macKey, "strata key fingerprint"), 16 bytes. */
export function keyFingerprint(keys: CodecKeys): string {
  return createHmac("sha256", keys.macKey).update("strata key fingerprint").digest("hex").slice(0, 32);
}
