// Property-based fuzzing (fast-check) of both sides of Strata's NBD code, with oracles.
//
// Server: structured option sequences (real and unknown option codes, valid, mutated and random
// payloads, wrong length fields) and mutated request headers (magic, flags, type, cookie,
// offsets and lengths beyond the export or beyond 2^53) are sent to a real NbdServer over a
// unix socket. The byte stream it answers with is parsed and checked against a small model of
// what each option and request deserves; the connection must end when the model says so, within
// a bound; memory must not grow with the lengths claimed; afterwards a good client still reads
// correct data and no connection is left behind.
//
// Client: a FAKE server — it answers the handshake correctly, then replies to a read or a block
// status request with generated structured reply chunks (wrong cookies, overlapping, short or
// out-of-range OFFSET_DATA/OFFSET_HOLE, BLOCK_STATUS with bad lengths, missing DONE, oversized
// lengths), which a real server never sends. The client must resolve exactly when the chunks
// form a valid reply, then with exactly the data they describe, and otherwise reject with a
// StrataError — never another exception, never wrong data, never a hang past its timeout.
//
// Bounded for CI: STRATA_FUZZ_RUNS cases per property (default 200) and STRATA_FUZZ_SECONDS
// per property at most (default 10); a failure prints the seed and path that replay it.
import assert from "node:assert/strict";
import { mkdtempSync, rmSync } from "node:fs";
import { connect, createServer, type Socket } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import fc from "fast-check";
import { ErrorCode, StrataError } from "../util/errors.js";
import { NbdClient } from "./client.js";
import { MemorySource } from "./memory-source.js";
import {
  BASE_ALLOCATION,
  Cmd,
  CmdFlag,
  encodeBlockStatusPayload,
  encodeChunkHeader,
  encodeErrorPayload,
  encodeInfoRequest,
  encodeMetaContextRequest,
  encodeOption,
  encodeOptionReply,
  encodeRequest,
  IHAVEOPT,
  Info,
  isRepError,
  MAX_OPTION_LENGTH,
  MAX_PAYLOAD,
  NBD_MAGIC,
  NbdErrno,
  OPTION_REPLY_MAGIC,
  Opt,
  REQUEST_MAGIC,
  Rep,
  ReplyFlag,
  ReplyType,
  SIMPLE_REPLY_MAGIC,
  STRUCTURED_REPLY_MAGIC,
  TransmissionFlag,
} from "./protocol.js";
import { NbdServer } from "./server.js";

const RUNS = Number(process.env.STRATA_FUZZ_RUNS ?? 200);
const LIMIT_MS = Number(process.env.STRATA_FUZZ_SECONDS ?? 10) * 1000;
/** STRATA_FUZZ_SEED (and STRATA_FUZZ_PATH) replay the failure a run printed. */
const replay =
  process.env.STRATA_FUZZ_SEED === undefined
    ? {}
    : {
        seed: Number(process.env.STRATA_FUZZ_SEED),
        ...(process.env.STRATA_FUZZ_PATH ? { path: process.env.STRATA_FUZZ_PATH } : {}),
      };
const params = { numRuns: RUNS, interruptAfterTimeLimit: LIMIT_MS, ...replay };
/** How long one case may take before it counts as a hang. */
const CASE_MS = 5000;
/** Growth of ArrayBuffer memory allowed during a property (lengths on the wire claim up to 4 GiB). */
const MEMORY_BOUND = 64 * 1024 * 1024;
const SIZE = 256 * 1024;

/** `arb` in about one case of `freq`, null otherwise. */
function rarely<T>(arb: fc.Arbitrary<T>, { freq }: { freq: number }): fc.Arbitrary<T | null> {
  return fc.oneof({ weight: freq - 1, arbitrary: fc.constant(null) }, { weight: 1, arbitrary: arb });
}

function tempSocket(t: TestContext, name: string): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-nbd-pfuzz-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  return join(dir, name);
}

/** Samples ArrayBuffer memory while `fn` runs; fails if it grew beyond MEMORY_BOUND. */
async function withinMemory<T>(fn: () => Promise<T>): Promise<T> {
  const base = process.memoryUsage().arrayBuffers;
  let peak = base;
  const timer = setInterval(() => {
    peak = Math.max(peak, process.memoryUsage().arrayBuffers);
  }, 5);
  try {
    const out = await fn();
    peak = Math.max(peak, process.memoryUsage().arrayBuffers);
    return out;
  } finally {
    clearInterval(timer);
    assert.ok(peak - base < MEMORY_BOUND, `memory grew by ${peak - base} bytes`);
  }
}

/** The disk both sides serve: every byte depends on its offset. */
function content(size: number): Buffer {
  const b = Buffer.alloc(size);
  for (let i = 0; i < size; i++) b[i] = (i * 131 + (i >>> 8) * 7 + 1) & 0xff;
  return b;
}
const DISK = content(SIZE);

// ---- talking to the real server -------------------------------------------------------------

/**
 * Sends `bytes`, collects what comes back until the server closes. If it has not closed after
 * `waitMs`, this side ends its half (an idle connection is legitimate) and the server then
 * has CASE_MS to close.
 */
async function talk(
  path: string,
  bytes: Buffer,
  waitMs: number,
): Promise<{ got: Buffer; closedFirst: boolean }> {
  const s = connect(path);
  s.on("error", () => {});
  const chunks: Buffer[] = [];
  let size = 0;
  s.on("data", (d: Buffer) => {
    size += d.length;
    if (size <= 16 * 1024 * 1024) chunks.push(d);
  });
  const closed = new Promise<void>((r) => s.once("close", () => r()));
  const timeout = (ms: number) => new Promise<"timeout">((r) => setTimeout(() => r("timeout"), ms).unref());
  s.once("connect", () => s.write(bytes));
  let closedFirst = true;
  if ((await Promise.race([closed, timeout(waitMs)])) === "timeout") {
    closedFirst = false;
    s.end();
    const r = await Promise.race([closed, timeout(CASE_MS)]);
    s.destroy();
    assert.notEqual(r, "timeout", "the server kept a connection open after the client went away");
  }
  assert.ok(size <= 16 * 1024 * 1024, "the server sent more than 16 MiB");
  return { got: Buffer.concat(chunks), closedFirst };
}

