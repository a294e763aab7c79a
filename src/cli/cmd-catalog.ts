/** catalog rebuild: the daemon's catalog of restore points, recreated from a repository. */
import type { Command } from "commander";
import { rebuildRestorePoints } from "../catalog/rebuild.js";
import { catalogPath, globals, output, withCatalog, withRepo } from "./context.js";

export const CATALOG_OPTION_HELP =
  "the daemon's catalog file (default: $STRATA_CATALOG or /var/lib/strata/catalog.db)";

export function registerCatalogCommands(program: Command): void {
  const catalog = program
    .command("catalog")
    .description("the daemon's SQLite catalog of jobs, runs, restore points and API tokens")
    .option("--catalog <file>", CATALOG_OPTION_HELP)
    .addHelpText(
      "after",
      `
The catalog is the daemon's memory: what each job did (runs, bytes, errors, logs) and a copy of
the restore points for quick lists. The repository stays the truth about restore points:
"strata catalog rebuild" recreates the catalog's rows from the repository's manifests, after
a lost catalog or a forget run by hand. Runs and API tokens live only in the catalog.`,
    );

  catalog
    .command("rebuild")
    .description("recreate the catalog's restore points of a repository from its manifests")
    .addHelpText(
      "after",
      `
Reads every manifest of the repository (--repo, with --password-file when it is encrypted) and
makes the catalog's restore points of that repository exactly those: new ones are added, ones
no longer in the repository removed. Other repositories' rows, jobs, runs and tokens are kept.
A restore point whose manifest is damaged is left out and named in a warning. The catalog is
created when missing.

Example:
  strata catalog rebuild --repo /backup/strata --catalog /var/lib/strata/catalog.db`,
    )
    .action(async (_opts: unknown, cmd: Command) => {
      const out = output(cmd);
      const path = catalogPath(globals(cmd));
      await withRepo(cmd, (repo) =>
        withCatalog(cmd, async (cat) => {
          const report = await rebuildRestorePoints(cat, repo);
          for (const d of report.damaged) out.warn(`${d.id} left out: ${d.error}`);
          out.result({ type: "summary", catalog: path, ...report }, () =>
            [
              `catalog ${path}: ${report.restorePoints} restore points of ${report.vms} VM(s) in ${report.location}`,
              `${report.added} added, ${report.removed} removed, ${report.kept} unchanged` +
                (report.damaged.length > 0 ? `, ${report.damaged.length} damaged left out` : ""),
            ].join("\n"),
          );
        }),
      );
    });
}
