/**
 * The one way Strata talks to libvirt: `virsh` as a subprocess. No maintained Node binding has
 * the backup and checkpoint API (LIBVIRT-NOTES.md), and virsh's own cost (0.2-0.3 s a call once
 * libvirtd has probed its capabilities) is small beside a backup.
 *
 * Every call has a deadline and fails with a {@link VirshError} that quotes what virsh printed on
 * stderr, classified: a domain or checkpoint that does not exist is NOT_FOUND, a libvirtd that
 * does not answer is EXTERNAL with a hint, a call past its deadline is TIMEOUT. Arguments are
 * passed as an argv array (no shell), and XML documents go through files the caller writes.
 */
import { execFile } from "node:child_process";
import { ErrorCode, StrataError } from "../../util/errors.js";

/** A failed virsh call; `stderr` is virsh's own words. */
export class VirshError extends StrataError {
  constructor(
    code: ErrorCode,
    message: string,
    readonly stderr: string,
    options?: { cause?: unknown },
  ) {
    super(code, message, options);
    this.name = "VirshError";
  }
}

/** The longest a call may print: domain XMLs and lists are far smaller. */
const MAX_OUTPUT = 16 * 1024 * 1024;

const NOT_FOUND_RE =
  /failed to get domain|Domain not found|no domain with matching|no domain checkpoint with matching|Checkpoint not found|checkpoint .* not found/i;

export class Virsh {
  /**
   * @param uri libvirt connection URI (`qemu:///system`).
   * @param timeoutMs default deadline of one call.
   */
  constructor(
    readonly uri: string,
    readonly timeoutMs = 60_000,
  ) {}

  /** Runs `virsh -c URI ARGS...` and returns its stdout. */
  run(args: readonly string[], options: { timeoutMs?: number } = {}): Promise<string> {
    const timeout = options.timeoutMs ?? this.timeoutMs;
    const argv = ["-c", this.uri, ...args];
    const shown = `virsh ${args.join(" ")}`;
    return new Promise((resolve, reject) => {
      execFile(
        "virsh",
        argv,
        { timeout, maxBuffer: MAX_OUTPUT, killSignal: "SIGKILL", env: { ...process.env, LC_ALL: "C" } },
        (err, stdout, stderr) => {
          if (!err) return resolve(stdout);
          const e = err as NodeJS.ErrnoException & { killed?: boolean };
          if (e.code === "ENOENT") {
            reject(
              new VirshError(
                ErrorCode.EXTERNAL,
                "virsh is not installed (Debian: apt-get install libvirt-clients)",
                "",
                { cause: err },
              ),
            );
            return;
          }
          const text = (stderr || stdout || e.message)
            .trim()
            .split("\n")
            .map((l) => l.replace(/^error:\s*/, "").trim())
            .filter((l) => l !== "")
            .slice(-4)
            .join("; ")
            .slice(0, 2000);
          if (e.killed) {
            reject(
              new VirshError(ErrorCode.TIMEOUT, `${shown} did not finish within ${timeout} ms`, text, {
                cause: err,
              }),
            );
            return;
          }
          let code: ErrorCode = ErrorCode.EXTERNAL;
          let hint = "";
          if (NOT_FOUND_RE.test(text)) code = ErrorCode.NOT_FOUND;
          else if (/failed to connect to the hypervisor|Failed to connect socket/i.test(text))
            hint = ` (is libvirtd running and ${this.uri} the right connection?)`;
          reject(new VirshError(code, `${shown} failed: ${text}${hint}`, text, { cause: err }));
        },
      );
    });
  }
}
