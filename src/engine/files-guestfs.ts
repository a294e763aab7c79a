/**
 * Filesystems Strata does not read in-process (XFS, Btrfs, NTFS), read through libguestfs: the
 * guest's kernel code runs inside libguestfs's appliance VM, never in Strata's process, against
 * the restore point served read-only over NBD ({@link serveRestorePoint}).
 *
 * One appliance is started per browser (`guestfish --listen`, ~15-20 s under TCG) and driven
 * with `guestfish --remote` commands (~0.25 s each): `lstatns`/`lstatnslist` for entries, `ls`
 * for directories, `readlink`, and `download` into a private temporary file for contents, which
 * is then streamed and deleted. The filesystem is mounted with `mount-ro`; libguestfs keeps a
 * writable overlay under the read-only drive, so a dirty journal or log is replayed into the
 * overlay, never into the restore point (XFS falls back to `norecovery` if that fails).
 *
 * Leaving nothing behind. `guestfish --listen` forks a daemon that would outlive a killed
 * Strata, with its QEMU, its overlays and sockets. So it is started by a small guard (`sh`, in a
 * session of its own, so a Ctrl-C to the terminal reaches Strata first) that holds a pipe from
 * Strata and waits for it to close: when Strata closes the browser, or dies in any way (even
 * SIGKILL), the pipe closes and the guard tells the daemon to exit, kills it if it does not
 * (libguestfs's recovery process then kills QEMU), and removes the private temporary directory
 * that holds the NBD socket, the downloads and libguestfs's overlays (TMPDIR points there).
 */
