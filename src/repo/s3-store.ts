/**
 * A repository in an S3 bucket (any S3 service; tested against a Ceph RADOS Gateway).
 *
 * Format v2 needs only whole-object put, get, range get, list, head and delete, which is all this
 * store does: S3 has no rename, no mtime to touch and no conditional delete that every service
 * honours, so format v1 repositories (one object per chunk, gc by touch) are refused here
 * ({@link S3Store.formatV1} is false; {@link S3Store.touch} and {@link S3Store.deleteIfUntouched}
 * throw).
 *
 * - put: one PutObject up to {@link S3StoreOptions.multipartThreshold} (64 MiB), else a multipart upload
 *   in parts of {@link S3StoreOptions.partSize}. S3 makes an object visible only when its PutObject
 *   or CompleteMultipartUpload returns, so a reader never sees half of one; a multipart upload
 *   that died mid-way is invisible and {@link S3Store.sweepTemporary} aborts it later.
 * - Integrity: every PutObject and UploadPart carries Content-MD5, which the server checks before
 *   it stores anything; the ETag it answers (the MD5, or for a multipart object the MD5 of the
 *   parts' MD5s and the part count) is compared with what was sent. A body whose length differs
 *   from Content-Length (a connection cut mid-way) is a transient failure and read again.
 * - Failures are classified here: timeouts, connection resets, 5xx, 429 and SlowDown are retried
 *   with exponential backoff and jitter; 403, bad credentials and a missing bucket end at once
 *   with a {@link StrataError} naming the bucket and key. The SDK's own retries are off, so that
 *   one policy decides.
 * - At most {@link S3StoreOptions.concurrency} requests are in flight per store.
 * - Object Lock: a put may carry a retention (mode and retain-until date); a multipart object gets
 *   it by PutObjectRetention once complete (RGW ignores the lock headers of
 *   CreateMultipartUpload). In a versioned bucket (every bucket with Object Lock is one) a plain
 *   DeleteObject only hides an object behind a delete marker, so {@link S3Store.delete} removes
 *   every version of the key; a version under retention is refused by the server and reported as
 *   OBJECT_LOCKED. Credentials that may not list versions (a backup-only user) fall back to the
 *   plain delete: that is how such a user releases its lock objects (see docs/architecture.md).
 */
import { createHash } from "node:crypto";
import { readFileSync } from "node:fs";
import { homedir } from "node:os";
import { join } from "node:path";
import {
  AbortMultipartUploadCommand,
  CompleteMultipartUploadCommand,
  CreateMultipartUploadCommand,
  DeleteObjectCommand,
  GetBucketVersioningCommand,
  GetObjectCommand,
  GetObjectLockConfigurationCommand,
  HeadObjectCommand,
  ListMultipartUploadsCommand,
  ListObjectsV2Command,
  ListObjectVersionsCommand,
  PutObjectCommand,
  PutObjectRetentionCommand,
  S3Client,
  UploadPartCommand,
} from "@aws-sdk/client-s3";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { isS3Url, parseS3Url, type S3Location, s3UrlOf } from "./s3-url.js";
import type { ObjectInfo, PutOptions, Retention, RetentionMode, Store } from "./store.js";

export { isS3Url, parseS3Url, type S3Location };

export interface S3Credentials {
  accessKeyId: string;
  secretAccessKey: string;
  sessionToken?: string;
}

/**
 * The credentials: AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN), else the
 * profile AWS_PROFILE (default "default") of the credentials file STRATA_S3_CREDENTIALS or
 * ~/.aws/credentials. Never the command line, where other users would see them.
 */