/** Reads a received byte stream; `take` returns undefined at the end. */
class Stream {
  at = 0;
  constructor(readonly b: Buffer) {}
  get left(): number {
    return this.b.length - this.at;
  }
  take(n: number): Buffer | undefined {
    if (this.at + n > this.b.length) return undefined;
    const v = this.b.subarray(this.at, this.at + n);
    this.at += n;
    return v;
  }
}

function clientFlags(): Buffer {
  const b = Buffer.alloc(4);
  b.writeUInt32BE(3); // FIXED_NEWSTYLE | NO_ZEROES
  return b;
}

function readGreeting(st: Stream): void {
  const hello = st.take(18);
  assert.ok(hello, "no greeting");
  assert.equal(hello.readBigUInt64BE(0), NBD_MAGIC);
  assert.equal(hello.readBigUInt64BE(8), IHAVEOPT);
}

/** One option reply, checked for its magic; undefined at the end of the stream. */
function readOptionReply(st: Stream): { option: number; type: number; data: Buffer } | undefined {
  const h = st.take(20);
  if (!h) {
    assert.equal(st.left, 0, "a truncated option reply");
    return undefined;
  }
  assert.equal(h.readBigUInt64BE(0), OPTION_REPLY_MAGIC, "option reply magic");
  const data = st.take(h.readUInt32BE(16));
  assert.ok(data, "option reply payload cut short");
  return { option: h.readUInt32BE(8), type: h.readUInt32BE(12), data };
}

async function startServer(t: TestContext): Promise<{ path: string; server: NbdServer; errors: Error[] }> {
  const path = tempSocket(t, "srv.sock");
  const errors: Error[] = [];
  const server = new NbdServer({
    exports: { d: { source: MemorySource.from(Buffer.from(DISK)), readOnly: true, description: "fuzz" } },
    handshakeTimeoutMs: 5000,
    onError: (e) => errors.push(e),
  });
  await server.listen({ path });
  t.after(() => server.close());
  return { path, server, errors };
}

/** After the abuse: a good client reads correct data, no connection is left, only StrataErrors. */
async function serverSurvived(path: string, server: NbdServer, errors: Error[]): Promise<void> {
  const c = await NbdClient.connect({ path }, { exportName: "d", metaContexts: [BASE_ALLOCATION] });
  assert.ok((await c.read(1000, 70000)).equals(DISK.subarray(1000, 71000)));
  assert.deepEqual(await c.blockStatus(0, SIZE), [{ offset: 0, length: SIZE, flags: 0 }]);
  await c.close();
  for (let i = 0; i < 500 && server.connectionCount > 0; i++) await new Promise((r) => setTimeout(r, 10));
  assert.equal(server.connectionCount, 0, "connections left open");
  for (const e of errors) assert.ok(e instanceof StrataError, `non-Strata error escaped: ${e.stack}`);
}

// ---- option phase ---------------------------------------------------------------------------

const nameArb = fc.oneof(
  { weight: 4, arbitrary: fc.constant("d") },
  fc.constantFrom("", "nope", "d\u0000", "D", "x".repeat(5000)),
  fc.string({ maxLength: 20 }),
);

/** Payloads: valid encodings of each option's data, mutations of them, random bytes. */
const payloadArb: fc.Arbitrary<Buffer> = fc
  .oneof(
    fc.constant(Buffer.alloc(0)),
    fc
      .tuple(nameArb, fc.array(fc.oneof(fc.constantFrom(0, 1, 2, 3), fc.nat(0xffff)), { maxLength: 6 }))
      .map(([n, infos]) => encodeInfoRequest(n.slice(0, 4096), infos)),
    fc
      .tuple(
        nameArb,
        fc.array(
          fc.oneof(fc.constantFrom(BASE_ALLOCATION, "base:", "qemu:dirty-bitmap:x", ""), fc.string()),
          {
            maxLength: 4,
          },
        ),
      )
      .map(([n, q]) => encodeMetaContextRequest(n.slice(0, 4096), q)),
    nameArb.map((n) => Buffer.from(n.slice(0, 4096))),
    fc.uint8Array({ maxLength: 300 }).map((u) => Buffer.from(u)),
  )
  .chain((valid) =>
    fc
      .record({
        flips: fc.oneof(
          { weight: 2, arbitrary: fc.constant([]) },
          fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 3 }),
        ),
        u32: rarely(fc.tuple(fc.nat(), fc.constantFrom(0, 1, 1000, 1001, 4097, 0xffffffff)), { freq: 4 }),
        cut: rarely(fc.nat(), { freq: 6 }),
      })
      .map(({ flips, u32, cut }) => {
        let b = Buffer.from(valid);
        for (const [at, x] of flips) if (b.length > 0) b[at % b.length]! ^= x;
        if (u32 && b.length >= 4) b.writeUInt32BE(u32[1] >>> 0, u32[0] % (b.length - 3));
        if (cut !== null) b = b.subarray(0, cut % (b.length + 1));
        return b;
      }),
  );

const optionArb = fc.record({
  code: fc.oneof(
    {
      weight: 12,
      arbitrary: fc.constantFrom(
        ...Object.values(Opt).filter((o) => o !== Opt.EXPORT_NAME && o !== Opt.ABORT),
      ),
    },
    fc.constantFrom(Opt.EXPORT_NAME, Opt.ABORT),
    fc.constantFrom(0, 12, 0x7fffffff, 0xffffffff),
  ),
  payload: payloadArb,
  /** A length field that does not match the payload. */
  length: rarely(fc.constantFrom(-1, 1, 0xffffffff, MAX_OPTION_LENGTH + 1, MAX_OPTION_LENGTH), {
    freq: 30,
  }),
});
type FuzzOption = { code: number; payload: Buffer; length: number | null };

