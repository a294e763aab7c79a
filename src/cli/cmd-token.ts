/** token create, list, revoke: API tokens for the daemon's REST API, kept hashed in the catalog. */
import type { Command } from "commander";
import { ROLES } from "../catalog/schema.js";
import { createToken, isRole, listTokens, revokeToken, type TokenInfo } from "../catalog/tokens.js";
import { parseDuration } from "../util/durations.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { CATALOG_OPTION_HELP } from "./cmd-catalog.js";
import { output, withCatalog } from "./context.js";

const ROLE_HELP = `Roles:
  admin     everything, including forget, gc, job changes and tokens
  operator  reads state, runs backups and verifies, cancels jobs, restores, files, instant recovery
  backup    only adds restore points: starts backups and follows its jobs; cannot forget, gc,
            restore, read data or list restore points
  read      reads state: VMs, restore points, jobs and logs, retention previews, statistics`;

function when(ms: number | null): string {
  return ms === null ? "-" : new Date(ms).toISOString().replace(/\.\d{3}Z$/, "Z");
}

export function registerTokenCommands(program: Command): void {
  const token = program
    .command("token")
    .description("create, list and revoke API tokens for the daemon's REST API")
    .option("--catalog <file>", CATALOG_OPTION_HELP)
    .addHelpText("after", `\n${ROLE_HELP}`);

  token
    .command("create")
    .description("create an API token and print it, once")
    .requiredOption("--role <role>", `what the token may do: ${ROLES.join(", ")}`)
    .option("--name <name>", "a name to tell it by in lists (default: ROLE-ID)")
    .option("--expires <duration>", "let it expire after this long, e.g. 90d, 12h (default: never)")
    .addHelpText(
      "after",
      `
The token is printed once and never again: the catalog keeps only its SHA-256. Give it to the
client as "Authorization: Bearer <token>". Lost tokens can't be shown; revoke and create anew.

${ROLE_HELP}

Examples:
  strata token create --role backup --name nightly-script
  strata token create --role read --name grafana --expires 90d`,
    )
    .action(async (opts: { role: string; name?: string; expires?: string }, cmd: Command) => {
      const out = output(cmd);
      const role = opts.role;
      if (!isRole(role))
        throw new StrataError(ErrorCode.USAGE, `--role must be one of ${ROLES.join(", ")}, not "${role}"`);
      if (
        opts.name !== undefined &&
        (opts.name.length === 0 || opts.name.length > 64 || /[\p{Cc}]/u.test(opts.name))
      )
        throw new StrataError(ErrorCode.USAGE, "--name takes 1 to 64 printable characters");
      const expiresInMs = opts.expires === undefined ? undefined : parseDuration(opts.expires);
      if (expiresInMs !== undefined && expiresInMs <= 0)
        throw new StrataError(ErrorCode.USAGE, `--expires must be longer than 0, not "${opts.expires}"`);
      await withCatalog(cmd, (catalog) => {
        const made = createToken(catalog, {
          role,
          ...(opts.name === undefined ? {} : { name: opts.name }),
          ...(expiresInMs === undefined ? {} : { expiresInMs }),
        });
        out.result({ token: made.token, ...made.info }, () =>
          [
            made.token,
            "",
            `token ${made.info.id} "${made.info.name}", role ${made.info.role}` +
              (made.info.expiresAt === null ? "" : `, expires ${when(made.info.expiresAt)}`),
            "Keep it now: it is not shown again.",
          ].join("\n"),
        );
      });
    });

  token
    .command("list")
    .description("list API tokens (never their secrets)")
    .action(async (_opts: unknown, cmd: Command) => {
      const out = output(cmd);
      await withCatalog(cmd, (catalog) => {
        const rows = listTokens(catalog);
        out.result(rows, () => table(rows));
      });
    });

  token
    .command("revoke")
    .description("revoke an API token: it stops working at once")
    .argument("<id>", "the token's id, as token list shows it (the part after strata_)")
    .action(async (id: string, _opts: unknown, cmd: Command) => {
      const out = output(cmd);
      await withCatalog(
        cmd,
        (catalog) => {
          const revoked = revokeToken(catalog, id);
          out.result(revoked, () => `revoked token ${revoked.id} "${revoked.name}" (role ${revoked.role})`);
        },
        { create: false },
      );
    });
}

function table(rows: TokenInfo[]): string {
  if (rows.length === 0) return "no API tokens";
  const head = ["ID", "NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED", "STATE"];
  const cells = rows.map((r) => [
    r.id,
    r.name,
    r.role,
    when(r.createdAt),
    when(r.expiresAt),
    when(r.lastUsedAt),
    r.revokedAt !== null
      ? "revoked"
      : r.expiresAt !== null && r.expiresAt <= Date.now()
        ? "expired"
        : "active",
  ]);
  const width = head.map((h, i) => Math.max(h.length, ...cells.map((c) => c[i]!.length)));
  return [head, ...cells]
    .map((r) =>
      r
        .map((c, i) => c.padEnd(width[i]!))
        .join("  ")
        .trimEnd(),
    )
    .join("\n");
}