export function s3Credentials(env: NodeJS.ProcessEnv = process.env, home = homedir()): S3Credentials {
  const id = env.AWS_ACCESS_KEY_ID;
  const secret = env.AWS_SECRET_ACCESS_KEY;
  if (id && secret) return { accessKeyId: id, secretAccessKey: secret, ...tokenOf(env.AWS_SESSION_TOKEN) };
  const file = env.STRATA_S3_CREDENTIALS ?? join(home, ".aws", "credentials");
  const profile = env.AWS_PROFILE ?? "default";
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new StrataError(
      ErrorCode.USAGE,
      `no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or write them to ${file} ` +
        `(STRATA_S3_CREDENTIALS names another file): ${describeError(err)}`,
    );
  }
  const section = parseIni(text).get(profile);
  const fid = section?.get("aws_access_key_id");
  const fsecret = section?.get("aws_secret_access_key");
  if (!fid || !fsecret)
    throw new StrataError(
      ErrorCode.USAGE,
      `S3 credentials file ${file} has no aws_access_key_id and aws_secret_access_key in [${profile}]`,
    );
  return { accessKeyId: fid, secretAccessKey: fsecret, ...tokenOf(section?.get("aws_session_token")) };
}

function tokenOf(token: string | undefined): { sessionToken?: string } {
  return token ? { sessionToken: token } : {};
}

function parseIni(text: string): Map<string, Map<string, string>> {
  const sections = new Map<string, Map<string, string>>();
  let current: Map<string, string> | undefined;
  for (const raw of text.split(/\r?\n/)) {
    const line = raw.trim();
    if (line === "" || line.startsWith("#") || line.startsWith(";")) continue;
    const head = /^\[\s*(?:profile\s+)?([^\]]+?)\s*\]$/.exec(line);
    if (head) {
      current = new Map();
      sections.set(head[1]!, current);
      continue;
    }
    const eq = line.indexOf("=");
    if (current && eq > 0) current.set(line.slice(0, eq).trim().toLowerCase(), line.slice(eq + 1).trim());
  }
  return sections;
}

export interface S3StoreOptions {
  credentials?: S3Credentials;
  /**
   * Objects larger than this go up in parts (default 64 MiB). A pack is sealed once past 16 MiB,
   * so it is a little larger than that: with a 16 MiB threshold nearly every pack would take a
   * multipart upload of one full part and a small one (four requests instead of one).
   */
  multipartThreshold?: number;
  /** Size of a multipart upload's parts (default 16 MiB; S3 wants at least 5 MiB). */
  partSize?: number;
  /** Requests in flight at most (default 16). */
  concurrency?: number;
  /** Tries per request, the first included (default 6). */
  attempts?: number;
  /** First backoff; each retry doubles it, up to 5 s, with jitter (default 200 ms). */
  backoffMs?: number;
  /**
   * A request whose answer does not begin within this, or whose connection is silent this long,
   * is abandoned and retried (default 60 s).
   */
  requestTimeoutMs?: number;
}

const MiB = 1024 * 1024;
const SHORT = "ESTRATASHORT";
const NOT_FOUND = "ESTRATANOSUCHKEY";

/** The S3 permission (IAM action) each operation of this store needs, for messages. */
function permissionOf(what: string): string | undefined {
  if (what.startsWith("delete version")) return "s3:DeleteObjectVersion";
  if (what.startsWith("delete")) return "s3:DeleteObject";
  if (what.includes("retention"))
    return what.startsWith("extend") ? "s3:PutObjectRetention" : "s3:GetObjectRetention";
  if (what.includes("multipart upload") && what.startsWith("list")) return "s3:ListBucketMultipartUploads";
  if (what.startsWith("abort")) return "s3:AbortMultipartUpload";
  if (what.startsWith("list versions")) return "s3:ListBucketVersions";
  if (what.startsWith("list")) return "s3:ListBucket";
  if (what.startsWith("put") || what.includes("upload")) return "s3:PutObject";
  if (what.startsWith("get") || what.startsWith("range get") || what.startsWith("stat"))
    return "s3:GetObject";
  return undefined;
}

/** Status and S3 error name of an SDK error. */
function s3Status(err: unknown): { status: number | undefined; name: string; code: string | undefined } {
  const e = err as { $metadata?: { httpStatusCode?: number }; name?: string; code?: string; Code?: string };
  return { status: e?.$metadata?.httpStatusCode, name: e?.Code ?? e?.name ?? "", code: e?.code };
}

