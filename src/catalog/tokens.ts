/**
 * API tokens: `strata_<id>_<secret>`, where `id` (16 hex digits) is public, shown in lists and
 * logs and used to find the row, and `secret` is 256 random bits (base64url). The catalog keeps
 * only SHA-256 of the secret.
 *
 * A plain SHA-256 is enough here, where a password would need scrypt: a slow hash protects a
 * low-entropy secret that an attacker with the hash could guess. A 256-bit random secret cannot
 * be guessed, so a stolen catalog gives nothing a brute force could use, and checking a token
 * stays a microsecond on every API call instead of scrypt's tens of milliseconds (which would
 * also make the API an easy CPU sink). The comparison runs in constant time.
 */
import { createHash, randomBytes, timingSafeEqual } from "node:crypto";
import { type Clock, systemClock } from "../util/clock.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { Catalog, TokenRow } from "./catalog.js";
import { ROLES, type Role } from "./schema.js";

const TOKEN_RE = /^strata_([0-9a-f]{16})_([A-Za-z0-9_-]{43})$/;

export interface TokenInfo {
  id: string;
  name: string;
  role: Role;
  createdAt: number;
  expiresAt: number | null;
  lastUsedAt: number | null;
  revokedAt: number | null;
}

function sha256(text: string): Buffer {
  return createHash("sha256").update(text).digest();
}

export function isRole(text: string): text is Role {
  return (ROLES as readonly string[]).includes(text);
}

function info(row: TokenRow): TokenInfo {
  const { secretSha256: _hash, ...rest } = row;
  return rest;
}

/**
 * Creates a token and returns it with its secret: the only time the secret exists outside the
 * caller's hands. `expiresInMs` limits its life; without it the token lives until revoked.
 */
export function createToken(
  catalog: Catalog,
  options: { role: Role; name?: string; expiresInMs?: number; clock?: Clock },
): { token: string; info: TokenInfo } {
  if (!isRole(options.role))
    throw new StrataError(ErrorCode.USAGE, `unknown role "${options.role}": use ${ROLES.join(", ")}`);
  const now = (options.clock ?? systemClock).now();
  const id = randomBytes(8).toString("hex");
  const secret = randomBytes(32).toString("base64url");
  const row = {
    id,
    name: options.name ?? `${options.role}-${id.slice(0, 6)}`,
    role: options.role,
    secretSha256: sha256(secret),
    createdAt: now,
    expiresAt: options.expiresInMs === undefined ? null : now + options.expiresInMs,
  };
  catalog.insertToken(row);
  return {
    token: `strata_${id}_${secret}`,
    info: { ...info({ ...row, lastUsedAt: null, revokedAt: null }) },
  };
}

/**
 * The token's id, name and role when `token` is valid now; UNAUTHORIZED (saying why, never
 * echoing the secret) when it is malformed, unknown, wrong, revoked or expired.
 */
export function verifyToken(catalog: Catalog, token: string, clock: Clock = systemClock): TokenInfo {
  const m = TOKEN_RE.exec(token.trim());
  if (!m)
    throw new StrataError(ErrorCode.UNAUTHORIZED, "malformed API token (expected strata_<id>_<secret>)");
  const [, id, secret] = m as unknown as [string, string, string];
  const row = catalog.token(id);
  // The same work for an unknown id as for a wrong secret: no timing tells which ids exist.
  const expected = row?.secretSha256 ?? Buffer.alloc(32);
  const match = timingSafeEqual(sha256(secret), expected) && row !== undefined;
  if (!match)
    throw new StrataError(ErrorCode.UNAUTHORIZED, `API token ${id} is unknown or its secret is wrong`);
  if (row.revokedAt !== null)
    throw new StrataError(
      ErrorCode.UNAUTHORIZED,
      `API token ${id} (${row.name}) was revoked on ${new Date(row.revokedAt).toISOString()}`,
    );
  const now = clock.now();
  if (row.expiresAt !== null && row.expiresAt <= now)
    throw new StrataError(
      ErrorCode.UNAUTHORIZED,
      `API token ${id} (${row.name}) expired on ${new Date(row.expiresAt).toISOString()}`,
    );
  catalog.touchToken(id);
  return info({ ...row, lastUsedAt: now });
}

export function listTokens(catalog: Catalog): TokenInfo[] {
  return catalog.tokens().map(info);
}

/** Revokes the token with this id (the `strata_<id>_...` part, as `token list` shows it). */
export function revokeToken(catalog: Catalog, id: string): TokenInfo {
  const row = catalog.token(id);
  if (!row) throw new StrataError(ErrorCode.NOT_FOUND, `no API token with id ${id} in ${catalog.path}`);
  if (!catalog.revokeToken(id))
    throw new StrataError(
      ErrorCode.USAGE,
      `API token ${id} (${row.name}) was revoked already, on ${new Date(row.revokedAt!).toISOString()}`,
    );
  return info(catalog.token(id)!);
}
