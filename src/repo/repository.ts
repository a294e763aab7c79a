/**
 * A repository opened for use: its config, its key, and typed access to chunks, indexes,
 * manifests and blobs, every read verified. Writers go through {@link BackupWriter}.
 */
import { randomBytes } from "node:crypto";
import { hostname } from "node:os";
import { AlignedSlots } from "../util/aligned.js";
import { type Clock, systemClock } from "../util/clock.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { isPowerOfTwo } from "../util/sizes.js";
import { ChunkPool, type SharedSlot } from "./chunk-pool.js";
import { type CodecKeys, chunkDigest, type DigestKind, storedSizeBound } from "./codec.js";
import { backupLevel } from "./compression.js";
import { FixedIndex } from "./fixed-index.js";
import {
  DEFAULT_CHUNK_SIZE,
  FORMAT_VERSION,
  FORMAT_VERSIONS,
  formatTime,
  keys,
  MAX_CHUNK_SIZE,
  MIN_CHUNK_SIZE,
  NAME_RE,
  TIME_RE,
} from "./format.js";
import {
  createKeyFile,
  joinKeys,
  type KdfCache,
  keyFingerprint,
  openKeyFile,
  SCRYPT_DEFAULTS,
} from "./keys.js";
import { type ChunkLayout, type ChunkSession, ObjectPerChunkLayout, PackLayout } from "./layout.js";
import { Lock, type LockKind, listLocks } from "./locks.js";
import { type Manifest, type ManifestBlob, manifestProblem } from "./manifest.js";
import { PAYLOAD_ALIGN, payloadPad } from "./pack.js";
import { sealJson, unsealJson } from "./sealed-json.js";
import type { Retention, RetentionMode, Store } from "./store.js";

export interface RepoConfig {
  format: "strata-repository";
  version: number;
  /** Random id, hex; tells repositories apart (bitmap hand-over checks it). */
  id: string;
  chunkSize: number;
  compression: "zstd";
  encryption: "none" | "aes-256-gcm";
  /** keyFingerprint() of the key, or null when unencrypted. */
  keyFingerprint: string | null;
  created: string;
  /**
   * Restore points are stored under S3 Object Lock for this long (a bucket with Object Lock only).
   * Absent: no retention unless a backup asks for one.
   */
  immutable?: Immutability;
}

/** How restore points are locked: the mode and for how many seconds from their backup. */
export interface Immutability {
  mode: RetentionMode;
  seconds: number;
}

export interface InitOptions {
  chunkSize?: number;
  /** Encrypts the repository under this password. */
  password?: string;
  clock?: Clock;
  /** scrypt cost; the default is right for people. */
  kdfCost?: { N: number; r: number; p: number };
  /** Format version (default {@link FORMAT_VERSION}); 1 only to test that old repositories still work. */
  formatVersion?: number;
  /** Keeps the password's derived key for the commands that follow (see {@link KdfCache}). */
  kdfCache?: KdfCache;
  /** Locks every restore point for this long (the bucket must have S3 Object Lock). */
  immutable?: Immutability;
}

export interface OpenOptions {
  /** Locks the restore points written through this repository object so (overrides the config's). */
  immutable?: Immutability;
  password?: string;
  clock?: Clock;
  /** Worker threads for the chunk codec. */
  threads?: number;
  /** The CPU priority (nice, 0-19) of the codec's threads; unset: the process's. */
  workerNice?: number;
  /** How often held locks are refreshed (default every 5 minutes; tests shorten it). */
  lockRefreshMs?: number;
  /** Format v2: pack size at which writers seal a pack (tests make it small). */
  packTarget?: number;
  /** Where a password's derived key may be found instead of running scrypt (see {@link KdfCache}). */
  kdfCache?: KdfCache;
}

interface LegacyUpgrade {
  password: string;
  keyCreated: string;
  cost: { N: number; r: number; p: number };
}

/** What a config claims, read before its seal can be checked (that may need the key it names). */
function peekConfig(
  bytes: Uint8Array,
): { format: unknown; version: unknown; encryption: unknown; keyed: boolean } | string {
  let doc: unknown;
  try {
    doc = JSON.parse(Buffer.from(bytes).toString("utf8"));
  } catch (err) {
    return `not valid JSON (${(err as Error).message})`;
  }
  if (typeof doc !== "object" || doc === null || Array.isArray(doc)) return "not an object";
  const d = doc as Record<string, unknown>;
  if (typeof d.seal !== "string") return "no seal";
  return {
    format: d.format,
    version: d.version,
    encryption: d.encryption,
    keyed: d.seal.startsWith("hmac-sha256:"),
  };
}

/** A restore point as listed: where it is and what its manifest says. */
export interface SnapshotRef {
  vm: string;
  time: string;
  manifest: Manifest;
}

