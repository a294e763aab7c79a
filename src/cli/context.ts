/** Global options and opening the repository, shared by every command. */
import { readFileSync } from "node:fs";
import { resolve } from "node:path";
import type { Command } from "commander";
import { Catalog, DEFAULT_CATALOG } from "../catalog/catalog.js";
import { openStoreAt } from "../repo/open-store.js";
import { type Immutability, type OpenOptions, Repository } from "../repo/repository.js";
import { isS3Url } from "../repo/s3-url.js";
import type { Store } from "../repo/store.js";
import { parseDuration } from "../util/durations.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { parseSize } from "../util/sizes.js";
import { kdfCacheFromEnv } from "./kdf-cache.js";
import { makeOutput, type Output } from "./output.js";

export interface GlobalOptions {
  repo?: string;
  /** The daemon's catalog (set by the commands that use one). */
  catalog?: string;
  passwordFile?: string;
  json?: boolean;
  quiet?: boolean;
  s3Credentials?: string;
  s3CacheDir?: string;
  s3CacheSize?: string;
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
  if (!isS3Url(p)) return openStoreAt(p);
  // Reads of packs (restore, serve, files, instant recovery) go through a bounded local cache.
  const sizeText = g.s3CacheSize ?? process.env.STRATA_S3_CACHE_SIZE;
  return openStoreAt(p, {
    ...(sizeText === undefined ? {} : { cacheBytes: parseSize(sizeText) }),
    ...(g.s3CacheDir === undefined ? {} : { cacheDir: g.s3CacheDir }),
    ...(g.s3Credentials === undefined ? {} : { credentialsFile: resolve(g.s3Credentials) }),
  });
}

/**
 * The options that name this command's repository, for a strata child process (serve, protect):
 * --repo, --password-file and the S3 options given, paths made absolute.
 */
export function repoArgs(g: GlobalOptions): string[] {
  return [
    "--repo",
    repoPath(g),
    ...(g.passwordFile === undefined ? [] : ["--password-file", resolve(g.passwordFile)]),
    ...(g.s3Credentials === undefined ? [] : ["--s3-credentials", resolve(g.s3Credentials)]),
    ...(g.s3CacheDir === undefined ? [] : ["--s3-cache-dir", resolve(g.s3CacheDir)]),
    ...(g.s3CacheSize === undefined ? [] : ["--s3-cache-size", g.s3CacheSize]),
  ];
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

export async function openRepo(cmd: Command, options: OpenOptions = {}): Promise<Repository> {
  const g = globals(cmd);
  const pw = password(g);
  if (pw === undefined) return Repository.open(await openStore(g), options);
  const cache = kdfCacheFromEnv();
  return Repository.open(await openStore(g), {
    ...options,
    password: pw,
    ...(cache ? { kdfCache: cache } : {}),
  });
}

/** Runs `fn` with an open repository and closes it afterwards. */
export async function withRepo<T>(
  cmd: Command,
  fn: (repo: Repository) => Promise<T>,
  options: OpenOptions = {},
): Promise<T> {
  const repo = await openRepo(cmd, options);
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

/**
 * `--immutable-for DURATION` with `--immutable-mode compliance|governance` (default compliance),
 * or undefined when no duration is given.
 */
export function parseImmutability(
  forText: string | undefined,
  modeText: string | undefined,
): Immutability | undefined {
  if (forText === undefined) {
    if (modeText !== undefined)
      throw new StrataError(ErrorCode.USAGE, "--immutable-mode needs --immutable-for DURATION");
    return undefined;
  }
  const mode = (modeText ?? "compliance").toUpperCase();
  if (mode !== "COMPLIANCE" && mode !== "GOVERNANCE")
    throw new StrataError(ErrorCode.USAGE, `--immutable-mode is compliance or governance, not "${modeText}"`);
  const ms = parseDuration(forText);
  if (ms < 1000 || ms % 1000 !== 0)
    throw new StrataError(
      ErrorCode.USAGE,
      `--immutable-for takes whole seconds, at least 1s, not "${forText}"`,
    );
  return { mode, seconds: ms / 1000 };
}

export function parseCount(flag: string): (v: string) => number {
  return (v) => {
    const n = Number(v);
    if (!Number.isInteger(n) || n < 0)
      throw new StrataError(ErrorCode.USAGE, `${flag} takes a whole number, not "${v}"`);
    return n;
  };
}
