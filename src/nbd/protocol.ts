/**
 * NBD wire format: magic numbers, option/command/reply numbers, flags, errno values, the
 * fixed-size headers, and their encoders and decoders. Follows doc/proto.md of the NBD project
 * (fixed newstyle handshake, structured replies; no TLS, no extended headers).
 *
 * Every length that comes off the wire is checked against one of the `MAX_*` bounds below
 * before anything is allocated for it.
 */

import { ErrorCode, StrataError } from "../util/errors.js";

/** "NBDMAGIC": first 8 bytes the server sends. */
export const NBD_MAGIC = 0x4e42444d41474943n;
/** "IHAVEOPT": newstyle handshake magic, also prefixes every option the client sends. */
export const IHAVEOPT = 0x49484156454f5054n;
/** Prefix of every option reply. */
export const OPTION_REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server → client, 16 bits). */
export const HandshakeFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;
/** Client flags (client → server, 32 bits). */
export const ClientFlag = { FIXED_NEWSTYLE: 1 << 0, NO_ZEROES: 1 << 1 } as const;

/** Transmission flags (16 bits), sent with the export size. */
export const TransmissionFlag = {
  HAS_FLAGS: 1 << 0,
  READ_ONLY: 1 << 1,
  SEND_FLUSH: 1 << 2,
  SEND_FUA: 1 << 3,
  ROTATIONAL: 1 << 4,
  SEND_TRIM: 1 << 5,
  SEND_WRITE_ZEROES: 1 << 6,
  SEND_DF: 1 << 7,
  CAN_MULTI_CONN: 1 << 8,
  SEND_RESIZE: 1 << 9,
  SEND_CACHE: 1 << 10,
  SEND_FAST_ZERO: 1 << 11,
} as const;

export const Opt = {
  EXPORT_NAME: 1,
  ABORT: 2,
  LIST: 3,
  PEEK_EXPORT: 4,
  STARTTLS: 5,
  INFO: 6,
  GO: 7,
  STRUCTURED_REPLY: 8,
  LIST_META_CONTEXT: 9,
  SET_META_CONTEXT: 10,
  EXTENDED_HEADERS: 11,
} as const;

const REP_ERR = 0x80000000;
export const Rep = {
  ACK: 1,
  SERVER: 2,
  INFO: 3,
  META_CONTEXT: 4,
  ERR_UNSUP: REP_ERR + 1,
  ERR_POLICY: REP_ERR + 2,
  ERR_INVALID: REP_ERR + 3,
  ERR_PLATFORM: REP_ERR + 4,
  ERR_TLS_REQD: REP_ERR + 5,
  ERR_UNKNOWN: REP_ERR + 6,
  ERR_SHUTDOWN: REP_ERR + 7,
  ERR_BLOCK_SIZE_REQD: REP_ERR + 8,
  ERR_TOO_BIG: REP_ERR + 9,
} as const;

/** True for option reply types that are errors (bit 31 set). */
export function isRepError(type: number): boolean {
  return type >= REP_ERR;
}

export const Info = { EXPORT: 0, NAME: 1, DESCRIPTION: 2, BLOCK_SIZE: 3 } as const;

export const Cmd = {
  READ: 0,
  WRITE: 1,
  DISC: 2,
  FLUSH: 3,
  TRIM: 4,
  CACHE: 5,
  WRITE_ZEROES: 6,
  BLOCK_STATUS: 7,
} as const;

export const CmdFlag = {
  FUA: 1 << 0,
  NO_HOLE: 1 << 1,
  DF: 1 << 2,
  REQ_ONE: 1 << 3,
  FAST_ZERO: 1 << 4,
} as const;

export const ReplyFlag = { DONE: 1 << 0 } as const;

export const ReplyType = {
  NONE: 0,
  OFFSET_DATA: 1,
  OFFSET_HOLE: 2,
  BLOCK_STATUS: 5,
  ERROR: (1 << 15) + 1,
  ERROR_OFFSET: (1 << 15) + 2,
} as const;

/** True for structured reply chunk types in the error category (bit 15 set). */
export function isErrorChunk(type: number): boolean {
  return (type & 0x8000) !== 0;
}

/** NBD errno values (protocol numbers, not the host's). */
export const NbdErrno = {
  EPERM: 1,
  EIO: 5,
  ENOMEM: 12,
  EINVAL: 22,
  ENOSPC: 28,
  EOVERFLOW: 75,
  ENOTSUP: 95,
  ESHUTDOWN: 108,
} as const;

