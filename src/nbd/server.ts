/**
 * NBD server: serves {@link BlockSource}s over a unix socket or TCP. Fixed newstyle handshake,
 * structured replies, meta contexts, out-of-order replies with a bounded number of requests in
 * flight per connection. See index.ts for the design.
 */

import { createServer, type Server, type Socket } from "node:net";
import { createSecureContext, type SecureContext, TLSSocket } from "node:tls";
import { ErrorCode, isStrataError, StrataError } from "../util/errors.js";
import {
  BASE_ALLOCATION,
  ClientFlag,
  Cmd,
  CmdFlag,
  Cursor,
  DEFAULT_MIN_BLOCK,
  DEFAULT_PREFERRED_BLOCK,
  decodeOptionHeader,
  decodeRequest,
  type Extent,
  encodeBlockStatusPayload,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeOptionReply,
  encodeSimpleReply,
  encodeString32,
  HandshakeFlag,
  IHAVEOPT,
  Info,
  MAX_EXTENTS_PER_CHUNK,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  MAX_STRING,
  NBD_MAGIC,
  NbdErrno,
  OPTION_HEADER_SIZE,
  Opt,
  protocolError,
  REQUEST_HEADER_SIZE,
  Rep,
  ReplyFlag,
  ReplyType,
  TransmissionFlag,
} from "./protocol.js";
import { SocketReader, SocketWriter } from "./wire.js";

/**
 * What the server needs from a disk to export it. Offsets and lengths are bytes; the server
 * checks every request against `size` before calling, so implementations see only in-range
 * calls with `length <= 32 MiB` for read and write.
 */
export interface BlockSource {
  /** Size in bytes; fixed for the life of the export. */
  readonly size: number;
  /** Resolves with exactly `length` bytes. */
  read(offset: number, length: number): Promise<Buffer>;
  /** Absent: the export is read-only. */
  write?(offset: number, data: Buffer): Promise<void>;
  /** Absent: emulated with write() of zero buffers. */
  writeZeroes?(offset: number, length: number): Promise<void>;
  /** Absent: TRIM is accepted and ignored (it is advisory). */
  trim?(offset: number, length: number): Promise<void>;
  /** Makes completed writes durable. Absent: nothing to do. */
  flush?(): Promise<void>;
  /**
   * Extents of `context` starting exactly at `offset`, contiguous; may stop short of
   * `offset + length` but must cover at least one byte. Absent for `base:allocation`: the
   * whole range is reported allocated.
   */
  blockStatus?(context: string, offset: number, length: number): Promise<Extent[]>;
  /** Meta contexts besides `base:allocation` this source can answer (e.g. dirty bitmaps). */
  metaContexts?(): string[];
}

/** One named export. */
export interface NbdExport {
  source: BlockSource;
  /** Refuse writes even when the source has write(). */
  readOnly?: boolean;
  description?: string;
}

export interface NbdServerOptions {
  /** Exports by name ("" is the default export). */
  exports?: Record<string, NbdExport>;
  /** Requests handled at once per connection; beyond that the socket is not read. Default 16. */
  maxInFlight?: number;
  /** A client must reach transmission within this many ms. Default 10 s. */
  handshakeTimeoutMs?: number;
  /** Largest read/write payload accepted (and advertised). Default and maximum 32 MiB. */
  maxPayload?: number;
  /** Called with errors from connections (already handled: the connection is closed). */
  onError?: (err: Error) => void;
  /**
   * Require TLS (NBD_OPT_STARTTLS, as QEMU's server with tls-creds): every option but STARTTLS
   * and ABORT is answered NBD_REP_ERR_TLS_REQD until the client has upgraded, and the client
   * must present a certificate signed by `ca` (PEM).
   */
  tls?: NbdTlsOptions;
}

/** PEM server certificate and key, and the CA that client certificates must be signed by. */
export interface NbdTlsOptions {
  cert: string | Buffer;
  key: string | Buffer;
  ca: string | Buffer;
}