export function checkName(kind: string, name: string): void {
  if (!NAME_RE.test(name)) {
    throw new StrataError(
      ErrorCode.USAGE,
      `bad ${kind} name "${name}": use 1-64 letters, digits, ".", "_" or "-", starting with a letter or digit`,
    );
  }
}

export class Repository {
  private pool: ChunkPool | undefined;
  /** Where the chunks are: one object each (v1) or packs (v2). */
  readonly layout: ChunkLayout;

  private constructor(
    readonly store: Store,
    readonly config: RepoConfig,
    readonly keys: CodecKeys | undefined,
    readonly clock: Clock,
    private readonly threads: number | undefined,
    /**
     * Set for an encrypted repository whose config is still under a plain seal (written before
     * configs were keyed): what the next writer needs to key it.
     */
    private legacy: LegacyUpgrade | undefined,
    private readonly lockRefreshMs?: number,
    packTarget?: number,
    private readonly workerNice?: number,
    private readonly immutableOverride?: Immutability,
  ) {
    this.layout =
      config.version === 1
        ? new ObjectPerChunkLayout(store)
        : new PackLayout(store, () => this.codec(), config.chunkSize, packTarget);
  }

  get chunkSize(): number {
    return this.config.chunkSize;
  }

  get encrypted(): boolean {
    return this.keys !== undefined;
  }

  /** How chunks are named: SHA-256 in format v1, BLAKE3 in v2 (keyed when encrypted). */
  get digestKind(): DigestKind {
    return this.config.version === 1 ? "sha256" : "blake3";
  }

  /** Creates a repository in an empty store. */
  static async init(store: Store, options: InitOptions = {}): Promise<RepoConfig> {
    const clock = options.clock ?? systemClock;
    const chunkSize = options.chunkSize ?? DEFAULT_CHUNK_SIZE;
    if (!isPowerOfTwo(chunkSize) || chunkSize < MIN_CHUNK_SIZE || chunkSize > MAX_CHUNK_SIZE) {
      throw new StrataError(
        ErrorCode.USAGE,
        `chunk size ${chunkSize} is not a power of two between ${MIN_CHUNK_SIZE} and ${MAX_CHUNK_SIZE}`,
      );
    }
    if (await store.stat(keys.config)) {
      throw new StrataError(ErrorCode.REPO_EXISTS, `a repository already exists at ${store.location}`);
    }
    const created = new Date(clock.now()).toISOString();
    let fingerprint: string | null = null;
    let macKey: Buffer | undefined;
    if (options.password !== undefined) {
      const { file, keys: k } = await createKeyFile(
        options.password,
        created,
        options.kdfCost ?? SCRYPT_DEFAULTS,
        undefined,
        options.kdfCache,
      );
      await store.put(keys.key("default"), file, { durable: true });
      fingerprint = keyFingerprint(k);
      macKey = k.macKey;
    }
    if (options.immutable) await checkObjectLock(store, options.immutable);
    const version = options.formatVersion ?? FORMAT_VERSION;
    if (!FORMAT_VERSIONS.includes(version))
      throw new StrataError(ErrorCode.USAGE, `unknown repository format version ${version}`);
    if (version === 1 && store.formatV1 === false) throw formatV1Refused(store.location);
    const config: RepoConfig = {
      format: "strata-repository",
      version,
      id: randomBytes(16).toString("hex"),
      chunkSize,
      compression: "zstd",
      encryption: options.password === undefined ? "none" : "aes-256-gcm",
      keyFingerprint: fingerprint,
      created,
      ...(options.immutable ? { immutable: options.immutable } : {}),
    };
    // An encrypted repository's config is sealed with its MAC key: editing it (to say "no
    // encryption", another chunk size or id) breaks the seal, and only the key can make a new one.
    await store.put(keys.config, sealJson(config, macKey), { durable: true });
    return config;
  }