function encodeFuzzOption(o: FuzzOption): Buffer {
  const b = encodeOption(o.code >>> 0, o.payload);
  if (o.length !== null) {
    const l = o.length === -1 || o.length === 1 ? o.payload.length + o.length : o.length;
    b.writeUInt32BE(Math.max(0, l) >>> 0, 12);
  }
  return b;
}

/** Independent parse of NBD_OPT_GO/INFO data: name, or "invalid". */
function goName(p: Buffer): string | "invalid" {
  if (p.length < 4) return "invalid";
  const n = p.readUInt32BE(0);
  if (n > 4096 || 4 + n + 2 > p.length) return "invalid";
  const count = p.readUInt16BE(4 + n);
  if (p.length !== 4 + n + 2 + 2 * count) return "invalid";
  return p.subarray(4, 4 + n).toString("utf8");
}

/** Independent parse of NBD_OPT_*_META_CONTEXT data. */
function metaQuery(p: Buffer): { name: string; queries: string[] } | "invalid" | "too-big" {
  let at = 0;
  const str = (): string | undefined => {
    if (at + 4 > p.length) return undefined;
    const n = p.readUInt32BE(at);
    if (n > 4096 || at + 4 + n > p.length) return undefined;
    at += 4 + n;
    return p.subarray(at - n, at).toString("utf8");
  };
  const name = str();
  if (name === undefined || at + 4 > p.length) return "invalid";
  const count = p.readUInt32BE(at);
  at += 4;
  if (count > 1000) return "too-big";
  const queries: string[] = [];
  for (let k = 0; k < count; k++) {
    const q = str();
    if (q === undefined) return "invalid";
    queries.push(q);
  }
  return at === p.length ? { name, queries } : "invalid";
}

type Expect =
  | { kind: "final"; type: number; nonFinal?: number }
  | { kind: "close" }
  | { kind: "ack-close" }
  | { kind: "export-name" }
  | { kind: "go" };

/** What a correct server does with one well-framed option. */
function expectFor(o: FuzzOption, structured: boolean): Expect {
  const p = o.payload;
  switch (o.code) {
    case Opt.EXPORT_NAME:
      return p.toString("utf8") === "d" ? { kind: "export-name" } : { kind: "close" };
    case Opt.ABORT:
      return { kind: "ack-close" };
    case Opt.STARTTLS:
      return { kind: "final", type: Rep.ERR_UNSUP };
    case Opt.LIST:
      return p.length === 0
        ? { kind: "final", type: Rep.ACK, nonFinal: Rep.SERVER }
        : { kind: "final", type: Rep.ERR_INVALID };
    case Opt.STRUCTURED_REPLY:
      return { kind: "final", type: p.length === 0 ? Rep.ACK : Rep.ERR_INVALID };
    case Opt.INFO:
    case Opt.GO: {
      const name = goName(p);
      if (name === "invalid") return { kind: "final", type: Rep.ERR_INVALID };
      if (name !== "d") return { kind: "final", type: Rep.ERR_UNKNOWN };
      return o.code === Opt.GO ? { kind: "go" } : { kind: "final", type: Rep.ACK, nonFinal: Rep.INFO };
    }
    case Opt.SET_META_CONTEXT:
    case Opt.LIST_META_CONTEXT: {
      if (!structured) return { kind: "final", type: Rep.ERR_INVALID };
      const q = metaQuery(p);
      if (q === "too-big") return { kind: "final", type: Rep.ERR_TOO_BIG };
      if (q === "invalid") return { kind: "final", type: Rep.ERR_INVALID };
      if (q.name !== "d") return { kind: "final", type: Rep.ERR_UNKNOWN };
      return { kind: "final", type: Rep.ACK, nonFinal: Rep.META_CONTEXT };
    }
    default:
      return { kind: "final", type: Rep.ERR_UNSUP };
  }
}

