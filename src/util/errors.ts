/**
 * One error base class with stable codes.
 *
 * Every failure Strata reports to a person or to the API is a {@link StrataError} with a
 * stable `code` (SCREAMING_SNAKE, never renamed once released) and a message that says what,
 * where and why. Lower layers classify their own errors; only the CLI's top level prints them
 * and picks the exit code, and only the REST API maps them to HTTP statuses.
 */

/** Stable error codes. Add, never rename. */
export const ErrorCode = {
  /** The user asked for something malformed (bad flag, bad source spec). */
  USAGE: "USAGE",
  /** No repository at the given location. */
  REPO_NOT_FOUND: "REPO_NOT_FOUND",
  /** A repository already exists where `init` was asked to create one. */
  REPO_EXISTS: "REPO_EXISTS",
  /** The repository's config or key file is unreadable or damaged. */
  REPO_CORRUPT: "REPO_CORRUPT",
  /** The repository was written by a newer or unknown format version. */
  REPO_VERSION: "REPO_VERSION",
  /** The repository is encrypted and no password was given. */
  PASSWORD_REQUIRED: "PASSWORD_REQUIRED",
  /** The password does not open the repository's key. */
  WRONG_PASSWORD: "WRONG_PASSWORD",
  /** A password was given for a repository that is not encrypted. */
  PASSWORD_UNEXPECTED: "PASSWORD_UNEXPECTED",
  /**
   * The repository's config contradicts its key: edited, or downgraded from encrypted to plain.
   * Nothing is written to such a repository.
   */
  REPO_TAMPERED: "REPO_TAMPERED",
  /** A stored object (chunk, index, manifest) failed verification. */
  DATA_CORRUPT: "DATA_CORRUPT",
  /** A stored object that should exist does not. */
  DATA_MISSING: "DATA_MISSING",
  /** No such restore point, VM or disk. */
  NOT_FOUND: "NOT_FOUND",
  /** A backup source cannot be opened or read. */
  SOURCE_UNREADABLE: "SOURCE_UNREADABLE",
  /** A restore target exists or cannot be written. */
  TARGET_CONFLICT: "TARGET_CONFLICT",
  /** Another process holds a conflicting repository lock. */
  LOCKED: "LOCKED",
  /**
   * A held lock could not be refreshed (or was removed): others may take its holder for dead,
   * so the holder stops.
   */
  LOCK_LOST: "LOCK_LOST",
  /** A stored object is under a retention (S3 Object Lock) and can't be deleted or changed yet. */
  OBJECT_LOCKED: "OBJECT_LOCKED",
  /** The operation was cancelled (signal, abort). */
  ABORTED: "ABORTED",
  /** No space left on a device. */
  NO_SPACE: "NO_SPACE",
  /** The operating system refused access (EACCES, EPERM). */
  PERMISSION_DENIED: "PERMISSION_DENIED",
  /** A write to a read-only filesystem (EROFS). */
  READ_ONLY: "READ_ONLY",
  /** A read or write failed in the operating system or device (EIO and other I/O errors). */
  IO_ERROR: "IO_ERROR",
  /** A network peer broke the protocol. */
  PROTOCOL: "PROTOCOL",
  /** An operation did not finish within its time limit. */
  TIMEOUT: "TIMEOUT",
  /** An external program failed. */
  EXTERNAL: "EXTERNAL",
  /** A bug: an invariant did not hold. */
  INTERNAL: "INTERNAL",
  /** The daemon's catalog file is not a Strata catalog, or SQLite found it damaged. */
  CATALOG_CORRUPT: "CATALOG_CORRUPT",
  /** The catalog was written by a newer Strata (a schema version this one does not know). */
  CATALOG_VERSION: "CATALOG_VERSION",
  /** The daemon's configuration file has errors (each named with its line and column). */
  CONFIG_INVALID: "CONFIG_INVALID",
  /** No valid API token: missing, malformed, unknown, revoked or expired. */
  UNAUTHORIZED: "UNAUTHORIZED",
  /** A valid API token whose role does not allow the action. */
  FORBIDDEN: "FORBIDDEN",
  /** A restore point failed boot verification: its VM did not boot as far as its guest agent, or the check failed. */
  BOOT_FAILED: "BOOT_FAILED",
} as const;

export type ErrorCode = (typeof ErrorCode)[keyof typeof ErrorCode];

export class StrataError extends Error {
  readonly code: ErrorCode;

  constructor(code: ErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options?.cause === undefined ? undefined : { cause: options.cause });
    this.name = "StrataError";
    this.code = code;
  }
}

/** True when `err` is a StrataError with the given code. */
export function isStrataError(err: unknown, code?: ErrorCode): err is StrataError {
  return err instanceof StrataError && (code === undefined || err.code === code);
}

/** The errno code (`ENOENT`, …) of a Node system error, or undefined. */
export function errnoCode(err: unknown): string | undefined {
  if (typeof err === "object" && err !== null && "code" in err) {
    const code = (err as { code: unknown }).code;
    return typeof code === "string" ? code : undefined;
  }
  return undefined;
}

/** True for "file or directory does not exist". */
export function isNotFound(err: unknown): boolean {
  return errnoCode(err) === "ENOENT";
}

/** A short human text for any thrown value. */
export function describeError(err: unknown): string {
  if (err instanceof Error) return err.message;
  return String(err);
}

/**
 * Wraps a Node system error from an I/O call with context, naming the real cause: disk full
 * (NO_SPACE), permission (PERMISSION_DENIED), read-only filesystem (READ_ONLY) and device errors
 * (IO_ERROR) say so plainly; anything else gets `fallback`.
 */
export function ioError(fallback: ErrorCode, what: string, err: unknown): StrataError {
  if (err instanceof StrataError) return err;
  const errno = errnoCode(err);
  if (errno === "ENOSPC" || errno === "EDQUOT") {
    return new StrataError(ErrorCode.NO_SPACE, `${what}: no space left on device`, { cause: err });
  }
  if (errno === "EACCES" || errno === "EPERM")
    return new StrataError(ErrorCode.PERMISSION_DENIED, `${what}: permission denied (${errno})`, {
      cause: err,
    });
  if (errno === "EROFS")
    return new StrataError(ErrorCode.READ_ONLY, `${what}: read-only filesystem (EROFS)`, { cause: err });
  if (errno === "EIO")
    return new StrataError(ErrorCode.IO_ERROR, `${what}: input/output error (EIO)`, { cause: err });
  return new StrataError(fallback, `${what}: ${describeError(err)}`, { cause: err });
}
