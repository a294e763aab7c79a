/**
 * Filesystems Strata does not read in-process (XFS, Btrfs, NTFS, and anything inside an LVM
 * logical volume), read through libguestfs: the guest's kernel code runs inside libguestfs's
 * appliance VM, never in Strata's process, against the restore point served read-only over NBD
 * ({@link serveRestorePoint}).
 *
 * One appliance is started per browser (`guestfish --listen`, ~15-20 s under TCG) and driven
 * with `guestfish --remote` commands (~0.25 s each): `lstatns`/`lstatnslist` for entries, `ls`
 * for directories, `readlink`, and `download` into a private temporary file for contents, which
 * is then streamed and deleted. Every disk the filesystem needs is attached, in the restore
 * point's order (all the PVs of a volume group may span several disks); the appliance's LVM
 * activates the volume groups it finds at boot, and `vfs-type` says what the partition or LV
 * holds before anything is mounted. The filesystem is mounted with `mount-ro` (Btrfs: the default
 * subvolume, or the one asked for with `subvol=`); libguestfs keeps a writable overlay under the
 * read-only drives, so a dirty journal or log is replayed into the overlay, never into the
 * restore point (XFS falls back to `norecovery` if that fails). NTFS is mounted by ntfs-3g, which
 * reports every entry as mode 0777 owned by root: Windows ACLs are not Unix modes.
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
import type { FsType } from "../../image/fs-detect.js";
import {
  type FileSystemReader,
  type FsEntry,
  joinPath,
  kindOf,
  normalPath,
  notFound,
  READ_PIECE,
} from "../../image/fs-types.js";
import type { Repository, SnapshotRef } from "../../repo/repository.js";
import { chooseAccelerator } from "../../util/accel.js";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { type RunningServe, serveRestorePoint } from "../serve.js";

/** Filesystem types read through libguestfs when it is installed. */
export const GUESTFS_TYPES: ReadonlySet<FsType> = new Set(["xfs", "btrfs", "ntfs"]);

/** What blkid may find where a filesystem is expected, but which is none. */
export const NOT_FILESYSTEMS: ReadonlySet<string> = new Set([
  "swap",
  "crypto_LUKS",
  "LVM2_member",
  "linux_raid_member",
]);

/** True when guestfish is on the PATH. */
export function haveGuestfish(): boolean {
  return (process.env.PATH ?? "").split(":").some((d) => d !== "" && existsSync(join(d, "guestfish")));
}

/** Which filesystem of a restore point to open in the appliance. */
export interface GuestfsTarget {
  /** Disks of the restore point to attach, in this order. */
  disks: readonly string[];
  /** A partition of one of `disks` (0: the whole disk), or an LVM logical volume. */
  device: { disk: string; partition: number } | { vg: string; lv: string };
  /** Btrfs only: mount this subvolume (a path from the top level) instead of the default one. */
  subvolume?: string;
  /** "web1/… disk root partition 2", for messages. */
  where: string;
  signal?: AbortSignal;
}

/** A Btrfs subvolume. */
export interface BtrfsSubvolume {
  id: number;
  /** Path from the filesystem's top level. */
  path: string;
  /** Mounted when no subvolume is asked for. */
  default: boolean;
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
  private subvolumeList: BtrfsSubvolume[] | undefined;

  private constructor(
    /** What `vfs-type` says: "xfs", "btrfs", "ntfs", "ext4"… */
    readonly type: string,
    /** The device mounted, as the appliance names it ("/dev/sda2", "/dev/vg0/root"). */
    readonly device: string,
    private readonly cmd: Fish,
    private readonly guard: ChildProcess,
    private readonly serve: RunningServe,
    private readonly tmp: string,
  ) {}

