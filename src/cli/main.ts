/**
 * The strata command. Commands parse their arguments, call the engine or the repository, and
 * render; this file alone prints errors and picks exit codes.
 */
import { createRequire } from "node:module";
import { Command, CommanderError } from "commander";
import { ErrorCode, errnoCode, ioError, StrataError } from "../util/errors.js";
import { registerBackupCommands } from "./cmd-backup.js";
import { registerCatalogCommands } from "./cmd-catalog.js";
import { registerCopyCommand } from "./cmd-copy.js";
import { registerDaemonCommand } from "./cmd-daemon.js";
import { registerDemoCommand } from "./cmd-demo.js";
import { registerDoctorCommand } from "./cmd-doctor.js";
import { registerFilesCommands } from "./cmd-files.js";
import { registerInstantCommands } from "./cmd-instant.js";
import { registerJobsCommands } from "./cmd-jobs.js";
import { registerProtectCommand } from "./cmd-protect.js";
import { registerRepoCommands } from "./cmd-repo.js";
import { registerRestoreCommand } from "./cmd-restore.js";
import { registerServeCommand } from "./cmd-serve.js";
import { registerTokenCommands } from "./cmd-token.js";
import { registerVmsCommand } from "./cmd-vms.js";

/** Exit codes, stable for scripts. */
export const EXIT: Record<string, number> = {
  [ErrorCode.USAGE]: 2,
  [ErrorCode.CONFIG_INVALID]: 2,
  [ErrorCode.DATA_CORRUPT]: 3,
  [ErrorCode.DATA_MISSING]: 3,
  [ErrorCode.REPO_NOT_FOUND]: 10,
  [ErrorCode.LOCKED]: 11,
  [ErrorCode.WRONG_PASSWORD]: 12,
  [ErrorCode.PASSWORD_REQUIRED]: 12,
  [ErrorCode.PASSWORD_UNEXPECTED]: 12,
  [ErrorCode.ABORTED]: 130,
};

/** Strata's version, from the package.json beside dist/ (a checkout and the .deb both have it). */
function version(): string {
  try {
    return (createRequire(import.meta.url)("../../../package.json") as { version: string }).version;
  } catch {
    return "unknown";
  }
}

export function buildProgram(): Command {
  const program = new Command("strata")
    .description("host-level backup and recovery for KVM/QEMU virtual machines")
    .version(version(), "-V, --version", "print Strata's version")
    .option(
      "-r, --repo <dir|s3-url>",
      "repository: a directory, or s3:https://HOST[:PORT]/BUCKET[/PREFIX] (default: $STRATA_REPO)",
    )
    .option("--password-file <file>", "file holding the repository password (default: $STRATA_PASSWORD)")
    .option("--json", "machine-readable output: JSON documents, or one JSON event per line for long commands")
    .option("-q, --quiet", "print only errors")
    .option(
      "--s3-credentials <file>",
      "S3 repositories: a credentials file (AWS format, profile $AWS_PROFILE or default) used instead of AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (default: $STRATA_S3_CREDENTIALS or ~/.aws/credentials)",
    )
    .option(
      "--s3-cache-dir <dir>",
      "S3 repositories: where pack blocks read are cached (default: $STRATA_S3_CACHE_DIR or ~/.cache/strata)",
    )
    .option(
      "--s3-cache-size <size>",
      "S3 repositories: cap of the read cache, least recently used goes first; 0: no cache (default: $STRATA_S3_CACHE_SIZE or 1G)",
    )
    .showHelpAfterError()
    .exitOverride()
    .configureOutput({ writeErr: (s) => process.stderr.write(s) })
    .addHelpText(
      "after",
      `
Exit codes: 0 ok, 1 error, 2 usage (or a daemon configuration with errors), 3 damaged or
missing data, 10 no repository, 11 locked, 12 password missing, wrong, or given for an
unencrypted repository, 130 interrupted.

Encrypted repositories: the key derived from the password (scrypt, half a second and 128 MiB)
is kept in the kernel keyring of the user running strata for STRATA_KEY_CACHE seconds (default
43200, 12 hours; 0: never kept), so the commands that follow skip it. It never touches a disk.

Getting started:
  strata init --repo /backup/strata
  strata backup --repo /backup/strata --vm web1 file:/var/lib/images/web1.img
  strata snapshots --repo /backup/strata
  strata restore --repo /backup/strata web1/latest --target /tmp/web1-restored`,
    );
  registerRepoCommands(program);
  registerBackupCommands(program);
  registerRestoreCommand(program);
  registerCopyCommand(program);
  registerVmsCommand(program);
  registerServeCommand(program);
  registerFilesCommands(program);
  registerInstantCommands(program);
  registerProtectCommand(program);
  registerDoctorCommand(program);
  registerDemoCommand(program);
  registerDaemonCommand(program);
  registerJobsCommands(program);
  registerCatalogCommands(program);
  registerTokenCommands(program);
  return program;
}

export async function main(argv: string[]): Promise<number> {
  const program = buildProgram();
  try {
    await program.parseAsync(argv);
    return 0;
  } catch (err) {
    if (err instanceof CommanderError) {
      return err.exitCode === 0 ? 0 : 2;
    }
    const json = argv.includes("--json");
    if (err instanceof StrataError) {
      if (json)
        process.stderr.write(`${JSON.stringify({ type: "error", code: err.code, message: err.message })}\n`);
      else process.stderr.write(`strata: ${err.message}\n`);
      return EXIT[err.code] ?? 1;
    }
    const e = err as Error & { code?: string };
    const errno = errnoCode(err);
    if (errno !== undefined && /^E[A-Z]+$/.test(errno)) {
      // A system error nobody wrapped: Node's message names the call and the path.
      const se = ioError(ErrorCode.IO_ERROR, e.message, err);
      if (json)
        process.stderr.write(`${JSON.stringify({ type: "error", code: se.code, message: e.message })}\n`);
      else process.stderr.write(`strata: ${e.message}\n`);
      return EXIT[se.code] ?? 1;
    }
    if (e?.name === "AbortError") {
      process.stderr.write("strata: interrupted\n");
      return 130;
    }
    process.stderr.write(`strata: unexpected error: ${e?.stack ?? String(err)}\n`);
    return 1;
  }
}
