// Hostile peers: malformed, truncated, oversized and random bytes thrown at the client and the
// server. Every case must end within its time limit with a clean StrataError (client) or a
// closed connection (server), and neither side may crash or keep memory.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Server, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { ErrorCode, StrataError } from "../util/errors.js";
import { NbdClient } from "./client.js";
import { MemorySource } from "./memory-source.js";
import {
  BASE_ALLOCATION,
  Cmd,
  encodeBlockStatusPayload,
  encodeChunkHeader,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  encodeSimpleReply,
  IHAVEOPT,
  Info,
  NBD_MAGIC,
  NbdErrno,
  Opt,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  TransmissionFlag,
} from "./protocol.js";
import { NbdServer } from "./server.js";

/** Deterministic PRNG (mulberry32) so a failing case can be replayed from its seed. */
function prng(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let x = a;
    x = Math.imul(x ^ (x >>> 15), x | 1);
    x ^= x + Math.imul(x ^ (x >>> 7), x | 61);
    return ((x ^ (x >>> 14)) >>> 0) / 4294967296;
  };
}

function tempSocket(t: TestContext, name: string): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-nbd-fuzz-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return join(dir, name);
}

// ---- a scripted server for the client ------------------------------------------------------

/**
 * What a well-behaved server sends to a client that negotiates structured replies and
 * base:allocation, opens export "" with GO, then sends READ(0, 4096) as cookie 1 and
 * BLOCK_STATUS(0, 4096) as cookie 2. Each segment goes out once the client has sent `after`
 * bytes in total.
 */
function validTranscript(): Array<{ after: number; bytes: Buffer }> {
  const hello = Buffer.alloc(18);
  hello.writeBigUInt64BE(NBD_MAGIC, 0);
  hello.writeBigUInt64BE(IHAVEOPT, 8);
  hello.writeUInt16BE(3, 16);
  const ctx = Buffer.concat([Buffer.from([0, 0, 0, 7]), Buffer.from(BASE_ALLOCATION)]);
  const info = Buffer.alloc(12);
  info.writeUInt16BE(Info.EXPORT, 0);
  info.writeBigUInt64BE(1n << 20n, 2);
  info.writeUInt16BE(TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, 10);
  const off = Buffer.alloc(8);
  const data = Buffer.alloc(4096, 0x5a);
  const bs = encodeBlockStatusPayload(7, [
    { offset: 0, length: 1024, flags: 0 },
    { offset: 1024, length: 3072, flags: 3 },
  ]);
  const sr = 4 + 16;
  const meta = sr + 16 + encodeMetaContextRequest("", [BASE_ALLOCATION]).length;
  const go = meta + 16 + encodeInfoRequest("", [Info.BLOCK_SIZE, Info.DESCRIPTION]).length;
  return [
    { after: 0, bytes: hello },
    { after: sr, bytes: encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.ACK) },
    {
      after: meta,
      bytes: Buffer.concat([
        encodeOptionReply(Opt.SET_META_CONTEXT, Rep.META_CONTEXT, ctx),
        encodeOptionReply(Opt.SET_META_CONTEXT, Rep.ACK),
      ]),
    },
    {
      after: go,
      bytes: Buffer.concat([encodeOptionReply(Opt.GO, Rep.INFO, info), encodeOptionReply(Opt.GO, Rep.ACK)]),
    },
    {
      after: go + 56,
      bytes: Buffer.concat([
        encodeChunkHeader({
          flags: ReplyFlag.DONE,
          type: ReplyType.BLOCK_STATUS,
          cookie: 2n,
          length: bs.length,
        }),
        bs,
        encodeChunkHeader({ flags: 0, type: ReplyType.OFFSET_DATA, cookie: 1n, length: 8 + 2048 }),
        off,
        data.subarray(0, 2048),
        encodeChunkHeader({ flags: ReplyFlag.DONE, type: ReplyType.OFFSET_HOLE, cookie: 1n, length: 12 }),
        Buffer.from([0, 0, 0, 0, 0, 0, 8, 0, 0, 0, 8, 0]),
      ]),
    },
  ];
}

