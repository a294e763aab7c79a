// strata token create/list/revoke through the real CLI, checked against verifyToken on the same
// catalog file.
import assert from "node:assert/strict";
import { join } from "node:path";
import { test } from "node:test";
import { Catalog } from "../../src/catalog/catalog.js";
import { verifyToken } from "../../src/catalog/tokens.js";
import { ErrorCode, isStrataError } from "../../src/util/errors.js";
import { strata, strataOk, tempDir } from "../helpers/cli.js";

test("token create prints the token once; list shows it without the secret; revoke stops it", async (t) => {
  const dir = tempDir(t);
  const catalog = join(dir, "catalog.db");
  const made = await strataOk([
    "token",
    "create",
    "--role",
    "backup",
    "--name",
    "nightly",
    "--catalog",
    catalog,
  ]);
  const token = made.stdout.split("\n")[0]!;
  assert.match(token, /^strata_[0-9a-f]{16}_[A-Za-z0-9_-]{43}$/);
  assert.match(made.stdout, /role backup/);
  const id = token.split("_")[1]!;

  const check = (fn: (c: Catalog) => void) => {
    const c = Catalog.open(catalog, { create: false });
    try {
      fn(c);
    } finally {
      c.close();
    }
  };
  check((c) => assert.equal(verifyToken(c, token).role, "backup"));

  const list = await strataOk(["token", "list", "--catalog", catalog]);
  assert.match(list.stdout, new RegExp(`${id}\\s+nightly\\s+backup`));
  assert.equal(list.stdout.includes(token.slice(24)), false, "list never shows the secret");
  const listJson = JSON.parse(
    (await strataOk(["token", "list", "--catalog", catalog, "--json"])).stdout,
  ) as Array<Record<string, unknown>>;
  assert.equal(listJson.length, 1);
  assert.equal(listJson[0]!.id, id);
  assert.equal("secretSha256" in listJson[0]!, false);

  await strataOk(["token", "revoke", id, "--catalog", catalog]);
  check((c) =>
    assert.throws(
      () => verifyToken(c, token),
      (e) => isStrataError(e, ErrorCode.UNAUTHORIZED) && /revoked/.test(e.message),
    ),
  );
  assert.match((await strataOk(["token", "list", "--catalog", catalog])).stdout, /revoked/);
  const again = await strata(["token", "revoke", id, "--catalog", catalog]);
  assert.equal(again.code, 2);
  assert.match(again.stderr, /revoked already/);
});

test("token create refuses an unknown role and a bad expiry; an expiring token says when", async (t) => {
  const dir = tempDir(t);
  const catalog = join(dir, "catalog.db");
  const bad = await strata(["token", "create", "--role", "root", "--catalog", catalog]);
  assert.equal(bad.code, 2);
  assert.match(bad.stderr, /--role must be one of admin, operator, backup, read, not "root"/);
  const badExp = await strata([
    "token",
    "create",
    "--role",
    "read",
    "--expires",
    "soon",
    "--catalog",
    catalog,
  ]);
  assert.equal(badExp.code, 2);
  assert.match(badExp.stderr, /not a duration: "soon"/);
  const j = JSON.parse(
    (await strataOk(["token", "create", "--role", "read", "--expires", "1d", "--json", "--catalog", catalog]))
      .stdout,
  ) as { token: string; expiresAt: number; createdAt: number; role: string };
  assert.equal(j.expiresAt - j.createdAt, 86_400_000);
  assert.equal(j.role, "read");
  const missing = await strata(["token", "revoke", "0123456789abcdef", "--catalog", join(dir, "none.db")]);
  assert.notEqual(missing.code, 0);
  assert.match(missing.stderr, /no catalog at/);
});