import { type ChildProcess, execFile, spawn } from "node:child_process";
import { createReadStream, existsSync, promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { createInterface } from "node:readline";
import { chooseAccelerator } from "../hypervisor/qemu/launcher.js";
import type { FsType } from "../image/fs-detect.js";
import {
  type FileSystemReader,
  type FsEntry,
  joinPath,
  kindOf,
  normalPath,
  notFound,
  READ_PIECE,
} from "../image/fs-types.js";
import type { Repository, SnapshotRef } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { type RunningServe, serveRestorePoint } from "./serve.js";

/** Filesystem types read through libguestfs when it is installed. */
export const GUESTFS_TYPES: ReadonlySet<FsType> = new Set(["xfs", "btrfs", "ntfs"]);

/** True when guestfish is on the PATH. */
export function haveGuestfish(): boolean {
  return (process.env.PATH ?? "").split(":").some((d) => d !== "" && existsSync(join(d, "guestfish")));
}

/**
 * The guard: starts `guestfish --listen` with the arguments after $1 (the private directory),
 * prints its PID, waits for stdin to close, then makes sure the daemon is gone and cleans up.
 */
const GUARD = `
dir=$1; shift
# The daemon, not a zombie nobody reaped, nor a process that took its PID over.
alive() {
  st=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
  case $st in *"(guestfish) "[!Z]*) return 0 ;; esac
  return 1
}
gone_within() {
  i=0
  while alive && [ "$i" -lt "$1" ]; do sleep 0.2; i=$((i + 1)); done
  ! alive
}
guestfish --listen "$@" >"$dir/guestfish.log" 2>&1 </dev/null
pid=$(sed -n 's/^GUESTFISH_PID=\\([0-9][0-9]*\\).*/\\1/p' "$dir/guestfish.log")
if [ -z "$pid" ]; then
  echo "no daemon"
  cat "$dir/guestfish.log"
else
  echo "$pid"
  while read -r _; do :; done
  if alive; then
    timeout 30 guestfish --remote="$pid" -- exit >/dev/null 2>&1
    gone_within 50 || { kill -TERM "$pid" 2>/dev/null; gone_within 10 || kill -KILL "$pid" 2>/dev/null; }
  fi
  sock="/tmp/.guestfish-$(id -u)/socket-$pid"
  if [ -S "$sock" ]; then rm -f "$sock"; fi
fi
rm -rf "$dir"
`;

/** A filesystem read through a libguestfs appliance. */
export class GuestfishReader implements FileSystemReader {
  private closed = false;

  private constructor(
    readonly type: string,
    private readonly pid: string,
    private readonly guard: ChildProcess,
    private readonly env: NodeJS.ProcessEnv,
    private readonly serve: RunningServe,
    private readonly tmp: string,
  ) {}

  /**
   * Serves `disk` of the restore point over NBD, starts an appliance on it and mounts partition
   * `partition` (0: the whole disk) read-only.
   */
  static async open(
    repo: Repository,
    snap: SnapshotRef,
    disk: string,
    partition: number,
    type: FsType,
  ): Promise<GuestfishReader> {
    const tmp = await fs.mkdtemp(join(tmpdir(), "strata-guestfs-"));
    const socket = join(tmp, "nbd.sock");
    let serve: RunningServe | undefined;
    let guard: ChildProcess | undefined;
    // libguestfs's overlays go to the private directory (TMPDIR), its appliance cache stays
    // where it would be without that.
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      LIBGUESTFS_BACKEND: process.env.LIBGUESTFS_BACKEND ?? "direct",
      LIBGUESTFS_CACHEDIR: process.env.LIBGUESTFS_CACHEDIR ?? process.env.TMPDIR ?? "/var/tmp",
      TMPDIR: tmp,
    };
    try {
      // Where KVM cannot run stock guests (no vmx/svm, though /dev/kvm may exist) the appliance
      // must be told to use TCG, or QEMU aborts or hangs; the launcher's test decides, as for VMs.
      if (env.LIBGUESTFS_BACKEND_SETTINGS === undefined && (await chooseAccelerator()).accel === "tcg")
        env.LIBGUESTFS_BACKEND_SETTINGS = "force_tcg";
      serve = await serveRestorePoint(repo, snap, { disks: [disk], listen: { path: socket } });
      const started = await startGuarded(
        tmp,
        ["--ro", "--format=raw", "-a", `nbd:///${disk}?socket=${socket}`],
        env,
      );
      guard = started.guard;
      const reader = new GuestfishReader(type, started.pid, guard, env, serve, tmp);
      await reader.fish(["run"]).catch(async (err: unknown) => {
        const log = await fs.readFile(join(tmp, "guestfish.log"), "utf8").catch(() => "");
        throw new StrataError(ErrorCode.EXTERNAL, `${(err as Error).message}\n${log.slice(-2000)}`.trim());
      });
      const dev = partition === 0 ? "/dev/sda" : `/dev/sda${partition}`;
      // libguestfs puts a writable overlay under read-only drives, so a read-only mount can
      // replay an XFS log into it; should that fail, XFS is read without recovery.
      await reader.fish(["mount-ro", dev, "/"]).catch(async (err: unknown) => {
        if (type !== "xfs") throw err;
        await reader.fish(["mount-options", "ro,norecovery", dev, "/"]);
      });
      return reader;
    } catch (err) {
      await stopGuarded(guard);
      await serve?.close();
      await fs.rm(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  async stat(path: string): Promise<FsEntry> {
    const p = normalPath(path);
    const st = parseStats(await this.fishPath(p, ["lstatns", p]))[0];
    if (!st || st.st_ino === -1) throw notFound(p);
    return this.entry(p, st);
  }

  async list(path: string): Promise<FsEntry[]> {
    const p = normalPath(path);
    const names = (await this.fishPath(p, ["ls", p]))
      .split("\n")
      .filter((n) => n !== "" && n !== "." && n !== "..")
      .sort();
    if (names.length === 0) return [];
    // lstatnslist takes the names as one space-separated argument; names that need quoting
    // are looked up one by one.
    const stats = names.some((n) => /[\s"'\\]/.test(n))
      ? await Promise.all(
          names.map(async (n) => parseStats(await this.fishPath(p, ["lstatns", joinPath(p, n)]))[0]),
        )
      : parseStats(await this.fishPath(p, ["lstatnslist", p, names.join(" ")]));
    const out: FsEntry[] = [];
    for (const [i, name] of names.entries()) out.push(await this.entry(joinPath(p, name), stats[i] ?? {}));
    return out;
  }

  async *read(path: string, pieceSize = READ_PIECE): AsyncIterable<Buffer> {
    const p = normalPath(path);
    const local = join(this.tmp, "download");
    await this.fishPath(p, ["download", p, local]);
    try {
      for await (const piece of createReadStream(local, { highWaterMark: pieceSize })) yield piece as Buffer;
    } finally {
      await fs.rm(local, { force: true });
    }
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fish(["exit"]).catch(() => {});
    await stopGuarded(this.guard);
    await this.serve.close();
    await fs.rm(this.tmp, { recursive: true, force: true });
  }

  private async entry(path: string, st: Record<string, number>): Promise<FsEntry> {
    const mode = st.st_mode ?? 0;
    const kind = kindOf(mode);
    const e: FsEntry = {
      name: path === "/" ? "" : path.slice(path.lastIndexOf("/") + 1),
      path,
      kind,
      mode: mode & 0o7777,
      uid: st.st_uid ?? 0,
      gid: st.st_gid ?? 0,
      size: kind === "directory" ? 0 : (st.st_size ?? 0),
      mtime: (st.st_mtime_sec ?? 0) * 1000 + Math.floor((st.st_mtime_nsec ?? 0) / 1e6),
      atime: (st.st_atime_sec ?? 0) * 1000 + Math.floor((st.st_atime_nsec ?? 0) / 1e6),
    };
    if (kind === "symlink") e.target = (await this.fishPath(path, ["readlink", path])).replace(/\n$/, "");
    return e;
  }

  /**
   * One command in the appliance. The "-" prefix keeps the guestfish server alive when the
   * command fails (it exits otherwise); the failure is then only on stderr.
   */
  private async fish(args: string[]): Promise<string> {
    const [cmd, ...rest] = args;
    const { stdout, stderr } = await run(
      "guestfish",
      [`--remote=${this.pid}`, "--", `-${cmd}`, ...rest],
      this.env,
    );
    const error = /libguestfs: error: (.*)/.exec(stderr)?.[1];
    if (error) throw new StrataError(ErrorCode.EXTERNAL, `guestfish ${cmd}: ${error}`);
    return stdout;
  }

  /** A command about `path`, with "no such file" turned into NOT_FOUND. */
  private async fishPath(path: string, args: string[]): Promise<string> {
    try {
      return await this.fish(args);
    } catch (err) {
      const msg = (err as Error).message;
      if (/No such file or directory/i.test(msg)) throw notFound(path);
      if (/Not a directory/i.test(msg)) throw notFound(path, "not a directory");
      throw err;
    }
  }
}

/** Parses one or more `lstatns` records ("st_mode: 33188" lines; lists in "[n] = { … }"). */
function parseStats(text: string): Array<Record<string, number>> {
  const out: Array<Record<string, number>> = [];
  let cur: Record<string, number> | undefined;
  for (const line of text.split("\n")) {
    const m = /^\s*(st_\w+): (-?\d+)/.exec(line);
    if (!m) continue;
    if (!cur || (m[1] === "st_dev" && "st_dev" in cur)) {
      cur = {};
      out.push(cur);
    }
    cur[m[1]!] = Number(m[2]);
  }
  return out;
}

/**
 * Starts the guard, which starts `guestfish --listen` and prints the daemon's PID. The guard
 * runs in its own session and holds our pipe; see the module comment.
 */
async function startGuarded(
  dir: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ pid: string; guard: ChildProcess }> {
  const guard = spawn("sh", ["-c", GUARD, "strata-guestfish-guard", dir, ...args], {
    env,
    detached: true,
    stdio: ["pipe", "pipe", "ignore"],
  });
  // The first line is the daemon's PID; otherwise guestfish's own words follow.
  const [pid, ...rest] = await new Promise<string[]>((resolve, reject) => {
    guard.once("error", (e) =>
      reject(new StrataError(ErrorCode.EXTERNAL, `cannot start guestfish: ${e.message}`)),
    );
    const lines: string[] = [];
    const input = createInterface({ input: guard.stdout! });
    input.on("line", (l) => {
      lines.push(l);
      if (lines.length === 1 && /^\d+$/.test(l)) resolve(lines);
    });
    input.once("close", () => resolve(lines));
  });
  if (pid === undefined || !/^\d+$/.test(pid)) {
    guard.stdin?.end();
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `guestfish --listen did not start: ${rest.join("\n").trim() || "no message (is libguestfs-tools installed?)"}`,
    );
  }
  // The guard must not keep Strata running, only outlive it.
  guard.stdout?.destroy();
  guard.unref();
  (guard.stdin as unknown as { unref?: () => void } | null)?.unref?.();
  return { pid, guard };
}

/**
 * Closes the guard's pipe, which makes it stop the appliance and remove the private directory,
 * and waits (boundedly) for that unless `wait` is false.
 */
async function stopGuarded(guard: ChildProcess | undefined, wait = true): Promise<void> {
  if (!guard || guard.exitCode !== null || guard.signalCode !== null) return;
  const exited = new Promise<void>((resolve) => guard.once("exit", () => resolve()));
  guard.stdin?.end();
  if (!wait) return;
  let timer: NodeJS.Timeout | undefined;
  await Promise.race([exited, new Promise<void>((r) => (timer = setTimeout(r, 45_000)))]);
  clearTimeout(timer);
}

function run(
  cmd: string,
  args: string[],
  env: NodeJS.ProcessEnv,
): Promise<{ stdout: string; stderr: string }> {
  return new Promise((resolve, reject) => {
    execFile(cmd, args, { env, maxBuffer: 64 * 1024 * 1024 }, (err, stdout, stderr) => {
      if (err)
        reject(
          new StrataError(
            ErrorCode.EXTERNAL,
            `${cmd} ${args.slice(0, 3).join(" ")}: ${stderr.trim() || err.message}`,
            {
              cause: err,
            },
          ),
        );
      else resolve({ stdout, stderr });
    });
  });
}