const TRANSIENT_NAMES = new Set([
  "SlowDown",
  "ServiceUnavailable",
  "InternalError",
  "RequestTimeout",
  "TimeoutError",
  "RequestTimeoutException",
  "ThrottlingException",
  "Throttling",
  // The body the server got does not match its Content-MD5 or signed SHA-256: damaged on the
  // way, sent again.
  "BadDigest",
  "XAmzContentSHA256Mismatch",
]);
const TRANSIENT_CODES = new Set([
  "ECONNRESET",
  "ECONNREFUSED",
  "ECONNABORTED",
  "EPIPE",
  "ETIMEDOUT",
  // EAI_AGAIN is a resolver that did not answer; ENOTFOUND (no such host) is not retried.
  "EAI_AGAIN",
  "EHOSTUNREACH",
  "ENETUNREACH",
  "ERR_STREAM_PREMATURE_CLOSE",
  "UND_ERR_SOCKET",
  "ESTRATATRUNCATED",
]);

/**
 * True for failures worth retrying: the server or the network, not the request. A 5xx without a
 * body, a timeout, a reset or refused connection, a throttle, a body cut short.
 */
export function isTransientS3Error(err: unknown): boolean {
  const { status, name, code } = s3Status(err);
  if (code !== undefined && TRANSIENT_CODES.has(code)) return true;
  if (TRANSIENT_NAMES.has(name)) return true;
  if (status !== undefined) return status >= 500 || status === 429 || status === 408;
  // No HTTP answer at all: the connection failed in a way Node names in the message only.
  return /socket hang up|aborted|premature close|ECONNRESET|timed? ?out/i.test(describeError(err));
}

export class S3Store implements Store {
  readonly formatV1 = false;
  private readonly client: S3Client;
  private readonly multipartThreshold: number;
  private readonly partSize: number;
  private readonly concurrency: number;
  private readonly attempts: number;
  private readonly backoffMs: number;
  private inFlight = 0;
  private readonly waiting: (() => void)[] = [];
  /** Requests retried after a transient failure, for tests and progress. */
  retries = 0;
  private versioning: Promise<boolean> | undefined;
  private locking: Promise<boolean> | undefined;

  constructor(
    readonly where: S3Location,
    options: S3StoreOptions = {},
  ) {
    this.multipartThreshold = options.multipartThreshold ?? 64 * MiB;
    this.partSize = Math.max(options.partSize ?? 16 * MiB, 5 * MiB);
    this.concurrency = options.concurrency ?? 16;
    this.attempts = options.attempts ?? 6;
    this.backoffMs = options.backoffMs ?? 200;
    const timeout = options.requestTimeoutMs ?? 60_000;
    // The SDK warns on stderr that its releases from 2027 need Node 22: a note for whoever picks
    // the SDK version (package.json pins it), not for the operator of a backup.
    process.env.AWS_SDK_JS_NODE_VERSION_SUPPORT_WARNING_DISABLED ??= "true";
    this.client = new S3Client({
      endpoint: where.endpoint,
      region: "us-east-1",
      forcePathStyle: true,
      credentials: options.credentials ?? s3Credentials(),
      maxAttempts: 1,
      // The SDK's default CRC on every request makes streamed PUTs fail on some gateways (411);
      // this store sends Content-MD5 itself.
      requestChecksumCalculation: "WHEN_REQUIRED",
      responseChecksumValidation: "WHEN_REQUIRED",
      // requestTimeout runs until the answer's headers (without throwOnRequestTimeout it only
      // logs); socketTimeout catches a connection that goes quiet later, in the body.
      requestHandler: {
        requestTimeout: timeout,
        throwOnRequestTimeout: true,
        socketTimeout: timeout,
        connectionTimeout: Math.min(timeout, 10_000),
      },
    });
  }

  get location(): string {
    return s3UrlOf(this.where);
  }

  private key(key: string): string {
    if (key.startsWith("/") || key.split("/").some((p) => p === ".." || p === "."))
      throw new StrataError(ErrorCode.INTERNAL, `bad store key ${key}`);
    return this.where.prefix + key;
  }

  private async slot(): Promise<void> {
    if (this.inFlight < this.concurrency) {
      this.inFlight++;
      return;
    }
    await new Promise<void>((r) => this.waiting.push(r));
  }

  private release(): void {
    const next = this.waiting.shift();
    if (next) next();
    else this.inFlight--;
  }

