/**
 * Guest-agent (qemu-ga) client over the host end of the agent's virtio-serial port: the unix
 * socket of QEMU's `-chardev socket,...,server=on` (see launcher.ts).
 *
 * The agent's protocol differs from QMP: no greeting, no ids, one command at a time, and the
 * stream may hold stale replies (of commands whose caller gave up, or of an earlier client).
 * So before the first command, after every timeout and after every reconnect we synchronise:
 * send the byte 0xFF (the agent discards its input up to it and resets its parser), then
 * `guest-sync-delimited {id}` with a fresh random id; the agent answers with 0xFF followed by
 * `{"return": id}`. Lines before that reply are discarded.
 *
 * Every call has a deadline (TIMEOUT). An agent error becomes a QemuCommandError (EXTERNAL).
 * Before the sync reply anything goes (fragments included); after it, a reply that is not JSON is
 * a PROTOCOL error, the connection is dropped and the next call reconnects and synchronises
 * again. Commands run strictly one after another.
 */
import { randomInt } from "node:crypto";
import type { Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { Semaphore } from "../../util/pool.js";
import { commandError, connectUnix, LineSplitter, parseObjectLine, preview } from "./wire.js";

export interface QgaOptions {
  /** Deadline of each command (default 10 s). */
  timeoutMs?: number;
  /** Deadline of a sync; a guest without a running agent fails here (default 5 s). */
  syncTimeoutMs?: number;
  /** How long to keep trying to connect to the socket (default 5 s). */
  connectTimeoutMs?: number;
}

export interface CallOptions {
  timeoutMs?: number;
}

export interface QgaInfo {
  version: string;
  supported_commands: Array<{ name: string; enabled: boolean; "success-response": boolean }>;
}

export type FsfreezeStatus = "thawed" | "frozen";

export interface GuestExecStatus {
  exited: boolean;
  exitcode?: number;
  signal?: number;
  "out-data"?: string;
  "err-data"?: string;
}

interface Waiter {
  resolve: (msg: Record<string, unknown>) => void;
  reject: (err: StrataError) => void;
}

export class QgaClient {
  private socket: Socket | undefined;
  private splitter = new LineSplitter(true);
  private lines: Array<Record<string, unknown>> = [];
  private waiter: Waiter | undefined;
  private synced = false;
  private readonly lock = new Semaphore(1);
  private readonly where: string;
  private readonly timeoutMs: number;
  private readonly syncTimeoutMs: number;
  private readonly connectTimeoutMs: number;

  constructor(
    readonly path: string,
    options: QgaOptions = {},
  ) {
    this.where = `guest agent ${path}`;
    this.timeoutMs = options.timeoutMs ?? 10_000;
    this.syncTimeoutMs = options.syncTimeoutMs ?? 5_000;
    this.connectTimeoutMs = options.connectTimeoutMs ?? 5_000;
  }

  /**
   * Runs an agent command and resolves with its `return` value. Connects and synchronises first
   * when needed.
   */
  execute<T = unknown>(
    command: string,
    args?: Record<string, unknown>,
    options: CallOptions = {},
  ): Promise<T> {
    return this.lock.with(async () => {
      await this.ensureSynced();
      const reply = await this.request(command, args, options.timeoutMs ?? this.timeoutMs);
      if ("error" in reply) throw commandError(this.where, command, reply["error"]);
      if (!("return" in reply)) {
        const err = new StrataError(
          ErrorCode.PROTOCOL,
          `${this.where}: ${command}: not a reply: ${preview(reply)}`,
        );
        this.drop(err);
        throw err;
      }
      return reply["return"] as T;
    });
  }

  /** Waits until the agent answers a sync (e.g. after boot), retrying until `timeoutMs`. */
  async waitUntilReady(timeoutMs: number): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      try {
        await this.lock.with(() =>
          this.ensureSynced(Math.min(this.syncTimeoutMs, Math.max(100, deadline - Date.now()))),
        );
        return;
      } catch (err) {
        if (Date.now() >= deadline) {
          throw new StrataError(
            ErrorCode.TIMEOUT,
            `${this.where}: agent not answering after ${timeoutMs} ms`,
            {
              cause: err,
            },
          );
        }
        await sleep(200);
      }
    }
  }

  ping(options?: CallOptions): Promise<void> {
    return this.execute<unknown>("guest-ping", undefined, options).then(() => undefined);
  }

  info(options?: CallOptions): Promise<QgaInfo> {
    return this.execute<QgaInfo>("guest-info", undefined, options);
  }

  fsfreezeStatus(options?: CallOptions): Promise<FsfreezeStatus> {
    return this.execute<FsfreezeStatus>("guest-fsfreeze-status", undefined, options);
  }

  /** Freezes all freezable guest filesystems; resolves with how many were frozen. */
  fsfreezeFreeze(options?: CallOptions): Promise<number> {
    return this.execute<number>("guest-fsfreeze-freeze", undefined, options);
  }

  /** Freezes the filesystems mounted at `mountpoints` only. */
  fsfreezeFreezeList(mountpoints: string[], options?: CallOptions): Promise<number> {
    return this.execute<number>("guest-fsfreeze-freeze-list", { mountpoints }, options);
  }

  /** Thaws every frozen filesystem; resolves with how many were thawed. */
  fsfreezeThaw(options?: CallOptions): Promise<number> {
    return this.execute<number>("guest-fsfreeze-thaw", undefined, options);
  }

  /**
   * Asks the guest to shut down. The agent sends no reply on success (the command's
   * success-response is false), so this resolves once the request is written; an error reply, if
   * any, is discarded by the next sync. Watch QEMU (QMP SHUTDOWN, process exit) for the outcome.
   */
  shutdown(mode: "powerdown" | "halt" | "reboot" = "powerdown"): Promise<void> {
    return this.lock.with(async () => {
      await this.ensureSynced();
      this.send({ execute: "guest-shutdown", arguments: { mode } });
      this.synced = false;
    });
  }

  /** Runs a program in the guest and waits for it (polling guest-exec-status). */
  async exec(
    path: string,
    args: string[] = [],
    options: { timeoutMs?: number; pollMs?: number } = {},
  ): Promise<{ exitcode: number | undefined; signal: number | undefined; stdout: string; stderr: string }> {
    const timeoutMs = options.timeoutMs ?? this.timeoutMs;
    const { pid } = await this.execute<{ pid: number }>("guest-exec", {
      path,
      arg: args,
      "capture-output": true,
    });
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const st = await this.execute<GuestExecStatus>("guest-exec-status", { pid });
      if (st.exited) {
        return {
          exitcode: st.exitcode,
          signal: st.signal,
          stdout: Buffer.from(st["out-data"] ?? "", "base64").toString("utf8"),
          stderr: Buffer.from(st["err-data"] ?? "", "base64").toString("utf8"),
        };
      }
      if (Date.now() >= deadline) {
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `${this.where}: ${path} still running after ${timeoutMs} ms`,
        );
      }
      await sleep(options.pollMs ?? 100);
    }
  }

  /** Closes the connection. A later call reconnects. */
  async close(): Promise<void> {
    await this.lock.with(async () => {
      const s = this.socket;
      this.drop(new StrataError(ErrorCode.ABORTED, `${this.where}: closed by Strata`));
      if (s && !s.destroyed) {
        await new Promise<void>((resolve) => {
          s.once("close", () => resolve());
          s.end();
          setTimeout(() => s.destroy(), 1000).unref();
        });
      }
    });
  }

  private async ensureSynced(syncTimeoutMs = this.syncTimeoutMs): Promise<void> {
    if (!this.socket) await this.connect();
    if (this.synced) return;
    const id = randomInt(1, 2 ** 47);
    // 0xFF first: the agent drops whatever partial request it holds and resets its JSON parser.
    this.socket!.write(Buffer.from([0xff]));
    this.lines = [];
    this.send({ execute: "guest-sync-delimited", arguments: { id } });
    const deadline = Date.now() + syncTimeoutMs;
    for (;;) {
      const msg = await this.next(Math.max(1, deadline - Date.now()), "guest-sync-delimited");
      if (msg["return"] === id) break;
      // Anything else is stale: replies to abandoned commands, or the agent's complaint about the
      // 0xFF byte itself ("JSON parse error, stray ..."). Drop it.
    }
    this.synced = true;
  }

  private async connect(): Promise<void> {
    const socket = await connectUnix(this.path, this.connectTimeoutMs, this.where);
    this.socket = socket;
    this.splitter = new LineSplitter(true);
    this.lines = [];
    this.synced = false;
    socket.on("data", (chunk: Buffer) => {
      if (this.socket !== socket) return;
      try {
        for (const line of this.splitter.push(chunk)) {
          if (line.trim() === "") continue;
          let msg: Record<string, unknown>;
          try {
            msg = parseObjectLine(this.where, line);
          } catch (err) {
            // Before the sync reply everything is stale, fragments too (we may have connected in
            // the middle of a line meant for an earlier client): skip them. After it, garbage is
            // a protocol violation.
            if (!this.synced) continue;
            throw err;
          }
          this.deliver(msg);
        }
      } catch (err) {
        this.drop(
          err instanceof StrataError
            ? err
            : new StrataError(ErrorCode.PROTOCOL, `${this.where}: ${String(err)}`),
        );
      }
    });
    socket.on("error", (err) => {
      if (this.socket === socket) {
        this.drop(
          new StrataError(ErrorCode.EXTERNAL, `${this.where}: socket error: ${err.message}`, { cause: err }),
        );
      }
    });
    socket.on("close", () => {
      if (this.socket === socket)
        this.drop(new StrataError(ErrorCode.EXTERNAL, `${this.where}: connection closed`));
    });
  }

  private deliver(msg: Record<string, unknown>): void {
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.resolve(msg);
    } else {
      this.lines.push(msg);
    }
  }

  /** Sends one command and waits for the next message; a timeout leaves the stream unsynced. */
  private async request(command: string, args: Record<string, unknown> | undefined, timeoutMs: number) {
    this.lines = [];
    this.send(args === undefined ? { execute: command } : { execute: command, arguments: args });
    return this.next(timeoutMs, command);
  }

  private next(timeoutMs: number, command: string): Promise<Record<string, unknown>> {
    if (!this.socket) {
      return Promise.reject(
        new StrataError(ErrorCode.EXTERNAL, `${this.where}: ${command}: connection lost`),
      );
    }
    const queued = this.lines.shift();
    if (queued) return Promise.resolve(queued);
    return new Promise<Record<string, unknown>>((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiter = undefined;
        this.synced = false; // a late reply may still come: sync before the next command
        reject(
          new StrataError(ErrorCode.TIMEOUT, `${this.where}: ${command} got no reply within ${timeoutMs} ms`),
        );
      }, timeoutMs);
      this.waiter = {
        resolve: (m) => {
          clearTimeout(timer);
          resolve(m);
        },
        reject: (e) => {
          clearTimeout(timer);
          reject(e);
        },
      };
    });
  }

  private send(msg: Record<string, unknown>): void {
    this.socket!.write(`${JSON.stringify(msg)}\n`);
  }

  /**
   * Forgets the connection (the next call reconnects and syncs); a waiting call rejects with
   * `error`. The socket is destroyed unless the caller closes it gracefully (ABORTED).
   */
  private drop(error: StrataError): void {
    const s = this.socket;
    this.socket = undefined;
    this.synced = false;
    this.lines = [];
    if (this.waiter) {
      const w = this.waiter;
      this.waiter = undefined;
      w.reject(error);
    }
    if (s && !s.destroyed && error.code !== ErrorCode.ABORTED) s.destroy();
  }
}