/** Serves `script(connectionIndex)` to each client: segments sent by received-byte thresholds. */
async function scriptedServer(
  t: TestContext,
  script: () => { segments: Array<{ after: number; bytes: Buffer }>; closeAfter: boolean },
): Promise<string> {
  const path = tempSocket(t, "evil.sock");
  const sockets = new Set<Socket>();
  const server: Server = createServer((s) => {
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
    const { segments, closeAfter } = script();
    let received = 0;
    let next = 0;
    const pump = (): void => {
      while (next < segments.length && received >= segments[next]!.after) {
        s.write(segments[next]!.bytes);
        next++;
      }
      if (next === segments.length && closeAfter) s.end();
    };
    s.on("data", (d: Buffer) => {
      received += d.length;
      pump();
    });
    pump();
  });
  await new Promise<void>((r) => server.listen(path, () => r()));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  });
  return path;
}

/** Runs the client session the transcript expects; returns "ok" or the error's code. */
async function clientSession(path: string, limitMs: number): Promise<string> {
  let c: NbdClient | undefined;
  try {
    c = await NbdClient.connect(
      { path },
      { metaContexts: [BASE_ALLOCATION], timeoutMs: limitMs, requestTimeoutMs: limitMs },
    );
    const [data, status] = await Promise.all([c.read(0, 4096), c.blockStatus(0, 4096)]);
    assert.equal(data.length, 4096);
    assert.ok(status.length >= 1);
    return "ok";
  } catch (err) {
    if (err instanceof StrataError) return err.code;
    throw err; // anything else (TypeError, RangeError, assertion) is a bug
  } finally {
    await c?.close();
  }
}

test("the scripted server's valid transcript works, so mutations below test something", async (t) => {
  const path = await scriptedServer(t, () => ({ segments: validTranscript(), closeAfter: false }));
  assert.equal(await clientSession(path, 2000), "ok");
});

test("client: hand-made hostile servers end in PROTOCOL or TIMEOUT, quickly", async (t) => {
  const v = validTranscript();
  const head = v.slice(0, 4);
  const after = v[4]!.after;
  const huge = Buffer.alloc(20);
  huge.writeUInt32BE(0x668e33ef, 0);
  huge.writeUInt16BE(1, 4);
  huge.writeUInt16BE(ReplyType.OFFSET_DATA, 6);
  huge.writeBigUInt64BE(1n, 8);
  huge.writeUInt32BE(0xffffffff, 16);
  const optHuge = encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.ACK);
  optHuge.writeUInt32BE(0xffffffff, 16);
  const cases: Array<[string, Array<{ after: number; bytes: Buffer }>, boolean, string]> = [
    ["silent server", [], false, ErrorCode.TIMEOUT],
    ["closes at once", [], true, ErrorCode.PROTOCOL],
    ["truncated greeting", [{ after: 0, bytes: v[0]!.bytes.subarray(0, 10) }], true, ErrorCode.PROTOCOL],
    ["wrong magic", [{ after: 0, bytes: Buffer.alloc(18, 0x41) }], false, ErrorCode.PROTOCOL],
    [
      "oldstyle",
      [
        {
          after: 0,
          bytes: Buffer.concat([v[0]!.bytes.subarray(0, 8), Buffer.from("\x00\x00\x42\x02\x81\x86\x12\x53")]),
        },
      ],
      false,
      ErrorCode.PROTOCOL,
    ],
    ["option reply of 4 GiB", [v[0]!, { after: v[1]!.after, bytes: optHuge }], false, ErrorCode.PROTOCOL],
    [
      "reply to another option",
      [v[0]!, { after: v[1]!.after, bytes: encodeOptionReply(Opt.GO, Rep.ACK) }],
      false,
      ErrorCode.PROTOCOL,
    ],
    [
      "GO acked without export info",
      [...v.slice(0, 3), { after: v[3]!.after, bytes: encodeOptionReply(Opt.GO, Rep.ACK) }],
      false,
      ErrorCode.PROTOCOL,
    ],
    [
      "endless LIST-style replies",
      [
        ...v.slice(0, 1),
        {
          after: v[1]!.after,
          bytes: Buffer.concat(
            Array.from({ length: 2000 }, () =>
              encodeOptionReply(Opt.STRUCTURED_REPLY, Rep.SERVER, Buffer.alloc(4)),
            ),
          ),
        },
      ],
      false,
      ErrorCode.PROTOCOL,
    ],
    ["never answers requests", head, false, ErrorCode.TIMEOUT],
    ["chunk of 4 GiB", [...head, { after, bytes: huge }], false, ErrorCode.PROTOCOL],
    ["unknown cookie", [...head, { after, bytes: encodeSimpleReply(0, 99n) }], false, ErrorCode.PROTOCOL],
    [
      "simple reply to a structured read",
      [...head, { after, bytes: encodeSimpleReply(0, 1n) }],
      false,
      ErrorCode.PROTOCOL,
    ],
    ["wrong reply magic", [...head, { after, bytes: Buffer.alloc(32, 0x13) }], false, ErrorCode.PROTOCOL],
    [
      "data outside the request",
      [
        ...head,
        {
          after,
          bytes: Buffer.concat([
            encodeChunkHeader({ flags: 1, type: ReplyType.OFFSET_DATA, cookie: 1n, length: 16 }),
            Buffer.from([0, 0, 0, 0, 0, 1, 0, 0]),
            Buffer.alloc(8),
          ]),
        },
      ],
      false,
      ErrorCode.PROTOCOL,
    ],
    [
      "read done without data",
      [
        ...head,
        { after, bytes: encodeChunkHeader({ flags: 1, type: ReplyType.NONE, cookie: 1n, length: 0 }) },
      ],
      false,
      ErrorCode.PROTOCOL,
    ],
    [
      "block status with a zero-length extent",
      [
        ...head,
        {
          after,
          bytes: Buffer.concat([
            encodeChunkHeader({ flags: 1, type: ReplyType.BLOCK_STATUS, cookie: 2n, length: 12 }),
            Buffer.from([0, 0, 0, 7, 0, 0, 0, 0, 0, 0, 0, 0]),
          ]),
        },
      ],
      false,
      ErrorCode.PROTOCOL,
    ],
    [
      "unknown chunk type",
      [...head, { after, bytes: encodeChunkHeader({ flags: 1, type: 77, cookie: 1n, length: 0 }) }],
      false,
      ErrorCode.PROTOCOL,
    ],
    ["closes mid-transmission", head, true, ErrorCode.PROTOCOL],
  ];
  await Promise.all(
    cases.map(async ([name, segments, closeAfter, expected]) => {
      const path = await scriptedServer(t, () => ({ segments, closeAfter }));
      const started = Date.now();
      assert.equal(await clientSession(path, 400), expected, name);
      assert.ok(Date.now() - started < 3000, `${name} took ${Date.now() - started} ms`);
    }),
  );
});

