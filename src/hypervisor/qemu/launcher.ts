/**
 * Starts QEMU VMs the way Strata expects to find them: every disk as `-blockdev` with explicit
 * node-names on the protocol and the format layer, every device with an `id`, QMP and guest-agent
 * sockets in a run directory, the serial console in a file, no default devices. Used for
 * instant recovery, verify-by-boot and by the tests (which boot the busybox test guest).
 *
 * The run directory holds:
 *   qmp.sock, qga.sock   QMP monitor and guest-agent channel (QEMU is the server)
 *   console.log          the guest's serial console
 *   qemu.log             QEMU's own stdout/stderr
 *   cmdline.json         the exact argv used (the VM configuration capture reads it)
 *
 * Accelerator: KVM only where the CPU advertises vmx/svm and /dev/kvm opens read-write; TCG
 * otherwise (see {@link chooseAccelerator}). The choice and its reason are on the handle.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { createWriteStream } from "node:fs";
import { mkdir, readFile, writeFile } from "node:fs/promises";
import { join } from "node:path";
import { type Accelerator, type AcceleratorChoice, chooseAccelerator } from "../../util/accel.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { QgaClient, type QgaOptions } from "./qga.js";
import { QmpClient } from "./qmp.js";

export interface DiskSpec {
  /** Image file path. */
  file: string;
  /** Format driver: "qcow2", "raw", ... */
  format: string;
  /** Node-name of the format layer (the node Strata addresses), e.g. "disk0". */
  nodeName: string;
  /** Node-name of the protocol (file) layer; default `${nodeName}-file`. */
  fileNodeName?: string;
  /** qdev id of the virtio-blk device, e.g. "vblk0". */
  id: string;
  readOnly?: boolean;
  /** Disk serial visible to the guest (/dev/disk/by-id). */
  serial?: string;
  /** Firmware boot order. */
  bootIndex?: number;
}

export { type Accelerator, type AcceleratorChoice, chooseAccelerator } from "../../util/accel.js";

export interface LaunchOptions {
  /** Directory for sockets, logs and the recorded command line (created if missing). */
  runDir: string;
  disks: DiskSpec[];
  name?: string;
  memoryMiB?: number;
  cpus?: number;
  /** Direct kernel boot (the test guest); without it the VM boots from firmware (SeaBIOS). */
  kernel?: { kernel: string; initrd?: string; append?: string };
  machine?: string;
  /** "auto" (default) runs {@link chooseAccelerator}. */
  accel?: Accelerator | "auto";
  /** Attach the guest-agent channel (default true). */
  guestAgent?: boolean;
  /** Exit instead of rebooting (default false). */
  noReboot?: boolean;
  qemuBinary?: string;
  /** Appended to the generated arguments. */
  extraArgs?: string[];
}

/** QEMU's option syntax doubles commas inside values. */
function q(value: string): string {
  return value.replaceAll(",", ",,");
}

/** Socket paths are limited to 107 bytes by sockaddr_un. */
const MAX_SOCKET_PATH = 107;

