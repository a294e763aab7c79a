/**
 * systemd readiness (Type=notify): READY=1 once the daemon listens, STATUS= lines, STOPPING=1
 * on stop, RELOADING=1 while the configuration is read again.
 *
 * Node has no unix datagram sockets, so the message goes through systemd's own `systemd-notify`
 * (the unit sets NotifyAccess=all, since the sender is a child). It is sent as coming from the
 * daemon's pid (`--pid`: systemd also learns the main PID), and systemd-notify waits by default
 * until PID 1 has processed it (a barrier), so the message can't be lost to the race of a
 * sender that exits before systemd looks it up. Without $NOTIFY_SOCKET (not under systemd, or
 * Type=exec) nothing is sent; a failure to send is logged, never fatal.
 */
import { execFile } from "node:child_process";
import type { LogLevel } from "../catalog/schema.js";

/** How long one message may take (systemd-notify's barrier waits for PID 1). */
const NOTIFY_TIMEOUT_MS = 10_000;

export type SdState = Partial<
  Record<"READY" | "STOPPING" | "RELOADING" | "STATUS" | "MONOTONIC_USEC", string>
>;

/** Sends `state` to systemd when $NOTIFY_SOCKET is set; resolves true when it was sent. */
export function sdNotify(
  state: SdState,
  log: (level: LogLevel, message: string) => void,
  env: NodeJS.ProcessEnv = process.env,
): Promise<boolean> {
  if (!env.NOTIFY_SOCKET) return Promise.resolve(false);
  const vars = Object.entries(state).map(([k, v]) => `${k}=${String(v).replace(/\n/g, " ")}`);
  return new Promise((resolve) => {
    execFile(
      "systemd-notify",
      [`--pid=${process.pid}`, ...vars],
      { env, timeout: NOTIFY_TIMEOUT_MS },
      (err, _stdout, stderr) => {
        if (err) {
          log(
            "warn",
            `cannot tell systemd ${vars.join(" ")} through systemd-notify: ${stderr.trim() || err.message}`,
          );
          resolve(false);
        } else resolve(true);
      },
    );
  });
}

/** MONOTONIC_USEC for RELOADING=1: CLOCK_MONOTONIC in microseconds. */
export function monotonicUsec(): string {
  return String(process.hrtime.bigint() / 1000n);
}