/** Address the server is listening on. */
export type NbdListenAddress = { path: string } | { host: string; port: number };

const MAX_OPTIONS = 1000;
const MAX_QUERIES = 1000;
const ZERO_CHUNK = 1024 * 1024;

interface Session {
  name: string;
  exp: NbdExport;
  structured: boolean;
  /** Selected contexts: id → name. */
  contexts: Map<number, string>;
}

/** NBD errno for an error thrown by a block source. */
function errnoFor(err: unknown): number {
  if (isStrataError(err, ErrorCode.NO_SPACE)) return NbdErrno.ENOSPC;
  if (err instanceof RangeError) return NbdErrno.EINVAL;
  return NbdErrno.EIO;
}

class RequestFailure extends Error {
  constructor(
    readonly errno: number,
    message: string,
  ) {
    super(message);
  }
}

/**
 * Clips a source's extents to `[offset, offset + length)`, merges neighbours with equal flags
 * and caps the count. Throws if they do not start at `offset` or have a gap.
 */
export function normalizeExtents(extents: ReadonlyArray<Extent>, offset: number, length: number): Extent[] {
  const end = offset + length;
  const out: Extent[] = [];
  let pos = offset;
  for (const e of extents) {
    if (pos >= end || out.length >= MAX_EXTENTS_PER_CHUNK) break;
    if (!(e.length > 0) || e.offset + e.length <= pos) continue;
    if (e.offset > pos) break; // a gap: report the contiguous prefix only
    const stop = Math.min(end, e.offset + e.length);
    const last = out[out.length - 1];
    if (last && last.flags === e.flags) last.length += stop - pos;
    else out.push({ offset: pos, length: stop - pos, flags: e.flags >>> 0 });
    pos = stop;
  }
  if (out.length === 0)
    throw new RequestFailure(NbdErrno.EIO, "block source returned no extent for the range");
  return out;
}

/**
 * An NBD server. `listen()` once, `close()` to stop it and drop every connection.
 */
export class NbdServer {
  private readonly exports = new Map<string, NbdExport>();
  private readonly sockets = new Set<Socket>();
  private readonly maxInFlight: number;
  private readonly handshakeTimeoutMs: number;
  private readonly maxPayload: number;
  private server: Server | undefined;
  private readonly tls: SecureContext | undefined;

  constructor(private readonly opts: NbdServerOptions = {}) {
    if (opts.tls) {
      try {
        this.tls = createSecureContext({ cert: opts.tls.cert, key: opts.tls.key, ca: opts.tls.ca });
      } catch (err) {
        throw new StrataError(
          ErrorCode.USAGE,
          `TLS certificate, key or CA unusable: ${(err as Error).message}`,
          {
            cause: err,
          },
        );
      }
    }
    for (const [name, exp] of Object.entries(opts.exports ?? {})) this.addExport(name, exp);
    this.maxInFlight = Math.max(1, opts.maxInFlight ?? 16);
    this.handshakeTimeoutMs = opts.handshakeTimeoutMs ?? 10_000;
    this.maxPayload = Math.min(MAX_PAYLOAD, opts.maxPayload ?? MAX_PAYLOAD);
  }

  /** Adds or replaces an export; existing connections keep what they opened. */
  addExport(name: string, exp: NbdExport): void {
    if (Buffer.byteLength(name) > MAX_STRING)
      throw new StrataError(ErrorCode.USAGE, "NBD export name too long");
    this.exports.set(name, exp);
  }

  removeExport(name: string): void {
    this.exports.delete(name);
  }

  /** Open connections. */
  get connectionCount(): number {
    return this.sockets.size;
  }