test("client: 300 randomly mutated server transcripts never crash or hang the client", async (t) => {
  const seeds = Array.from({ length: 300 }, (_, i) => i + 1);
  const outcomes = new Map<string, number>();
  const batch = 30;
  for (let i = 0; i < seeds.length; i += batch) {
    await Promise.all(
      seeds.slice(i, i + batch).map(async (seed) => {
        const rnd = prng(seed);
        const segments = validTranscript().map((s) => ({ after: s.after, bytes: Buffer.from(s.bytes) }));
        const target = segments[Math.floor(rnd() * segments.length)]!;
        const kind = Math.floor(rnd() * 5);
        if (kind === 0) {
          for (let k = 0; k < 1 + rnd() * 4; k++)
            target.bytes[Math.floor(rnd() * target.bytes.length)] = Math.floor(rnd() * 256);
        } else if (kind === 1) {
          target.bytes = target.bytes.subarray(0, Math.floor(rnd() * target.bytes.length));
        } else if (kind === 2) {
          const at = Math.floor(rnd() * target.bytes.length);
          const junk = Buffer.from(
            Array.from({ length: 1 + Math.floor(rnd() * 40) }, () => Math.floor(rnd() * 256)),
          );
          target.bytes = Buffer.concat([target.bytes.subarray(0, at), junk, target.bytes.subarray(at)]);
        } else if (kind === 3 && target.bytes.length >= 4) {
          const at = 4 * Math.floor((rnd() * target.bytes.length) / 4);
          if (at + 4 <= target.bytes.length) target.bytes.writeUInt32BE(0xffffffff, at);
        } else {
          target.bytes = Buffer.from(
            Array.from({ length: Math.floor(rnd() * 200) }, () => Math.floor(rnd() * 256)),
          );
        }
        const closeAfter = rnd() < 0.5;
        const path = await scriptedServer(t, () => ({ segments, closeAfter }));
        const started = Date.now();
        const outcome = await clientSession(path, 300);
        assert.ok(Date.now() - started < 3000, `seed ${seed} took ${Date.now() - started} ms`);
        assert.ok(
          [
            "ok",
            ErrorCode.USAGE,
            ErrorCode.PROTOCOL,
            ErrorCode.TIMEOUT,
            ErrorCode.NOT_FOUND,
            ErrorCode.EXTERNAL,
            ErrorCode.NO_SPACE,
          ].includes(outcome),
          `seed ${seed}: ${outcome}`,
        );
        outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
      }),
    );
  }
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  assert.ok((outcomes.get(ErrorCode.PROTOCOL) ?? 0) > 50);
});