  /**
   * Runs one request with the retry policy. `what` names the operation and key for messages; a
   * permanent failure becomes a StrataError naming the bucket, except "no such key", which the
   * caller turns into its own answer.
   */
  private async request<T>(what: string, key: string | undefined, fn: () => Promise<T>): Promise<T> {
    for (let attempt = 1; ; attempt++) {
      await this.slot();
      try {
        return await fn();
      } catch (err) {
        if (!isTransientS3Error(err)) throw this.permanent(what, key, err);
        if (attempt >= this.attempts)
          throw new StrataError(
            ErrorCode.IO_ERROR,
            `${what} ${this.name(key)} failed ${attempt} times, the last: ${this.describe(err)}`,
            { cause: err },
          );
        this.retries++;
      } finally {
        this.release();
      }
      const delay = Math.min(this.backoffMs * 2 ** (attempt - 1), 5000);
      await new Promise((r) => setTimeout(r, delay / 2 + Math.random() * (delay / 2)));
    }
  }

  private name(key: string | undefined): string {
    return key === undefined ? `bucket ${this.where.bucket}` : `${this.where.bucket}/${this.key(key)}`;
  }

  private describe(err: unknown): string {
    const { status, name } = s3Status(err);
    const msg = describeError(err);
    return status !== undefined ? `HTTP ${status} ${name}${msg && msg !== name ? `: ${msg}` : ""}` : msg;
  }

  private permanent(what: string, key: string | undefined, err: unknown): Error {
    if (err instanceof StrataError) return err;
    const { status, name } = s3Status(err);
    const at = `${this.where.endpoint}`;
    if (name === "NoSuchKey" || (status === 404 && name === "NotFound" && key !== undefined))
      return Object.assign(new Error(`${this.name(key)} does not exist`), { code: NOT_FOUND, cause: err });
    if (name === "NoSuchBucket")
      return new StrataError(
        ErrorCode.REPO_NOT_FOUND,
        `bucket ${this.where.bucket} does not exist at ${at} (create it first)`,
        { cause: err },
      );
    if (name === "InvalidAccessKeyId" || name === "SignatureDoesNotMatch")
      return new StrataError(
        ErrorCode.PERMISSION_DENIED,
        `${at} refused the S3 credentials (${name}) for ${what} ${this.name(key)}: check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY or the credentials file`,
        { cause: err },
      );
    if (status === 403) {
      // A HEAD's 403 has no body to tell wrong keys from a missing permission.
      const permission = permissionOf(what);
      return new StrataError(
        ErrorCode.PERMISSION_DENIED,
        `access denied (HTTP 403${name && name !== "Unknown" ? ` ${name}` : ""}) to ${what} ${this.name(key)} at ${at}: ` +
          `the S3 credentials are wrong or may not do this${permission ? ` (${permission})` : ""}`,
        { cause: err },
      );
    }
    return new StrataError(ErrorCode.IO_ERROR, `${what} ${this.name(key)} at ${at}: ${this.describe(err)}`, {
      cause: err,
    });
  }

  private async getBody(what: string, key: string, range?: string): Promise<Buffer> {
    return this.request(what, key, async () => {
      const res = await this.client.send(
        new GetObjectCommand({
          Bucket: this.where.bucket,
          Key: this.key(key),
          ...(range ? { Range: range } : {}),
        }),
      );
      if (!res.Body) throw Object.assign(new Error("no body"), { code: "ESTRATATRUNCATED" });
      const bytes = await res.Body.transformToByteArray();
      const body = Buffer.from(bytes.buffer, bytes.byteOffset, bytes.byteLength);
      if (res.ContentLength !== undefined && body.length !== res.ContentLength)
        throw Object.assign(new Error(`the body ended after ${body.length} of ${res.ContentLength} bytes`), {
          code: "ESTRATATRUNCATED",
        });
      return body;
    });
  }

  async get(key: string): Promise<Buffer> {
    return this.getBody("get", key);
  }