test("server: fuzzed option sequences get the replies the spec asks for, or a closed connection", async (t) => {
  const { path, server, errors } = await startServer(t);
  const tailRead = encodeRequest({ flags: 0, type: Cmd.READ, cookie: 0xfeedn, offset: 4096, length: 8192 });
  const disc = encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 0n, offset: 0, length: 0 });
  const seen = new Map<string, number>();
  await withinMemory(() =>
    fc.assert(
      fc.asyncProperty(fc.array(optionArb, { minLength: 1, maxLength: 10 }), async (options) => {
        // The model: walk the options as a correct server would, up to the first that ends
        // the option phase or whose length field breaks the framing.
        const steps: Array<{ o: FuzzOption; e: Expect }> = [];
        let structured = false;
        let phase: "options" | "transmission" | "closed" | "unknown" = "options";
        let sent = 0;
        for (const o of options) {
          sent++;
          if (o.length !== null) {
            const l = o.length === -1 || o.length === 1 ? o.payload.length + o.length : o.length;
            if (l > MAX_OPTION_LENGTH) {
              phase = "closed";
              steps.push({ o, e: { kind: "close" } });
            } else if (l !== o.payload.length) phase = "unknown";
            else steps.push({ o, e: expectFor(o, structured) });
            if (phase !== "options") break;
            continue;
          }
          const e = expectFor(o, structured);
          steps.push({ o, e });
          if (o.code === Opt.STRUCTURED_REPLY && e.kind === "final" && e.type === Rep.ACK) structured = true;
          if (e.kind === "close" || e.kind === "ack-close") phase = "closed";
          if (e.kind === "export-name" || e.kind === "go") phase = "transmission";
          if (phase !== "options") break;
        }
        const sentOptions = options.slice(0, sent).map(encodeFuzzOption);
        let tail: Buffer[] = [];
        if (phase === "options") {
          tail = [encodeOption(Opt.GO, encodeInfoRequest("d", [])), tailRead, disc];
          phase = "transmission";
          steps.push({ o: { code: Opt.GO, payload: Buffer.alloc(0), length: null }, e: { kind: "go" } });
        } else if (phase === "transmission") tail = [tailRead, disc];
        const bytes = Buffer.concat([clientFlags(), ...sentOptions, ...tail]);
        const { got, closedFirst } = await talk(path, bytes, phase === "unknown" ? 100 : CASE_MS);
        seen.set(phase, (seen.get(phase) ?? 0) + 1);
        const st = new Stream(got);
        readGreeting(st);
        if (phase === "unknown") return; // framing broken on purpose: only "it closed" is checked
        for (const { o, e } of steps) {
          if (e.kind === "close") {
            assert.equal(st.left, 0, `option ${o.code}: answered although it must close`);
            assert.ok(closedFirst, `option ${o.code}: the server did not close`);
            return;
          }
          if (e.kind === "export-name") {
            const b = st.take(10);
            assert.ok(b, "no NBD_OPT_EXPORT_NAME answer");
            assert.equal(b.readBigUInt64BE(0), BigInt(SIZE));
            break;
          }
          for (;;) {
            const r = readOptionReply(st);
            assert.ok(r, `option ${o.code}: no final reply`);
            assert.equal(r.option, o.code >>> 0, "reply echoes the option");
            if (e.kind === "ack-close") {
              assert.equal(r.type, Rep.ACK);
              assert.equal(st.left, 0);
              assert.ok(closedFirst, "NBD_OPT_ABORT: the server did not close");
              return;
            }
            if (e.kind === "go") {
              if (r.type === Rep.INFO) continue;
              assert.equal(r.type, Rep.ACK, "GO for an existing export");
              break;
            }
            if (r.type === e.type) break;
            assert.ok(
              !isRepError(r.type) && r.type !== Rep.ACK,
              `option ${o.code}: ${r.type} instead of ${e.type}`,
            );
            assert.equal(r.type, e.nonFinal, `option ${o.code}: non-final reply ${r.type}`);
          }
        }
        // Transmission: the tail READ is answered with the right data, then DISC closes.
        const magic = st.take(4)?.readUInt32BE(0);
        if (magic === SIMPLE_REPLY_MAGIC) {
          const h = st.take(12)!;
          assert.equal(h.readUInt32BE(0), 0);
          assert.equal(h.readBigUInt64BE(4), 0xfeedn);
        } else {
          assert.equal(magic, STRUCTURED_REPLY_MAGIC, "reply to the tail read");
          const h = st.take(16)!;
          assert.deepEqual(
            [h.readUInt16BE(0), h.readUInt16BE(2), h.readBigUInt64BE(4), h.readUInt32BE(12)],
            [ReplyFlag.DONE, ReplyType.OFFSET_DATA, 0xfeedn, 8 + 8192],
          );
          assert.equal(st.take(8)!.readBigUInt64BE(0), 4096n);
        }
        assert.ok(st.take(8192)?.equals(DISK.subarray(4096, 4096 + 8192)), "tail read data");
        assert.equal(st.left, 0, "bytes after the last reply");
        assert.ok(closedFirst, "NBD_CMD_DISC did not close");
      }),
      params,
    ),
  );
  t.diagnostic(`phases reached: ${JSON.stringify(Object.fromEntries(seen))}`);
  await serverSurvived(path, server, errors);
});

// ---- transmission phase ---------------------------------------------------------------------

const requestArb = fc.record({
  badMagic: rarely(fc.nat(0xffffffff), { freq: 25 }),
  flags: fc.oneof(fc.constantFrom(0, CmdFlag.FUA, CmdFlag.REQ_ONE, CmdFlag.DF), fc.nat(0xffff)),
  type: fc.oneof(
    {
      weight: 8,
      arbitrary: fc.constantFrom(Cmd.READ, Cmd.READ, Cmd.BLOCK_STATUS, Cmd.WRITE, Cmd.WRITE_ZEROES),
    },
    fc.constantFrom(Cmd.TRIM, Cmd.FLUSH, Cmd.CACHE, 8, 0xffff),
  ),
  cookie: fc.bigInt({ min: 0n, max: (1n << 48n) - 1n }),
  offset: fc.oneof(
    { weight: 4, arbitrary: fc.nat(SIZE - 1) },
    fc.constantFrom(SIZE - 1, SIZE, SIZE + 1, 2 ** 32, Number.MAX_SAFE_INTEGER),
    fc.constantFrom(2n ** 53n, 2n ** 63n, 2n ** 64n - 1n),
  ),
  length: fc.oneof(
    { weight: 4, arbitrary: fc.nat(16384) },
    fc.constantFrom(0, SIZE, SIZE + 1, MAX_PAYLOAD, MAX_PAYLOAD + 1, 0xffffffff),
  ),
});
type FuzzRequest = {
  badMagic: number | null;
  flags: number;
  type: number;
  cookie: bigint;
  offset: number | bigint;
  length: number;
};

