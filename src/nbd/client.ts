/**
 * NBD client: fixed newstyle handshake, structured replies, meta contexts and block status,
 * many requests in flight with out-of-order replies. See index.ts for the design.
 */

import { connect as netConnect, type Socket } from "node:net";
import { ErrorCode, StrataError } from "../util/errors.js";
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  Cursor,
  DEFAULT_MIN_BLOCK,
  DEFAULT_PREFERRED_BLOCK,
  decodeOptionReplyHeader,
  type Extent,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeRequest,
  errnoName,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  isErrorChunk,
  isRepError,
  MAX_EXTENTS_PER_CHUNK,
  MAX_OPTION_REPLY_LENGTH,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_MAGIC,
  NbdErrno,
  OPTION_REPLY_HEADER_SIZE,
  Opt,
  protocolError,
  Rep,
  ReplyFlag,
  ReplyType,
  readU64,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlag,
} from "./protocol.js";
import { SocketReader, SocketWriter } from "./wire.js";

/** Where the NBD server listens: a unix socket path, or TCP host and port. */
export type NbdAddress = { path: string } | { host: string; port: number };

export interface NbdClientOptions {
  /** Export to open; "" is the server's default export. */
  exportName?: string;
  /** Meta contexts to negotiate, e.g. `base:allocation`, `qemu:dirty-bitmap:NAME`. */
  metaContexts?: string[];
  /** Aborting closes the connection; pending and future calls fail with ABORTED. */
  signal?: AbortSignal;
  /** Limit for connect + handshake, and default per-request limit (ms). Default 30 s. */
  timeoutMs?: number;
  /** Per-request limit in ms, counted from the call (waiting for a slot included). */
  requestTimeoutMs?: number;
  /** Most requests on the wire at once; further calls wait for a slot. Default 16. */
  maxInFlight?: number;
  /** Ask for structured replies (default true). False forces simple replies. */
  structuredReplies?: boolean;
}

/** What NBD_OPT_INFO / NBD_OPT_GO told about an export. */
export interface ExportInfo {
  size: number;
  /** Transmission flags (see {@link TransmissionFlag}). */
  flags: number;
  minBlockSize: number;
  preferredBlockSize: number;
  maxBlockSize: number;
  description?: string;
}

/** One entry of NBD_OPT_LIST. */
export interface ExportListing {
  name: string;
  description: string;
}

/** The server answered a request with an NBD error number. */
export class NbdRequestError extends StrataError {
  /** The NBD errno value (see NbdErrno). */
  readonly errno: number;
  constructor(errno: number, message: string) {
    super(errno === NbdErrno.ENOSPC ? ErrorCode.NO_SPACE : ErrorCode.EXTERNAL, message);
    this.errno = errno;
  }
}

const DEFAULT_TIMEOUT = 30_000;
const MAX_OPTION_REPLIES = 100_000;
/** Largest length of one TRIM / WRITE_ZEROES / BLOCK_STATUS request. */
const MAX_RANGE_REQUEST = 1 << 30;
/** Most coverage intervals a read reply may be fragmented into. */
const MAX_READ_FRAGMENTS = 4096;

/** The one non-final reply type each option may get before its ACK. */
const NON_FINAL_REPLY: Record<number, number> = {
  [Opt.LIST]: Rep.SERVER,
  [Opt.INFO]: Rep.INFO,
  [Opt.GO]: Rep.INFO,
  [Opt.SET_META_CONTEXT]: Rep.META_CONTEXT,
  [Opt.LIST_META_CONTEXT]: Rep.META_CONTEXT,
};

interface OptionReply {
  type: number;
  data: Buffer;
}

function toStrataError(err: unknown): StrataError {
  if (err instanceof StrataError) return err;
  return new StrataError(ErrorCode.PROTOCOL, `NBD: ${err instanceof Error ? err.message : String(err)}`, {
    cause: err,
  });
}

function repName(type: number): string {
  for (const [k, v] of Object.entries(Rep)) if (v === type) return `NBD_REP_${k}`;
  return `reply type 0x${type.toString(16)}`;
}

/**
 * Negotiation phase over a fresh socket. Used by {@link NbdClient.connect} and by the
 * stand-alone queries (listExports, info, listMetaContexts).
 */
class Negotiation {
  readonly reader: SocketReader;
  readonly writer: SocketWriter;
  noZeroes = false;
  fixed = false;

  private constructor(readonly socket: Socket) {
    this.reader = new SocketReader(socket);
    this.writer = new SocketWriter(socket);
  }