// ---- hostile clients against the server ----------------------------------------------------

/** Sends `bytes` (optionally after a valid greeting exchange) and waits for the server to close. */
async function throwAt(
  path: string,
  bytes: Buffer,
  limitMs: number,
  endAfter = false,
): Promise<{ closed: boolean; got: Buffer }> {
  const s = connect(path);
  s.on("error", () => {});
  const chunks: Buffer[] = [];
  let size = 0;
  s.on("data", (d: Buffer) => {
    if (size < 1 << 20) chunks.push(d);
    size += d.length;
  });
  const closed = new Promise<boolean>((resolve) => {
    s.once("close", () => resolve(true));
    setTimeout(() => resolve(false), limitMs);
  });
  s.once("connect", () => {
    s.write(bytes);
    if (endAfter) s.end(); // the client goes away (an idle open connection is legitimate)
  });
  const wasClosed = await closed;
  s.destroy();
  return { closed: wasClosed, got: Buffer.concat(chunks) };
}

function clientFlags(): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(3);
  return b;
}

/** A valid client prefix: flags, EXPORT_NAME "d", then transmission. */
function transmissionPrefix(): Buffer {
  return Buffer.concat([clientFlags(), encodeOption(Opt.EXPORT_NAME, Buffer.from("d"))]);
}

