/**
 * QMP client (QEMU Machine Protocol, docs/interop/qmp-spec.rst) over a unix socket.
 *
 * The session: QEMU greets with `{"QMP": {...}}`; we send `qmp_capabilities`; then each command
 * goes out as `{"execute", "arguments", "id"}` and its reply (`return` or `error`) carries the
 * same id back. Events (`{"event", "data", "timestamp"}`) interleave with replies at any point and
 * go to listeners.
 *
 * Guarantees:
 * - Every command has a deadline; when it passes the call rejects with TIMEOUT and a late reply
 *   is dropped (the connection stays usable).
 * - A QMP error becomes a {@link QemuCommandError} (code EXTERNAL) with QEMU's class and desc.
 * - A line that is not a JSON object, or a reply without an id, is a protocol violation: all
 *   pending calls reject with PROTOCOL and the connection is closed. Nothing throws out of the
 *   socket's event handlers.
 * - When the connection ends (QEMU exited, close()), pending calls and event waiters reject.
 *
 * To catch an event a command causes, start waiting before sending the command:
 * `const down = qmp.waitForEvent("SHUTDOWN"); await qmp.execute("system_powerdown"); await down;`
 */
import type { Socket } from "node:net";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { commandError, connectUnix, LineSplitter, parseObjectLine, preview } from "./wire.js";

export interface QmpEvent {
  event: string;
  data: Record<string, unknown>;
  timestamp: { seconds: number; microseconds: number };
}

export interface QmpGreeting {
  version: { qemu: { major: number; minor: number; micro: number }; package: string };
  capabilities: string[];
}

export interface QmpConnectOptions {
  /** How long to keep trying to connect and to wait for the greeting (default 10 s). */
  connectTimeoutMs?: number;
  /** Default deadline of each command (default 30 s). */
  commandTimeoutMs?: number;
  /** Stops the connection attempts (e.g. when QEMU has exited). */
  signal?: AbortSignal;
}

export interface ExecuteOptions {
  timeoutMs?: number;
}

interface Pending {
  command: string;
  resolve: (value: unknown) => void;
  reject: (err: StrataError) => void;
  timer: NodeJS.Timeout;
}

type EventListener = (event: QmpEvent) => void;
type CloseListener = (error: StrataError | undefined) => void;

export class QmpClient {
  private readonly pending = new Map<string, Pending>();
  private readonly eventListeners = new Set<EventListener>();
  private readonly closeListeners = new Set<CloseListener>();
  private readonly splitter = new LineSplitter();
  private nextId = 1;
  private closedWith: { error: StrataError | undefined } | undefined;
  private readonly closedPromise: Promise<void>;
  private greetingWaiter: { resolve: (g: QmpGreeting) => void; reject: (e: StrataError) => void } | undefined;
  /** Filled in by connect(). */
  greeting!: QmpGreeting;

  private constructor(
    private readonly socket: Socket,
    private readonly where: string,
    private readonly commandTimeoutMs: number,
  ) {
    this.closedPromise = new Promise((resolve) => socket.once("close", () => resolve()));
    socket.on("data", (chunk: Buffer) => this.onData(chunk));
    socket.on("error", (err) => {
      this.shutdown(
        new StrataError(ErrorCode.EXTERNAL, `${this.where}: socket error: ${err.message}`, { cause: err }),
      );
    });
    socket.on("close", () => {
      this.shutdown(new StrataError(ErrorCode.EXTERNAL, `${this.where}: connection closed by QEMU`));
    });
  }

  /** Connects to QEMU's QMP socket, reads the greeting and negotiates capabilities. */
  static async connect(path: string, options: QmpConnectOptions = {}): Promise<QmpClient> {
    const connectTimeoutMs = options.connectTimeoutMs ?? 10_000;
    const where = `QMP ${path}`;
    const socket = await connectUnix(path, connectTimeoutMs, where, options.signal);
    const client = new QmpClient(socket, where, options.commandTimeoutMs ?? 30_000);
    try {
      client.greeting = await client.readGreeting(connectTimeoutMs);
      await client.execute("qmp_capabilities");
    } catch (err) {
      client.destroy();
      throw err;
    }
    return client;
  }

