/**
 * Offline mode's part on the VM: shut the guest down cleanly (agent, else ACPI), wait for QEMU to
 * let go of its images, and start the VM again afterwards with the very command line it ran
 * with. The restart is recorded in the state file before the shutdown, so that a run that dies
 * while the VM is down leaves `strata doctor --fix` what it needs to start it again.
 */
import { spawn } from "node:child_process";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { processAlive, socketAccepts } from "../../util/process.js";
import type { QgaClient } from "./qga.js";
import type { QmpClient } from "./qmp.js";

/** Asks the guest to power off and waits until the QEMU process `pid` has exited. */
export async function shutdownVm(
  qmp: QmpClient,
  qga: QgaClient | undefined,
  pid: number,
  timeoutMs: number,
  log: (m: string) => void,
): Promise<void> {
  let asked = false;
  if (qga) {
    try {
      await qga.shutdown("powerdown");
      asked = true;
      log("asked the guest agent to power the guest off");
    } catch (err) {
      log(
        `guest agent shutdown failed (${err instanceof Error ? err.message : String(err)}); pressing the ACPI power button`,
      );
    }
  }
  if (!asked) await qmp.execute("system_powerdown");
  const deadline = Date.now() + timeoutMs;
  let quitSent = false;
  while (processAlive(pid)) {
    if (Date.now() > deadline) {
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `the guest did not shut down within ${Math.round(timeoutMs / 1000)} s; it is still running`,
      );
    }
    // QEMU started with -no-shutdown stays up with the guest off: tell it to quit.
    if (!quitSent && !qmp.closed) {
      const status = await qmp.execute<{ status: string }>("query-status").catch(() => undefined);
      if (status?.status === "shutdown") {
        quitSent = true;
        await qmp.execute("quit").catch(() => {});
      }
    }
    await new Promise((r) => setTimeout(r, 100));
  }
}

/**
 * Starts QEMU again with `argv` (detached: it outlives Strata) and waits for its QMP socket.
 * Does nothing when the VM still answers there (it was never shut down).
 */
export async function restartVm(
  argv: readonly string[],
  qmpSocket: string,
  timeoutMs = 30_000,
): Promise<number> {
  if (await socketAccepts(qmpSocket)) return 0;
  const child = spawn(argv[0]!, argv.slice(1), { detached: true, stdio: "ignore" });
  const pid = child.pid;
  const failed = new Promise<Error>((resolve) => child.once("error", resolve));
  child.unref();
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const err = await Promise.race([
      failed,
      new Promise<undefined>((r) => setTimeout(() => r(undefined), 50)),
    ]);
    if (err) throw new StrataError(ErrorCode.EXTERNAL, `cannot start the VM again: ${err.message}`);
    if (await socketAccepts(qmpSocket)) return pid ?? 0;
    if (pid !== undefined && !processAlive(pid) && !argv.includes("-daemonize")) {
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the VM exited right after being started again (${argv.join(" ")})`,
      );
    }
    if (Date.now() > deadline)
      throw new StrataError(ErrorCode.TIMEOUT, `the VM did not come back within ${timeoutMs / 1000} s`);
  }
}