/** Name of an NBD errno value, for messages. */
export function errnoName(errno: number): string {
  for (const [name, value] of Object.entries(NbdErrno)) if (value === errno) return name;
  return `errno ${errno}`;
}

/** `base:allocation` flags. */
export const StateFlag = { HOLE: 1 << 0, ZERO: 1 << 1 } as const;
/** `qemu:dirty-bitmap:*` flag. */
export const DIRTY = 1 << 0;

export const BASE_ALLOCATION = "base:allocation";

// ---- bounds -------------------------------------------------------------------------------

/** Longest string (export name, context name, message) the spec allows. */
export const MAX_STRING = 4096;
/** Largest option payload either side accepts during the handshake. */
export const MAX_OPTION_LENGTH = 64 * 1024;
/** Largest option reply payload the client accepts. */
export const MAX_OPTION_REPLY_LENGTH = 64 * 1024;
/** Largest read/write payload of one request: 32 MiB, the spec's usual maximum. */
export const MAX_PAYLOAD = 32 * 1024 * 1024;
/** Most extents one BLOCK_STATUS chunk may carry (the spec's SHOULD NOT exceed 2^20). */
export const MAX_EXTENTS_PER_CHUNK = 1 << 20;
/** Default block size constraints (spec "Size constraints"). */
export const DEFAULT_MIN_BLOCK = 1;
export const DEFAULT_PREFERRED_BLOCK = 4096;

export const REQUEST_HEADER_SIZE = 28;
export const SIMPLE_REPLY_SIZE = 16;
export const STRUCTURED_HEADER_SIZE = 20;
export const OPTION_HEADER_SIZE = 16;
export const OPTION_REPLY_HEADER_SIZE = 20;

/** A protocol violation by the peer. */
export function protocolError(message: string, cause?: unknown): StrataError {
  return new StrataError(ErrorCode.PROTOCOL, `NBD: ${message}`, cause === undefined ? undefined : { cause });
}

/** Reads an unsigned 64-bit big-endian value that must fit a JS number exactly. */
export function readU64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64BE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw protocolError(`${what} ${v} is beyond 2^53`);
  return Number(v);
}

// ---- handshake ----------------------------------------------------------------------------

