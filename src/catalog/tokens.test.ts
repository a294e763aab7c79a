import assert from "node:assert/strict";
import { mkdtempSync, readFileSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { FakeClock } from "../util/clock.js";
import { ErrorCode, isStrataError } from "../util/errors.js";
import { Catalog } from "./catalog.js";
import { ACTIONS, allows, authorize } from "./roles.js";
import { createToken, listTokens, revokeToken, verifyToken } from "./tokens.js";

const T0 = Date.UTC(2026, 10, 20, 2, 0, 0);

function catalog(t: TestContext, clock: FakeClock): { c: Catalog; path: string } {
  const dir = mkdtempSync(join(tmpdir(), "strata-tokens-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const path = join(dir, "catalog.db");
  const c = Catalog.open(path, { clock });
  t.after(() => c.close());
  return { c, path };
}

const unauthorized = (pattern: RegExp) => (e: unknown) =>
  isStrataError(e, ErrorCode.UNAUTHORIZED) && pattern.test(e.message);

test("a created token verifies to its role, and only its SHA-256 is stored", (t) => {
  const clock = new FakeClock(T0);
  const { c, path } = catalog(t, clock);
  const { token, info } = createToken(c, { role: "operator", name: "ops", clock });
  assert.match(token, /^strata_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
  assert.equal(info.role, "operator");
  clock.advance(5000);
  const v = verifyToken(c, token, clock);
  assert.deepEqual([v.id, v.name, v.role], [info.id, "ops", "operator"]);
  assert.equal(listTokens(c)[0]?.lastUsedAt, T0 + 5000);
  c.close();
  const secret = token.slice(24);
  const file = readFileSync(path);
  const wal = (() => {
    try {
      return readFileSync(`${path}-wal`);
    } catch {
      return Buffer.alloc(0);
    }
  })();
  assert.equal(file.includes(secret), false, "the secret is not in the catalog");
  assert.equal(wal.includes(secret), false, "the secret is not in the WAL");
});

test("a malformed, unknown, tampered, revoked or expired token is refused, saying which", (t) => {
  const clock = new FakeClock(T0);
  const { c } = catalog(t, clock);
  const { token, info } = createToken(c, { role: "read", clock });
  assert.throws(() => verifyToken(c, "", clock), unauthorized(/malformed/));
  assert.throws(() => verifyToken(c, "Bearer xyz", clock), unauthorized(/malformed/));
  const other = `strata_${"0".repeat(16)}_${token.slice(24)}`;
  assert.throws(() => verifyToken(c, other, clock), unauthorized(/unknown or its secret is wrong/));
  const last = token.at(-1) === "A" ? "B" : "A";
  const tampered = token.slice(0, -1) + last;
  assert.throws(
    () => verifyToken(c, tampered, clock),
    (e) => {
      assert.ok(unauthorized(/unknown or its secret is wrong/)(e));
      assert.equal((e as Error).message.includes(tampered.slice(24)), false, "never echoes the secret");
      return true;
    },
  );
  const short = createToken(c, { role: "backup", expiresInMs: 60_000, clock });
  clock.advance(59_999);
  assert.equal(verifyToken(c, short.token, clock).role, "backup");
  clock.advance(1);
  assert.throws(() => verifyToken(c, short.token, clock), unauthorized(/expired/));
  revokeToken(c, info.id);
  assert.throws(() => verifyToken(c, token, clock), unauthorized(/revoked/));
  assert.throws(
    () => revokeToken(c, info.id),
    (e) => isStrataError(e, ErrorCode.USAGE),
  );
  assert.throws(
    () => revokeToken(c, "feedfeedfeedfeed"),
    (e) => isStrataError(e, ErrorCode.NOT_FOUND),
  );
});

test("roles: backup only adds restore points; read only reads; operator cannot remove data; admin can all", () => {
  for (const a of [
    "forget.run",
    "gc.run",
    "restore.start",
    "files.read",
    "points.list",
    "tokens.manage",
  ] as const)
    assert.equal(allows("backup", a), false, `backup may not ${a}`);
  assert.equal(allows("backup", "backup.start"), true);
  for (const a of ["backup.start", "restore.start", "forget.run", "jobs.cancel"] as const)
    assert.equal(allows("read", a), false, `read may not ${a}`);
  assert.equal(allows("read", "points.list"), true);
  for (const a of ["forget.run", "gc.run", "tokens.manage", "jobs.manage"] as const)
    assert.equal(allows("operator", a), false, `operator may not ${a}`);
  for (const a of ["restore.start", "files.read", "instant.manage", "backup.start"] as const)
    assert.equal(allows("operator", a), true, `operator may ${a}`);
  for (const a of ACTIONS) assert.equal(allows("admin", a), true, `admin may ${a}`);
  assert.throws(
    () => authorize("backup", "forget.run", "abc"),
    (e) =>
      isStrataError(e, ErrorCode.FORBIDDEN) && /abc \(role backup\) may not do forget\.run/.test(e.message),
  );
});