  static async open(address: NbdAddress, timeoutMs: number, signal?: AbortSignal): Promise<Negotiation> {
    signal?.throwIfAborted();
    const socket = "path" in address ? netConnect(address.path) : netConnect(address.port, address.host);
    socket.setNoDelay?.(true);
    const where = "path" in address ? address.path : `${address.host}:${address.port}`;
    const fail = (err: Error): void => {
      socket.destroy(err);
    };
    const timer = setTimeout(
      () =>
        fail(new StrataError(ErrorCode.TIMEOUT, `NBD: no handshake with ${where} within ${timeoutMs} ms`)),
      timeoutMs,
    );
    const onAbort = (): void =>
      fail(new StrataError(ErrorCode.ABORTED, `NBD: connecting to ${where} aborted`));
    signal?.addEventListener("abort", onAbort, { once: true });
    let errorSeen: Error | undefined;
    socket.on("error", (e) => {
      errorSeen ??= e;
    });
    const n = new Negotiation(socket);
    try {
      await new Promise<void>((resolve, reject) => {
        socket.once("connect", resolve);
        socket.once("close", () => reject(errorSeen ?? new Error("closed")));
      });
      await n.greet();
      return n;
    } catch (err) {
      socket.destroy();
      const e = errorSeen ?? err;
      if (e instanceof StrataError) throw e;
      throw new StrataError(ErrorCode.PROTOCOL, `NBD: handshake with ${where} failed: ${String(e)}`, {
        cause: e,
      });
    } finally {
      clearTimeout(timer);
      signal?.removeEventListener("abort", onAbort);
    }
  }

  /** Server greeting and client flags. */
  private async greet(): Promise<void> {
    const hello = await this.reader.readExact(18);
    if (hello.readBigUInt64BE(0) !== NBD_MAGIC) throw protocolError("server greeting lacks NBDMAGIC");
    if (hello.readBigUInt64BE(8) !== IHAVEOPT)
      throw protocolError("server does not speak the newstyle handshake (oldstyle is not supported)");
    const flags = hello.readUInt16BE(16);
    this.fixed = (flags & HandshakeFlag.FIXED_NEWSTYLE) !== 0;
    this.noZeroes = (flags & HandshakeFlag.NO_ZEROES) !== 0;
    const cflags = Buffer.alloc(4);
    cflags.writeUInt32BE(
      (this.fixed ? ClientFlag.FIXED_NEWSTYLE : 0) | (this.noZeroes ? ClientFlag.NO_ZEROES : 0),
    );
    await this.writer.send(cflags);
  }

  /** Sends one option and collects its replies up to the final one (ACK or error). */
  async option(option: number, data?: Buffer): Promise<{ replies: OptionReply[]; final: OptionReply }> {
    const expected = NON_FINAL_REPLY[option];
    if (!this.fixed) throw protocolError("server lacks fixed newstyle; only NBD_OPT_EXPORT_NAME is possible");
    await this.writer.send(encodeOption(option, data));
    const replies: OptionReply[] = [];
    for (;;) {
      const h = decodeOptionReplyHeader(await this.reader.readExact(OPTION_REPLY_HEADER_SIZE));
      if (h.option !== option)
        throw protocolError(`reply for option ${h.option} while waiting for ${option}`);
      if (h.length > MAX_OPTION_REPLY_LENGTH) throw protocolError(`option reply of ${h.length} bytes`);
      const final = h.type === Rep.ACK || isRepError(h.type);
      if (!final && h.type !== expected)
        throw protocolError(`${repName(h.type)} in reply to option ${option}`);
      const reply = { type: h.type, data: await this.reader.readExact(h.length) };
      if (final) return { replies, final: reply };
      if (replies.length >= MAX_OPTION_REPLIES) throw protocolError("too many option replies");
      replies.push(reply);
    }
  }

  /** Describes a refused option: `NBD_REP_ERR_*` plus the server's message. */
  refusal(what: string, final: OptionReply): StrataError {
    const text = final.data.subarray(0, MAX_STRING).toString("utf8");
    const code = final.type === Rep.ERR_UNKNOWN ? ErrorCode.NOT_FOUND : ErrorCode.EXTERNAL;
    return new StrataError(
      code,
      `NBD: server refused ${what}: ${repName(final.type)}${text ? `: ${text}` : ""}`,
    );
  }