  async getRange(key: string, offset: number, length: number): Promise<Buffer> {
    const short = (got: number) =>
      Object.assign(
        new Error(`${this.name(key)} ends before byte ${offset + length} (read ${got} from ${offset})`),
        {
          code: SHORT,
        },
      );
    if (length === 0) {
      const info = await this.stat(key);
      if (!info) throw Object.assign(new Error(`${this.name(key)} does not exist`), { code: NOT_FOUND });
      if (info.size < offset) throw short(0);
      return Buffer.alloc(0);
    }
    let body: Buffer;
    try {
      body = await this.getBody("range get", key, `bytes=${offset}-${offset + length - 1}`);
    } catch (err) {
      // 416: the range starts at or past the end.
      if (err instanceof StrataError && s3Status(err.cause).status === 416) throw short(0);
      throw err;
    }
    if (body.length !== length) throw short(body.length);
    return body;
  }

  async put(key: string, data: Uint8Array, options?: PutOptions): Promise<void> {
    const body = Buffer.from(data.buffer, data.byteOffset, data.byteLength);
    const retain = options?.retain;
    if (body.length <= this.multipartThreshold) {
      const md5 = createHash("md5").update(body).digest();
      await this.request("put", key, async () => {
        const res = await this.client.send(
          new PutObjectCommand({
            Bucket: this.where.bucket,
            Key: this.key(key),
            Body: body,
            ContentLength: body.length,
            ContentMD5: md5.toString("base64"),
            ...(retain
              ? { ObjectLockMode: retain.mode, ObjectLockRetainUntilDate: new Date(retain.untilMs) }
              : {}),
          }),
        );
        this.checkEtag(key, res.ETag, `"${md5.toString("hex")}"`);
      });
      return;
    }
    await this.putMultipart(key, body);
    // RGW ignores the lock headers of CreateMultipartUpload: the retention is set once complete.
    if (retain) await this.extendRetention(key, retain);
  }

