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
 */
import { execFile, spawn } from "node:child_process";
import { createReadStream, existsSync, promises as fs } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
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

/** A filesystem read through a libguestfs appliance. */
export class GuestfishReader implements FileSystemReader {
  private closed = false;

  private constructor(
    readonly type: string,
    private readonly pid: string,
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
    let pid: string | undefined;
    const env: NodeJS.ProcessEnv = {
      ...process.env,
      LIBGUESTFS_BACKEND: process.env.LIBGUESTFS_BACKEND ?? "direct",
    };
    // Where KVM cannot run stock guests (no vmx/svm, though /dev/kvm may exist) the appliance
    // must be told to use TCG, or QEMU aborts or hangs; the launcher's test decides, as for VMs.
    if (env.LIBGUESTFS_BACKEND_SETTINGS === undefined && (await chooseAccelerator()).accel === "tcg")
      env.LIBGUESTFS_BACKEND_SETTINGS = "force_tcg";
    try {
      serve = await serveRestorePoint(repo, snap, { disks: [disk], listen: { path: socket } });
      pid = await listen(
        ["--listen", "--ro", "--format=raw", "-a", `nbd:///${disk}?socket=${socket}`],
        env,
        join(tmp, "guestfish.log"),
      );
      const reader = new GuestfishReader(type, pid, env, serve, tmp);
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
      if (pid) await run("guestfish", [`--remote=${pid}`, "--", "exit"], env).catch(() => {});
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
 * Starts `guestfish --listen` and returns the PID it prints. The parent prints the PID and exits;
 * the daemon it forks keeps the parent's stdout and stderr, so both go to a log file (not pipes,
 * which the daemon would outlive or die writing to).
 */
async function listen(args: string[], env: NodeJS.ProcessEnv, log: string): Promise<string> {
  const fh = await fs.open(log, "w");
  try {
    const code = await new Promise<number | null>((resolve, reject) => {
      const child = spawn("guestfish", args, { env, stdio: ["ignore", fh.fd, fh.fd] });
      child.on("error", (e) =>
        reject(new StrataError(ErrorCode.EXTERNAL, `cannot start guestfish: ${e.message}`)),
      );
      child.on("exit", resolve);
    });
    const out = await fs.readFile(log, "utf8");
    const pid = /GUESTFISH_PID=(\d+)/.exec(out)?.[1];
    if (code !== 0 || !pid)
      throw new StrataError(ErrorCode.EXTERNAL, `guestfish --listen exited ${code}: ${out.trim()}`);
    return pid;
  } finally {
    await fh.close();
  }
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