  /** NBD_OPT_INFO or NBD_OPT_GO; throws on refusal (ERR_UNSUP is returned as undefined). */
  async infoOrGo(option: number, exportName: string): Promise<ExportInfo | undefined> {
    const { replies, final } = await this.option(
      option,
      encodeInfoRequest(exportName, [Info.BLOCK_SIZE, Info.DESCRIPTION]),
    );
    if (final.type === Rep.ERR_UNSUP) return undefined;
    const what = `${option === Opt.GO ? "NBD_OPT_GO" : "NBD_OPT_INFO"} for export "${exportName}"`;
    if (final.type !== Rep.ACK) throw this.refusal(what, final);
    let size: number | undefined;
    let flags = 0;
    let minB = DEFAULT_MIN_BLOCK;
    let prefB = DEFAULT_PREFERRED_BLOCK;
    let maxB = MAX_PAYLOAD;
    let description: string | undefined;
    for (const r of replies) {
      if (r.type !== Rep.INFO) throw protocolError(`unexpected ${repName(r.type)} in reply to ${what}`);
      const c = new Cursor(r.data, "NBD_REP_INFO");
      const info = c.u16();
      if (info === Info.EXPORT) {
        if (r.data.length !== 12) throw protocolError("NBD_INFO_EXPORT of wrong length");
        size = c.u64("export size");
        flags = c.u16();
      } else if (info === Info.BLOCK_SIZE) {
        if (r.data.length !== 14) throw protocolError("NBD_INFO_BLOCK_SIZE of wrong length");
        minB = c.u32();
        prefB = c.u32();
        maxB = c.u32();
        const pow2 = (v: number): boolean => v > 0 && (v & (v - 1)) === 0;
        if (!pow2(minB) || minB > 65536 || !pow2(prefB) || prefB < minB || maxB < minB)
          throw protocolError(`implausible block sizes ${minB}/${prefB}/${maxB}`);
      } else if (info === Info.DESCRIPTION) {
        description = c.rest().subarray(0, MAX_STRING).toString("utf8");
      }
    }
    if (size === undefined) throw protocolError(`${what} succeeded without NBD_INFO_EXPORT`);
    const out: ExportInfo = {
      size,
      flags,
      minBlockSize: minB,
      preferredBlockSize: prefB,
      maxBlockSize: maxB,
    };
    if (description !== undefined) out.description = description;
    return out;
  }

  /** Old NBD_OPT_EXPORT_NAME: the server closes the connection on an unknown name. */
  async exportName(exportName: string): Promise<ExportInfo> {
    await this.writer.send(encodeOption(Opt.EXPORT_NAME, Buffer.from(exportName, "utf8")));
    const b = await this.reader.readExact(10 + (this.noZeroes ? 0 : 124));
    return {
      size: readU64(b, 0, "export size"),
      flags: b.readUInt16BE(8),
      minBlockSize: DEFAULT_MIN_BLOCK,
      preferredBlockSize: DEFAULT_PREFERRED_BLOCK,
      maxBlockSize: MAX_PAYLOAD,
    };
  }

  /** Sends NBD_OPT_ABORT and closes, without waiting long for the server's ACK. */
  async abort(): Promise<void> {
    try {
      if (this.fixed) await this.writer.send(encodeOption(Opt.ABORT));
    } catch {
      // the connection is being dropped anyway
    }
    this.socket.end();
    setTimeout(() => this.socket.destroy(), 1000).unref();
  }

  /** Parses the REP_META_CONTEXT replies: [id, name] pairs (ids are all 0 for LIST). */
  static contexts(replies: OptionReply[]): Array<[number, string]> {
    const out: Array<[number, string]> = [];
    for (const r of replies) {
      if (r.type !== Rep.META_CONTEXT) throw protocolError(`unexpected ${repName(r.type)} for meta context`);
      const c = new Cursor(r.data, "NBD_REP_META_CONTEXT");
      const id = c.u32();
      const name = c.rest();
      if (name.length > MAX_STRING) throw protocolError("meta context name too long");
      out.push([id, name.toString("utf8")]);
    }
    return out;
  }
}

interface Pending {
  type: number;
  offset: number;
  length: number;
  cookie: bigint;
  /** READ: where the data goes (zero-filled beforehand, so holes need no work). */
  into?: Buffer;
  /** READ: byte ranges [start, end) received so far, relative to `offset`. */
  covered: Array<[number, number]>;
  /** BLOCK_STATUS: descriptors per context id. */
  status: Map<number, Extent[]>;
  error?: NbdRequestError;
  timedOut: boolean;
  settle: (err?: Error) => void;
}

/**
 * An NBD connection in transmission phase. Create with {@link NbdClient.connect}. All methods
 * may be called concurrently; at most `maxInFlight` requests are on the wire, the rest wait.
 */
export class NbdClient {
  /** Export size in bytes. */
  readonly size: number;
  /** Transmission flags ({@link TransmissionFlag}). */
  readonly flags: number;
  readonly minBlockSize: number;
  readonly preferredBlockSize: number;
  /** Largest payload the server accepts; larger reads and writes are split. */
  readonly maxBlockSize: number;
  /** Whether the server agreed to structured replies. */
  readonly structuredReplies: boolean;
  /** Negotiated meta contexts (names). */
  readonly metaContexts: readonly string[];