  /** True once the connection is gone (closed, lost, or dropped for a protocol error). */
  get closed(): boolean {
    return this.closedWith !== undefined;
  }

  /**
   * Runs a command and resolves with its `return` value.
   * Rejects with QemuCommandError (QEMU refused), TIMEOUT, PROTOCOL or EXTERNAL (connection lost).
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: ExecuteOptions = {},
  ): Promise<T> {
    if (this.closedWith) {
      return Promise.reject(
        new StrataError(ErrorCode.EXTERNAL, `${this.where}: ${command}: connection is closed`, {
          cause: this.closedWith.error,
        }),
      );
    }
    const id = `strata-${this.nextId++}`;
    const timeoutMs = options.timeoutMs ?? this.commandTimeoutMs;
    return new Promise<T>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.pending.delete(id);
        reject(
          new StrataError(ErrorCode.TIMEOUT, `${this.where}: ${command} got no reply within ${timeoutMs} ms`),
        );
      }, timeoutMs);
      this.pending.set(id, { command, resolve: resolve as (v: unknown) => void, reject, timer });
      const msg = args === undefined ? { execute: command, id } : { execute: command, arguments: args, id };
      this.socket.write(`${JSON.stringify(msg)}\n`);
    });
  }

  /** Subscribes to events ("event") or to the end of the connection ("close"). Returns an unsubscribe. */
  on(type: "event", listener: EventListener): () => void;
  on(type: "close", listener: CloseListener): () => void;
  on(type: "event" | "close", listener: EventListener | CloseListener): () => void {
    if (type === "event") {
      const l = listener as EventListener;
      this.eventListeners.add(l);
      return () => this.eventListeners.delete(l);
    }
    const l = listener as CloseListener;
    this.closeListeners.add(l);
    return () => this.closeListeners.delete(l);
  }

  /**
   * Resolves with the next event called `name` (and accepted by `predicate`) that arrives after
   * this call. Rejects with TIMEOUT after `timeoutMs`, or when the connection ends first.
   */
  waitForEvent(
    name: string,
    predicate: (event: QmpEvent) => boolean = () => true,
    timeoutMs = 30_000,
  ): Promise<QmpEvent> {
    return new Promise<QmpEvent>((resolve, reject) => {
      if (this.closedWith) {
        reject(
          new StrataError(ErrorCode.EXTERNAL, `${this.where}: waiting for ${name}: connection is closed`),
        );
        return;
      }
      const cleanup = () => {
        clearTimeout(timer);
        offEvent();
        offClose();
      };
      const timer = setTimeout(() => {
        cleanup();
        reject(new StrataError(ErrorCode.TIMEOUT, `${this.where}: no ${name} event within ${timeoutMs} ms`));
      }, timeoutMs);
      const offEvent = this.on("event", (e) => {
        if (e.event !== name) return;
        let ok: boolean;
        try {
          ok = predicate(e);
        } catch (err) {
          cleanup();
          reject(err);
          return;
        }
        if (ok) {
          cleanup();
          resolve(e);
        }
      });
      const offClose = this.on("close", (err) => {
        cleanup();
        reject(
          new StrataError(ErrorCode.EXTERNAL, `${this.where}: connection ended while waiting for ${name}`, {
            cause: err,
          }),
        );
      });
    });
  }

  /** Closes the connection and waits until the socket is gone. Pending calls reject. */
  async close(): Promise<void> {
    if (!this.closedWith) {
      this.shutdown(new StrataError(ErrorCode.ABORTED, `${this.where}: connection closed by Strata`));
      this.socket.end();
    }
    const timer = setTimeout(() => this.socket.destroy(), 1000);
    await this.closedPromise;
    clearTimeout(timer);
  }

