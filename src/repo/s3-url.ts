/**
 * Telling an S3 repository from a directory and reading its URL, without loading the S3 client (its
 * modules take longer to load than a small backup takes to run).
 */
import { ErrorCode, StrataError } from "../util/errors.js";

/** True when a --repo value names an S3 repository. */
export function isS3Url(spec: string): boolean {
  return spec.startsWith("s3:");
}

/** Where an `s3:` repository lives. */
export interface S3Location {
  /** http(s)://host[:port] */
  endpoint: string;
  bucket: string;
  /** Key prefix inside the bucket: "" or ending in "/". */
  prefix: string;
}

/** Parses `s3:http(s)://HOST[:PORT]/BUCKET[/PREFIX]`. */
export function parseS3Url(spec: string): S3Location {
  const bad = (why: string) =>
    new StrataError(
      ErrorCode.USAGE,
      `bad S3 repository "${spec}": ${why} (expected s3:https://HOST[:PORT]/BUCKET[/PREFIX])`,
    );
  if (!isS3Url(spec)) throw bad('it does not start with "s3:"');
  let url: URL;
  try {
    url = new URL(spec.slice(3));
  } catch {
    throw bad("not a URL after s3:");
  }
  if (url.protocol !== "http:" && url.protocol !== "https:") throw bad("the scheme must be http or https");
  if (url.username || url.password) throw bad("credentials do not belong in the URL (use the environment)");
  if (url.search || url.hash) throw bad("no query or fragment");
  const parts = url.pathname.split("/").filter((p) => p !== "");
  const bucket = parts.shift();
  if (!bucket) throw bad("no bucket");
  if (!/^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$/.test(bucket)) throw bad(`"${bucket}" is not a valid bucket name`);
  if (parts.some((p) => p === "." || p === "..")) throw bad("the prefix must not contain . or ..");
  return { endpoint: url.origin, bucket, prefix: parts.length > 0 ? `${parts.join("/")}/` : "" };
}

/** The canonical `s3:` URL of a location (what the store calls itself, and the catalog records). */
export function s3UrlOf(where: S3Location): string {
  return `s3:${where.endpoint}/${where.bucket}${where.prefix ? `/${where.prefix.slice(0, -1)}` : ""}`;
}