test("server: hostile clients are disconnected or refused, the server keeps serving", async (t) => {
  const path = tempSocket(t, "srv.sock");
  const src = MemorySource.from(Buffer.alloc(MiB(1), 9));
  const errors: Error[] = [];
  const server = new NbdServer({
    exports: { d: { source: src } },
    handshakeTimeoutMs: 300,
    onError: (e) => errors.push(e),
  });
  await server.listen({ path });
  t.after(() => server.close());

  const hugeOpt = encodeOption(Opt.GO);
  hugeOpt.writeUInt32BE(0xffffffff, 12);
  const badGo = encodeOption(Opt.GO, Buffer.from([0, 0, 0x10, 0, 0x41]));
  const closing: Array<[string, Buffer]> = [
    ["random greeting", Buffer.from("GET / HTTP/1.1\r\n\r\n")],
    ["unknown client flags", Buffer.from([0xff, 0xff, 0xff, 0xff])],
    ["nothing after flags (handshake timeout)", clientFlags()],
    ["option of 4 GiB", Buffer.concat([clientFlags(), hugeOpt])],
    ["option with wrong magic", Buffer.concat([clientFlags(), Buffer.alloc(16, 0x22)])],
    [
      "unknown export name",
      Buffer.concat([clientFlags(), encodeOption(Opt.EXPORT_NAME, Buffer.from("nope"))]),
    ],
    ["request with wrong magic", Buffer.concat([transmissionPrefix(), Buffer.alloc(28, 0x33)])],
    [
      "write of 64 MiB",
      Buffer.concat([
        transmissionPrefix(),
        encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 1n, offset: 0, length: 64 << 20 }),
      ]),
    ],
  ];
  await Promise.all(
    closing.map(async ([name, bytes]) => {
      const started = Date.now();
      const { closed } = await throwAt(path, bytes, 2000);
      assert.ok(closed, `${name}: connection not closed`);
      assert.ok(Date.now() - started < 2000, name);
    }),
  );

  // Malformed options get NBD_REP_ERR_INVALID (the connection stays up until the timeout).
  const { got } = await throwAt(
    path,
    Buffer.concat([
      clientFlags(),
      badGo,
      encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest("d", [])),
    ]),
    1000,
  );
  const types: number[] = [];
  for (let at = 18; at + 20 <= got.length; at += 20 + got.readUInt32BE(at + 16))
    types.push(got.readUInt32BE(at + 12));
  assert.deepEqual(types, [Rep.ERR_INVALID, Rep.ERR_INVALID]);

  // Bad requests get errors; the connection stays usable.
  const reqs = Buffer.concat([
    transmissionPrefix(),
    encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 0, length: 0xffffffff }),
    encodeRequest({ flags: 0, type: Cmd.READ, cookie: 2n, offset: MiB(1) - 1, length: 2 }),
    encodeRequest({ flags: 0, type: 99, cookie: 3n, offset: 0, length: 0 }),
    encodeRequest({ flags: 0, type: Cmd.BLOCK_STATUS, cookie: 4n, offset: 0, length: 10 }),
    encodeRequest({ flags: 0, type: Cmd.READ, cookie: 5n, offset: 0, length: 4 }),
    encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 6n, offset: 0, length: 0 }),
  ]);
  const r = await throwAt(path, reqs, 2000);
  assert.ok(r.closed, "DISC closes");
  const replies = new Map<bigint, number>();
  // Replies follow the 18-byte greeting and the 10-byte EXPORT_NAME answer (NO_ZEROES).
  for (let at = 18 + 10; at + 16 <= r.got.length; ) {
    assert.equal(r.got.readUInt32BE(at), SIMPLE_REPLY_MAGIC, `simple reply at ${at}`);
    const cookie = r.got.readBigUInt64BE(at + 8);
    replies.set(cookie, r.got.readUInt32BE(at + 4));
    at += 16 + (cookie === 5n ? 4 : 0);
  }
  assert.deepEqual(
    [...replies].sort((a, b) => Number(a[0] - b[0])),
    [
      [1n, NbdErrno.EINVAL],
      [2n, NbdErrno.EINVAL],
      [3n, NbdErrno.EINVAL],
      [4n, NbdErrno.EINVAL],
      [5n, 0],
    ],
  );

  // Random and mutated client transcripts.
  const valid = Buffer.concat([
    clientFlags(),
    encodeOption(Opt.STRUCTURED_REPLY),
    encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest("d", [BASE_ALLOCATION])),
    encodeOption(Opt.GO, encodeInfoRequest("d", [Info.BLOCK_SIZE])),
    encodeRequest({ flags: 0, type: Cmd.READ, cookie: 1n, offset: 4096, length: 4096 }),
    encodeRequest({ flags: 0, type: Cmd.BLOCK_STATUS, cookie: 2n, offset: 0, length: 8192 }),
    encodeRequest({ flags: 0, type: Cmd.WRITE, cookie: 3n, offset: 0, length: 8 }),
    Buffer.alloc(8, 1),
    encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 4n, offset: 0, length: 0 }),
  ]);
  const ok = await throwAt(path, valid, 2000);
  assert.ok(ok.closed && ok.got.length > 4096, "the valid transcript is served and ends with DISC");
  const cases = Array.from({ length: 200 }, (_, seed) => {
    const rnd = prng(1000 + seed);
    const b = Buffer.from(valid);
    const kind = seed % 4;
    if (kind === 0)
      for (let k = 0; k < 1 + rnd() * 4; k++) b[Math.floor(rnd() * b.length)] = Math.floor(rnd() * 256);
    if (kind === 1) return b.subarray(0, Math.floor(rnd() * b.length));
    if (kind === 2) {
      const at = 4 * Math.floor((rnd() * b.length) / 4);
      if (at + 4 <= b.length) b.writeUInt32BE(0xffffffff, at);
    }
    if (kind === 3)
      return Buffer.from(Array.from({ length: Math.floor(rnd() * 300) }, () => Math.floor(rnd() * 256)));
    return b;
  });
  for (let i = 0; i < cases.length; i += 50) {
    await Promise.all(
      cases.slice(i, i + 50).map(async (bytes, k) => {
        const { closed } = await throwAt(path, bytes, 3000, true);
        assert.ok(closed, `mutated client ${i + k}: the server neither finished nor dropped it`);
      }),
    );
  }

  // Still healthy: a real client reads correctly, and no connection is left behind.
  const c = await NbdClient.connect({ path }, { exportName: "d" });
  assert.ok((await c.read(0, 4096)).equals(src.data.subarray(0, 4096)));
  await c.close();
  for (let i = 0; i < 100 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 20));
  assert.equal(server.connectionCount, 0);
  for (const e of errors) assert.ok(e instanceof StrataError, `non-Strata error escaped: ${e.stack}`);
});

function MiB(n: number): number {
  return n * 1024 * 1024;
}