  /** Opens a repository, checking its config and, when encrypted, the password. */
  static async open(store: Store, options: OpenOptions = {}): Promise<Repository> {
    let bytes: Buffer;
    try {
      bytes = await store.get(keys.config);
    } catch (err) {
      if (store.isNotFound(err)) {
        throw new StrataError(
          ErrorCode.REPO_NOT_FOUND,
          `no repository at ${store.location} (create one with "strata init")`,
        );
      }
      // A store's own classified error (an S3 store's missing bucket, refused credentials, an
      // unreachable endpoint) already says what is wrong and where.
      if (err instanceof StrataError) throw err;
      throw new StrataError(
        ErrorCode.REPO_CORRUPT,
        `cannot read the repository config at ${store.location}: ${String(err)}`,
      );
    }
    const where = store.location;
    // The seal says how the config was written: "hmac-sha256:" under the repository's MAC key
    // (encrypted repositories since this version), "sha256:" otherwise. What the config claims is
    // believed only once its seal is checked with the key that the claim itself requires.
    const peek = peekConfig(bytes);
    if (typeof peek === "string")
      throw new StrataError(ErrorCode.REPO_CORRUPT, `repository config at ${where} is damaged: ${peek}`);
    if (peek.format !== "strata-repository") {
      throw new StrataError(ErrorCode.REPO_CORRUPT, `${where} does not hold a Strata repository config`);
    }
    if (typeof peek.version !== "number" || !FORMAT_VERSIONS.includes(peek.version)) {
      throw new StrataError(
        ErrorCode.REPO_VERSION,
        `repository at ${where} has format version ${String(peek.version)}; this Strata reads versions ${FORMAT_VERSIONS.join(" and ")}`,
      );
    }
    if (peek.version === 1 && store.formatV1 === false) throw formatV1Refused(where);
    const keyFile = await store.stat(keys.key("default"));
    const encrypted = peek.keyed || peek.encryption !== "none" || keyFile !== undefined;
    if (!encrypted) {
      const r = unsealJson<RepoConfig>(bytes);
      if (!r.ok)
        throw new StrataError(ErrorCode.REPO_CORRUPT, `repository config at ${where} is damaged: ${r.why}`);
      if (options.password !== undefined) {
        throw new StrataError(
          ErrorCode.PASSWORD_UNEXPECTED,
          `repository at ${where} is not encrypted, but a password was given (--password-file or STRATA_PASSWORD): ` +
            "refusing to store or read anything unencrypted that was meant to be encrypted; drop the password to use it",
        );
      }
      return new Repository(
        store,
        r.doc,
        undefined,
        options.clock ?? systemClock,
        options.threads,
        undefined,
        options.lockRefreshMs,
        options.packTarget,
        options.workerNice,
        options.immutable,
      );
    }
    if (peek.encryption !== "aes-256-gcm") {
      if (peek.encryption === "none") {
        throw new StrataError(
          ErrorCode.REPO_TAMPERED,
          `repository at ${where} has a key file (keys/default) but its config says it is not encrypted: ` +
            "the config was changed (an encrypted repository is never turned into a plain one); refusing to use it",
        );
      }
      throw new StrataError(
        ErrorCode.REPO_VERSION,
        `unknown encryption "${String(peek.encryption)}" at ${where}`,
      );
    }
    if (options.password === undefined) {
      throw new StrataError(
        ErrorCode.PASSWORD_REQUIRED,
        `repository at ${where} is encrypted: give its password with --password-file or STRATA_PASSWORD`,
      );
    }
    let keyBytes: Buffer;
    try {
      keyBytes = await store.get(keys.key("default"));
    } catch (err) {
      throw new StrataError(ErrorCode.REPO_CORRUPT, `repository at ${where} has no readable key file`, {
        cause: err,
      });
    }
    const opened = await openKeyFile(keyBytes, options.password, `${where}/keys/default`, options.kdfCache);
    const codecKeys = opened.keys;
    // A keyed seal proves the config was written by someone holding the key; a plain one is a
    // config from before configs were keyed, accepted (and re-sealed by the next writer) only
    // while the key file, whose flag is authenticated with the key, does not say configs are keyed.
    if (!peek.keyed && opened.configSealed) {
      throw new StrataError(
        ErrorCode.REPO_TAMPERED,
        `repository config at ${where} is not sealed with the repository key, as its key file requires: it was replaced; refusing to use it`,
      );
    }
    const r = unsealJson<RepoConfig>(bytes, peek.keyed ? codecKeys.macKey : undefined);
    if (!r.ok) {
      throw new StrataError(
        peek.keyed ? ErrorCode.REPO_TAMPERED : ErrorCode.REPO_CORRUPT,
        `repository config at ${where} ${peek.keyed ? "fails its keyed seal (it was changed)" : "is damaged"}: ${r.why}`,
      );
    }
    const config = r.doc;
    if (keyFingerprint(codecKeys) !== config.keyFingerprint) {
      throw new StrataError(
        ErrorCode.REPO_CORRUPT,
        `the key file does not belong to the repository at ${where}`,
      );
    }
    return new Repository(
      store,
      config,
      codecKeys,
      options.clock ?? systemClock,
      options.threads,
      peek.keyed ? undefined : { password: options.password, keyCreated: opened.created, cost: opened.cost },
      options.lockRefreshMs,
      options.packTarget,
      options.workerNice,
      options.immutable,
    );
  }

  /** The worker pool for the chunk codec, started on first use. */
  codec(): ChunkPool {
    this.pool ??= new ChunkPool(this.keys, this.threads, this.digestKind, this.workerNice);
    return this.pool;
  }

  /**
   * Starts, in the background, what reading chunks will need: the codec's threads and (format v2)
   * the pack index. A restore calls it once its lock is held, so that both are ready by the time
   * it has found its restore point and opened its target (~60 ms at a command's start). A failure
   * here is the first read's to report.
   */
  prepareReads(): void {
    this.startCodec();
    this.layout.prefetch?.();
  }