/** The full QEMU argv (without the binary) for `options` and an accelerator. Pure. */
export function buildCommandLine(options: LaunchOptions, accel: Accelerator): string[] {
  const run = options.runDir;
  const args: string[] = [
    "-name",
    q(options.name ?? "strata-vm"),
    "-machine",
    `${options.machine ?? "q35"},accel=${accel}`,
    ...(accel === "kvm" ? ["-cpu", "host"] : []),
    "-m",
    String(options.memoryMiB ?? 256),
    "-smp",
    String(options.cpus ?? 1),
    "-nodefaults",
    "-no-user-config",
    "-display",
    "none",
    "-chardev",
    `file,id=serial0,path=${q(join(run, "console.log"))}`,
    "-serial",
    "chardev:serial0",
    "-chardev",
    `socket,id=qmp0,path=${q(join(run, "qmp.sock"))},server=on,wait=off`,
    "-mon",
    "chardev=qmp0,mode=control",
  ];
  if (options.noReboot) args.push("-no-reboot");
  if (options.kernel) {
    args.push("-kernel", options.kernel.kernel);
    if (options.kernel.initrd) args.push("-initrd", options.kernel.initrd);
    if (options.kernel.append) args.push("-append", options.kernel.append);
  }
  for (const d of options.disks) {
    const fileNode = d.fileNodeName ?? `${d.nodeName}-file`;
    const ro = d.readOnly ? ",read-only=on" : "";
    args.push("-blockdev", `driver=file,filename=${q(d.file)},node-name=${fileNode}${ro}`);
    args.push("-blockdev", `driver=${d.format},file=${fileNode},node-name=${d.nodeName}${ro}`);
    let dev = `virtio-blk-pci,drive=${d.nodeName},id=${d.id}`;
    if (d.serial) dev += `,serial=${q(d.serial)}`;
    if (d.bootIndex !== undefined) dev += `,bootindex=${d.bootIndex}`;
    args.push("-device", dev);
  }
  if (options.guestAgent ?? true) {
    args.push(
      "-chardev",
      `socket,id=qga0,path=${q(join(run, "qga.sock"))},server=on,wait=off`,
      "-device",
      "virtio-serial-pci,id=vser0",
      "-device",
      "virtserialport,bus=vser0.0,chardev=qga0,name=org.qemu.guest_agent.0",
    );
  }
  args.push(...(options.extraArgs ?? []));
  return args;
}

export interface ExitStatus {
  code: number | null;
  signal: NodeJS.Signals | null;
}

export interface StopResult extends ExitStatus {
  /** How it ended: it had already exited, QMP quit / powerdown worked, or it had to be killed. */
  how: "exited" | "quit" | "powerdown" | "killed";
}

export interface StopOptions {
  /**
   * "quit" (default): QMP quit. "powerdown": ACPI power button first, then quit. "kill": SIGKILL
   * at once (a host crash as the guest's disks see it; for tests of crash consistency).
   */
  mode?: "quit" | "powerdown" | "kill";
  /** How long each graceful step may take before the next (default 10 s). */
  timeoutMs?: number;
}

/** A running VM started by {@link launchQemu}. */
export class QemuVm {
  readonly pid: number;
  readonly qmpSocket: string;
  readonly qgaSocket: string | undefined;
  readonly consoleLog: string;
  readonly qemuLog: string;
  /** The exact command line: binary then arguments. */
  readonly argv: readonly string[];
  readonly exited: Promise<ExitStatus>;
  private exitStatus: ExitStatus | undefined;
  private qmpClient: Promise<QmpClient> | undefined;
  private qgaClient: QgaClient | undefined;
  /** Aborted when QEMU exits, so that nobody keeps trying to connect to a dead VM. */
  private readonly exitSignal = new AbortController();

  constructor(
    private readonly child: ChildProcess,
    readonly runDir: string,
    argv: string[],
    readonly accelerator: AcceleratorChoice,
    guestAgent: boolean,
  ) {
    this.pid = child.pid!;
    this.argv = argv;
    this.qmpSocket = join(runDir, "qmp.sock");
    this.qgaSocket = guestAgent ? join(runDir, "qga.sock") : undefined;
    this.consoleLog = join(runDir, "console.log");
    this.qemuLog = join(runDir, "qemu.log");
    this.exited = new Promise<ExitStatus>((resolve) => {
      child.once("exit", (code, signal) => {
        this.exitStatus = { code, signal };
        this.exitSignal.abort(new Error("QEMU exited"));
        resolve(this.exitStatus);
      });
    });
  }

  get running(): boolean {
    return this.exitStatus === undefined;
  }

  /** The console so far. */
  async console(): Promise<string> {
    try {
      return await readFile(this.consoleLog, "utf8");
    } catch {
      return "";
    }
  }