  private checkEtag(key: string, got: string | undefined, want: string): void {
    // Some gateways answer CompleteMultipartUpload without an ETag; the HEAD after it has one.
    if (got === undefined || got === "" || got === '""') return;
    const norm = (e: string) => (e.startsWith('"') ? e : `"${e}"`);
    if (norm(got) !== want)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `${this.name(key)} was stored with ETag ${got}, not ${want}: the server holds other bytes than were sent`,
      );
  }

  private async putMultipart(key: string, body: Buffer): Promise<void> {
    const created = await this.request("start multipart upload of", key, () =>
      this.client.send(new CreateMultipartUploadCommand({ Bucket: this.where.bucket, Key: this.key(key) })),
    );
    const uploadId = created.UploadId;
    if (!uploadId)
      throw new StrataError(
        ErrorCode.PROTOCOL,
        `${this.where.endpoint} gave no upload id for ${this.name(key)}`,
      );
    const count = Math.ceil(body.length / this.partSize);
    const digests: Buffer[] = new Array(count);
    const etags: string[] = new Array(count);
    try {
      let next = 0;
      const worker = async () => {
        for (let i = next++; i < count; i = next++) {
          const part = body.subarray(i * this.partSize, Math.min(body.length, (i + 1) * this.partSize));
          const md5 = createHash("md5").update(part).digest();
          digests[i] = md5;
          const want = `"${md5.toString("hex")}"`;
          await this.request(`upload part ${i + 1} of`, key, async () => {
            const res = await this.client.send(
              new UploadPartCommand({
                Bucket: this.where.bucket,
                Key: this.key(key),
                UploadId: uploadId,
                PartNumber: i + 1,
                Body: part,
                ContentLength: part.length,
                ContentMD5: md5.toString("base64"),
              }),
            );
            this.checkEtag(key, res.ETag, want);
            etags[i] = res.ETag ?? want;
          });
        }
      };
      await Promise.all(Array.from({ length: Math.min(4, count) }, worker));
      try {
        await this.request("complete multipart upload of", key, () =>
          this.client.send(
            new CompleteMultipartUploadCommand({
              Bucket: this.where.bucket,
              Key: this.key(key),
              UploadId: uploadId,
              MultipartUpload: { Parts: etags.map((ETag, i) => ({ ETag, PartNumber: i + 1 })) },
            }),
          ),
        );
      } catch (err) {
        // A retried completion whose first try went through (its answer lost) finds no upload:
        // the HEAD below tells, by size and the parts' ETag, whether the object is this one.
        if (!(err instanceof StrataError && s3Status(err.cause).name === "NoSuchUpload")) throw err;
      }
    } catch (err) {
      await this.client
        .send(
          new AbortMultipartUploadCommand({
            Bucket: this.where.bucket,
            Key: this.key(key),
            UploadId: uploadId,
          }),
        )
        .catch(() => {});
      throw err;
    }
    const whole = `"${createHash("md5").update(Buffer.concat(digests)).digest("hex")}-${count}"`;
    const head = await this.head(key);
    if (!head)
      throw new StrataError(
        ErrorCode.IO_ERROR,
        `the multipart upload of ${this.name(key)} was lost before it completed (at ${this.where.endpoint})`,
      );
    if (head.size !== body.length)
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `${this.name(key)} holds ${head.size} bytes after its multipart upload of ${body.length}`,
      );
    this.checkEtag(key, head.etag, whole);
  }

  private async head(
    key: string,
    versionId?: string,
  ): Promise<(ObjectInfo & { etag: string | undefined; retention: Retention | undefined }) | undefined> {
    try {
      const res = await this.request("stat", key, () =>
        this.client.send(
          new HeadObjectCommand({
            Bucket: this.where.bucket,
            Key: this.key(key),
            ...(versionId ? { VersionId: versionId } : {}),
          }),
        ),
      );
      const mode = res.ObjectLockMode;
      const until = res.ObjectLockRetainUntilDate?.getTime();
      return {
        key,
        size: res.ContentLength ?? 0,
        mtimeMs: res.LastModified?.getTime() ?? 0,
        etag: res.ETag,
        retention:
          (mode === "COMPLIANCE" || mode === "GOVERNANCE") && until !== undefined
            ? { mode: mode as RetentionMode, untilMs: until }
            : undefined,
      };
    } catch (err) {
      if (this.isNotFound(err)) return undefined;
      throw err;
    }
  }

  async stat(key: string): Promise<ObjectInfo | undefined> {
    const h = await this.head(key);
    return h && { key: h.key, size: h.size, mtimeMs: h.mtimeMs };
  }

  async *list(prefix: string): AsyncIterable<ObjectInfo> {
    const full = this.key(prefix);
    let token: string | undefined;
    do {
      const page = await this.request("list", prefix, () =>
        this.client.send(
          new ListObjectsV2Command({
            Bucket: this.where.bucket,
            Prefix: full,
            ...(token ? { ContinuationToken: token } : {}),
          }),
        ),
      );
      for (const o of page.Contents ?? []) {
        if (!o.Key?.startsWith(this.where.prefix)) continue;
        yield {
          key: o.Key.slice(this.where.prefix.length),
          size: o.Size ?? 0,
          mtimeMs: o.LastModified?.getTime() ?? 0,
        };
      }
      token = page.IsTruncated ? page.NextContinuationToken : undefined;
    } while (token);
  }

  /** True when the bucket keeps versions (it has, or had, versioning on: every Object Lock bucket). */
  private versioned(): Promise<boolean> {
    this.versioning ??= this.request("get versioning of", undefined, () =>
      this.client.send(new GetBucketVersioningCommand({ Bucket: this.where.bucket })),
    ).then(
      (r) => r.Status === "Enabled" || r.Status === "Suspended",
      (err: unknown) => {
        this.versioning = undefined;
        throw err;
      },
    );
    return this.versioning;
  }

  /** True when the bucket was created with Object Lock (so puts may carry a retention). */
  async objectLock(): Promise<boolean> {
    this.locking ??= this.request("get object lock configuration of", undefined, () =>
      this.client.send(new GetObjectLockConfigurationCommand({ Bucket: this.where.bucket })),
    ).then(
      (r) => r.ObjectLockConfiguration?.ObjectLockEnabled === "Enabled",
      (err: unknown) => {
        if (
          s3Status(err instanceof StrataError ? err.cause : err).name ===
          "ObjectLockConfigurationNotFoundError"
        )
          return false;
        this.locking = undefined;
        throw err;
      },
    );
    return this.locking;
  }

  async retention(key: string): Promise<Retention | undefined> {
    return (await this.head(key))?.retention;
  }

  async extendRetention(key: string, retain: Retention): Promise<void> {
    await this.request("extend retention of", key, () =>
      this.client.send(
        new PutObjectRetentionCommand({
          Bucket: this.where.bucket,
          Key: this.key(key),
          Retention: { Mode: retain.mode, RetainUntilDate: new Date(retain.untilMs) },
        }),
      ),
    );
  }

  async checkDelete(): Promise<void> {
    // Deleting a key that does not exist is allowed exactly when deleting is (S3 answers 204).
    const probe = ".strata-delete-check";
    const res = await this.request("delete", probe, () =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: this.key(probe) })),
    ).catch((err: unknown) => {
      if (err instanceof StrataError && err.code === ErrorCode.PERMISSION_DENIED)
        throw new StrataError(
          ErrorCode.PERMISSION_DENIED,
          `the S3 credentials may not delete objects in bucket ${this.where.bucket} (s3:DeleteObject is refused): ` +
            "this command removes restore points or packs and needs credentials that may delete; " +
            "a backup-only credential can only add restore points",
          { cause: err },
        );
      throw err;
    });
    // A versioned bucket answers with a delete marker: removed again, not left behind.
    if (res.VersionId)
      await this.request("delete version of", probe, () =>
        this.client.send(
          new DeleteObjectCommand({
            Bucket: this.where.bucket,
            Key: this.key(probe),
            VersionId: res.VersionId,
          }),
        ),
      ).catch(() => {});
  }

  isLocked(err: unknown): boolean {
    return err instanceof StrataError && err.code === ErrorCode.OBJECT_LOCKED;
  }

  /** Every version (and delete marker) of the keys under `full` (a key or a folder-like prefix). */
  private async *versions(full: string): AsyncIterable<{ key: string; versionId: string }> {
    let keyMarker: string | undefined;
    let idMarker: string | undefined;
    for (;;) {
      const page = await this.request("list versions of", full.slice(this.where.prefix.length), () =>
        this.client.send(
          new ListObjectVersionsCommand({
            Bucket: this.where.bucket,
            Prefix: full,
            ...(keyMarker ? { KeyMarker: keyMarker } : {}),
            ...(idMarker ? { VersionIdMarker: idMarker } : {}),
          }),
        ),
      );
      for (const v of [...(page.Versions ?? []), ...(page.DeleteMarkers ?? [])])
        if (v.Key?.startsWith(this.where.prefix) && v.VersionId)
          yield { key: v.Key.slice(this.where.prefix.length), versionId: v.VersionId };
      if (!page.IsTruncated) return;
      keyMarker = page.NextKeyMarker;
      idMarker = page.NextVersionIdMarker;
    }
  }

  /** Deletes one version; a version under retention is an OBJECT_LOCKED error naming its date. */
  private async deleteVersion(key: string, versionId: string): Promise<void> {
    try {
      await this.request("delete version of", key, () =>
        this.client.send(
          new DeleteObjectCommand({ Bucket: this.where.bucket, Key: this.key(key), VersionId: versionId }),
        ),
      );
    } catch (err) {
      if (!(err instanceof StrataError && err.code === ErrorCode.PERMISSION_DENIED)) throw err;
      const held = await this.head(key, versionId).catch(() => undefined);
      if (held?.retention && held.retention.untilMs > Date.now())
        throw new StrataError(
          ErrorCode.OBJECT_LOCKED,
          `${this.name(key)} is locked (${held.retention.mode} retention) until ${new Date(held.retention.untilMs).toISOString()}`,
          { cause: err },
        );
      throw err;
    }
  }

  /**
   * Removes the object. In a versioned bucket every version of it goes (a plain delete would
   * only hide it behind a delete marker and free nothing); credentials that may not list or
   * delete versions get the plain delete, which hides it.
   */
  async delete(key: string): Promise<void> {
    if (await this.versioned()) {
      const full = this.key(key);
      let found: { key: string; versionId: string }[] | undefined = [];
      try {
        for await (const v of this.versions(full)) if (v.key === key) found.push(v);
      } catch (err) {
        if (!(err instanceof StrataError && err.code === ErrorCode.PERMISSION_DENIED)) throw err;
        found = undefined;
      }
      if (found !== undefined) {
        await this.deleteVersions(found);
        return;
      }
    }
    await this.request("delete", key, () =>
      this.client.send(new DeleteObjectCommand({ Bucket: this.where.bucket, Key: this.key(key) })),
    );
  }

  /** Deletes the versions, all of them tried; the first error (a locked one last) is thrown after. */
  private async deleteVersions(found: readonly { key: string; versionId: string }[]): Promise<void> {
    const locked: StrataError[] = [];
    let failed: unknown;
    let next = 0;
    const worker = async () => {
      for (let i = next++; i < found.length; i = next++) {
        const v = found[i]!;
        try {
          await this.deleteVersion(v.key, v.versionId);
        } catch (err) {
          if (this.isLocked(err)) locked.push(err as StrataError);
          else failed ??= err;
        }
      }
    };
    await Promise.all(Array.from({ length: Math.min(this.concurrency, found.length) }, worker));
    if (failed !== undefined) throw failed;
    if (locked.length === 1) throw locked[0];
    if (locked.length > 1)
      throw new StrataError(
        ErrorCode.OBJECT_LOCKED,
        `${locked.length} object versions are locked, the first: ${locked[0]!.message}`,
        { cause: locked[0] },
      );
  }

  async deletePrefix(prefix: string): Promise<void> {
    if (await this.versioned()) {
      const found: { key: string; versionId: string }[] = [];
      try {
        for await (const v of this.versions(this.key(prefix))) found.push(v);
      } catch (err) {
        if (!(err instanceof StrataError && err.code === ErrorCode.PERMISSION_DENIED)) throw err;
      }
      if (found.length > 0) return this.deleteVersions(found);
    }
    const batch: Promise<void>[] = [];
    for await (const o of this.list(prefix)) {
      batch.push(this.delete(o.key));
      if (batch.length >= this.concurrency) await Promise.all(batch.splice(0));
    }
    await Promise.all(batch);
  }

  async touch(key: string): Promise<boolean> {
    throw this.noV1("touch", key);
  }

  async deleteIfUntouched(key: string): Promise<boolean> {
    throw this.noV1("deleteIfUntouched", key);
  }

  private noV1(op: string, key: string): StrataError {
    return new StrataError(
      ErrorCode.REPO_VERSION,
      `${op} of ${this.name(key)}: an S3 store holds only format v2 repositories (format v1 needs touch and conditional delete)`,
    );
  }

  /** Aborts multipart uploads under the prefix started before `cutoffMs` (died mid-way). */
  async sweepTemporary(cutoffMs: number): Promise<number> {
    let removed = 0;
    let keyMarker: string | undefined;
    let idMarker: string | undefined;
    for (;;) {
      const page = await this.request("list multipart uploads in", undefined, () =>
        this.client.send(
          new ListMultipartUploadsCommand({
            Bucket: this.where.bucket,
            Prefix: this.where.prefix,
            ...(keyMarker ? { KeyMarker: keyMarker } : {}),
            ...(idMarker ? { UploadIdMarker: idMarker } : {}),
          }),
        ),
      );
      for (const u of page.Uploads ?? []) {
        if (!u.Key || !u.UploadId || (u.Initiated?.getTime() ?? 0) >= cutoffMs) continue;
        await this.request("abort multipart upload of", u.Key.slice(this.where.prefix.length), () =>
          this.client.send(
            new AbortMultipartUploadCommand({ Bucket: this.where.bucket, Key: u.Key, UploadId: u.UploadId }),
          ),
        );
        removed++;
      }
      if (!page.IsTruncated) return removed;
      keyMarker = page.NextKeyMarker;
      idMarker = page.NextUploadIdMarker;
    }
  }

  /** Puts are durable when they return. */
  async flush(): Promise<void> {}

  async close(): Promise<void> {}

  isNotFound(err: unknown): boolean {
    return (err as { code?: unknown })?.code === NOT_FOUND;
  }
}
