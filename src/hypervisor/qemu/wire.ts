/**
 * What QMP and the guest agent share on the wire: newline-delimited JSON over a unix socket, and
 * `{"error": {"class", "desc"}}` replies. Both clients build on these pieces.
 */
import { connect, type Socket } from "node:net";
import { setTimeout as sleep } from "node:timers/promises";
import { describeError, ErrorCode, errnoCode, StrataError } from "../../util/errors.js";

/** A command QEMU or the agent refused: the QMP error class and description are kept. */
export class QemuCommandError extends StrataError {
  /** QMP error class, e.g. "GenericError", "DeviceNotFound", "CommandNotFound". */
  readonly errorClass: string;
  /** QEMU's own description of the failure. */
  readonly desc: string;
  readonly command: string;

  constructor(where: string, command: string, errorClass: string, desc: string) {
    super(ErrorCode.EXTERNAL, `${where}: ${command} failed: ${errorClass}: ${desc}`);
    this.name = "QemuCommandError";
    this.errorClass = errorClass;
    this.desc = desc;
    this.command = command;
  }
}

/** Longest line accepted from a peer; QMP replies (query-named-block-nodes on big VMs) stay far below. */
export const MAX_LINE_BYTES = 64 * 1024 * 1024;

/**
 * Splits a byte stream into lines (LF, optional CR before it). `strip0xff` drops the 0xFF bytes
 * the guest agent puts before a guest-sync-delimited reply. Throws PROTOCOL when a line grows past
 * MAX_LINE_BYTES.
 */
export class LineSplitter {
  private parts: Buffer[] = [];
  private size = 0;

  constructor(private readonly strip0xff = false) {}

  push(chunk: Buffer): string[] {
    const lines: string[] = [];
    let start = 0;
    for (;;) {
      const nl = chunk.indexOf(0x0a, start);
      if (nl < 0) break;
      this.parts.push(chunk.subarray(start, nl));
      lines.push(this.take());
      start = nl + 1;
    }
    if (start < chunk.length) {
      this.parts.push(chunk.subarray(start));
      this.size += chunk.length - start;
      if (this.size > MAX_LINE_BYTES) {
        throw new StrataError(ErrorCode.PROTOCOL, `line longer than ${MAX_LINE_BYTES} bytes`);
      }
    }
    return lines;
  }

  private take(): string {
    let buf = Buffer.concat(this.parts);
    this.parts = [];
    this.size = 0;
    if (this.strip0xff) {
      let i = 0;
      while (i < buf.length && buf[i] === 0xff) i++;
      buf = buf.subarray(i);
    }
    let line = buf.toString("utf8");
    if (line.endsWith("\r")) line = line.slice(0, -1);
    return line;
  }
}

/** Parses one line as a JSON object; anything else is a PROTOCOL error naming the peer. */
export function parseObjectLine(where: string, line: string): Record<string, unknown> {
  let value: unknown;
  try {
    value = JSON.parse(line);
  } catch (err) {
    throw new StrataError(ErrorCode.PROTOCOL, `${where}: malformed JSON line: ${preview(line)}`, {
      cause: err,
    });
  }
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    throw new StrataError(ErrorCode.PROTOCOL, `${where}: expected a JSON object, got ${preview(line)}`);
  }
  return value as Record<string, unknown>;
}

/** The `{"error": {...}}` member of a reply as a QemuCommandError, or a PROTOCOL error if malformed. */
export function commandError(where: string, command: string, error: unknown): StrataError {
  if (typeof error === "object" && error !== null) {
    const e = error as { class?: unknown; desc?: unknown };
    if (typeof e.class === "string" && typeof e.desc === "string") {
      return new QemuCommandError(where, command, e.class, e.desc);
    }
  }
  return new StrataError(ErrorCode.PROTOCOL, `${where}: ${command}: malformed error reply ${preview(error)}`);
}

export function preview(value: unknown): string {
  const text = typeof value === "string" ? value : JSON.stringify(value);
  return text.length > 200 ? `${text.slice(0, 200)}…` : text;
}

/**
 * Connects to a unix socket, retrying while it does not exist yet or refuses (QEMU still
 * starting) until `timeoutMs` has passed or `signal` aborts (QEMU exited: ABORTED).
 */
export async function connectUnix(
  path: string,
  timeoutMs: number,
  what: string,
  signal?: AbortSignal,
): Promise<Socket> {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    if (signal?.aborted) {
      throw new StrataError(ErrorCode.ABORTED, `${what}: gave up connecting to ${path}`, {
        cause: signal.reason,
      });
    }
    try {
      return await new Promise<Socket>((resolve, reject) => {
        const s = connect(path);
        s.once("connect", () => {
          s.removeListener("error", reject);
          resolve(s);
        });
        s.once("error", reject);
      });
    } catch (err) {
      const code = errnoCode(err);
      const retryable = code === "ENOENT" || code === "ECONNREFUSED" || code === "EAGAIN";
      if (!retryable) {
        throw new StrataError(
          ErrorCode.EXTERNAL,
          `${what}: cannot connect to ${path}: ${describeError(err)}`,
          {
            cause: err,
          },
        );
      }
      if (Date.now() >= deadline) {
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `${what}: ${path} not accepting connections after ${timeoutMs} ms (${code})`,
          { cause: err },
        );
      }
      await sleep(50, undefined, signal ? { signal } : {}).catch(() => {});
    }
  }
}
