// Encoders and decoders of the NBD wire format, byte for byte against doc/proto.md.
import assert from "node:assert/strict";
import { test } from "node:test";
import { ErrorCode, isStrataError } from "../util/errors.js";
import {
  Cmd,
  Cursor,
  decodeOptionHeader,
  decodeOptionReplyHeader,
  decodeRequest,
  encodeBlockStatusPayload,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  errnoName,
  isErrorChunk,
  isRepError,
  MAX_STRING,
  NbdErrno,
  Opt,
  Rep,
  ReplyType,
  readU64,
} from "./protocol.js";

const isProtocol = (e: unknown) => isStrataError(e, ErrorCode.PROTOCOL);

test("magic numbers spell what the spec says", () => {
  assert.equal(encodeOption(Opt.GO).subarray(0, 8).toString("latin1"), "IHAVEOPT");
  assert.equal(encodeOptionReply(Opt.GO, Rep.ACK).readBigUInt64BE(0), 0x3e889045565a9n);
  assert.equal(
    encodeRequest({ flags: 0, type: 0, cookie: 0n, offset: 0, length: 0 }).readUInt32BE(0),
    0x25609513,
  );
  assert.equal(encodeSimpleReply(0, 0n).readUInt32BE(0), 0x67446698);
  assert.equal(encodeChunkHeader({ flags: 0, type: 0, cookie: 0n, length: 0 }).readUInt32BE(0), 0x668e33ef);
  assert.equal(Rep.ERR_UNSUP, 2 ** 31 + 1);
  assert.equal(ReplyType.ERROR_OFFSET, 2 ** 15 + 2);
  assert.ok(isRepError(Rep.ERR_TOO_BIG) && !isRepError(Rep.META_CONTEXT));
  assert.ok(isErrorChunk(ReplyType.ERROR) && !isErrorChunk(ReplyType.BLOCK_STATUS));
});

test("request header round-trips, 28 bytes, big-endian", () => {
  const h = { flags: 1, type: Cmd.WRITE, cookie: 0x0102030405060708n, offset: 2 ** 40 + 5, length: 65536 };
  const b = encodeRequest(h);
  assert.equal(b.length, 28);
  assert.equal(b.toString("hex", 4, 8), "00010001");
  assert.deepEqual(decodeRequest(b), h);
  b.writeUInt32BE(0x12560953, 0); // the historic magic is not accepted
  assert.throws(() => decodeRequest(b), isProtocol);
});

test("offsets beyond 2^53 are refused, not rounded", () => {
  const b = Buffer.alloc(8);
  b.writeBigUInt64BE(2n ** 53n + 1n);
  assert.throws(() => readU64(b, 0, "offset"), isProtocol);
  b.writeBigUInt64BE(2n ** 53n - 1n);
  assert.equal(readU64(b, 0, "offset"), Number.MAX_SAFE_INTEGER);
});

test("option and option reply headers", () => {
  const o = encodeOption(Opt.LIST);
  assert.equal(o.length, 16);
  assert.deepEqual(decodeOptionHeader(o), { option: Opt.LIST, length: 0 });
  const r = encodeOptionReply(Opt.INFO, Rep.ERR_UNKNOWN, Buffer.from("no"));
  assert.deepEqual(decodeOptionReplyHeader(r), { option: Opt.INFO, type: Rep.ERR_UNKNOWN, length: 2 });
  assert.throws(() => decodeOptionHeader(Buffer.alloc(16)), isProtocol);
  assert.throws(() => decodeOptionReplyHeader(Buffer.alloc(20)), isProtocol);
});

test("GO and meta context payloads", () => {
  assert.equal(encodeInfoRequest("ab", [3]).toString("hex"), "00000002" + "6162" + "0001" + "0003");
  const m = encodeMetaContextRequest("x", ["base:allocation"]);
  const c = new Cursor(m, "meta");
  assert.equal(c.string32(), "x");
  assert.equal(c.u32(), 1);
  assert.equal(c.string32(), "base:allocation");
  assert.equal(c.remaining, 0);
  assert.throws(() => encodeMetaContextRequest("x", ["a".repeat(MAX_STRING + 1)]), RangeError);
});

test("Cursor refuses to read past the end or long strings", () => {
  assert.throws(() => new Cursor(Buffer.alloc(3), "x").u32(), isProtocol);
  const lying = Buffer.alloc(8);
  lying.writeUInt32BE(100, 0);
  assert.throws(() => new Cursor(lying, "x").string32(), isProtocol);
  const huge = Buffer.alloc(4);
  huge.writeUInt32BE(0xffffffff);
  assert.throws(() => new Cursor(huge, "x").string32(), isProtocol);
});

test("error and block status payloads", () => {
  const e = encodeErrorPayload(NbdErrno.EIO, "disk on fire");
  assert.equal(e.readUInt32BE(0), 5);
  assert.equal(e.readUInt16BE(4), 12);
  assert.equal(e.subarray(6).toString(), "disk on fire");
  assert.equal(encodeErrorPayload(1, "x".repeat(10_000)).length, 6 + MAX_STRING);
  const bs = encodeBlockStatusPayload(9, [
    { offset: 0, length: 4096, flags: 3 },
    { offset: 4096, length: 512, flags: 0 },
  ]);
  assert.equal(bs.toString("hex"), "00000009" + "00001000" + "00000003" + "00000200" + "00000000");
  assert.equal(errnoName(28), "ENOSPC");
  assert.equal(errnoName(7), "errno 7");
});