  private destroy(): void {
    this.shutdown(new StrataError(ErrorCode.ABORTED, `${this.where}: connection dropped`));
    this.socket.destroy();
  }

  private readGreeting(timeoutMs: number): Promise<QmpGreeting> {
    return new Promise<QmpGreeting>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.greetingWaiter = undefined;
        reject(new StrataError(ErrorCode.TIMEOUT, `${this.where}: no greeting within ${timeoutMs} ms`));
      }, timeoutMs);
      this.greetingWaiter = {
        resolve: (g) => {
          clearTimeout(timer);
          resolve(g);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  private onData(chunk: Buffer): void {
    try {
      for (const line of this.splitter.push(chunk)) {
        if (line.trim() === "") continue;
        this.onMessage(parseObjectLine(this.where, line));
        if (this.closedWith) return;
      }
    } catch (err) {
      const e =
        err instanceof StrataError
          ? err
          : new StrataError(ErrorCode.PROTOCOL, `${this.where}: ${String(err)}`, { cause: err });
      this.shutdown(e);
      this.socket.destroy();
    }
  }

  private onMessage(msg: Record<string, unknown>): void {
    if (this.greetingWaiter) {
      const g = msg["QMP"];
      // An event before the greeting was queued for the monitor's previous client, which QEMU had
      // not yet seen leave (seen: a RESUME right after a backup's own connection closed): skipped.
      if (typeof msg["event"] === "string" && g === undefined) return;
      if (typeof g !== "object" || g === null) {
        // thrown to onData, whose shutdown() rejects the greeting waiter with it
        throw new StrataError(
          ErrorCode.PROTOCOL,
          `${this.where}: expected the QMP greeting, got ${preview(msg)}`,
        );
      }
      const waiter = this.greetingWaiter;
      this.greetingWaiter = undefined;
      waiter.resolve(g as QmpGreeting);
      return;
    }
    if (typeof msg["event"] === "string") {
      const event: QmpEvent = {
        event: msg["event"],
        data: (msg["data"] as Record<string, unknown> | undefined) ?? {},
        timestamp: (msg["timestamp"] as QmpEvent["timestamp"] | undefined) ?? { seconds: 0, microseconds: 0 },
      };
      for (const l of [...this.eventListeners]) {
        try {
          l(event);
        } catch {
          // A listener's bug must not break the connection for everyone else.
        }
      }
      return;
    }
    if (!("return" in msg) && !("error" in msg)) {
      throw new StrataError(ErrorCode.PROTOCOL, `${this.where}: neither reply nor event: ${preview(msg)}`);
    }
    const id = msg["id"];
    if (typeof id !== "string") {
      throw new StrataError(ErrorCode.PROTOCOL, `${this.where}: reply without our id: ${preview(msg)}`);
    }
    const p = this.pending.get(id);
    if (!p) return; // the reply to a command that already timed out
    this.pending.delete(id);
    clearTimeout(p.timer);
    if ("error" in msg) p.reject(commandError(this.where, p.command, msg["error"]));
    else p.resolve(msg["return"]);
  }

  /** Fails everything pending with `error` and tells close listeners, once. */
  private shutdown(error: StrataError): void {
    if (this.closedWith) return;
    this.closedWith = { error };
    if (this.greetingWaiter) {
      this.greetingWaiter.reject(error);
      this.greetingWaiter = undefined;
    }
    for (const p of this.pending.values()) {
      clearTimeout(p.timer);
      p.reject(
        error.code === ErrorCode.PROTOCOL
          ? error
          : new StrataError(error.code, `${error.message} (while waiting for ${p.command})`, {
              cause: error,
            }),
      );
    }
    this.pending.clear();
    const reported = error.code === ErrorCode.ABORTED ? undefined : error;
    for (const l of [...this.closeListeners]) {
      try {
        l(reported);
      } catch {
        // ignore listener bugs
      }
    }
    this.closeListeners.clear();
    this.eventListeners.clear();
  }
}
