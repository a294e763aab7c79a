/**
 * Talking to a running daemon over its unix socket (plain HTTP; without a token the socket's
 * owner acts as the local administrator, see src/server/api.ts). Used by `strata jobs` and
 * `strata run`; every other command works on the repository directly, daemon or not.
 */
import { existsSync } from "node:fs";
import { request } from "node:http";
import { resolve } from "node:path";
import { checkConfigFile, DEFAULT_CONFIG, DEFAULT_SOCKET } from "../server/config.js";
import { ErrorCode, errnoCode, StrataError } from "../util/errors.js";

/** --socket, else $STRATA_SOCKET, else the configuration's api.socket, else the default. */
export function daemonSocket(opts: { socket?: string; config?: string }): string {
  if (opts.socket !== undefined) return resolve(opts.socket);
  if (process.env.STRATA_SOCKET) return resolve(process.env.STRATA_SOCKET);
  const file = resolve(opts.config ?? process.env.STRATA_CONFIG ?? DEFAULT_CONFIG);
  if (existsSync(file)) {
    try {
      const checked = checkConfigFile(file);
      if (checked.config) return checked.config.api.socket;
    } catch {
      // Unreadable: the default socket, and the error below names it.
    }
  }
  return DEFAULT_SOCKET;
}

function unreachable(socket: string, err: unknown): StrataError {
  const code = errnoCode(err);
  const why =
    code === "ENOENT"
      ? `the daemon is not running: there is no socket ${socket}`
      : code === "ECONNREFUSED"
        ? `the daemon is not running: nothing answers on ${socket}`
        : code === "EACCES" || code === "EPERM"
          ? `permission denied on the daemon's socket ${socket} (only the daemon's user may connect; run as that user)`
          : `cannot reach the daemon on ${socket}: ${(err as Error).message}`;
  return new StrataError(
    code === "EACCES" || code === "EPERM" ? ErrorCode.PERMISSION_DENIED : ErrorCode.NOT_FOUND,
    `${why} (start it with "strata daemon", or give --socket or STRATA_SOCKET)`,
    { cause: err },
  );
}

/** One API call; an error answer becomes a StrataError with the API's code and message. */
export function daemonCall<T>(
  socket: string,
  method: string,
  path: string,
): Promise<{ status: number; body: T }> {
  return new Promise((resolvePromise, reject) => {
    const req = request(
      { socketPath: socket, method, path, headers: { accept: "application/json" } },
      (res) => {
        let text = "";
        res.setEncoding("utf8");
        res.on("data", (d: string) => {
          text += d;
        });
        res.on("end", () => {
          let body: unknown;
          try {
            body = JSON.parse(text);
          } catch {
            reject(
              new StrataError(ErrorCode.PROTOCOL, `the daemon on ${socket} answered ${path} with no JSON`),
            );
            return;
          }
          const status = res.statusCode ?? 0;
          const e = (body as { error?: { code?: string; message?: string } }).error;
          if (status >= 400 && status !== 409 && e) {
            const code = Object.values(ErrorCode).includes(e.code as ErrorCode)
              ? (e.code as ErrorCode)
              : ErrorCode.EXTERNAL;
            reject(new StrataError(code, `daemon: ${e.message ?? `status ${status}`}`));
            return;
          }
          resolvePromise({ status, body: body as T });
        });
      },
    );
    req.on("error", (err) => reject(unreachable(socket, err)));
    req.end();
  });
}

/** Follows a run's server-sent events until its end event; returns that event's data. */
export function followRun(
  socket: string,
  runId: number,
  onEvent: (type: string, data: Record<string, unknown>) => void,
): Promise<Record<string, unknown>> {
  return new Promise((resolvePromise, reject) => {
    const req = request({ socketPath: socket, path: `/api/v1/runs/${runId}/events` }, (res) => {
      let buf = "";
      let end: Record<string, unknown> | undefined;
      res.setEncoding("utf8");
      res.on("data", (d: string) => {
        buf += d;
        for (let i = buf.indexOf("\n\n"); i >= 0; i = buf.indexOf("\n\n")) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const type = /^event: (\w+)$/m.exec(block)?.[1];
          const data = /^data: (.*)$/m.exec(block)?.[1];
          if (!type || data === undefined) continue;
          const parsed = JSON.parse(data) as Record<string, unknown>;
          if (type === "end") end = parsed;
          onEvent(type, parsed);
        }
      });
      res.on("end", () =>
        end
          ? resolvePromise(end)
          : reject(
              new StrataError(ErrorCode.PROTOCOL, `the daemon closed run ${runId}'s events before its end`),
            ),
      );
    });
    req.on("error", (err) => reject(unreachable(socket, err)));
    req.end();
  });
}
