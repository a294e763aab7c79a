/**
 * Framed reading and backpressured writing on a stream socket, shared by client and server.
 *
 * {@link SocketReader} keeps the socket paused unless someone is waiting for bytes, and never
 * buffers more than `highWater` bytes beyond what the current `readExact` asked for: if the
 * consumer stops reading, the kernel's socket buffer fills and the peer is held back (TCP or
 * unix-socket flow control), so memory stays bounded however fast the peer sends.
 */

import type { Socket } from "node:net";
import { ErrorCode, StrataError } from "../util/errors.js";

/** The peer closed the connection: a PROTOCOL error unless the closing was expected. */
export function connectionClosed(what: string): StrataError {
  return new StrataError(ErrorCode.PROTOCOL, `NBD: connection closed ${what}`);
}

export class SocketReader {
  private chunks: Buffer[] = [];
  private buffered = 0;
  private waiter:
    | { n: number; dst?: Buffer; filled: number; resolve: (b: Buffer) => void; reject: (e: Error) => void }
    | undefined;
  private failure: Error | undefined;

  /**
   * @param socket a connected socket; the reader owns its 'data' events from now on.
   * @param highWater bytes buffered ahead of demand before the socket is paused.
   */
  constructor(
    private readonly socket: Socket,
    private readonly highWater = 256 * 1024,
  ) {
    socket.pause();
    socket.on("data", this.onData);
    socket.on("end", this.onEnd);
    socket.on("close", this.onClose);
    socket.on("error", this.onError);
  }

  private readonly onData = (chunk: Buffer): void => {
    this.chunks.push(chunk);
    this.buffered += chunk.length;
    this.settle();
    if (this.buffered >= this.highWater && !this.waiter) this.socket.pause();
  };
  private readonly onEnd = (): void => this.fail(connectionClosed("by the peer"));
  private readonly onClose = (): void => this.fail(connectionClosed(""));
  private readonly onError = (err: Error): void => this.fail(err);

  /**
   * Gives the socket back, paused, with nothing read from it left over (NBD_OPT_STARTTLS: TLS
   * takes the socket over). Throws if bytes were received that nobody consumed.
   */
  detach(): void {
    this.socket.pause();
    this.socket.off("data", this.onData);
    this.socket.off("end", this.onEnd);
    this.socket.off("close", this.onClose);
    this.socket.off("error", this.onError);
    if (this.buffered !== 0 || this.waiter)
      throw new StrataError(ErrorCode.PROTOCOL, "NBD: client sent data before the TLS handshake");
  }

  /** Bytes received but not yet consumed. */
  get pending(): number {
    return this.buffered;
  }

  /** Rejects the current and all future reads with `err` (first error wins). */
  fail(err: Error): void {
    if (this.failure) return;
    this.failure = err;
    const w = this.waiter;
    this.waiter = undefined;
    w?.reject(err);
  }

  /**
   * Resolves with exactly `n` bytes. Callers bound `n` before calling: this is the only place
   * the size of an allocation is decided by the peer. At most one read may be outstanding.
   */
  readExact(n: number): Promise<Buffer> {
    if (this.waiter) return Promise.reject(new StrataError(ErrorCode.INTERNAL, "concurrent readExact"));
    if (this.buffered >= n) return Promise.resolve(this.take(n));
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<Buffer>((resolve, reject) => {
      this.waiter = { n, filled: 0, resolve, reject };
      this.socket.resume();
    });
  }

  /**
   * Fills `dst` completely with the next bytes, copying straight from the socket's chunks (no
   * intermediate buffer). Same rules as {@link readExact}.
   */
  readInto(dst: Buffer): Promise<void> {
    if (this.waiter) return Promise.reject(new StrataError(ErrorCode.INTERNAL, "concurrent readInto"));
    const filled = this.drainInto(dst, 0);
    if (filled === dst.length) return Promise.resolve();
    if (this.failure) return Promise.reject(this.failure);
    return new Promise<void>((resolve, reject) => {
      this.waiter = { n: dst.length, dst, filled, resolve: () => resolve(), reject };
      this.socket.resume();
    });
  }

  private drainInto(dst: Buffer, at: number): number {
    while (at < dst.length && this.chunks.length > 0) {
      const c = this.chunks[0]!;
      const k = Math.min(c.length, dst.length - at);
      c.copy(dst, at, 0, k);
      at += k;
      this.buffered -= k;
      if (k === c.length) this.chunks.shift();
      else this.chunks[0] = c.subarray(k);
    }
    return at;
  }

  private settle(): void {
    const w = this.waiter;
    if (w?.dst) {
      w.filled = this.drainInto(w.dst, w.filled);
      if (w.filled === w.n) {
        this.waiter = undefined;
        w.resolve(w.dst);
      }
      return;
    }
    if (w && this.buffered >= w.n) {
      this.waiter = undefined;
      w.resolve(this.take(w.n));
    }
  }

  private take(n: number): Buffer {
    if (n === 0) return Buffer.alloc(0);
    const first = this.chunks[0]!;
    if (first.length >= n) {
      this.buffered -= n;
      if (first.length === n) this.chunks.shift();
      else this.chunks[0] = first.subarray(n);
      return first.subarray(0, n);
    }
    const out = Buffer.allocUnsafe(n);
    let filled = 0;
    while (filled < n) {
      const c = this.chunks[0]!;
      const want = n - filled;
      if (c.length <= want) {
        c.copy(out, filled);
        filled += c.length;
        this.chunks.shift();
      } else {
        c.copy(out, filled, 0, want);
        this.chunks[0] = c.subarray(want);
        filled += want;
      }
    }
    this.buffered -= n;
    return out;
  }
}

/**
 * Writes buffers to a socket in order and lets callers wait for 'drain' when the socket's
 * buffer is full (undici's `if (!write()) await drain`). Each `send` writes all its buffers
 * synchronously, so messages from concurrent callers never interleave.
 */
export class SocketWriter {
  private drained: Promise<void> | undefined;
  private closedError: Error | undefined;

  constructor(private readonly socket: Socket) {
    const onGone = (): void => {
      this.closedError ??= connectionClosed("while writing");
    };
    socket.on("close", onGone);
  }

  /** Writes the buffers; resolves once the socket can take more (after 'drain' if needed). */
  async send(...buffers: Buffer[]): Promise<void> {
    if (this.closedError || this.socket.destroyed)
      throw this.closedError ?? connectionClosed("while writing");
    let ok = true;
    for (const b of buffers) if (b.length > 0) ok = this.socket.write(b);
    if (!ok) await this.waitDrain();
  }

  /** Resolves when the socket's write buffer has drained (or the socket is gone). */
  waitDrain(): Promise<void> {
    if (!this.socket.writableNeedDrain) return Promise.resolve();
    this.drained ??= new Promise<void>((resolve) => {
      const done = (): void => {
        this.socket.off("drain", done);
        this.socket.off("close", done);
        this.drained = undefined;
        resolve();
      };
      this.socket.on("drain", done);
      this.socket.on("close", done);
    });
    return this.drained;
  }
}