  /**
   * Resolves with the first match of `pattern` in the console output. Rejects with TIMEOUT, or
   * EXTERNAL when QEMU exits first (with the end of the console and of QEMU's log).
   */
  async waitForConsole(pattern: RegExp, timeoutMs: number): Promise<RegExpMatchArray> {
    const deadline = Date.now() + timeoutMs;
    for (;;) {
      const m = pattern.exec(await this.console());
      if (m) return m;
      if (!this.running) {
        throw new StrataError(
          ErrorCode.EXTERNAL,
          `QEMU (pid ${this.pid}) exited (${describeExit(this.exitStatus!)}) before the console showed ${pattern}\n` +
            (await this.diagnostics()),
        );
      }
      if (Date.now() >= deadline) {
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `console did not show ${pattern} within ${timeoutMs} ms\n${await this.diagnostics()}`,
        );
      }
      await within(this.exited, 50);
    }
  }

  /** The QMP connection (connected on first use, then shared). */
  qmp(): Promise<QmpClient> {
    if (!this.qmpClient) {
      const p = QmpClient.connect(this.qmpSocket, {
        connectTimeoutMs: 10_000,
        signal: this.exitSignal.signal,
      });
      this.qmpClient = p;
      p.catch(() => {
        if (this.qmpClient === p) this.qmpClient = undefined;
      });
    }
    return this.qmpClient;
  }

  /** The guest-agent client (connects and syncs on first call). */
  qga(options?: QgaOptions): QgaClient {
    if (!this.qgaSocket)
      throw new StrataError(ErrorCode.USAGE, "this VM was started without a guest agent channel");
    this.qgaClient ??= new QgaClient(this.qgaSocket, options);
    return this.qgaClient;
  }

  /**
   * Stops the VM: optionally the ACPI power button (guest shuts down cleanly), then QMP `quit`,
   * then SIGKILL, each step given `timeoutMs`. Always waits for the process to be gone.
   */
  async stop(options: StopOptions = {}): Promise<StopResult> {
    const timeoutMs = options.timeoutMs ?? 10_000;
    let how: StopResult["how"] | undefined;
    if (!this.running) how = "exited";
    if (!how && options.mode === "kill") {
      this.child.kill("SIGKILL");
      how = "killed";
    }
    if (!how && options.mode === "powerdown") {
      try {
        const qmp = await this.qmp();
        await qmp.execute("system_powerdown", undefined, { timeoutMs });
        if (await this.waitExit(timeoutMs)) how = "powerdown";
      } catch {
        // fall through to quit
      }
    }
    if (!how && this.running) {
      try {
        const qmp = await within(this.qmp(), timeoutMs);
        if (!qmp) throw new StrataError(ErrorCode.TIMEOUT, `no QMP connection within ${timeoutMs} ms`);
        await qmp.execute("quit", undefined, { timeoutMs }).catch(() => {
          // QEMU may close the socket before the reply arrives: the exit below is what counts.
        });
        if (await this.waitExit(timeoutMs)) how = "quit";
      } catch {
        // fall through to kill
      }
    }
    if (!how && this.running) {
      this.child.kill("SIGKILL");
      how = "killed";
    }
    const status = await this.exited;
    await this.closeClients();
    return { ...status, how: how ?? "exited" };
  }

  /**
   * Closes the shared QMP connection, if any: QEMU serves one client per QMP socket, so a VM that
   * others (a backup) must reach is left without one. qmp() connects again when called.
   */
  async releaseQmp(): Promise<void> {
    const qmp = this.qmpClient;
    this.qmpClient = undefined;
    if (qmp) await qmp.then((c) => c.close()).catch(() => {});
  }

  private async closeClients(): Promise<void> {
    const qmp = this.qmpClient;
    this.qmpClient = undefined;
    if (qmp) await qmp.then((c) => c.close()).catch(() => {});
    await this.qgaClient?.close().catch(() => {});
  }

  private async waitExit(timeoutMs: number): Promise<boolean> {
    if (!this.running) return true;
    return (await within(this.exited, timeoutMs)) !== undefined;
  }

  private async diagnostics(): Promise<string> {
    const tail = (s: string) => s.split("\n").slice(-15).join("\n");
    let qemuLog = "";
    try {
      qemuLog = await readFile(this.qemuLog, "utf8");
    } catch {
      // none yet
    }
    return `--- console (tail) ---\n${tail(await this.console())}\n--- qemu.log (tail) ---\n${tail(qemuLog)}`;
  }
}