  /** Starts listening on a unix socket path or a TCP port (0 picks a free one). */
  async listen(where: { path: string } | { port: number; host?: string }): Promise<NbdListenAddress> {
    if (this.server) throw new StrataError(ErrorCode.USAGE, "NBD server is already listening");
    const server = createServer((socket) => this.accept(socket));
    this.server = server;
    server.on("error", (err) => this.opts.onError?.(err));
    await new Promise<void>((resolve, reject) => {
      server.once("error", reject);
      if ("path" in where) server.listen(where.path, () => resolve());
      else server.listen(where.port, where.host ?? "127.0.0.1", () => resolve());
    });
    const addr = server.address();
    if (addr && typeof addr === "object") return { host: addr.address, port: addr.port };
    return { path: "path" in where ? where.path : String(addr) };
  }

  /** Stops listening and closes every connection; resolves when all are gone. */
  async close(): Promise<void> {
    const server = this.server;
    const closing = server
      ? new Promise<void>((resolve) => server.close(() => resolve()))
      : Promise.resolve();
    const gone = [...this.sockets].map(
      (s) =>
        new Promise<void>((resolve) => {
          if (s.destroyed) resolve();
          else s.once("close", () => resolve());
          s.destroy();
        }),
    );
    await Promise.all([closing, ...gone]);
  }

  private accept(socket: Socket): void {
    this.sockets.add(socket);
    socket.on("close", () => this.sockets.delete(socket));
    socket.on("error", () => {}); // reported through the reader; never crash the process
    socket.setNoDelay?.(true);
    this.serve(socket).catch((err: unknown) => {
      this.opts.onError?.(err instanceof Error ? err : new Error(String(err)));
      socket.destroy();
    });
  }

  private async serve(socket: Socket): Promise<void> {
    let stream = socket;
    let reader = new SocketReader(socket);
    let writer = new SocketWriter(socket);
    const timer = setTimeout(() => {
      reader.fail(new StrataError(ErrorCode.TIMEOUT, "NBD: client did not finish the handshake in time"));
      socket.destroy();
    }, this.handshakeTimeoutMs);
    let session: Session | undefined;
    try {
      const noZeroes = await this.greet(reader, writer);
      let secure = this.tls === undefined;
      for (;;) {
        const r = await this.handshake(reader, writer, noZeroes, secure);
        if (r !== "starttls") {
          session = r;
          break;
        }
        // Everything negotiated so far is forgotten; the options go on inside TLS.
        stream = await this.startTls(socket);
        reader = new SocketReader(stream);
        writer = new SocketWriter(stream);
        secure = true;
      }
    } finally {
      clearTimeout(timer);
    }
    if (!session) {
      stream.end();
      setTimeout(() => stream.destroy(), 1000).unref();
      return;
    }
    await this.transmission(session, stream, reader, writer);
  }

  /** TLS over the connection after NBD_OPT_STARTTLS's ACK; the client must show a trusted certificate. */
  private async startTls(socket: Socket): Promise<TLSSocket> {
    const t = new TLSSocket(socket, {
      isServer: true,
      secureContext: this.tls!,
      requestCert: true,
      rejectUnauthorized: true,
    });
    this.sockets.add(t);
    t.on("close", () => this.sockets.delete(t));
    await new Promise<void>((resolve, reject) => {
      t.once("secure", () => resolve());
      t.once("error", (err) =>
        reject(
          new StrataError(ErrorCode.PROTOCOL, `NBD: TLS handshake failed: ${err.message}`, { cause: err }),
        ),
      );
      t.once("close", () =>
        reject(new StrataError(ErrorCode.PROTOCOL, "NBD: connection closed during the TLS handshake")),
      );
    });
    t.on("error", () => {}); // reported through the reader from now on
    return t;
  }

  // ---- handshake --------------------------------------------------------------------------

  /** Sends the greeting and reads the client's flags; returns whether it asked for no zeroes. */
  private async greet(reader: SocketReader, writer: SocketWriter): Promise<boolean> {
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBD_MAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES, 16);
    await writer.send(hello);
    const cflags = (await reader.readExact(4)).readUInt32BE(0);
    if ((cflags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0)
      throw protocolError(`unknown client flags 0x${cflags.toString(16)}`);
    return (cflags & ClientFlag.NO_ZEROES) !== 0;
  }

