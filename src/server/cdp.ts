/**
 * Continuous data protection under the daemon: for every VM of a policy with `cdp`, one
 * `strata protect` child process (the same binary, like instant recovery's serve) journaling
 * into journal-dir/VM/START. A child that exits is started again after a backoff (1 s doubling
 * to 5 min, reset once a child ran 10 minutes) on the same journal, which protect resumes from
 * the dirty bitmaps the dead one left (re-reading only what they mark); when protect says that
 * journal cannot be resumed, the next start takes a new directory. The daemon's stop, or a
 * reload that drops the VM from every cdp policy, stops it with SIGTERM (protect cancels its
 * mirrors, removes its nodes and bitmap and exits) and, if it did not stop in time and was
 * killed, `strata protect stop` removes what it left on the VM.
 * Before a VM's first protect, `strata protect stop` ends one a killed daemon left running.
 */
import { mkdirSync } from "node:fs";
import { join } from "node:path";
import { describeError } from "../util/errors.js";
import { Daemon as Child, runProgram } from "../util/process.js";
import { type CdpPolicy, type RepositoryConfig, repoArgs } from "./config.js";
import type { DaemonLog } from "./service.js";

/** One VM the daemon protects continuously. */
export interface CdpWant {
  vm: string;
  /** The VM's live source: qmp:SOCKET[,qga=SOCKET] or vm:NAME. */
  source: string;
  policy: string;
  cdp: CdpPolicy;
  repository: RepositoryConfig;
}

export type CdpState = "starting" | "running" | "restarting" | "stopping" | "stopped";

/** What the daemon knows of one VM's protect, in memory. */
export interface CdpStatus {
  vm: string;
  policy: string;
  repository: string;
  state: CdpState;
  pid?: number;
  /** The journal of the protect running now (or last). */
  journal?: string;
  starts: number;
  lastExit?: string;
  /** When the next start is due (state restarting). */
  restartAt?: number;
}

export interface CdpOptions {
  /** The strata binary: [node, script]. */
  strataCommand: readonly string[];
  stateDir: string;
  inventory?: string;
  log: DaemonLog;
  /** Grace between SIGTERM and SIGKILL (default 2 min). */
  stopGraceMs?: number;
  /** First restart delay (default 1 s); doubles up to maxBackoffMs. */
  backoffMs?: number;
  maxBackoffMs?: number;
}

/** What protect says when a journal it was given cannot be continued: a new one is needed. */
const NOT_RESUMABLE = /cannot be resumed|holds no journal/;

interface Slot {
  want: CdpWant;
  status: CdpStatus;
  /** The journal the next start resumes (that of a child that died). */
  resume?: string;
  child?: Child | undefined;
  timer?: NodeJS.Timeout | undefined;
  backoffMs: number;
  startedAt: number;
  stopped: boolean;
}

const sameWant = (a: CdpWant, b: CdpWant) =>
  a.source === b.source &&
  a.repository.path === b.repository.path &&
  a.repository.passwordFile === b.repository.passwordFile &&
  JSON.stringify(a.cdp) === JSON.stringify(b.cdp);

export class CdpSupervisor {
  private readonly slots = new Map<string, Slot>();
  private closed = false;

  constructor(private readonly o: CdpOptions) {}

  /** The protects going on, by VM. */
  statuses(): CdpStatus[] {
    return [...this.slots.values()].map((s) => ({ ...s.status }));
  }

  status(vm: string): CdpStatus | undefined {
    const s = this.slots.get(vm);
    return s && { ...s.status };
  }

  /** Starts protects for new VMs, stops those not wanted any more, restarts changed ones. */
  async sync(wants: readonly CdpWant[]): Promise<void> {
    if (this.closed) return;
    const next = new Map(wants.map((w) => [w.vm, w]));
    const stops: Promise<void>[] = [];
    for (const [vm, slot] of this.slots) {
      const w = next.get(vm);
      if (w && sameWant(w, slot.want)) continue;
      this.o.log(
        "info",
        `cdp ${vm}: ${w ? "its policy changed" : "no cdp policy covers it any more"}: stopping`,
      );
      stops.push(this.halt(slot));
      this.slots.delete(vm);
    }
    await Promise.all(stops);
    for (const [vm, want] of next) {
      if (this.slots.has(vm)) continue;
      const slot: Slot = {
        want,
        status: { vm, policy: want.policy, repository: want.repository.name, state: "starting", starts: 0 },
        backoffMs: this.o.backoffMs ?? 1000,
        startedAt: 0,
        stopped: false,
      };
      this.slots.set(vm, slot);
      this.launch(slot);
    }
  }

  /** Stops every protect and waits for them. */
  async stop(): Promise<void> {
    this.closed = true;
    await Promise.all([...this.slots.values()].map((s) => this.halt(s)));
  }