  private readonly contextIds: Map<string, number>;
  private readonly pending = new Map<bigint, Pending>();
  private readonly slotWaiters: Array<{ grant: () => void; deny: (e: Error) => void }> = [];
  private inFlight = 0;
  private nextCookie = 1n;
  private failure: StrataError | undefined;
  private closing = false;
  private readonly maxInFlight: number;
  private readonly requestTimeoutMs: number;
  private readonly closed: Promise<void>;

  private constructor(
    private readonly n: Negotiation,
    info: ExportInfo,
    structured: boolean,
    contexts: Map<number, string>,
    opts: NbdClientOptions,
  ) {
    this.size = info.size;
    this.flags = info.flags;
    this.minBlockSize = info.minBlockSize;
    this.preferredBlockSize = info.preferredBlockSize;
    this.maxBlockSize = Math.min(info.maxBlockSize, MAX_PAYLOAD);
    this.structuredReplies = structured;
    this.contextIds = new Map([...contexts].map(([id, name]) => [name, id]));
    this.metaContexts = [...contexts.values()];
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? 16);
    this.requestTimeoutMs = opts.requestTimeoutMs ?? opts.timeoutMs ?? DEFAULT_TIMEOUT;
    this.closed = new Promise((resolve) => n.socket.once("close", () => resolve()));
    n.socket.on("close", () => this.fail(protocolError("connection closed by the server")));
    const signal = opts.signal;
    if (signal) {
      const onAbort = (): void => this.fail(new StrataError(ErrorCode.ABORTED, "NBD: connection aborted"));
      signal.addEventListener("abort", onAbort, { once: true });
      void this.closed.then(() => signal.removeEventListener("abort", onAbort));
    }
    this.readLoop().catch((err: unknown) => this.fail(toStrataError(err)));
  }

  /**
   * Connects, negotiates structured replies and meta contexts, and opens the export with
   * NBD_OPT_GO (NBD_OPT_EXPORT_NAME only if the server does not know GO).
   */
  static async connect(address: NbdAddress, opts: NbdClientOptions = {}): Promise<NbdClient> {
    const timeoutMs = opts.timeoutMs ?? DEFAULT_TIMEOUT;
    const exportName = opts.exportName ?? "";
    const n = await Negotiation.open(address, timeoutMs, opts.signal);
    const timer = setTimeout(
      () =>
        n.socket.destroy(
          new StrataError(ErrorCode.TIMEOUT, `NBD: handshake did not finish within ${timeoutMs} ms`),
        ),
      timeoutMs,
    );
    let errorSeen: Error | undefined;
    n.socket.on("error", (e) => {
      errorSeen ??= e;
    });
    try {
      let structured = false;
      let contexts = new Map<number, string>();
      if (n.fixed && opts.structuredReplies !== false) {
        const { final } = await n.option(Opt.STRUCTURED_REPLY);
        structured = final.type === Rep.ACK;
      }
      const wanted = opts.metaContexts ?? [];
      if (wanted.length > 0) {
        if (!structured)
          throw new StrataError(ErrorCode.EXTERNAL, "NBD: meta contexts need structured replies, refused");
        const { replies, final } = await n.option(
          Opt.SET_META_CONTEXT,
          encodeMetaContextRequest(exportName, wanted),
        );
        if (final.type !== Rep.ACK) throw n.refusal("NBD_OPT_SET_META_CONTEXT", final);
        contexts = new Map(Negotiation.contexts(replies));
        if (contexts.size !== replies.length) throw protocolError("duplicate meta context ids");
      }
      let info = n.fixed ? await n.infoOrGo(Opt.GO, exportName) : undefined;
      if (!info) {
        if (structured || contexts.size > 0) {
          // EXPORT_NAME cannot confirm what was negotiated; be conservative.
          throw protocolError("server knows structured replies but not NBD_OPT_GO");
        }
        info = await n.exportName(exportName);
      }
      if ((info.flags & TransmissionFlag.HAS_FLAGS) === 0) info.flags = 0;
      return new NbdClient(n, info, structured, contexts, opts);
    } catch (err) {
      n.socket.destroy();
      throw toStrataError(errorSeen instanceof StrataError ? errorSeen : err);
    } finally {
      clearTimeout(timer);
    }
  }

  /** NBD_OPT_LIST: the exports a server offers. */
  static async listExports(address: NbdAddress, opts: { timeoutMs?: number } = {}): Promise<ExportListing[]> {
    const n = await Negotiation.open(address, opts.timeoutMs ?? DEFAULT_TIMEOUT);
    return NbdClient.withTimeout(n, opts.timeoutMs, async () => {
      const { replies, final } = await n.option(Opt.LIST);
      if (final.type !== Rep.ACK) throw n.refusal("NBD_OPT_LIST", final);
      return replies.map((r) => {
        if (r.type !== Rep.SERVER) throw protocolError(`unexpected ${repName(r.type)} in NBD_OPT_LIST`);
        const c = new Cursor(r.data, "NBD_REP_SERVER");
        const name = c.string32();
        return { name, description: c.rest().subarray(0, MAX_STRING).toString("utf8") };
      });
    });
  }

  /** NBD_OPT_INFO: size, flags and block sizes of one export, without opening it. */
  static async info(address: NbdAddress, exportName: string, opts: { timeoutMs?: number } = {}) {
    const n = await Negotiation.open(address, opts.timeoutMs ?? DEFAULT_TIMEOUT);
    return NbdClient.withTimeout(n, opts.timeoutMs, async () => {
      const info = await n.infoOrGo(Opt.INFO, exportName);
      if (!info) throw new StrataError(ErrorCode.EXTERNAL, "NBD: server does not support NBD_OPT_INFO");
      return info;
    });
  }

  /** NBD_OPT_LIST_META_CONTEXT: contexts matching `queries` (all, when empty). */
  static async listMetaContexts(
    address: NbdAddress,
    exportName: string,
    queries: string[] = [],
    opts: { timeoutMs?: number } = {},
  ): Promise<string[]> {
    const n = await Negotiation.open(address, opts.timeoutMs ?? DEFAULT_TIMEOUT);
    return NbdClient.withTimeout(n, opts.timeoutMs, async () => {
      const sr = await n.option(Opt.STRUCTURED_REPLY);
      if (sr.final.type !== Rep.ACK) throw n.refusal("NBD_OPT_STRUCTURED_REPLY", sr.final);
      const { replies, final } = await n.option(
        Opt.LIST_META_CONTEXT,
        encodeMetaContextRequest(exportName, queries),
      );
      if (final.type !== Rep.ACK) throw n.refusal("NBD_OPT_LIST_META_CONTEXT", final);
      return Negotiation.contexts(replies).map(([, name]) => name);
    });
  }

  private static async withTimeout<T>(n: Negotiation, timeoutMs: number | undefined, fn: () => Promise<T>) {
    const ms = timeoutMs ?? DEFAULT_TIMEOUT;
    const timer = setTimeout(
      () => n.socket.destroy(new StrataError(ErrorCode.TIMEOUT, `NBD: no answer within ${ms} ms`)),
      ms,
    );
    let errorSeen: Error | undefined;
    n.socket.on("error", (e) => {
      errorSeen ??= e;
    });
    try {
      const out = await fn();
      await n.abort();
      return out;
    } catch (err) {
      n.socket.destroy();
      throw toStrataError(errorSeen instanceof StrataError ? errorSeen : err);
    } finally {
      clearTimeout(timer);
    }
  }

  /** True if the export refuses writes. */
  get readOnly(): boolean {
    return (this.flags & TransmissionFlag.READ_ONLY) !== 0;
  }

  // ---- commands ---------------------------------------------------------------------------

  /** Reads `length` bytes at `offset`; holes read as zeroes. Large reads are split. */
  async read(offset: number, length: number): Promise<Buffer> {
    this.checkRange(offset, length);
    const out = Buffer.alloc(length);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += this.maxBlockSize) {
      const n = Math.min(this.maxBlockSize, length - at);
      parts.push(this.submit(Cmd.READ, 0, offset + at, n, undefined, out.subarray(at, at + n)));
    }
    await Promise.all(parts);
    return out;
  }

  /** Writes `data` at `offset`; with `fua` the data is durable when the call resolves. */
  async write(offset: number, data: Buffer, opts: { fua?: boolean } = {}): Promise<void> {
    this.checkRange(offset, data.length);
    const flags = this.fuaFlag(opts.fua);
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < data.length; at += this.maxBlockSize) {
      const part = data.subarray(at, Math.min(data.length, at + this.maxBlockSize));
      parts.push(this.submit(Cmd.WRITE, flags, offset + at, part.length, part));
    }
    await Promise.all(parts);
    if (opts.fua && flags === 0) await this.flush();
  }

  /**
   * Writes zeroes; `noHole` asks the server to allocate. Falls back to writing zero buffers
   * when the server lacks NBD_CMD_WRITE_ZEROES.
   */
  async writeZeroes(offset: number, length: number, opts: { fua?: boolean; noHole?: boolean } = {}) {
    this.checkRange(offset, length);
    if ((this.flags & TransmissionFlag.SEND_WRITE_ZEROES) === 0) {
      const zero = Buffer.alloc(Math.min(length, this.maxBlockSize));
      const parts: Promise<void>[] = [];
      for (let at = 0; at < length; at += zero.length) {
        parts.push(this.write(offset + at, zero.subarray(0, Math.min(zero.length, length - at))));
      }
      await Promise.all(parts);
      if (opts.fua) await this.flush();
      return;
    }
    const flags = this.fuaFlag(opts.fua) | (opts.noHole ? CmdFlag.NO_HOLE : 0);
    await this.ranges(Cmd.WRITE_ZEROES, flags, offset, length);
    if (opts.fua && (flags & CmdFlag.FUA) === 0) await this.flush();
  }

  /** Discards a range (NBD_CMD_TRIM); the server may ignore it. */
  async trim(offset: number, length: number): Promise<void> {
    this.checkRange(offset, length);
    if ((this.flags & TransmissionFlag.SEND_TRIM) === 0) return;
    await this.ranges(Cmd.TRIM, 0, offset, length);
  }

  /** Makes completed writes durable (no-op if the server has no flush). */
  async flush(): Promise<void> {
    if ((this.flags & TransmissionFlag.SEND_FLUSH) === 0) return;
    await this.submit(Cmd.FLUSH, 0, 0, 0);
  }

  /**
   * Block status of `[offset, offset + length)` in one negotiated meta context, as contiguous
   * extents covering the whole range (adjacent extents with equal flags merged). Issues as many
   * NBD_CMD_BLOCK_STATUS requests as the server's (possibly short) answers need.
   */
  async blockStatus(offset: number, length: number, context: string = BASE_ALLOCATION): Promise<Extent[]> {
    this.checkRange(offset, length);
    const id = this.contextIds.get(context);
    if (id === undefined)
      throw new StrataError(ErrorCode.USAGE, `NBD: meta context "${context}" was not negotiated`);
    const out: Extent[] = [];
    const end = offset + length;
    let pos = offset;
    while (pos < end) {
      const n = Math.min(end - pos, MAX_RANGE_REQUEST);
      const status = await this.submit(Cmd.BLOCK_STATUS, 0, pos, n);
      const descs = status.get(id);
      if (!descs) throw protocolError(`block status reply lacks context "${context}"`);
      for (const d of descs) {
        if (pos >= end) break;
        const len = Math.min(d.length, end - pos);
        const last = out[out.length - 1];
        if (last && last.flags === d.flags) last.length += len;
        else out.push({ offset: pos, length: len, flags: d.flags });
        pos += len;
      }
    }
    return out;
  }

  /** One raw NBD_CMD_BLOCK_STATUS: descriptors per negotiated context, as the server sent them. */
  async blockStatusAll(offset: number, length: number): Promise<Map<string, Extent[]>> {
    this.checkRange(offset, length);
    if (this.contextIds.size === 0) throw new StrataError(ErrorCode.USAGE, "NBD: no meta context negotiated");
    const status = await this.submit(Cmd.BLOCK_STATUS, 0, offset, Math.min(length, MAX_RANGE_REQUEST));
    const out = new Map<string, Extent[]>();
    for (const [name, id] of this.contextIds) out.set(name, status.get(id) ?? []);
    return out;
  }

  /**
   * Soft disconnect: waits (up to the request timeout) for requests in flight, sends
   * NBD_CMD_DISC and closes the socket. Safe to call more than once.
   */
  async close(): Promise<void> {
    if (!this.closing && !this.failure) {
      this.closing = true;
      const deadline = Date.now() + this.requestTimeoutMs;
      while (
        (this.pending.size > 0 || this.slotWaiters.length > 0) &&
        !this.failure &&
        Date.now() < deadline
      ) {
        await new Promise((r) => setTimeout(r, 5));
      }
      if (!this.failure) {
        try {
          await this.n.writer.send(
            encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 0n, offset: 0, length: 0 }),
          );
        } catch {
          // already gone
        }
        this.n.socket.end();
      }
    }
    this.closing = true;
    const t = setTimeout(() => this.n.socket.destroy(), 2000);
    await this.closed;
    clearTimeout(t);
  }

  // ---- machinery --------------------------------------------------------------------------

  private fuaFlag(fua: boolean | undefined): number {
    return fua && (this.flags & TransmissionFlag.SEND_FUA) !== 0 ? CmdFlag.FUA : 0;
  }

  private checkRange(offset: number, length: number): void {
    if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0)
      throw new StrataError(ErrorCode.USAGE, `NBD: bad range ${offset}+${length}`);
    if (offset + length > this.size)
      throw new StrataError(
        ErrorCode.USAGE,
        `NBD: range ${offset}+${length} beyond export size ${this.size}`,
      );
  }

  private async ranges(type: number, flags: number, offset: number, length: number): Promise<void> {
    const parts: Promise<unknown>[] = [];
    for (let at = 0; at < length; at += MAX_RANGE_REQUEST) {
      parts.push(this.submit(type, flags, offset + at, Math.min(MAX_RANGE_REQUEST, length - at)));
    }
    await Promise.all(parts);
  }

  /** Fails the connection: every pending and future call rejects with `err`. */
  private fail(err: StrataError): void {
    if (this.failure) return;
    this.failure = this.closing && err.code === ErrorCode.PROTOCOL ? protocolError("connection closed") : err;
    this.n.reader.fail(this.failure);
    this.n.socket.destroy();
    for (const p of this.pending.values()) p.settle(this.failure);
    this.pending.clear();
    for (const w of this.slotWaiters.splice(0)) w.deny(this.failure);
  }

  private releaseSlot(): void {
    const next = this.slotWaiters.shift();
    if (next) next.grant();
    else this.inFlight--;
  }

  /** Sends one request and resolves when its reply is complete. */
  private submit(
    type: number,
    flags: number,
    offset: number,
    length: number,
    payload?: Buffer,
    into?: Buffer,
  ): Promise<Map<number, Extent[]>> {
    if (this.failure) return Promise.reject(this.failure);
    if (this.closing) return Promise.reject(new StrataError(ErrorCode.USAGE, "NBD: client is closing"));
    return new Promise((resolve, reject) => {
      let done = false;
      let p: Pending | undefined;
      let waiter: { grant: () => void; deny: (e: Error) => void } | undefined;
      const timer = setTimeout(() => {
        if (done) return;
        done = true;
        if (waiter) {
          const i = this.slotWaiters.indexOf(waiter);
          if (i >= 0) this.slotWaiters.splice(i, 1);
        }
        if (p) p.timedOut = true; // keep the cookie: the late reply is read and dropped
        reject(
          new StrataError(
            ErrorCode.TIMEOUT,
            `NBD: request ${type} at ${offset}+${length} got no reply within ${this.requestTimeoutMs} ms`,
          ),
        );
      }, this.requestTimeoutMs);
      const start = (): void => {
        waiter = undefined;
        if (done) {
          this.releaseSlot();
          return;
        }
        const cookie = this.nextCookie++;
        const pending: Pending = {
          type,
          offset,
          length,
          cookie,
          covered: [],
          status: new Map(),
          timedOut: false,
          settle: (err) => {
            clearTimeout(timer);
            if (done) return;
            done = true;
            if (err) reject(err);
            else resolve(pending.status);
          },
        };
        if (into) pending.into = into;
        p = pending;
        this.pending.set(cookie, pending);
        const header = encodeRequest({ flags, type, cookie, offset, length });
        this.n.writer.send(header, payload ?? Buffer.alloc(0)).catch((err: unknown) => {
          this.fail(toStrataError(err));
        });
      };
      if (this.inFlight < this.maxInFlight) {
        this.inFlight++;
        start();
      } else {
        waiter = {
          grant: start,
          deny: (e) => {
            clearTimeout(timer);
            if (!done) {
              done = true;
              reject(e);
            }
          },
        };
        this.slotWaiters.push(waiter);
      }
    });
  }

  private finish(p: Pending, err?: Error): void {
    this.pending.delete(p.cookie);
    this.releaseSlot();
    p.settle(err);
  }

  private lookup(cookie: bigint): Pending {
    const p = this.pending.get(cookie);
    if (!p) throw protocolError(`reply for unknown cookie ${cookie}`);
    return p;
  }

  private async readLoop(): Promise<void> {
    const r = this.n.reader;
    for (;;) {
      const magic = (await r.readExact(4)).readUInt32BE(0);
      if (magic === SIMPLE_REPLY_MAGIC) {
        const h = await r.readExact(12);
        const errno = h.readUInt32BE(0);
        const p = this.lookup(h.readBigUInt64BE(4));
        if (p.type === Cmd.READ && this.structuredReplies)
          throw protocolError("simple reply to a read after structured replies were negotiated");
        if (p.type === Cmd.READ && errno === 0 && p.length > 0) {
          await r.readInto(p.into!);
        }
        this.finish(p, errno === 0 ? undefined : this.requestError(p, errno, ""));
      } else if (magic === STRUCTURED_REPLY_MAGIC) {
        if (!this.structuredReplies) throw protocolError("structured reply that was not negotiated");
        const h = await r.readExact(16);
        const flags = h.readUInt16BE(0);
        const type = h.readUInt16BE(2);
        const p = this.lookup(h.readBigUInt64BE(4));
        const length = h.readUInt32BE(12);
        await this.chunk(p, type, length);
        if (flags & ReplyFlag.DONE) this.complete(p);
      } else {
        throw protocolError(`reply with wrong magic 0x${magic.toString(16)}`);
      }
    }
  }

  private requestError(p: Pending, errno: number, message: string): NbdRequestError {
    return new NbdRequestError(
      errno,
      `NBD: request ${p.type} at ${p.offset}+${p.length} failed: ${errnoName(errno)}${message ? `: ${message}` : ""}`,
    );
  }

  /** Reads and applies one structured reply chunk (payload of `length` bytes). */
  private async chunk(p: Pending, type: number, length: number): Promise<void> {
    const r = this.n.reader;
    if (type === ReplyType.NONE) {
      if (length !== 0) throw protocolError("NBD_REPLY_TYPE_NONE with a payload");
    } else if (type === ReplyType.OFFSET_DATA || type === ReplyType.OFFSET_HOLE) {
      if (p.type !== Cmd.READ) throw protocolError("read data in reply to a non-read");
      let start: number;
      let n: number;
      if (type === ReplyType.OFFSET_DATA) {
        if (length < 9 || length - 8 > p.length) throw protocolError(`OFFSET_DATA chunk of ${length} bytes`);
        const head = await r.readExact(8);
        start = readU64(head, 0, "chunk offset");
        n = length - 8;
        this.cover(p, start, n);
        await r.readInto(p.into!.subarray(start - p.offset, start - p.offset + n));
      } else {
        if (length !== 12) throw protocolError(`OFFSET_HOLE chunk of ${length} bytes`);
        const b = await r.readExact(12);
        start = readU64(b, 0, "hole offset");
        n = b.readUInt32BE(8);
        if (n === 0) throw protocolError("empty hole");
        this.cover(p, start, n);
        p.into!.fill(0, start - p.offset, start - p.offset + n);
      }
    } else if (type === ReplyType.BLOCK_STATUS) {
      if (p.type !== Cmd.BLOCK_STATUS) throw protocolError("block status in reply to another command");
      if (length < 12 || (length - 4) % 8 !== 0 || length > 4 + 8 * MAX_EXTENTS_PER_CHUNK)
        throw protocolError(`BLOCK_STATUS chunk of ${length} bytes`);
      const b = await r.readExact(length);
      const id = b.readUInt32BE(0);
      if (![...this.contextIds.values()].includes(id)) throw protocolError(`unknown meta context id ${id}`);
      if (p.status.has(id)) throw protocolError(`two block status chunks for context ${id}`);
      const extents: Extent[] = [];
      let pos = p.offset;
      for (let at = 4; at < length; at += 8) {
        const len = b.readUInt32BE(at);
        if (len === 0) throw protocolError("zero-length extent");
        extents.push({ offset: pos, length: len, flags: b.readUInt32BE(at + 4) });
        pos += len;
      }
      p.status.set(id, extents);
    } else if (isErrorChunk(type)) {
      if (length < 6 || length > 6 + MAX_STRING + 8) throw protocolError(`error chunk of ${length} bytes`);
      const b = await r.readExact(length);
      const errno = b.readUInt32BE(0);
      const msgLen = b.readUInt16BE(4);
      if (6 + msgLen > length) throw protocolError("error chunk message overruns the chunk");
      if (type === ReplyType.ERROR_OFFSET && length !== 6 + msgLen + 8)
        throw protocolError("ERROR_OFFSET chunk of wrong length");
      const message = b.subarray(6, 6 + msgLen).toString("utf8");
      p.error ??= this.requestError(p, errno === 0 ? NbdErrno.EIO : errno, message);
    } else {
      throw protocolError(`unknown reply chunk type ${type}`);
    }
  }

  /** Records that `[start, start+n)` of a read arrived; rejects out-of-range or overlapping data. */
  private cover(p: Pending, start: number, n: number): void {
    const rel = start - p.offset;
    if (rel < 0 || rel + n > p.length) throw protocolError("read chunk outside the requested range");
    const last = p.covered[p.covered.length - 1];
    if (last && last[1] === rel) last[1] = rel + n;
    else p.covered.push([rel, rel + n]);
    if (p.covered.length > MAX_READ_FRAGMENTS) {
      this.mergeCovered(p);
      if (p.covered.length > MAX_READ_FRAGMENTS) throw protocolError("read reply is too fragmented");
    }
  }

  private mergeCovered(p: Pending): number {
    p.covered.sort((a, b) => a[0] - b[0]);
    const merged: Array<[number, number]> = [];
    for (const iv of p.covered) {
      const last = merged[merged.length - 1];
      if (last && iv[0] < last[1]) throw protocolError("overlapping read chunks");
      if (last && iv[0] === last[1]) last[1] = iv[1];
      else merged.push([iv[0], iv[1]]);
    }
    p.covered = merged;
    return merged.reduce((s, [a, b]) => s + (b - a), 0);
  }

  private complete(p: Pending): void {
    if (p.error) {
      this.finish(p, p.error);
      return;
    }
    if (p.type === Cmd.READ && this.mergeCovered(p) !== p.length)
      throw protocolError(`read reply covers fewer than ${p.length} bytes`);
    if (p.type === Cmd.BLOCK_STATUS && p.status.size === 0 && !p.timedOut)
      throw protocolError("block status reply without a status chunk");
    this.finish(p);
  }
}