  /**
   * Option haggling until an export is chosen (the session), the client leaves (undefined), or
   * STARTTLS was acknowledged ("starttls": the caller upgrades the socket and calls again).
   * Until `secure`, only STARTTLS and ABORT are served.
   */
  private async handshake(
    reader: SocketReader,
    writer: SocketWriter,
    noZeroes: boolean,
    secure: boolean,
  ): Promise<Session | undefined | "starttls"> {
    let structured = false;
    let contexts = new Map<number, string>();
    let contextsFor: string | undefined;

    for (let i = 0; i < MAX_OPTIONS; i++) {
      const h = decodeOptionHeader(await reader.readExact(OPTION_HEADER_SIZE));
      if (h.length > MAX_OPTION_LENGTH)
        throw protocolError(`option ${h.option} with ${h.length} bytes of data`);
      const data = await reader.readExact(h.length);
      const reply = (type: number, payload?: Buffer) =>
        writer.send(encodeOptionReply(h.option, type, payload));
      const refuse = (type: number, message: string) => reply(type, Buffer.from(message, "utf8"));

      if (h.option === Opt.STARTTLS) {
        if (!this.tls) await refuse(Rep.ERR_UNSUP, "this server has no TLS");
        else if (secure) await refuse(Rep.ERR_INVALID, "TLS is already on");
        else if (h.length !== 0) await refuse(Rep.ERR_INVALID, "NBD_OPT_STARTTLS takes no data");
        else {
          reader.detach();
          await reply(Rep.ACK);
          return "starttls";
        }
        continue;
      }
      if (!secure && h.option !== Opt.ABORT) {
        // NBD_OPT_EXPORT_NAME can't be refused with a reply: only by closing.
        if (h.option === Opt.EXPORT_NAME) return undefined;
        await refuse(Rep.ERR_TLS_REQD, "this server requires TLS: send NBD_OPT_STARTTLS first");
        continue;
      }

      if (h.option === Opt.EXPORT_NAME) {
        const name = data.toString("utf8");
        const exp = this.exports.get(name);
        if (!exp) return undefined; // the only answer the old option allows
        const b = Buffer.alloc(10 + (noZeroes ? 0 : 124));
        b.writeBigUInt64BE(BigInt(exp.source.size), 0);
        b.writeUInt16BE(this.transmissionFlags(exp), 8);
        await writer.send(b);
        return { name, exp, structured, contexts: contextsFor === name ? contexts : new Map() };
      }
      try {
        switch (h.option) {
          case Opt.ABORT:
            await reply(Rep.ACK);
            return undefined;
          case Opt.LIST:
            if (h.length !== 0) {
              await refuse(Rep.ERR_INVALID, "NBD_OPT_LIST takes no data");
              break;
            }
            for (const [name, exp] of this.exports) {
              await reply(
                Rep.SERVER,
                Buffer.concat([encodeString32(name), Buffer.from(exp.description ?? "", "utf8")]),
              );
            }
            await reply(Rep.ACK);
            break;
          case Opt.STRUCTURED_REPLY:
            if (h.length !== 0) await refuse(Rep.ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY takes no data");
            else {
              structured = true;
              await reply(Rep.ACK);
            }
            break;
          case Opt.INFO:
          case Opt.GO: {
            const c = new Cursor(data, "NBD_OPT_GO");
            const name = c.string32();
            const count = c.u16();
            const infos = new Set<number>();
            for (let k = 0; k < count; k++) infos.add(c.u16());
            if (c.remaining !== 0) throw protocolError("trailing bytes");
            const exp = this.exports.get(name);
            if (!exp) {
              await refuse(Rep.ERR_UNKNOWN, `no export named "${name}"`);
              break;
            }
            await this.sendInfo(h.option, name, exp, infos, writer);
            await reply(Rep.ACK);
            if (h.option === Opt.GO) {
              return { name, exp, structured, contexts: contextsFor === name ? contexts : new Map() };
            }
            break;
          }
          case Opt.SET_META_CONTEXT:
          case Opt.LIST_META_CONTEXT: {
            const set = h.option === Opt.SET_META_CONTEXT;
            if (set) {
              contexts = new Map();
              contextsFor = undefined;
            }
            if (!structured) {
              await refuse(Rep.ERR_INVALID, "negotiate structured replies first");
              break;
            }
            const c = new Cursor(data, "meta context option");
            const name = c.string32();
            const count = c.u32();
            if (count > MAX_QUERIES) {
              await refuse(Rep.ERR_TOO_BIG, "too many queries");
              break;
            }
            const queries: string[] = [];
            for (let k = 0; k < count; k++) queries.push(c.string32());
            if (c.remaining !== 0) throw protocolError("trailing bytes");
            const exp = this.exports.get(name);
            if (!exp) {
              await refuse(Rep.ERR_UNKNOWN, `no export named "${name}"`);
              break;
            }
            const available = [BASE_ALLOCATION, ...(exp.source.metaContexts?.() ?? [])];
            const matches = (ctx: string, q: string): boolean =>
              ctx === q || (!set && q.endsWith(":") && ctx.startsWith(q));
            const chosen = available
              .map((ctx, id) => ({ ctx, id }))
              .filter(({ ctx }) => (set || queries.length > 0 ? queries.some((q) => matches(ctx, q)) : true));
            for (const { ctx, id } of chosen) {
              const b = Buffer.alloc(4);
              b.writeUInt32BE(set ? id + 1 : 0);
              await reply(Rep.META_CONTEXT, Buffer.concat([b, Buffer.from(ctx, "utf8")]));
            }
            if (set) {
              contexts = new Map(chosen.map(({ ctx, id }) => [id + 1, ctx]));
              contextsFor = name;
            }
            await reply(Rep.ACK);
            break;
          }
          default:
            await refuse(Rep.ERR_UNSUP, `option ${h.option} is not supported`);
        }
      } catch (err) {
        if (!isStrataError(err, ErrorCode.PROTOCOL) || isConnectionError(err)) throw err;
        // A malformed option body: say so and carry on (spec: NBD_REP_ERR_INVALID).
        await refuse(Rep.ERR_INVALID, err.message);
      }
    }
    throw protocolError(`more than ${MAX_OPTIONS} options`);
  }

  private async sendInfo(
    option: number,
    name: string,
    exp: NbdExport,
    infos: Set<number>,
    writer: SocketWriter,
  ): Promise<void> {
    const e = Buffer.alloc(12);
    e.writeUInt16BE(Info.EXPORT, 0);
    e.writeBigUInt64BE(BigInt(exp.source.size), 2);
    e.writeUInt16BE(this.transmissionFlags(exp), 10);
    await writer.send(encodeOptionReply(option, Rep.INFO, e));
    const bs = Buffer.alloc(14);
    bs.writeUInt16BE(Info.BLOCK_SIZE, 0);
    bs.writeUInt32BE(DEFAULT_MIN_BLOCK, 2);
    bs.writeUInt32BE(DEFAULT_PREFERRED_BLOCK, 6);
    bs.writeUInt32BE(this.maxPayload, 10);
    await writer.send(encodeOptionReply(option, Rep.INFO, bs));
    if (infos.has(Info.NAME)) {
      const b = Buffer.concat([Buffer.alloc(2), Buffer.from(name, "utf8")]);
      b.writeUInt16BE(Info.NAME, 0);
      await writer.send(encodeOptionReply(option, Rep.INFO, b));
    }
    if (infos.has(Info.DESCRIPTION) && exp.description) {
      const b = Buffer.concat([
        Buffer.alloc(2),
        Buffer.from(exp.description, "utf8").subarray(0, MAX_STRING),
      ]);
      b.writeUInt16BE(Info.DESCRIPTION, 0);
      await writer.send(encodeOptionReply(option, Rep.INFO, b));
    }
  }

  private writable(exp: NbdExport): boolean {
    return !exp.readOnly && typeof exp.source.write === "function";
  }

  private transmissionFlags(exp: NbdExport): number {
    let f = TransmissionFlag.HAS_FLAGS | TransmissionFlag.CAN_MULTI_CONN;
    if (this.writable(exp)) {
      f |= TransmissionFlag.SEND_FLUSH | TransmissionFlag.SEND_FUA | TransmissionFlag.SEND_WRITE_ZEROES;
      f |= TransmissionFlag.SEND_TRIM;
    } else {
      f |= TransmissionFlag.READ_ONLY;
    }
    return f;
  }

  // ---- transmission -----------------------------------------------------------------------

  private async transmission(
    s: Session,
    socket: Socket,
    reader: SocketReader,
    writer: SocketWriter,
  ): Promise<void> {
    let inFlight = 0;
    let wake: (() => void) | undefined;
    const settled = (): void => {
      inFlight--;
      const w = wake;
      wake = undefined;
      w?.();
    };
    const idle = async (limit: number): Promise<void> => {
      while (inFlight > limit) await new Promise<void>((r) => (wake = r));
    };
    for (;;) {
      // Backpressure: with every slot busy, stop reading; the client's writes then block.
      await idle(this.maxInFlight - 1);
      let req: ReturnType<typeof decodeRequest>;
      try {
        req = decodeRequest(await reader.readExact(REQUEST_HEADER_SIZE));
      } catch (err) {
        if (isStrataError(err, ErrorCode.PROTOCOL) && /connection closed/.test(err.message)) return;
        throw err;
      }
      if (req.type === Cmd.DISC) {
        await idle(0);
        socket.end();
        setTimeout(() => socket.destroy(), 1000).unref();
        return;
      }
      let payload: Buffer | undefined;
      if (req.type === Cmd.WRITE) {
        // Too big to skip safely: a hard disconnect is the only way to stay in sync.
        if (req.length > this.maxPayload) throw protocolError(`write of ${req.length} bytes`);
        payload = await reader.readExact(req.length);
      }
      inFlight++;
      this.handle(s, req, payload, writer)
        .catch(() => socket.destroy())
        .finally(settled);
    }
  }

  private async handle(
    s: Session,
    req: ReturnType<typeof decodeRequest>,
    payload: Buffer | undefined,
    writer: SocketWriter,
  ): Promise<void> {
    const { cookie } = req;
    try {
      if (req.type === Cmd.READ) {
        const data = await this.doRead(s, req.offset, req.length);
        if (!s.structured) return await writer.send(encodeSimpleReply(0, cookie), data);
        if (data.length === 0) {
          return await writer.send(
            encodeChunkHeader({ flags: ReplyFlag.DONE, type: ReplyType.NONE, cookie, length: 0 }),
          );
        }
        const off = Buffer.alloc(8);
        off.writeBigUInt64BE(BigInt(req.offset));
        return await writer.send(
          encodeChunkHeader({
            flags: ReplyFlag.DONE,
            type: ReplyType.OFFSET_DATA,
            cookie,
            length: 8 + data.length,
          }),
          off,
          data,
        );
      }
      if (req.type === Cmd.BLOCK_STATUS) {
        const chunks = await this.doBlockStatus(s, req);
        for (let i = 0; i < chunks.length; i++) {
          const payloadBuf = chunks[i]!;
          await writer.send(
            encodeChunkHeader({
              flags: i === chunks.length - 1 ? ReplyFlag.DONE : 0,
              type: ReplyType.BLOCK_STATUS,
              cookie,
              length: payloadBuf.length,
            }),
            payloadBuf,
          );
        }
        return;
      }
      await this.doCommand(s, req, payload);
      await writer.send(encodeSimpleReply(0, cookie));
    } catch (err) {
      if (err instanceof RequestFailure || !isConnectionError(err)) {
        const errno = err instanceof RequestFailure ? err.errno : errnoFor(err);
        const message = err instanceof Error ? err.message : String(err);
        if (s.structured) {
          const p = encodeErrorPayload(errno, message);
          await writer.send(
            encodeChunkHeader({ flags: ReplyFlag.DONE, type: ReplyType.ERROR, cookie, length: p.length }),
            p,
          );
        } else {
          await writer.send(encodeSimpleReply(errno, cookie));
        }
        return;
      }
      throw err;
    }
  }

  private checkRange(s: Session, offset: number, length: number): void {
    if (offset + length > s.exp.source.size)
      throw new RequestFailure(NbdErrno.EINVAL, `range ${offset}+${length} beyond size ${s.exp.source.size}`);
  }

  private async doRead(s: Session, offset: number, length: number): Promise<Buffer> {
    if (length > this.maxPayload) throw new RequestFailure(NbdErrno.EINVAL, `read of ${length} bytes`);
    this.checkRange(s, offset, length);
    if (length === 0) return Buffer.alloc(0);
    const data = await s.exp.source.read(offset, length);
    if (data.length !== length)
      throw new RequestFailure(NbdErrno.EIO, `source returned ${data.length} of ${length} bytes`);
    return data;
  }

  private async doCommand(
    s: Session,
    req: ReturnType<typeof decodeRequest>,
    payload: Buffer | undefined,
  ): Promise<void> {
    const src = s.exp.source;
    const fua = (req.flags & CmdFlag.FUA) !== 0;
    switch (req.type) {
      case Cmd.WRITE:
      case Cmd.WRITE_ZEROES:
      case Cmd.TRIM: {
        if (!this.writable(s.exp)) throw new RequestFailure(NbdErrno.EPERM, "export is read-only");
        this.checkRange(s, req.offset, req.length);
        if (req.type === Cmd.WRITE) await src.write!(req.offset, payload!);
        else if (req.type === Cmd.TRIM) await src.trim?.(req.offset, req.length);
        else if (src.writeZeroes) await src.writeZeroes(req.offset, req.length);
        else {
          const zero = Buffer.alloc(Math.min(ZERO_CHUNK, req.length));
          for (let at = 0; at < req.length; at += zero.length) {
            await src.write!(req.offset + at, zero.subarray(0, Math.min(zero.length, req.length - at)));
          }
        }
        if (fua) await src.flush?.();
        return;
      }
      case Cmd.FLUSH:
        await src.flush?.();
        return;
      case Cmd.CACHE:
        this.checkRange(s, req.offset, req.length);
        return;
      default:
        throw new RequestFailure(NbdErrno.EINVAL, `unknown command ${req.type}`);
    }
  }

  private async doBlockStatus(s: Session, req: ReturnType<typeof decodeRequest>): Promise<Buffer[]> {
    if (!s.structured || s.contexts.size === 0)
      throw new RequestFailure(NbdErrno.EINVAL, "no meta context negotiated");
    if (req.length === 0) throw new RequestFailure(NbdErrno.EINVAL, "empty block status request");
    this.checkRange(s, req.offset, req.length);
    const out: Buffer[] = [];
    for (const [id, ctx] of s.contexts) {
      const src = s.exp.source;
      const raw =
        src.blockStatus !== undefined
          ? await src.blockStatus(ctx, req.offset, req.length)
          : [{ offset: req.offset, length: req.length, flags: 0 }];
      let extents = normalizeExtents(raw, req.offset, req.length);
      if (req.flags & CmdFlag.REQ_ONE) extents = extents.slice(0, 1);
      out.push(encodeBlockStatusPayload(id, extents));
    }
    return out;
  }
}

function isConnectionError(err: unknown): boolean {
  return isStrataError(err, ErrorCode.PROTOCOL) && /connection closed/.test(err.message);
}