  private args(slot: Slot, journal: string): string[] {
    const { want } = slot;
    return [
      ...this.o.strataCommand.slice(1),
      "protect",
      want.source,
      "--vm",
      want.vm,
      "--journal",
      journal,
      ...repoArgs(want.repository),
      "--state-dir",
      this.o.stateDir,
      ...(this.o.inventory === undefined ? [] : ["--inventory", this.o.inventory]),
      ...(want.cdp.foldMs === undefined ? [] : ["--fold", `${want.cdp.foldMs}ms`]),
      ...(want.cdp.windowMs === undefined ? [] : ["--window", `${want.cdp.windowMs}ms`]),
    ];
  }

  private launch(slot: Slot): void {
    slot.timer = undefined;
    if (slot.stopped || this.closed) return;
    const { vm } = slot.want;
    const journal =
      slot.resume ?? join(slot.want.cdp.journalDir, vm, new Date().toISOString().replace(/[:.]/g, "-"));
    const resuming = slot.resume !== undefined;
    delete slot.resume;
    /** Set when protect said this journal cannot be continued. */
    let spent = false;
    slot.status.state = "starting";
    slot.status.journal = journal;
    slot.status.starts++;
    delete slot.status.restartAt;
    slot.startedAt = Date.now();
    (async () => {
      mkdirSync(join(slot.want.cdp.journalDir, vm), { recursive: true, mode: 0o700 });
      // A protect a killed daemon left running (or its leftovers on the VM) would refuse the new one.
      if (slot.status.starts === 1) await this.protectStop(vm);
      if (slot.stopped || this.closed) return;
      const [cmd] = this.o.strataCommand;
      const child = await Child.start(
        `strata protect of ${vm}`,
        cmd!,
        this.args(slot, journal),
        async () => true,
      );
      slot.child = child;
      slot.status.state = "running";
      slot.status.pid = child.pid!;
      this.o.log(
        "info",
        `cdp ${vm}: strata protect started (pid ${child.pid}) ${resuming ? "resuming the journal" : "journaling into"} ${journal}`,
      );
      await child.exited;
      const code = child.child.exitCode;
      spent = NOT_RESUMABLE.test(child.stderr);
      const why = `exited (${code === null ? `signal ${child.child.signalCode}` : `code ${code}`})${child.stderr ? `: ${child.stderr.split("\n").slice(-2).join(" ")}` : ""}`;
      slot.child = undefined;
      delete slot.status.pid;
      if (slot.stopped || this.closed) return;
      throw new Error(why);
    })().catch((err: unknown) => {
      if (slot.stopped || this.closed) return;
      const why = describeError(err);
      // Started again on this journal, unless protect said it cannot go on with it.
      if (!spent && !NOT_RESUMABLE.test(why)) slot.resume = journal;
      slot.status.lastExit = why;
      if (Date.now() - slot.startedAt >= 600_000) slot.backoffMs = this.o.backoffMs ?? 1000;
      const wait = slot.backoffMs;
      slot.backoffMs = Math.min(slot.backoffMs * 2, this.o.maxBackoffMs ?? 300_000);
      slot.status.state = "restarting";
      slot.status.restartAt = Date.now() + wait;
      this.o.log("warn", `cdp ${vm}: strata protect ${why}; starting again in ${Math.round(wait / 1000)} s`);
      slot.timer = setTimeout(() => this.launch(slot), wait);
    });
  }

  /** `strata protect stop VM`: stops a protect of the VM still running and removes what a dead one left. */
  private async protectStop(vm: string): Promise<void> {
    const [cmd, ...pre] = this.o.strataCommand;
    await runProgram(cmd!, [...pre, "protect", "stop", vm, "--state-dir", this.o.stateDir], {
      timeoutMs: 180_000,
    }).then(
      (out) => {
        if (!/not protected/.test(out)) this.o.log("info", `cdp ${vm}: ${out.trim().replace(/\n/g, "; ")}`);
      },
      (err: unknown) => this.o.log("error", `cdp ${vm}: protect stop: ${describeError(err)}`),
    );
  }

  /** SIGTERM (protect's clean stop), SIGKILL after the grace, then what a killed one left is removed. */
  private async halt(slot: Slot): Promise<void> {
    slot.stopped = true;
    clearTimeout(slot.timer);
    const { vm } = slot.want;
    const child = slot.child;
    if (!child?.running) {
      slot.status.state = "stopped";
      return;
    }
    slot.status.state = "stopping";
    const grace = this.o.stopGraceMs ?? 120_000;
    await child.stop(grace);
    const signal = child.child.signalCode;
    this.o.log(
      signal === "SIGKILL" ? "warn" : "info",
      `cdp ${vm}: strata protect (pid ${child.pid}) stopped${signal === "SIGKILL" ? ` only by SIGKILL after ${Math.round(grace / 1000)} s` : ""}`,
    );
    if (signal === "SIGKILL") await this.protectStop(vm);
    delete slot.status.pid;
    slot.status.state = "stopped";
  }
}