  /**
   * Starts the codec's threads now rather than at the first chunk: they take ~60 ms to start, and
   * a backup's session waits for them to read the pack index before its first chunk.
   */
  startCodec(): void {
    this.codec();
  }

  async close(): Promise<void> {
    await this.pool?.close();
    this.pool = undefined;
    await this.store.close?.();
  }

  /** Takes a lock; a writer (backup, exclusive) first seals a legacy config with the key. */
  async lock(kind: LockKind, what: string, claim?: string): Promise<Lock> {
    if (kind !== "read") await this.sealLegacyConfig();
    return Lock.acquire(
      this.store,
      this.clock,
      kind,
      what,
      claim,
      this.lockRefreshMs === undefined ? {} : { refreshEveryMs: this.lockRefreshMs },
    );
  }

  /**
   * Re-seals an encrypted repository's config written before configs were keyed (plain
   * SHA-256 seal) with the MAC key, so that from now on an edit is caught. Same document, new seal.
   */
  private async sealLegacyConfig(): Promise<void> {
    const legacy = this.legacy;
    if (!legacy || !this.keys) return;
    // Config first: a keyed config is accepted whatever the key file says, so a crash between
    // the two writes leaves a repository that opens.
    await this.store.put(keys.config, sealJson(this.config, this.keys.macKey), { durable: true });
    const { file } = await createKeyFile(
      legacy.password,
      legacy.keyCreated,
      legacy.cost,
      joinKeys(this.keys),
    );
    await this.store.put(keys.key("default"), file, { durable: true });
    this.legacy = undefined;
  }

  /** The verified plaintext of a chunk. */
  async readChunk(digest: Buffer): Promise<Buffer> {
    const hex = digest.toString("hex");
    return this.codec().decode(await this.storedChunk(hex), digest, hex);
  }

  /**
   * Like {@link readChunk}, but the verified plaintext is written into shared memory `into` at
   * `offset` by the worker that decodes it (no copy on this thread); returns its length. A chunk
   * longer than `capacity` fails as damaged. With `scratch` (page-aligned, a multiple of 4 KiB),
   * the stored bytes are read into it, around the page cache where the store can.
   */
  async readChunkInto(digest: Buffer, into: SharedSlot, scratch?: SharedSlot): Promise<number> {
    const hex = digest.toString("hex");
    return this.codec().decodeInto(await this.storedChunk(hex, scratch), digest, hex, into);
  }

  /**
   * Several chunks' verified plaintexts, chunk k into `into[k]` (as {@link readChunkInto}); their
   * stored bytes are read with one read when they lie back to back in one pack, into `scratch`
   * (page-aligned, room for `digests.length` slots of `stride` bytes). Returns their lengths.
   */
  async readChunksInto(
    digests: readonly Buffer[],
    into: readonly SharedSlot[],
    scratch: SharedSlot,
    stride: number,
  ): Promise<number[]> {
    const hexes = digests.map((d) => d.toString("hex"));
    const stored =
      digests.length > 1 && this.layout.readRun ? await this.layout.readRun(hexes, scratch) : undefined;
    return Promise.all(
      digests.map(async (digest, k) => {
        const at = stored
          ? stored[k]!
          : await this.storedChunk(hexes[k]!, {
              memory: scratch.memory,
              offset: scratch.offset + k * stride,
              capacity: stride,
            });
        return this.codec().decodeInto(at, digest, hexes[k]!, into[k]!);
      }),
    );
  }

  /** A chunk's stored bytes (see {@link ChunkLayout.read}). */
  private storedChunk(hex: string, scratch?: SharedSlot): Promise<Buffer> {
    return this.layout.read(hex, scratch);
  }

  /** Checksum of a blob's plaintext: the digest a chunk of the same bytes would have. */
  blobChecksum(data: Uint8Array): string {
    return chunkDigest(data, this.keys, this.digestKind).toString("hex");
  }

  /** All complete restore points (those with a valid manifest), oldest first. Damaged ones are reported to `onDamaged`. */
  async snapshots(
    vm?: string,
    onDamaged?: (vm: string, time: string, err: StrataError) => void,
  ): Promise<SnapshotRef[]> {
    const found = await this.snapshotNames(vm);
    const out: SnapshotRef[] = [];
    for (const f of found) {
      try {
        out.push({ ...f, manifest: await this.manifest(f.vm, f.time) });
      } catch (err) {
        if (!(err instanceof StrataError) || !onDamaged) throw err;
        onDamaged(f.vm, f.time, err);
      }
    }
    return out;
  }

