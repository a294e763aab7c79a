/**
 * Telling an S3 repository from a directory, without loading the S3 client (its modules take
 * longer to load than a small backup takes to run).
 */

/** True when a --repo value names an S3 repository. */
export function isS3Url(spec: string): boolean {
  return spec.startsWith("s3:");
}