  /**
   * Serves `target.disks` of the restore point over NBD, starts an appliance on them and mounts
   * the partition or logical volume read-only. Errors: NOT_FOUND when the appliance does not see
   * the device or subvolume, USAGE when it holds no filesystem, EXTERNAL when libguestfs fails.
   */
  static async open(repo: Repository, snap: SnapshotRef, target: GuestfsTarget): Promise<GuestfishReader> {
    target.signal?.throwIfAborted();
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
      serve = await serveRestorePoint(repo, snap, { disks: [...target.disks], listen: { path: socket } });
      const drives = target.disks.flatMap((d) => ["-a", `nbd:///${d}?socket=${socket}`]);
      const started = await startGuarded(tmp, ["--ro", "--format=raw", ...drives], env);
      guard = started.guard;
      const cmd = remoteFish(started.pid, env, join(tmp, "guestfish.log"));
      // The appliance's own messages go to the listening guestfish's log, not to the client that
      // sent the command: a failed launch may show only there.
      const withLog = async (err: unknown) => {
        const log = await fs.readFile(join(tmp, "guestfish.log"), "utf8").catch(() => "");
        const code = err instanceof StrataError ? err.code : ErrorCode.EXTERNAL;
        return new StrataError(code, `${(err as Error).message}\n${log.slice(-2000)}`.trim());
      };
      await abortable(
        launchAppliance(cmd, target.signal).catch(async (err: unknown) => {
          throw await withLog(err);
        }),
        target.signal,
      );
      const device = await deviceName(cmd, target).catch(async (err: unknown) => {
        throw await withLog(err);
      });
      const type = (await cmd(["vfs-type", device])).trim();
      if (type === "" || type === "unknown")
        throw new StrataError(
          ErrorCode.USAGE,
          `${target.where} holds no filesystem libguestfs recognises (blkid finds nothing on ${device})`,
        );
      if (NOT_FILESYSTEMS.has(type))
        throw new StrataError(ErrorCode.USAGE, `${target.where} holds ${type}, not a filesystem`);
      const opened = new GuestfishReader(type, device, cmd, guard, serve, tmp);
      await opened.mount(target);
      return opened;
    } catch (err) {
      // Interrupted: the guard finishes the clean-up on its own, so Strata can stop at once.
      const aborted = target.signal?.aborted === true;
      await stopGuarded(guard, !aborted);
      await serve?.close();
      if (!aborted) await fs.rm(tmp, { recursive: true, force: true });
      throw err;
    }
  }

  /** The subvolumes of a Btrfs filesystem (empty for other types). */
  async subvolumes(): Promise<BtrfsSubvolume[]> {
    if (this.type !== "btrfs") return [];
    this.subvolumeList ??= await this.listSubvolumes();
    return this.subvolumeList;
  }

  async stat(path: string): Promise<FsEntry> {
    const p = normalPath(path);
    const st = parseRecords(await this.fishPath(p, ["lstatns", p]))[0];
    if (!st || st.st_ino === -1) throw notFound(p);
    return this.entry(p, st);
  }

  async list(path: string, signal?: AbortSignal): Promise<FsEntry[]> {
    signal?.throwIfAborted();
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
          names.map(async (n) => parseRecords(await this.fishPath(p, ["lstatns", joinPath(p, n)]))[0]),
        )
      : parseRecords(await this.fishPath(p, ["lstatnslist", p, names.join(" ")]));
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

  /** Exits the appliance, stops the NBD server and removes the private directory. */
  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    await this.fish(["exit"]).catch(() => {});
    await stopGuarded(this.guard);
    await this.serve.close();
    await fs.rm(this.tmp, { recursive: true, force: true });
  }

  private async mount(target: GuestfsTarget): Promise<void> {
    const sub = target.subvolume;
    if (sub !== undefined) {
      if (this.type !== "btrfs")
        throw new StrataError(
          ErrorCode.USAGE,
          `--subvolume is for Btrfs; ${target.where} holds ${this.type}`,
        );
      if (/[,\s]/.test(sub) || sub === "")
        throw new StrataError(ErrorCode.USAGE, `"${sub}" is not a subvolume path Strata can mount`);
      // The subvolume list needs a mounted filesystem: the default one, briefly.
      await this.fish(["mount-ro", this.device, "/"]);
      const subs = await this.subvolumes();
      await this.fish(["umount", "/"]);
      const want = sub.replace(/^\/+|\/+$/g, "");
      if (want !== "" && !subs.some((s) => s.path === want))
        throw new StrataError(
          ErrorCode.NOT_FOUND,
          `no Btrfs subvolume "${sub}" in ${target.where}; it has: ` +
            (subs.map((s) => s.path).join(", ") || "none but the top level (/)"),
        );
      // "/" (or "") is the top level, whatever the default is.
      await this.fish([
        "mount-options",
        want === "" ? "ro,subvolid=5" : `ro,subvol=${want}`,
        this.device,
        "/",
      ]);
      return;
    }
    // libguestfs puts a writable overlay under read-only drives, so a read-only mount can
    // replay an XFS log into it; should that fail, XFS is read without recovery.
    await this.fish(["mount-ro", this.device, "/"]).catch(async (err: unknown) => {
      if (this.type !== "xfs") throw err;
      await this.fish(["mount-options", "ro,norecovery", this.device, "/"]);
    });
  }

  private async listSubvolumes(): Promise<BtrfsSubvolume[]> {
    const def = Number((await this.fish(["btrfs-subvolume-get-default", "/"])).trim());
    return parseRecords(await this.fish(["btrfs-subvolume-list", "/"]), "btrfssubvolume_id")
      .map((r) => ({
        id: Number(r.btrfssubvolume_id),
        path: String(r.btrfssubvolume_path ?? ""),
        default: Number(r.btrfssubvolume_id) === def,
      }))
      .sort((a, b) => a.path.localeCompare(b.path));
  }

  private async entry(path: string, st: Record<string, number | string>): Promise<FsEntry> {
    const n = (k: string) => Number(st[k] ?? 0);
    const mode = n("st_mode");
    const kind = kindOf(mode);
    const e: FsEntry = {
      name: path === "/" ? "" : path.slice(path.lastIndexOf("/") + 1),
      path,
      kind,
      mode: mode & 0o7777,
      uid: n("st_uid"),
      gid: n("st_gid"),
      size: kind === "directory" ? 0 : n("st_size"),
      mtime: n("st_mtime_sec") * 1000 + Math.floor(n("st_mtime_nsec") / 1e6),
      atime: n("st_atime_sec") * 1000 + Math.floor(n("st_atime_nsec") / 1e6),
    };
    if (kind === "symlink") e.target = (await this.fishPath(path, ["readlink", path])).replace(/\n$/, "");
    return e;
  }

  private fish(args: string[]): Promise<string> {
    return this.cmd(args);
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

/** Runs one guestfish command in the appliance; its standard output. */
export type Fish = (args: string[]) => Promise<string>;

/**
 * Commands in the appliance of daemon `pid`, one at a time. The "-" prefix keeps the guestfish
 * server alive when a command fails (it exits otherwise). A failed command still exits 0 with
 * nothing on the client's stdout or stderr: libguestfs's error goes to the *server's* stderr,
 * which is `log`. So each command's error is the part of the log it added.
 */
export function remoteFish(pid: string, env: NodeJS.ProcessEnv, log: string): Fish {
  let queue: Promise<unknown> = Promise.resolve();
  const one = async (args: string[]): Promise<string> => {
    const [cmd, ...rest] = args;
    const before = await fs.stat(log).then(
      (st) => st.size,
      () => 0,
    );
    const { stdout, stderr } = await run("guestfish", [`--remote=${pid}`, "--", `-${cmd}`, ...rest], env);
    const added = await readFrom(log, before);
    const error = /libguestfs: error: (.*)/.exec(`${stderr}\n${added}`)?.[1];
    if (error) throw new StrataError(ErrorCode.EXTERNAL, `guestfish ${cmd}: ${error}`);
    return stdout;
  };
  return (args) => {
    const p = queue.then(() => one(args));
    queue = p.catch(() => {});
    return p;
  };
}

/**
 * Starts the appliance (guestfish `run`) and checks that it left the configured state. A launch
 * that fails goes back to the configured state and can be tried again: under load the appliance
 * was seen failing to come up once, then starting fine. Such a failure does not always leave an
 * error in the log before `run` answers (a CI run's next command was told "call launch before
 * using this function"), hence the check.
 */
export async function launchAppliance(cmd: Fish, signal?: AbortSignal): Promise<void> {
  const start = async () => {
    await cmd(["run"]);
    // guestfish has no is-ready; a launch that failed left the handle in the configured state.
    const config = (await cmd(["is-config"])).trim();
    if (config !== "false")
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the appliance is not running after run (is-config: ${config || "no answer"})`,
      );
  };
  try {
    await start();
  } catch (err) {
    if (signal?.aborted) throw err;
    await start().catch((again: unknown) => {
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the libguestfs appliance did not start, twice: ${(err as Error).message}; then ${(again as Error).message}`,
      );
    });
  }
}