  /** Restore points with a manifest (not read), oldest first, by VM. */
  private async snapshotNames(vm?: string): Promise<Array<{ vm: string; time: string }>> {
    const found: Array<{ vm: string; time: string }> = [];
    for await (const obj of this.store.list(vm === undefined ? "vms/" : `${keys.vmDir(vm)}/`)) {
      const parts = obj.key.split("/");
      if (parts.length === 4 && parts[3] === "manifest.json" && TIME_RE.test(parts[2]!)) {
        found.push({ vm: parts[1]!, time: parts[2]! });
      }
    }
    found.sort((a, b) => (a.vm === b.vm ? a.time.localeCompare(b.time) : a.vm.localeCompare(b.vm)));
    return found;
  }

  /**
   * The newest restore point of `vm`, undefined when it has none. Reads manifests newest first:
   * one, unless it is damaged; then, with `onDamaged`, it is reported and the next older one is
   * read, else its error is thrown.
   */
  async latestSnapshot(
    vm: string,
    onDamaged?: (vm: string, time: string, err: StrataError) => void,
  ): Promise<SnapshotRef | undefined> {
    const names = await this.snapshotNames(vm);
    for (let i = names.length - 1; i >= 0; i--) {
      const { time } = names[i]!;
      try {
        return { vm, time, manifest: await this.manifest(vm, time) };
      } catch (err) {
        if (!(err instanceof StrataError) || !onDamaged) throw err;
        onDamaged(vm, time, err);
      }
    }
    return undefined;
  }

  /**
   * Resolves "vm/time" or "vm/latest" to a restore point. "latest" reads one manifest, the
   * newest's, however many restore points the VM has; a damaged one is an error, not a reason to
   * fall back to an older point unasked.
   */
  async findSnapshot(ref: string): Promise<SnapshotRef> {
    const m = /^([^/]+)\/([^/]+)$/.exec(ref);
    if (!m)
      throw new StrataError(
        ErrorCode.USAGE,
        `restore point "${ref}" is not of the form VM/TIME or VM/latest`,
      );
    const [, vm, time] = m as unknown as [string, string, string];
    checkName("VM", vm);
    if (time === "latest") {
      const last = await this.latestSnapshot(vm);
      if (!last)
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `no restore points of VM "${vm}" in ${this.store.location}`,
        );
      return last;
    }
    if (!TIME_RE.test(time)) {
      throw new StrataError(
        ErrorCode.USAGE,
        `"${time}" is not a restore point time (YYYY-MM-DDTHH:MM:SSZ) or "latest"`,
      );
    }
    return { vm, time, manifest: await this.manifest(vm, time) };
  }

  /** A verified manifest. */
  async manifest(vm: string, time: string): Promise<Manifest> {
    let bytes: Buffer;
    try {
      bytes = await this.store.get(keys.manifest(vm, time));
    } catch (err) {
      if (this.store.isNotFound(err))
        throw new StrataError(ErrorCode.NOT_FOUND, `no restore point ${vm}/${time}`);
      throw err;
    }
    const r = unsealJson<Manifest>(bytes, this.keys?.macKey, this.encrypted);
    if (!r.ok)
      throw new StrataError(ErrorCode.DATA_CORRUPT, `manifest of ${vm}/${time} is damaged: ${r.why}`);
    if (r.doc.version !== undefined && r.doc.version !== 1 && r.doc.format === "strata-manifest")
      throw new StrataError(ErrorCode.REPO_VERSION, `manifest of ${vm}/${time} has unknown version`);
    const problem = manifestProblem(r.doc);
    if (problem !== undefined)
      throw new StrataError(ErrorCode.DATA_CORRUPT, `manifest of ${vm}/${time} is damaged: ${problem}`);
    if (r.doc.vm !== vm || r.doc.time !== time) {
      throw new StrataError(
        ErrorCode.DATA_CORRUPT,
        `manifest of ${vm}/${time} does not describe that restore point`,
      );
    }
    return r.doc;
  }

  /** A disk's index, verified against its manifest. */
  async index(snap: SnapshotRef, disk: string): Promise<FixedIndex> {
    const d = snap.manifest.disks.find((x) => x.name === disk);
    if (!d) {
      const names = snap.manifest.disks.map((x) => x.name).join(", ");
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `restore point ${snap.vm}/${snap.time} has no disk "${disk}" (it has: ${names})`,
      );
    }
    const what = `${snap.vm}/${snap.time}/${disk}`;
    let bytes: Buffer;
    try {
      bytes = await this.store.get(keys.index(snap.vm, snap.time, disk));
    } catch (err) {
      if (this.store.isNotFound(err))
        throw new StrataError(ErrorCode.DATA_MISSING, `index ${what} is missing`);
      throw err;
    }
    const index = FixedIndex.decode(bytes, what);
    if (index.checksum() !== d.indexChecksum || index.size !== d.size) {
      throw new StrataError(ErrorCode.DATA_CORRUPT, `index ${what} does not match its manifest`);
    }
    return index;
  }

  /** A blob of a restore point (the VM configuration), verified. */
  async blob(snap: SnapshotRef, blob: ManifestBlob): Promise<Buffer> {
    const stored = await this.store.get(keys.blob(snap.vm, snap.time, blob.name));
    // A blob's checksum is the digest a chunk of the same bytes would have, so the codec verifies it.
    return this.codec().decode(
      stored,
      Buffer.from(blob.checksum, "hex"),
      `${snap.vm}/${snap.time}/${blob.name}`,
    );
  }

  /**
   * Starts writing the restore point `vm`/`time` under a name fixed by the caller (a copy keeps
   * the name it has in its source repository). Its backup lock claims the name: a second writer
   * of the same restore point, live, is refused (LOCKED); a dead one's stale lock is taken over.
   */
  async startRestorePoint(vm: string, time: string, what: string): Promise<BackupWriter> {
    checkName("VM", vm);
    if (!TIME_RE.test(time))
      throw new StrataError(ErrorCode.USAGE, `"${time}" is not a restore point time (YYYY-MM-DDTHH:MM:SSZ)`);
    const lock = await this.lock("backup", what, `${vm}/${time}`);
    let session: ChunkSession;
    try {
      session = await this.layout.session();
    } catch (err) {
      await lock.release().catch(() => {});
      throw err;
    }
    return new BackupWriter(this, vm, time, lock, session, false);
  }

  /** How new restore points are locked: the backup's own setting, else the repository's; or none. */
  get immutability(): Immutability | undefined {
    return this.immutableOverride ?? this.config.immutable;
  }

  /**
   * Starts writing a restore point of `vm`. `incremental`: it has a parent restore point, so few
   * chunks are expected to be new and those are compressed harder ({@link backupLevel}).
   */
  async startBackup(vm: string, what: string, incremental = false): Promise<BackupWriter> {
    checkName("VM", vm);
    const immutable = this.immutability;
    if (immutable) await checkObjectLock(this.store, immutable);
    for (;;) {
      const time = formatTime(this.clock.now());
      const taken =
        (await this.store.stat(keys.manifest(vm, time))) !== undefined ||
        (await listLocks(this.store, this.clock)).some((l) => l.claim === `${vm}/${time}`);
      if (!taken) {
        try {
          const lock = await this.lock("backup", what, `${vm}/${time}`);
          // Counted from the backup's start: every object it stores is locked at least that long.
          const retain = immutable && {
            mode: immutable.mode,
            untilMs: this.clock.now() + immutable.seconds * 1000,
          };
          let session: ChunkSession;
          try {
            session = await this.layout.session(retain);
          } catch (err) {
            await lock.release().catch(() => {});
            throw err;
          }
          return new BackupWriter(this, vm, time, lock, session, incremental, retain);
        } catch (err) {
          if (!(err instanceof StrataError && err.code === ErrorCode.LOCKED)) throw err;
        }
      }
      // Restore points are named by the second: wait for the next one.
      await new Promise((r) => setTimeout(r, 1000 - (this.clock.now() % 1000) + 5));
    }
  }
}

