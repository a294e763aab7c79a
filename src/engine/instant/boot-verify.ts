/**
 * Boot verification ("SureBackup"): does the restore point boot?
 *
 * The restore point boots as an instant-recovery clone (start.ts: new name, UUID and MACs, its
 * own run files) with no network (every NIC on a private hub, or none), so that it can run
 * beside the original without either seeing the other. The test is the guest agent: the VM
 * passes when the agent answers a ping before the timeout and, when a check command is given,
 * the command run through the agent (guest-exec) exits 0. A guest that never gets as far as its
 * agent (a damaged disk, a kernel that panics) fails on the timeout, or as soon as its VM
 * stops. Whatever happens, everything started is stopped and removed again: the VM, the
 * serving process, the overlays, the run directory and the record.
 *
 * The time to answer is counted from the start of the boot (before the server and the VM are
 * started) to the agent's first answer.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import type { GuestAgent } from "../../hypervisor/adapter.js";
import type { AdapterRegistry } from "../../hypervisor/registry.js";
import type { SnapshotRef } from "../../repo/repository.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { need, type StoredVm } from "../vm-restore.js";
import { stopInstant } from "./control.js";
import { startInstant } from "./start.js";
import { runtimeOf } from "./state.js";

export interface BootVerifyOptions {
  repo: string;
  passwordFile?: string;
  /** `strata serve <vm/time> --repo ...` (argv, binary first), without `--socket`. */
  serveCommand: string[];
  stateDir: string;
  /** From the start of the boot to the agent's answer (and the command's end). */
  timeoutMs: number;
  /** A program and its arguments run in the guest through the agent; it must exit 0. */
  command?: readonly string[];
  signal?: AbortSignal;
  log?: (message: string) => void;
}

export interface BootVerifyResult {
  restorePoint: string;
  outcome: "passed" | "failed";
  /** When the verification started (ms since the epoch). */
  startedAt: number;
  /** Start of the boot to the agent's first answer; null when it never answered. */
  answerMs: number | null;
  /** Start of the verification to the end of the teardown. */
  durationMs: number;
  /** Why it failed, with its code. */
  error: string | null;
  errorCode: string | null;
  /** The check command's exit code and output (their last 4 KiB), when one ran. */
  command?: { exitcode: number | null; stdout: string; stderr: string };
}

const OUTPUT_TAIL = 4096;
const tail = (s: string) => (s.length > OUTPUT_TAIL ? s.slice(-OUTPUT_TAIL) : s);

/** Boots the restore point without a network, asks its agent, tears down (see the module comment). */
export async function verifyBoot(
  snap: SnapshotRef,
  stored: StoredVm,
  adapters: AdapterRegistry,
  o: BootVerifyOptions,
): Promise<BootVerifyResult> {
  const id = `${snap.vm}/${snap.time}`;
  const log = o.log ?? (() => {});
  const runtime = need(stored.adapter, "instant", "boot a restore point to verify it");
  if (!runtime.guestAgent)
    throw new StrataError(
      ErrorCode.USAGE,
      `boot verification asks the guest agent, which the ${stored.adapter.id} adapter cannot reach yet`,
    );
  const startedAt = Date.now();
  const deadline = startedAt + o.timeoutMs;
  const name = `verify-${snap.vm.slice(0, 40)}-${randomBytes(3).toString("hex")}`;
  const parent = join(o.stateDir, "verify");
  await fs.mkdir(parent, { recursive: true });
  const dir = await fs.mkdtemp(join(parent, `${snap.vm.slice(0, 40)}-`));
  let answerMs: number | null = null;
  let command: BootVerifyResult["command"];
  let failure: unknown;
  let started = false;
  let agent: GuestAgent | undefined;
  try {
    log(`booting ${id} without a network as ${name}`);
    const s = await startInstant(snap, stored, adapters, {
      dir,
      name,
      clone: true,
      repo: o.repo,
      ...(o.passwordFile === undefined ? {} : { passwordFile: o.passwordFile }),
      serveCommand: o.serveCommand,
      stateDir: o.stateDir,
      isolateNetwork: true,
      log,
    });
    started = true;
    const vm = s.record.vm!;
    log(`${name} runs (${vm.where}) after ${s.startMs} ms; waiting for its guest agent`);
    agent = runtimeOf(s.record, adapters).guestAgent?.(vm);
    if (!agent)
      throw new StrataError(
        ErrorCode.USAGE,
        `${id}: the VM has no guest agent channel (virtio-serial port org.qemu.guest_agent.0), so its boot cannot be verified`,
      );
    // Wait for the agent a few seconds at a time, so that a VM that stopped (a panic with
    // -no-reboot, a QEMU that failed) ends the wait at once.
    for (;;) {
      o.signal?.throwIfAborted();
      const left = deadline - Date.now();
      if (left <= 0)
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `${id}: the guest agent did not answer within ${Math.round(o.timeoutMs / 1000)} s of the boot (timeout)`,
        );
      try {
        await agent.waitUntilReady(Math.min(left, 5000));
        await agent.ping({ timeoutMs: Math.max(1000, Math.min(left, 10_000)) });
        break;
      } catch (err) {
        if (!(await runtime.running(vm)))
          throw new StrataError(
            ErrorCode.EXTERNAL,
            `${id}: the VM stopped before its guest agent answered (${describeError(err)})`,
          );
      }
    }
    answerMs = Date.now() - startedAt;
    log(`the guest agent answered ${answerMs} ms after the boot started`);
    if (o.command && o.command.length > 0) {
      const [path, ...args] = o.command as [string, ...string[]];
      const left = Math.max(1000, deadline - Date.now());
      const r = await agent.exec(path, args, { timeoutMs: left });
      command = { exitcode: r.exitcode ?? null, stdout: tail(r.stdout), stderr: tail(r.stderr) };
      if (r.exitcode !== 0) {
        const said = (r.stderr.trim() || r.stdout.trim()).split("\n").slice(-3).join(" | ");
        throw new StrataError(
          ErrorCode.EXTERNAL,
          `${id}: the check command ${o.command.join(" ")} ${r.exitcode === undefined ? `ended by signal ${r.signal}` : `exited ${r.exitcode}`}${said ? `: ${said.slice(0, 500)}` : ""}`,
        );
      }
      log(`the check command exited 0`);
    }
  } catch (err) {
    failure = err;
  } finally {
    await agent?.close().catch(() => {});
    if (started)
      await stopInstant(name, { discard: true, powerdownMs: 0, stateDir: o.stateDir }, adapters).catch(
        (err: unknown) => log(`stopping ${name}: ${describeError(err)}`),
      );
    await fs.rm(dir, { recursive: true, force: true });
  }
  if (failure !== undefined && o.signal?.aborted) throw failure;
  // A refusal before anything ran (no agent reachable at all) is the caller's problem, not the restore point's.
  if (failure instanceof StrataError && failure.code === ErrorCode.USAGE && !started) throw failure;
  return {
    restorePoint: id,
    outcome: failure === undefined ? "passed" : "failed",
    startedAt,
    answerMs,
    durationMs: Date.now() - startedAt,
    error: failure === undefined ? null : describeError(failure),
    errorCode:
      failure === undefined ? null : failure instanceof StrataError ? failure.code : ErrorCode.INTERNAL,
    ...(command === undefined ? {} : { command }),
  };
}