/** Client option: IHAVEOPT, option, length, data. */
export function encodeOption(option: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(IHAVEOPT, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(data.length, 12);
  data.copy(b, 16);
  return b;
}

export interface OptionHeader {
  option: number;
  length: number;
}

export function decodeOptionHeader(b: Buffer): OptionHeader {
  if (b.readBigUInt64BE(0) !== IHAVEOPT) throw protocolError("option does not start with IHAVEOPT");
  return { option: b.readUInt32BE(8), length: b.readUInt32BE(12) };
}

/** Server option reply: magic, option, type, length, data. */
export function encodeOptionReply(option: number, type: number, data: Buffer = Buffer.alloc(0)): Buffer {
  const b = Buffer.alloc(OPTION_REPLY_HEADER_SIZE + data.length);
  b.writeBigUInt64BE(OPTION_REPLY_MAGIC, 0);
  b.writeUInt32BE(option, 8);
  b.writeUInt32BE(type >>> 0, 12);
  b.writeUInt32BE(data.length, 16);
  data.copy(b, 20);
  return b;
}

export interface OptionReplyHeader {
  option: number;
  type: number;
  length: number;
}

export function decodeOptionReplyHeader(b: Buffer): OptionReplyHeader {
  if (b.readBigUInt64BE(0) !== OPTION_REPLY_MAGIC) throw protocolError("option reply has a wrong magic");
  return { option: b.readUInt32BE(8), type: b.readUInt32BE(12), length: b.readUInt32BE(16) };
}

/** A length-prefixed (32-bit) UTF-8 string. */
export function encodeString32(s: string): Buffer {
  const body = Buffer.from(s, "utf8");
  if (body.length > MAX_STRING) throw new RangeError(`NBD string longer than ${MAX_STRING} bytes`);
  const b = Buffer.alloc(4 + body.length);
  b.writeUInt32BE(body.length, 0);
  body.copy(b, 4);
  return b;
}

/** Data of NBD_OPT_INFO / NBD_OPT_GO. */
export function encodeInfoRequest(exportName: string, infos: number[]): Buffer {
  const name = encodeString32(exportName);
  const tail = Buffer.alloc(2 + 2 * infos.length);
  tail.writeUInt16BE(infos.length, 0);
  infos.forEach((info, i) => {
    tail.writeUInt16BE(info, 2 + 2 * i);
  });
  return Buffer.concat([name, tail]);
}

/** Data of NBD_OPT_SET_META_CONTEXT / NBD_OPT_LIST_META_CONTEXT. */
export function encodeMetaContextRequest(exportName: string, queries: string[]): Buffer {
  const count = Buffer.alloc(4);
  count.writeUInt32BE(queries.length, 0);
  return Buffer.concat([encodeString32(exportName), count, ...queries.map(encodeString32)]);
}

/** A cursor over a bounded option payload; every read is bounds-checked. */
export class Cursor {
  private at = 0;
  constructor(
    private readonly buf: Buffer,
    private readonly what: string,
  ) {}
  get remaining(): number {
    return this.buf.length - this.at;
  }
  private need(n: number): void {
    if (n > this.remaining) throw protocolError(`${this.what} is truncated`);
  }
  u16(): number {
    this.need(2);
    const v = this.buf.readUInt16BE(this.at);
    this.at += 2;
    return v;
  }
  u32(): number {
    this.need(4);
    const v = this.buf.readUInt32BE(this.at);
    this.at += 4;
    return v;
  }
  u64(what: string): number {
    this.need(8);
    const v = readU64(this.buf, this.at, what);
    this.at += 8;
    return v;
  }
  bytes(n: number): Buffer {
    this.need(n);
    const v = this.buf.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
  /** A 32-bit length-prefixed string of at most MAX_STRING bytes. */
  string32(): string {
    const n = this.u32();
    if (n > MAX_STRING) throw protocolError(`${this.what}: string of ${n} bytes is too long`);
    return this.bytes(n).toString("utf8");
  }
  rest(): Buffer {
    return this.bytes(this.remaining);
  }
}

// ---- transmission -------------------------------------------------------------------------

export interface RequestHeader {
  flags: number;
  type: number;
  cookie: bigint;
  offset: number;
  length: number;
}

export function encodeRequest(h: RequestHeader): Buffer {
  const b = Buffer.alloc(REQUEST_HEADER_SIZE);
  b.writeUInt32BE(REQUEST_MAGIC, 0);
  b.writeUInt16BE(h.flags, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeBigUInt64BE(h.cookie, 8);
  b.writeBigUInt64BE(BigInt(h.offset), 16);
  b.writeUInt32BE(h.length, 24);
  return b;
}

export function decodeRequest(b: Buffer): RequestHeader {
  if (b.readUInt32BE(0) !== REQUEST_MAGIC) throw protocolError("request has a wrong magic");
  return {
    flags: b.readUInt16BE(4),
    type: b.readUInt16BE(6),
    cookie: b.readBigUInt64BE(8),
    offset: readU64(b, 16, "request offset"),
    length: b.readUInt32BE(24),
  };
}

export function encodeSimpleReply(error: number, cookie: bigint): Buffer {
  const b = Buffer.alloc(SIMPLE_REPLY_SIZE);
  b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
  b.writeUInt32BE(error, 4);
  b.writeBigUInt64BE(cookie, 8);
  return b;
}

export interface ChunkHeader {
  flags: number;
  type: number;
  cookie: bigint;
  length: number;
}

/** Structured reply chunk header; the payload follows separately. */
export function encodeChunkHeader(h: ChunkHeader): Buffer {
  const b = Buffer.alloc(STRUCTURED_HEADER_SIZE);
  b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
  b.writeUInt16BE(h.flags, 4);
  b.writeUInt16BE(h.type, 6);
  b.writeBigUInt64BE(h.cookie, 8);
  b.writeUInt32BE(h.length, 16);
  return b;
}

/** Payload of an NBD_REPLY_TYPE_ERROR chunk. */
export function encodeErrorPayload(errno: number, message: string): Buffer {
  let msg = Buffer.from(message, "utf8");
  if (msg.length > MAX_STRING) msg = msg.subarray(0, MAX_STRING);
  const b = Buffer.alloc(6 + msg.length);
  b.writeUInt32BE(errno, 0);
  b.writeUInt16BE(msg.length, 4);
  msg.copy(b, 6);
  return b;
}

/** One extent of a block status answer. */
export interface Extent {
  offset: number;
  length: number;
  flags: number;
}

/** Payload of an NBD_REPLY_TYPE_BLOCK_STATUS chunk: context id, then (length, flags) pairs. */
export function encodeBlockStatusPayload(contextId: number, extents: ReadonlyArray<Extent>): Buffer {
  const b = Buffer.alloc(4 + 8 * extents.length);
  b.writeUInt32BE(contextId, 0);
  extents.forEach((e, i) => {
    b.writeUInt32BE(e.length, 4 + 8 * i);
    b.writeUInt32BE(e.flags >>> 0, 8 + 8 * i);
  });
  return b;
}