/**
 * Chunks a writer encodes or stores at once, per worker thread (each holds one chunk-size slot of
 * aligned memory): enough that the workers have work while earlier chunks wait on the disk's
 * fdatasync. Measured on the bench disk with 2 threads: 5 at once, full backup 6.6 s; 10, 6.0 s;
 * 16, 5.9 s.
 */
const PUTS_PER_THREAD = 4;

/**
 * {@link BackupWriter.putData} digests and encodes in one worker call while fewer than this share
 * of its recent chunks were found stored, over about the last 1 / REUSED_RATE_WEIGHT chunks. A
 * chunk found stored costs a compression it did not need (about 1 ms per MiB at the bulk level)
 * where digesting first would have cost a second trip to the worker (about 0.1 ms): even at 10 %
 * the two are about equal.
 */
const FUSE_UNTIL_REUSED = 0.1;
const REUSED_RATE_WEIGHT = 1 / 32;

/** What {@link BackupWriter.putChunk} did; `data` is the chunk's memory, back from the worker. */
export type PutResult = { state: "reused"; data: Buffer } | { state: "new"; stored: number; data: Buffer };

/** "new" with its stored size, or "reused" when nothing was stored (`stored` undefined). */
function putResult(stored: number | undefined, data: Buffer): PutResult {
  return stored === undefined ? { state: "reused", data } : { state: "new", stored, data };
}

/**
 * Writes one restore point: chunks, then indexes and blobs, then the manifest (commit). Until
 * commit nothing is visible to listings; abort (or a crash) leaves only garbage for gc.
 */
export class BackupWriter {
  /** Chunks this writer stored or found stored: known present until it ends. */
  private readonly present = new Set<string>();
  /** How often putData's chunks were found stored, lately (a moving average, 0 to 1). */
  private reusedRate = 0;
  /** Chunks being stored right now, by digest. */
  private readonly storing = new Map<string, Promise<unknown>>();
  /** Page-aligned memory the workers encode into and the store writes from (made on first use). */
  private out: AlignedSlots | undefined;
  private done = false;