function describeExit(s: ExitStatus): string {
  return s.signal ? `signal ${s.signal}` : `code ${s.code}`;
}

/** Resolves with p's value, or undefined once `ms` pass first; the timer never outlives the race. */
async function within<T>(p: Promise<T>, ms: number): Promise<T | undefined> {
  let timer: NodeJS.Timeout | undefined;
  try {
    return await Promise.race([
      p,
      new Promise<undefined>((resolve) => {
        timer = setTimeout(() => resolve(undefined), ms);
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

/**
 * Starts QEMU and returns once the QMP socket accepts connections (QEMU parsed its command line
 * and opened its disks). The QMP connection is closed again, so that other clients can connect. Rejects with EXTERNAL, with QEMU's own message, if QEMU exits first.
 */
export async function launchQemu(options: LaunchOptions): Promise<QemuVm> {
  const accelerator: AcceleratorChoice =
    options.accel === undefined || options.accel === "auto"
      ? await chooseAccelerator()
      : { accel: options.accel, reason: "requested" };
  await mkdir(options.runDir, { recursive: true });
  for (const sock of ["qmp.sock", "qga.sock"]) {
    const p = join(options.runDir, sock);
    if (Buffer.byteLength(p) > MAX_SOCKET_PATH) {
      throw new StrataError(
        ErrorCode.USAGE,
        `socket path too long for a unix socket (${MAX_SOCKET_PATH} bytes): ${p}`,
      );
    }
  }
  const binary = options.qemuBinary ?? "qemu-system-x86_64";
  const args = buildCommandLine(options, accelerator.accel);
  const argv = [binary, ...args];
  await writeFile(join(options.runDir, "cmdline.json"), `${JSON.stringify(argv, null, 2)}\n`);
  await writeFile(join(options.runDir, "console.log"), "");

  const log = createWriteStream(join(options.runDir, "qemu.log"));
  await new Promise<void>((resolve, reject) => {
    log.once("open", () => resolve());
    log.once("error", reject);
  });
  const child = spawn(binary, args, { stdio: ["ignore", log, log] });
  const spawned = await new Promise<Error | undefined>((resolve) => {
    child.once("spawn", () => resolve(undefined));
    child.once("error", (err) => resolve(err));
  });
  log.close();
  if (spawned) {
    throw new StrataError(ErrorCode.EXTERNAL, `cannot start ${binary}: ${describeError(spawned)}`, {
      cause: spawned,
    });
  }
  const vm = new QemuVm(child, options.runDir, argv, accelerator, options.guestAgent ?? true);
  // Resolves (never rejects) with an error if QEMU exits before QMP answers.
  const exitedEarly = vm.exited.then(async (s) => {
    const msg = await readFile(vm.qemuLog, "utf8").catch(() => "");
    return new StrataError(ErrorCode.EXTERNAL, `QEMU exited at start (${describeExit(s)}): ${msg.trim()}`);
  });
  try {
    // QEMU opens the QMP socket before the disks: a connection may come up and then break
    // because QEMU is exiting. Its exit status and message explain more than the socket error.
    const connected = vm.qmp().then(
      () => undefined,
      async (err: unknown) => (await within(exitedEarly, 2000)) ?? err,
    );
    const early = await Promise.race([connected, exitedEarly]);
    if (early) throw early;
    await vm.releaseQmp();
  } catch (err) {
    await vm.stop({ timeoutMs: 2000 }).catch(() => {});
    throw err;
  }
  return vm;
}