/** What `path` holds from byte `offset` on (at most 64 KiB of it). */
async function readFrom(path: string, offset: number): Promise<string> {
  const h = await fs.open(path, "r").catch(() => undefined);
  if (!h) return "";
  try {
    const buf = Buffer.alloc(64 * 1024);
    const { bytesRead } = await h.read(buf, 0, buf.length, offset);
    return buf.subarray(0, bytesRead).toString("utf8");
  } finally {
    await h.close();
  }
}

/** The appliance's name for the target's partition or logical volume. */
export async function deviceName(cmd: Fish, target: GuestfsTarget): Promise<string> {
  const dev = target.device;
  if ("vg" in dev) {
    const name = `/dev/${dev.vg}/${dev.lv}`;
    const lvs = (await cmd(["lvs"])).split("\n");
    if (!lvs.includes(name)) {
      // The metadata names the LV, yet the appliance's LVM did not activate it.
      const vgs = (await cmd(["vgs"])).split("\n").filter((l) => l !== "");
      throw new StrataError(
        ErrorCode.NOT_FOUND,
        `LVM in the appliance did not activate ${dev.vg}/${dev.lv} of ${target.where} ` +
          `(volume groups it sees: ${vgs.join(", ") || "none"}; logical volumes: ${lvs.filter((l) => l !== "").join(", ") || "none"})`,
      );
    }
    return name;
  }
  const drive = target.disks.indexOf(dev.disk);
  const list = async () => (await cmd(["list-devices"])).split("\n").filter((l) => l !== "");
  let devices = await list();
  // Seen once under load: an answer with no drives at all, right after the appliance started.
  // Asked again once; a second such answer is an error that says what the appliance listed.
  if (devices.length === 0) {
    await new Promise((r) => setTimeout(r, 1000));
    devices = await list();
  }
  const disk = devices[drive];
  if (disk === undefined)
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `the libguestfs appliance has no drive for disk ${dev.disk} (drive ${drive + 1} of ${target.disks.length} attached; it lists ${devices.length === 0 ? "none" : devices.join(", ")})`,
    );
  return dev.partition === 0 ? disk : `${disk}${dev.partition}`;
}

/**
 * Parses guestfish's struct output: one record ("key: value" lines), or a list of them
 * ("[n] = { … }"); a new record starts where `first` appears again.
 */
function parseRecords(text: string, first = "st_dev"): Array<Record<string, number | string>> {
  const out: Array<Record<string, number | string>> = [];
  let cur: Record<string, number | string> | undefined;
  for (const line of text.split("\n")) {
    const m = /^\s*(\w+): (.*)$/.exec(line);
    if (!m) continue;
    const [, key, value] = m as unknown as [string, string, string];
    if (!cur || (key === first && first in cur)) {
      cur = {};
      out.push(cur);
    }
    cur[key] = /^-?\d+$/.test(value) ? Number(value) : value;
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

/** `p`, or the signal's reason as soon as it aborts. */
function abortable<T>(p: Promise<T>, signal: AbortSignal | undefined): Promise<T> {
  if (!signal) return p;
  return new Promise<T>((resolve, reject) => {
    const onAbort = () => reject(signal.reason);
    if (signal.aborted) return onAbort();
    signal.addEventListener("abort", onAbort, { once: true });
    p.then(resolve, reject).finally(() => signal.removeEventListener("abort", onAbort));
  });
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