  constructor(
    readonly repo: Repository,
    readonly vm: string,
    readonly time: string,
    private readonly lock: Lock,
    private readonly chunks: ChunkSession,
    /** The backup has a parent restore point: its new chunks get the incremental level ({@link backupLevel}). */
    private readonly incremental = false,
    /** The retention everything this restore point needs is locked under (Object Lock). */
    readonly retain?: Retention,
  ) {}

  /** Disk indexes written, for extending the retention of the packs they reference. */
  private readonly indexes: FixedIndex[] = [];
  /** Objects of earlier restore points whose retention this one extended (at commit). */
  retentionsExtended = 0;

  private putOptions(): { retain?: Retention } {
    return this.retain ? { retain: this.retain } : {};
  }

  /** When this writer registered; gc keeps everything it touched since. */
  get started(): number {
    return this.lock.info.started;
  }

  /**
   * Makes sure the chunk with `digest` is stored. Returns "reused" if it was (it is touched so
   * gc keeps it), else encodes `data` on a worker and stores it: "new" with the stored size.
   * `data` is moved to the worker and back: use the returned `data`, not the argument, afterwards.
   */
  async putChunk(digest: Buffer, data: Buffer): Promise<PutResult> {
    this.lock.check();
    const hex = digest.toString("hex");
    let current = data;
    const stored = await this.once(hex, async () => {
      const codec = this.repo.codec();
      const out = this.outSlots();
      const slot = await out.take();
      try {
        const into = this.slotFor(out, slot);
        const encoded = await codec.encodeInto(current, backupLevel(this.incremental, codec.saturated), into);
        current = encoded.data;
        await this.chunks.put(hex, new Uint8Array(into.memory, into.offset, encoded.length));
        return encoded.length;
      } finally {
        out.give(slot);
      }
    });
    return putResult(stored, current);
  }

  /**
   * Digests `data` and makes sure it is stored, like {@link putChunk}; also returns the digest.
   * A backup without a parent expects nearly every chunk to be new: its worker digests and encodes
   * in one call, and the encoding is dropped for a chunk found stored. A backup with a parent, or
   * one whose recent chunks were often found stored (a disk of copies), digests first and encodes
   * only what is new.
   */
  async putData(data: Buffer): Promise<PutResult & { digest: Buffer }> {
    this.lock.check();
    const r = await this.putData_(data);
    this.reusedRate =
      this.reusedRate * (1 - REUSED_RATE_WEIGHT) + (r.state === "reused" ? REUSED_RATE_WEIGHT : 0);
    return r;
  }

  private async putData_(data: Buffer): Promise<PutResult & { digest: Buffer }> {
    const codec = this.repo.codec();
    if (this.incremental || this.reusedRate > FUSE_UNTIL_REUSED) {
      const hashed = await codec.hash(data);
      return { ...(await this.putChunk(hashed.digest, hashed.data)), digest: hashed.digest };
    }
    const out = this.outSlots();
    const slot = await out.take();
    try {
      const into = this.slotFor(out, slot);
      const encoded = await codec.hashEncodeInto(data, backupLevel(false, codec.saturated), into);
      const hex = encoded.digest.toString("hex");
      const stored = await this.once(hex, async () => {
        await this.chunks.put(hex, new Uint8Array(into.memory, into.offset, encoded.length));
        return encoded.length;
      });
      return { ...putResult(stored, encoded.data), digest: encoded.digest };
    } finally {
      out.give(slot);
    }
  }

  /**
   * Runs `store` (which returns the stored size) unless chunk `hex` is stored already (touched so
   * gc keeps it) or being stored by another call: then undefined. The same chunk twice at once
   * (a disk repeating itself): the second waits for the first.
   */
  private async once(hex: string, store: () => Promise<number>): Promise<number | undefined> {
    if (this.present.has(hex)) return undefined;
    const pending = this.storing.get(hex);
    if (pending) {
      await pending;
      return undefined;
    }
    const work = (async () => ((await this.chunks.has(hex)) ? undefined : await store()))();
    this.storing.set(hex, work);
    try {
      const r = await work;
      this.present.add(hex);
      return r;
    } finally {
      this.storing.delete(hex);
    }
  }

  /** Page-aligned memory the workers encode into and the store writes from. */
  private outSlots(): AlignedSlots {
    this.out ??= new AlignedSlots(
      this.repo.codec().threads * PUTS_PER_THREAD + 2,
      storedSizeBound(this.repo.chunkSize) + PAYLOAD_ALIGN,
    );
    return this.out;
  }