test("server: fuzzed request headers are answered with data or an NBD error, or the connection closes", async (t) => {
  const { path, server, errors } = await startServer(t);
  const outcomes = new Map<string, number>();
  await withinMemory(() =>
    fc.assert(
      fc.asyncProperty(
        fc.boolean(),
        fc.boolean(),
        fc.array(requestArb, { minLength: 1, maxLength: 12 }),
        async (structured, meta, reqs0) => {
          // Unique cookies: the index in the low bits.
          const reqs: FuzzRequest[] = reqs0.map((r, i) => ({ ...r, cookie: (r.cookie << 8n) | BigInt(i) }));
          const handshake = [
            clientFlags(),
            ...(structured ? [encodeOption(Opt.STRUCTURED_REPLY)] : []),
            ...(meta
              ? [encodeOption(Opt.SET_META_CONTEXT, encodeMetaContextRequest("d", [BASE_ALLOCATION]))]
              : []),
            encodeOption(Opt.GO, encodeInfoRequest("d", [Info.BLOCK_SIZE])),
          ];
          // The model: where the stream breaks (a closing request), and each request's answer.
          const wire: Buffer[] = [];
          let fatal = -1;
          for (const [i, r] of reqs.entries()) {
            const h = encodeRequest({ ...r, offset: 0 });
            h.writeBigUInt64BE(BigInt(r.offset), 16);
            if (r.badMagic !== null && r.badMagic !== REQUEST_MAGIC) h.writeUInt32BE(r.badMagic, 0);
            wire.push(h);
            if (r.type === Cmd.WRITE) wire.push(Buffer.alloc(Math.min(r.length, 65536), 0xee));
            const breaks =
              (r.badMagic !== null && r.badMagic !== REQUEST_MAGIC) ||
              BigInt(r.offset) > BigInt(Number.MAX_SAFE_INTEGER) ||
              r.type === Cmd.DISC ||
              (r.type === Cmd.WRITE && r.length > MAX_PAYLOAD);
            if (breaks) {
              fatal = i;
              break;
            }
            if (r.type === Cmd.WRITE && r.length > 65536) {
              fatal = i; // payload sent short on purpose: the server waits for the rest
              break;
            }
          }
          const disc = encodeRequest({ flags: 0, type: Cmd.DISC, cookie: 1n << 60n, offset: 0, length: 0 });
          const bytes = Buffer.concat([...handshake, ...wire, ...(fatal < 0 ? [disc] : [])]);
          const last = fatal >= 0 ? reqs[fatal]! : undefined;
          // A WRITE whose payload is sent short leaves the server waiting (legitimately).
          const waits = last?.type === Cmd.WRITE && last.length > 65536 && last.length <= MAX_PAYLOAD;
          const { got, closedFirst } = await talk(path, bytes, waits ? 300 : CASE_MS);
          const st = new Stream(got);
          readGreeting(st);
          let negotiated = false;
          let ctx = false;
          for (;;) {
            const r = readOptionReply(st);
            assert.ok(r, "the handshake was not answered");
            if (r.option === Opt.STRUCTURED_REPLY) negotiated = r.type === Rep.ACK;
            if (r.option === Opt.SET_META_CONTEXT && r.type === Rep.META_CONTEXT) ctx = true;
            if (r.option === Opt.GO && r.type === Rep.ACK) break;
          }
          assert.equal(negotiated, structured);
          assert.equal(ctx, structured && meta);
          const live = fatal < 0 ? reqs : reqs.slice(0, fatal);
          const byCookie = new Map(live.map((r) => [r.cookie, r]));
          const answered = new Set<bigint>();
          while (st.left > 0) {
            const magic = st.take(4)?.readUInt32BE(0);
            let cookie: bigint;
            let errno = 0;
            let data: Buffer | undefined;
            let extents: number[] | undefined;
            if (magic === SIMPLE_REPLY_MAGIC) {
              const h = st.take(12);
              assert.ok(h, "truncated simple reply");
              errno = h.readUInt32BE(0);
              cookie = h.readBigUInt64BE(4);
              const r = byCookie.get(cookie);
              assert.ok(r, `reply for cookie ${cookie} that was never sent or came after a fatal request`);
              assert.ok(
                !structured || r.type !== Cmd.READ || errno !== 0,
                "simple read reply after structured",
              );
              if (r.type === Cmd.READ && errno === 0) data = st.take(r.length);
            } else {
              assert.equal(magic, STRUCTURED_REPLY_MAGIC, "reply magic");
              assert.ok(structured, "structured reply that was not negotiated");
              const h = st.take(16);
              assert.ok(h, "truncated chunk header");
              const [flags, type] = [h.readUInt16BE(0), h.readUInt16BE(2)];
              cookie = h.readBigUInt64BE(4);
              const p = st.take(h.readUInt32BE(12));
              assert.ok(p, "truncated chunk");
              assert.equal(flags, ReplyFlag.DONE, "the server sends one chunk per reply");
              const r = byCookie.get(cookie);
              assert.ok(r, `reply for cookie ${cookie} that was never sent or came after a fatal request`);
              if (type === ReplyType.OFFSET_DATA) {
                assert.equal(p.readBigUInt64BE(0), BigInt(r.offset));
                data = p.subarray(8);
              } else if (type === ReplyType.NONE) data = Buffer.alloc(0);
              else if (type === ReplyType.ERROR) errno = p.readUInt32BE(0);
              else if (type === ReplyType.BLOCK_STATUS) {
                extents = [];
                for (let at = 4; at < p.length; at += 8) extents.push(p.readUInt32BE(at));
              } else assert.fail(`chunk type ${type}`);
            }
            assert.ok(!answered.has(cookie), `two replies for cookie ${cookie}`);
            answered.add(cookie);
            // What the request deserves.
            const r = byCookie.get(cookie)!;
            const off = Number(r.offset);
            const inRange = off + r.length <= SIZE;
            const key = `${r.type}:${errno}`;
            outcomes.set(key, (outcomes.get(key) ?? 0) + 1);
            if (r.type === Cmd.READ) {
              if (inRange) {
                assert.equal(errno, 0, `read ${off}+${r.length} failed`);
                assert.ok(
                  data?.equals(DISK.subarray(off, off + r.length)),
                  `read ${off}+${r.length}: wrong data`,
                );
              } else assert.equal(errno, NbdErrno.EINVAL, `read ${off}+${r.length} beyond the export`);
            } else if (r.type === Cmd.BLOCK_STATUS) {
              if (structured && meta && inRange && r.length > 0) {
                assert.ok(extents, `block status ${off}+${r.length}: errno ${errno}`);
                assert.deepEqual(extents, [r.length]);
              } else assert.equal(errno, NbdErrno.EINVAL);
            } else if (r.type === Cmd.WRITE || r.type === Cmd.WRITE_ZEROES || r.type === Cmd.TRIM) {
              assert.equal(errno, NbdErrno.EPERM, "the export is read-only");
            } else if (r.type === Cmd.FLUSH || (r.type === Cmd.CACHE && inRange)) {
              assert.equal(errno, 0);
            } else assert.equal(errno, NbdErrno.EINVAL, `command ${r.type}`);
          }
          if (fatal < 0) {
            assert.ok(closedFirst, "NBD_CMD_DISC did not close the connection");
            assert.equal(answered.size, reqs.length, "NBD_CMD_DISC closed before every request was answered");
          }
          if (last && !waits) assert.ok(closedFirst, "the server did not close after a fatal request");
        },
      ),
      params,
    ),
  );
  t.diagnostic(`type:errno outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  await serverSurvived(path, server, errors);
});

// ---- a fake server for the client -----------------------------------------------------------

const CONTEXT_ID = 7;
const FAKE_SIZE = 1 << 20;

/**
 * A FAKE server: it answers the handshake as a real one would (structured replies,
 * base:allocation as context 7, a 1 MiB read-only export), then answers the client's first
 * request with `reply(cookie)` — whatever bytes the test generated, which no real server sends.
 */
async function fakeServer(
  t: TestContext,
): Promise<{ path: string; set: (f: (cookie: bigint) => Buffer, close: boolean) => void }> {
  const path = tempSocket(t, "fake.sock");
  let reply: (cookie: bigint) => Buffer = () => Buffer.alloc(0);
  let closeAfter = false;
  const sockets = new Set<Socket>();
  const server = createServer((s) => {
    sockets.add(s);
    s.on("error", () => {});
    s.on("close", () => sockets.delete(s));
    const hello = Buffer.alloc(18);
    hello.writeBigUInt64BE(NBD_MAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(3, 16);
    s.write(hello);
    let buf = Buffer.alloc(0);
    let phase: "flags" | "options" | "requests" = "flags";
    s.on("data", (d: Buffer) => {
      buf = Buffer.concat([buf, d]);
      for (;;) {
        if (phase === "flags") {
          if (buf.length < 4) return;
          buf = buf.subarray(4);
          phase = "options";
        } else if (phase === "options") {
          if (buf.length < 16) return;
          const len = buf.readUInt32BE(12);
          if (buf.length < 16 + len) return;
          const option = buf.readUInt32BE(8);
          buf = buf.subarray(16 + len);
          if (option === Opt.STRUCTURED_REPLY) s.write(encodeOptionReply(option, Rep.ACK));
          else if (option === Opt.SET_META_CONTEXT) {
            const b = Buffer.alloc(4);
            b.writeUInt32BE(CONTEXT_ID);
            s.write(
              encodeOptionReply(option, Rep.META_CONTEXT, Buffer.concat([b, Buffer.from(BASE_ALLOCATION)])),
            );
            s.write(encodeOptionReply(option, Rep.ACK));
          } else if (option === Opt.GO) {
            const info = Buffer.alloc(12);
            info.writeUInt16BE(Info.EXPORT, 0);
            info.writeBigUInt64BE(BigInt(FAKE_SIZE), 2);
            info.writeUInt16BE(TransmissionFlag.HAS_FLAGS | TransmissionFlag.READ_ONLY, 10);
            s.write(encodeOptionReply(option, Rep.INFO, info));
            s.write(encodeOptionReply(option, Rep.ACK));
            phase = "requests";
          } else s.write(encodeOptionReply(option, Rep.ERR_UNSUP));
        } else {
          if (buf.length < 28) return;
          const type = buf.readUInt16BE(6);
          const cookie = buf.readBigUInt64BE(8);
          buf = buf.subarray(28);
          if (type === Cmd.DISC) {
            s.end();
            return;
          }
          s.write(reply(cookie));
          if (closeAfter) s.end();
        }
      }
    });
  });
  await new Promise<void>((r) => server.listen(path, () => r()));
  t.after(async () => {
    for (const s of sockets) s.destroy();
    await new Promise<void>((r) => server.close(() => r()));
  });
  return {
    path,
    set: (f, close) => {
      reply = f;
      closeAfter = close;
    },
  };
}

/** One generated chunk; `rel`/`n` are relative to the request, `length` overrides the header's. */
type Chunk = {
  kind: "data" | "hole" | "none" | "error" | "status" | "unknown";
  cookieDelta: number;
  rel: number;
  n: number;
  done: boolean;
  length: number | null;
  extents: number[];
  contextId: number;
};

function chunkArb(reqLen: number): fc.Arbitrary<Chunk> {
  return fc.record({
    kind: fc.oneof(
      { weight: 2, arbitrary: fc.constantFrom("data" as const, "hole" as const) },
      fc.constantFrom("none" as const, "error" as const, "status" as const, "unknown" as const),
    ),
    cookieDelta: fc.oneof({ weight: 12, arbitrary: fc.constant(0) }, fc.constantFrom(1, -1, 2 ** 20)),
    rel: fc.oneof({ weight: 4, arbitrary: fc.nat(reqLen) }, fc.integer({ min: -5000, max: reqLen + 5000 })),
    n: fc.oneof(
      { weight: 4, arbitrary: fc.integer({ min: 1, max: reqLen }) },
      fc.constantFrom(0, reqLen + 1, 0xffffffff),
    ),
    done: fc.boolean(),
    length: rarely(fc.constantFrom(0, 4, 11, 12, 13, 0xffffffff, MAX_PAYLOAD + 9, 4 + 8 * (1 << 20)), {
      freq: 12,
    }),
    extents: fc.array(
      fc.oneof(
        { weight: 6, arbitrary: fc.integer({ min: 1, max: 1 << 20 }) },
        fc.constantFrom(0, 0xffffffff),
      ),
      {
        maxLength: 5,
      },
    ),
    contextId: fc.oneof({ weight: 8, arbitrary: fc.constant(CONTEXT_ID) }, fc.nat(10)),
  });
}

/** A plausible reply (the range split into data and holes, DONE on the last) with edits. */
function replyArb(reqLen: number): fc.Arbitrary<Chunk[]> {
  const plausible = fc
    .tuple(
      fc.uniqueArray(fc.integer({ min: 1, max: Math.max(1, reqLen - 1) }), { maxLength: 5 }),
      fc.array(fc.boolean(), { minLength: 6, maxLength: 6 }),
    )
    .map(([cuts, holes]) => {
      const points = [0, ...cuts.filter((c) => c < reqLen).sort((a, b) => a - b), reqLen];
      const out: Chunk[] = [];
      for (let i = 0; i + 1 < points.length; i++) {
        out.push({
          kind: holes[i] ? "hole" : "data",
          cookieDelta: 0,
          rel: points[i]!,
          n: points[i + 1]! - points[i]!,
          done: false,
          length: null,
          extents: [],
          contextId: CONTEXT_ID,
        });
      }
      return out;
    });
  return fc
    .tuple(
      plausible,
      fc.boolean(),
      fc.array(fc.tuple(fc.nat(), chunkArb(reqLen)), { maxLength: 3 }),
      // Edits of the plausible chunks: shift one (an overlap and a gap of the same size),
      // resize one, drop one, send one twice.
      fc.array(
        fc.tuple(
          fc.constantFrom("shift" as const, "resize" as const, "drop" as const, "twice" as const),
          fc.nat(),
          fc.integer({ min: -64, max: 64 }),
        ),
        { maxLength: 2 },
      ),
      fc.oneof(
        { weight: 3, arbitrary: fc.constant("last" as const) },
        fc.constantFrom("none" as const, "random" as const),
      ),
    )
    .map(([base, reverse, inserts, edits, done]) => {
      let chunks = reverse ? [...base].reverse() : base; // any order is fine
      for (const [op, at, d] of edits) {
        if (chunks.length === 0) break;
        const i = at % chunks.length;
        const c = chunks[i]!;
        if (op === "shift") chunks[i] = { ...c, rel: c.rel + d };
        else if (op === "resize") chunks[i] = { ...c, n: c.n + d };
        else if (op === "drop") chunks.splice(i, 1);
        else chunks.splice(i, 0, { ...c });
      }
      for (const [at, c] of inserts) chunks.splice(at % (chunks.length + 1), 0, c);
      chunks = chunks.map((c) => ({ ...c, done: done === "random" ? c.done : false }));
      if (done === "last" && chunks.length > 0) chunks[chunks.length - 1]!.done = true;
      return chunks;
    });
}

/** Type and payload of one generated chunk (the header's length may still lie: `c.length`). */
function chunkBody(c: Chunk, reqOffset: number): { type: number; payload: Buffer } {
  if (c.kind === "data") {
    const start = Math.max(0, reqOffset + c.rel);
    const payload = Buffer.alloc(8 + Math.max(0, Math.min(c.n, 1 << 20)));
    payload.writeBigUInt64BE(BigInt(start), 0);
    DISK_FAKE.copy(payload, 8, Math.min(start, FAKE_SIZE));
    return { type: ReplyType.OFFSET_DATA, payload };
  }
  if (c.kind === "hole") {
    const payload = Buffer.alloc(12);
    payload.writeBigUInt64BE(BigInt(Math.max(0, reqOffset + c.rel)), 0);
    payload.writeUInt32BE(c.n >>> 0, 8);
    return { type: ReplyType.OFFSET_HOLE, payload };
  }
  if (c.kind === "none") return { type: ReplyType.NONE, payload: Buffer.alloc(0) };
  if (c.kind === "error")
    return { type: ReplyType.ERROR, payload: encodeErrorPayload(NbdErrno.EIO, "fake failure") };
  if (c.kind === "status") {
    const extents = c.extents.map((length) => ({ offset: 0, length, flags: length & 3 }));
    return { type: ReplyType.BLOCK_STATUS, payload: encodeBlockStatusPayload(c.contextId, extents) };
  }
  return { type: 77, payload: Buffer.alloc(4) };
}

/** True if the chunk's header length is not its payload's. */
function lies(c: Chunk, reqOffset: number): boolean {
  return c.length !== null && c.length !== chunkBody(c, reqOffset).payload.length;
}

function encodeChunks(chunks: Chunk[], cookie: bigint, reqOffset: number): Buffer {
  const out: Buffer[] = [];
  for (const c of chunks) {
    const { type, payload } = chunkBody(c, reqOffset);
    const id = cookie + BigInt(c.cookieDelta);
    out.push(
      encodeChunkHeader({
        flags: c.done ? ReplyFlag.DONE : 0,
        type,
        cookie: id < 0n ? 0n : id,
        length: c.length ?? payload.length,
      }),
      payload,
    );
  }
  return Buffer.concat(out);
}

/** Non-zero everywhere, so a hole and data can be told apart. */
const DISK_FAKE = Buffer.from(content(FAKE_SIZE).map((b) => b | 1));

/** Whether an error chunk for the request comes before (or with) its first DONE. */
function sentError(chunks: Chunk[]): boolean {
  for (const c of chunks) {
    if (c.kind === "error" && c.cookieDelta === 0) return true;
    if (c.done && c.cookieDelta === 0) return false;
  }
  return false;
}

/** Client-side reference: the data a valid read reply describes, or why it is invalid. */
function modelRead(chunks: Chunk[], offset: number, len: number): Buffer | "invalid" | "error" {
  const out = Buffer.alloc(len, 0xaa);
  const covered: Array<[number, number]> = [];
  let error = false;
  for (const c of chunks) {
    if (c.cookieDelta !== 0 || lies(c, offset)) return "invalid";
    if (c.kind === "data" || c.kind === "hole") {
      // Where the chunk says it starts: chunkBody puts an offset before the disk's start at 0.
      const rel = Math.max(0, offset + c.rel) - offset;
      if (c.n <= 0 || rel < 0 || rel + c.n > len) return "invalid";
      for (const [a, b] of covered) if (rel < b && a < rel + c.n) return error ? "error" : "invalid";
      covered.push([rel, rel + c.n]);
      if (c.kind === "data") DISK_FAKE.copy(out, rel, offset + rel, offset + rel + c.n);
      else out.fill(0, rel, rel + c.n);
    } else if (c.kind === "error") error = true;
    else if (c.kind !== "none") return "invalid";
    if (c.done) {
      if (error) return "error";
      return covered.reduce((s, [a, b]) => s + b - a, 0) === len ? out : "invalid";
    }
  }
  return "invalid"; // no DONE: the request times out or the connection closes
}

test("client: generated read replies from a fake server give exactly their data or a StrataError", async (t) => {
  const fake = await fakeServer(t);
  const outcomes = new Map<string, number>();
  const req = fc
    .integer({ min: 1, max: 8192 })
    .chain((len) => fc.tuple(fc.constant(len), fc.nat(FAKE_SIZE - len), replyArb(len), fc.boolean()));
  await withinMemory(() =>
    fc.assert(
      fc.asyncProperty(req, async ([len, offset, chunks, close]) => {
        fake.set((cookie) => encodeChunks(chunks, cookie, offset), close);
        const expected = modelRead(chunks, offset, len);
        // A short request timeout where the reply is invalid (it may lack DONE), a long one
        // where it is valid, so a loaded machine does not turn a valid reply into a timeout.
        const requestTimeoutMs = Buffer.isBuffer(expected) ? CASE_MS : 150;
        const c = await NbdClient.connect({ path: fake.path }, { timeoutMs: CASE_MS, requestTimeoutMs });
        const started = Date.now();
        let outcome: string;
        try {
          const got = await c.read(offset, len);
          assert.ok(Buffer.isBuffer(expected), `the client accepted an invalid reply (${expected})`);
          assert.ok(got.equals(expected), "the client returned data other than what the chunks carried");
          outcome = "ok";
        } catch (err) {
          if (!(err instanceof StrataError)) throw err;
          assert.ok(!Buffer.isBuffer(expected), `the client refused a valid reply: ${err.message}`);
          // The server's own error may be reported even when other chunks were also wrong.
          if (expected === "error" || sentError(chunks))
            assert.ok(
              ([ErrorCode.EXTERNAL, ErrorCode.PROTOCOL, ErrorCode.TIMEOUT] as string[]).includes(err.code),
            );
          else
            assert.ok(
              ([ErrorCode.PROTOCOL, ErrorCode.TIMEOUT] as string[]).includes(err.code),
              `${err.code}: ${err.message}`,
            );
          outcome = err.code;
        } finally {
          await c.close();
        }
        assert.ok(Date.now() - started < CASE_MS, "the client hung");
        outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
      }),
      params,
    ),
  );
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  // A replay runs the one case it names.
  if (process.env.STRATA_FUZZ_SEED === undefined)
    assert.ok(
      (outcomes.get("ok") ?? 0) > 0 && (outcomes.get(ErrorCode.PROTOCOL) ?? 0) > 0,
      "both outcomes reached",
    );
});

/** Client-side reference for one BLOCK_STATUS request: extent lengths, or invalid. */
function modelStatus(chunks: Chunk[], offset: number): number[] | "invalid" | "error" {
  let got: number[] | undefined;
  let error = false;
  for (const c of chunks) {
    if (c.cookieDelta !== 0 || lies(c, offset)) return "invalid";
    if (c.kind === "status") {
      if (c.contextId !== CONTEXT_ID || got || c.extents.length === 0 || c.extents.includes(0))
        return "invalid";
      got = c.extents;
    } else if (c.kind === "error") error = true;
    else if (c.kind !== "none") return "invalid";
    if (c.done) return error ? "error" : (got ?? "invalid");
  }
  return "invalid";
}

test("client: generated block status replies from a fake server give exactly their extents or a StrataError", async (t) => {
  const fake = await fakeServer(t);
  const outcomes = new Map<string, number>();
  const statusReply = fc
    .tuple(
      chunkArb(4096).map((c) => ({
        ...c,
        kind: "status" as const,
        cookieDelta: 0,
        length: null,
        done: false,
      })),
      fc.array(chunkArb(4096), { maxLength: 2 }),
      fc.boolean(),
      fc.oneof({ weight: 3, arbitrary: fc.constant(true) }, fc.constant(false)),
    )
    .map(([first, more, mutateFirst, doneLast]) => {
      const chunks = [mutateFirst ? { ...first, length: more[0]?.length ?? null } : first, ...more];
      if (doneLast) chunks[chunks.length - 1] = { ...chunks[chunks.length - 1]!, done: true };
      return chunks;
    });
  await withinMemory(() =>
    fc.assert(
      fc.asyncProperty(fc.nat(FAKE_SIZE - 4096), statusReply, fc.boolean(), async (offset, chunks, close) => {
        fake.set((cookie) => encodeChunks(chunks, cookie, offset), close);
        const expected = modelStatus(chunks, offset);
        const c = await NbdClient.connect(
          { path: fake.path },
          {
            metaContexts: [BASE_ALLOCATION],
            timeoutMs: CASE_MS,
            requestTimeoutMs: Array.isArray(expected) ? CASE_MS : 150,
          },
        );
        let outcome: string;
        try {
          const got = (await c.blockStatusAll(offset, 4096)).get(BASE_ALLOCATION);
          assert.ok(Array.isArray(expected), `the client accepted an invalid reply (${expected})`);
          let pos = offset;
          assert.deepEqual(
            got,
            expected.map((length) => {
              const e = { offset: pos, length, flags: length & 3 };
              pos += length;
              return e;
            }),
          );
          outcome = "ok";
        } catch (err) {
          if (!(err instanceof StrataError)) throw err;
          assert.ok(!Array.isArray(expected), `the client refused a valid reply: ${err.message}`);
          assert.ok(
            ([ErrorCode.EXTERNAL, ErrorCode.PROTOCOL, ErrorCode.TIMEOUT] as string[]).includes(err.code),
            err.code,
          );
          if (expected === "invalid" && !sentError(chunks)) assert.notEqual(err.code, ErrorCode.EXTERNAL);
          outcome = err.code;
        } finally {
          await c.close();
        }
        outcomes.set(outcome, (outcomes.get(outcome) ?? 0) + 1);
      }),
      params,
    ),
  );
  t.diagnostic(`outcomes: ${JSON.stringify(Object.fromEntries(outcomes))}`);
  // A replay runs the one case it names.
  if (process.env.STRATA_FUZZ_SEED === undefined)
    assert.ok(
      (outcomes.get("ok") ?? 0) > 0 && (outcomes.get(ErrorCode.PROTOCOL) ?? 0) > 0,
      "both outcomes reached",
    );
});
