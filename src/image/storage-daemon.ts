/**
 * qemu-storage-daemon as Strata's adapter for image files: it opens any format QEMU reads
 * (raw, qcow2, vmdk, vhdx, vpc, vdi), read-only or writable, and exports it over NBD on a unix
 * socket in a private directory. Strata's NBD client does the rest. The daemon is stopped and
 * waited for on every path (it does not exit synchronously on SIGTERM).
 */
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { Daemon, socketAccepts } from "../util/process.js";
import { FORMATS_WITH_BACKING } from "./image-safety.js";

export interface ExportSpec {
  /** Image file. */
  path: string;
  /** Its format; must be given (never probed here: see files adapter). */
  format: string;
  /** NBD export name. */
  name: string;
  writable?: boolean;
  /** Persistent bitmaps of the image to expose as `qemu:dirty-bitmap:NAME`. */
  bitmaps?: string[];
  /**
   * Open no backing file, whatever the image header names (`backing: null`): for images a guest
   * could write, whose header must not make QEMU read a host file.
   */
  noBacking?: boolean;
}

export class StorageDaemon {
  private constructor(
    private readonly daemon: Daemon,
    readonly dir: string,
    /** The NBD server's unix socket. */
    readonly socket: string,
  ) {}

  /** Starts one daemon exporting every image in `exports` on one NBD socket. */
  static async start(
    exports: readonly ExportSpec[],
    options: { runDir?: string } = {},
  ): Promise<StorageDaemon> {
    const dir = await mkdtemp(join(options.runDir ?? tmpdir(), "strata-qsd-"));
    const socket = join(dir, "nbd.sock");
    const args: string[] = [];
    exports.forEach((e, i) => {
      const ro = e.writable ? "off" : "on";
      // Commas in file names are doubled, as QEMU's option syntax wants.
      args.push(
        "--blockdev",
        `driver=file,filename=${e.path.replace(/,/g, ",,")},node-name=f${i},read-only=${ro}`,
      );
      if (e.noBacking && FORMATS_WITH_BACKING.has(e.format)) {
        // The key=value syntax can't say null (backing=null names a node "null"); JSON can.
        args.push(
          "--blockdev",
          JSON.stringify({
            driver: e.format,
            file: `f${i}`,
            "node-name": `d${i}`,
            "read-only": !e.writable,
            backing: null,
          }),
        );
      } else {
        args.push("--blockdev", `driver=${e.format},file=f${i},node-name=d${i},read-only=${ro}`);
      }
    });
    args.push("--nbd-server", `addr.type=unix,addr.path=${socket},max-connections=0`);
    exports.forEach((e, i) => {
      const bitmaps = (e.bitmaps ?? []).map((b, j) => `,bitmaps.${j}=${b}`).join("");
      args.push(
        "--export",
        `type=nbd,id=e${i},node-name=d${i},name=${e.name},writable=${e.writable ? "on" : "off"}${bitmaps}`,
      );
    });
    try {
      const daemon = await Daemon.start("qemu-storage-daemon", "qemu-storage-daemon", args, () =>
        socketAccepts(socket),
      );
      return new StorageDaemon(daemon, dir, socket);
    } catch (err) {
      await rm(dir, { recursive: true, force: true });
      throw err;
    }
  }

  get pid(): number | undefined {
    return this.daemon.pid;
  }

  async stop(): Promise<void> {
    await this.daemon.stop();
    await rm(this.dir, { recursive: true, force: true });
  }
}