  /**
   * Where in slot `slot` a worker encodes a chunk: at its start when the store writes it from
   * there (v1, page-aligned for O_DIRECT), else where its payload is aligned as in a pack.
   */
  private slotFor(out: AlignedSlots, slot: number): SharedSlot {
    const skip = this.chunks.copies ? payloadPad(0, this.repo.encrypted) : 0;
    return { memory: out.memory, offset: out.offset(slot) + skip, capacity: out.slotSize - skip };
  }

  /** True (and touched) when the chunk is already stored. */
  async haveChunk(digest: Buffer): Promise<boolean> {
    this.lock.check();
    const hex = digest.toString("hex");
    if (this.present.has(hex)) return true;
    if (await this.chunks.has(hex)) {
      this.present.add(hex);
      return true;
    }
    return false;
  }

  /**
   * Makes the chunks of every pack stored so far findable by later writers (format v2: an index
   * object for them), so that a writer killed after this does not have to store them again.
   * Cheap when nothing new was stored; calls may overlap. Returns how many packs it made findable.
   */
  async checkpoint(): Promise<number> {
    this.lock.check();
    return (await this.chunks.checkpoint?.()) ?? 0;
  }

  async writeIndex(disk: string, index: FixedIndex): Promise<void> {
    this.lock.check();
    await this.repo.store.put(keys.index(this.vm, this.time, disk), index.encode(), this.putOptions());
    if (this.retain) this.indexes.push(index);
  }

  /** Stores a blob (encrypted like a chunk) and returns its manifest entry. */
  async writeBlob(name: string, data: Buffer): Promise<ManifestBlob> {
    this.lock.check();
    const checksum = this.repo.blobChecksum(data);
    const size = data.length;
    const { blob: stored } = await this.repo.codec().encode(Buffer.from(data));
    await this.repo.store.put(keys.blob(this.vm, this.time, name), stored, this.putOptions());
    return { name, size, checksum };
  }

  /** Makes everything durable, then writes the manifest: the restore point now exists. */
  async commit(
    manifest: Omit<Manifest, "format" | "version" | "vm" | "time" | "host" | "tool">,
    /** The host that took the restore point (a copy keeps its source's). */
    host: string = hostname(),
  ): Promise<Manifest> {
    const full: Manifest = {
      format: "strata-manifest",
      version: 1,
      vm: this.vm,
      time: this.time,
      ...manifest,
      host,
      tool: "strata",
      ...(this.retain
        ? { immutable: { mode: this.retain.mode, until: new Date(this.retain.untilMs).toISOString() } }
        : {}),
    };
    await this.chunks.finish();
    if (this.retain && this.chunks.retain) {
      // Chunks reused from earlier restore points: their packs must stay as long as this one.
      const indexes = this.indexes;
      const hexes = function* () {
        for (const index of indexes)
          for (let i = 0; i < index.count; i++) if (!index.isZero(i)) yield index.digest(i).toString("hex");
      };
      this.retentionsExtended = await this.chunks.retain(hexes(), this.retain);
    }
    await this.repo.store.flush();
    // The last moment to find out that gc may have taken this backup for dead.
    this.lock.check();
    await this.repo.store.put(keys.manifest(this.vm, this.time), sealJson(full, this.repo.keys?.macKey), {
      durable: true,
      ...this.putOptions(),
    });
    this.done = true;
    // The restore point exists now: a lock that can't be removed does not undo that. It stops
    // being refreshed, so it is stale once this process exits (same host) or after
    // STALE_AFTER_MS (other hosts), and the next gc removes it.
    await this.lock.release().catch(() => {});
    return full;
  }

  /** Gives up: removes what this restore point wrote besides chunks (gc takes those). */
  async abort(): Promise<void> {
    if (this.done) return;
    this.done = true;
    await this.chunks.abandon().catch(() => {});
    await this.repo.store.deletePrefix(`${keys.snapshotDir(this.vm, this.time)}/`).catch(() => {});
    await this.lock.release().catch(() => {});
  }
}

/** Refuses a retention on a store that can't keep one (a local directory, a bucket without Object Lock). */
async function checkObjectLock(store: Store, immutable: Immutability): Promise<void> {
  if (!Number.isInteger(immutable.seconds) || immutable.seconds < 1)
    throw new StrataError(
      ErrorCode.USAGE,
      `an immutability period must be at least 1 second, not ${immutable.seconds}`,
    );
  if (!(await store.objectLock?.()))
    throw new StrataError(
      ErrorCode.USAGE,
      `${store.location} can't keep restore points immutable: only an S3 bucket created with Object Lock ` +
        "enabled can (create the bucket with Object Lock, or leave out the immutability setting)",
    );
}

/** Format v1 gc rests on touch and conditional delete, which an object store does not offer. */
function formatV1Refused(where: string): StrataError {
  return new StrataError(
    ErrorCode.REPO_VERSION,
    `${where} is an object store, which holds only format v2 repositories (format v1 keeps one object ` +
      "per chunk and needs touch and conditional delete); keep it in a local directory",
  );
}
