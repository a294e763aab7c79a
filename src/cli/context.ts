/** Global options and opening the repository, shared by every command. */
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import type { Command } from "commander";
import { Catalog, DEFAULT_CATALOG } from "../catalog/catalog.js";
import { FsStore } from "../repo/fs-store.js";
import { Repository } from "../repo/repository.js";
import { isS3Url } from "../repo/s3-url.js";
import type { Store } from "../repo/store.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { kdfCacheFromEnv } from "./kdf-cache.js";
import { makeOutput, type Output } from "./output.js";

export interface GlobalOptions {
  repo?: string;
  /** The daemon's catalog (set by the commands that use one). */
  catalog?: string;
  passwordFile?: string;
  json?: boolean;
  quiet?: boolean;
}

export function globals(cmd: Command): GlobalOptions {
  return cmd.optsWithGlobals() as GlobalOptions;
}

export function output(cmd: Command): Output {
  const g = globals(cmd);
  return makeOutput({ json: g.json === true, quiet: g.quiet === true });
}

/** The repository as given: an absolute directory, or an `s3:` URL unchanged. */
export function repoPath(g: GlobalOptions): string {
  const p = g.repo ?? process.env.STRATA_REPO;
  if (!p)
    throw new StrataError(
      ErrorCode.USAGE,
      "no repository given: use --repo DIR (or s3:https://HOST/BUCKET[/PREFIX]) or set STRATA_REPO",
    );
  return isS3Url(p) ? p : resolve(p);
}

/**
 * The store behind --repo: a local directory, or an S3 bucket for `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`
 * (credentials from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or a credentials file, never flags).
 */
export async function openStore(g: GlobalOptions): Promise<Store> {
  const p = repoPath(g);
  if (!isS3Url(p)) return new FsStore(p);
  // Loaded only for S3 repositories: the client's modules take longer to load than a small backup runs.
  const { S3Store, parseS3Url } = await import("../repo/s3-store.js");
  return new S3Store(parseS3Url(p));
}

/** The password from --password-file or STRATA_PASSWORD, or undefined. */
export function password(g: GlobalOptions): string | undefined {
  if (g.passwordFile !== undefined) {
    try {
      return readFileSync(g.passwordFile, "utf8").replace(/\r?\n$/, "");
    } catch (err) {
      throw new StrataError(
        ErrorCode.USAGE,
        `cannot read password file ${g.passwordFile}: ${(err as Error).message}`,
      );
    }
  }
  return process.env.STRATA_PASSWORD;
}

export async function openRepo(cmd: Command): Promise<Repository> {
  const g = globals(cmd);
  const pw = password(g);
  if (pw === undefined) return Repository.open(await openStore(g));
  const cache = kdfCacheFromEnv();
  return Repository.open(await openStore(g), { password: pw, ...(cache ? { kdfCache: cache } : {}) });
}

/** Runs `fn` with an open repository and closes it afterwards. */
export async function withRepo<T>(cmd: Command, fn: (repo: Repository) => Promise<T>): Promise<T> {
  const repo = await openRepo(cmd);
  try {
    return await fn(repo);
  } finally {
    await repo.close();
  }
}

/** The catalog file: --catalog, else $STRATA_CATALOG, else /var/lib/strata/catalog.db. */
export function catalogPath(g: GlobalOptions): string {
  return resolve(g.catalog ?? process.env.STRATA_CATALOG ?? DEFAULT_CATALOG);
}

/** Runs `fn` with the catalog open (created when missing, unless `create` is false) and closes it. */
export async function withCatalog<T>(
  cmd: Command,
  fn: (catalog: Catalog) => T | Promise<T>,
  options: { create?: boolean } = {},
): Promise<T> {
  const catalog = Catalog.open(catalogPath(globals(cmd)), options);
  try {
    return await fn(catalog);
  } finally {
    catalog.close();
  }
}

/** An AbortSignal that fires on SIGINT/SIGTERM, so long jobs stop cleanly (and clean up). */
export function interruptSignal(): AbortSignal {
  const ac = new AbortController();
  const stop = (sig: string) => {
    if (ac.signal.aborted) process.exit(130);
    ac.abort(new StrataError(ErrorCode.ABORTED, `interrupted by ${sig}`));
  };
  process.once("SIGINT", () => stop("SIGINT"));
  process.once("SIGTERM", () => stop("SIGTERM"));
  return ac.signal;
}

export function parseCount(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0)
      throw new StrataError(ErrorCode.USAGE, `${flag} takes a whole number, not "${v}"`);
    return n;
  };
}
