/**
 * The store behind a repository's location, for the CLI (--repo) and the daemon (its configured
 * repositories) alike: a local directory, or an S3 bucket for `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`
 * whose reads of packs go through a bounded local cache ({@link CachedStore}).
 */
import { resolve } from "node:path";
import { CachedStore, DEFAULT_CACHE_BYTES, defaultCacheDir } from "./cached-store.js";
import { FsStore } from "./fs-store.js";
import { isS3Url } from "./s3-url.js";
import type { Store } from "./store.js";

export interface StoreOptions {
  /** The read cache of an S3 store (default {@link defaultCacheDir}). */
  cacheDir?: string;
  /** Its size in bytes (default {@link DEFAULT_CACHE_BYTES}); 0: no cache. */
  cacheBytes?: number;
  /**
   * S3 credentials from the profile AWS_PROFILE (default "default") of this file, in the format of
   * ~/.aws/credentials; unset: from the environment (see `s3Credentials` in s3-store.ts).
   */
  credentialsFile?: string;
}

export async function openStoreAt(location: string, options: StoreOptions = {}): Promise<Store> {
  if (!isS3Url(location)) return new FsStore(location);
  // Loaded only for S3 repositories: the client's modules take longer to load than a small backup runs.
  const { S3Store, parseS3Url, s3Credentials } = await import("./s3-store.js");
  const credentials =
    options.credentialsFile === undefined
      ? undefined
      : s3Credentials({
          STRATA_S3_CREDENTIALS: options.credentialsFile,
          ...(process.env.AWS_PROFILE === undefined ? {} : { AWS_PROFILE: process.env.AWS_PROFILE }),
        });
  const s3 = new S3Store(parseS3Url(location), credentials ? { credentials } : {});
  const size = options.cacheBytes ?? DEFAULT_CACHE_BYTES;
  return size === 0 ? s3 : new CachedStore(s3, resolve(options.cacheDir ?? defaultCacheDir()), size);
}
