/** A running test guest with the workload, for live-backup tests, and checks of what a VM holds. */
import { execFile } from "node:child_process";
import { mkdtemp, readdir, rm, stat } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { promisify } from "node:util";
import { type DiskSpec, launchQemu, type QemuVm } from "../../src/hypervisor/qemu/launcher.js";
import { QgaClient } from "../../src/hypervisor/qemu/qga.js";
import { QmpClient } from "../../src/hypervisor/qemu/qmp.js";
import { testGuest } from "./guest.js";
import { parseLatencySummaries } from "./records.js";

const run = promisify(execFile);

export interface WorkloadVm {
  vm: QemuVm;
  dir: string;
  /** Disk files by device id. */
  files: Record<string, string>;
  /** Latest seq the workload reported on the console. */
  seq(): Promise<number>;
  /** Waits until the workload reported at least `n`. */
  waitSeq(n: number, timeoutMs?: number): Promise<number>;
  restart(): Promise<void>;
}

export interface VmDisk {
  id: string;
  format: "qcow2" | "raw";
  size: string;
  /** Holds an empty ext4 (mounted by the guest at /mnt/data when `data` names it). */
  ext4?: boolean;
  /** A raw image the disk starts as a copy of (converted to `format`; the disk takes its size). */
  content?: string;
  /**
   * A partition table of this kind with two partitions, each holding an empty filesystem:
   * 1 ext4 (the first half), 2 FAT32 (the rest). The guest sees them as /dev/vdX1 and /dev/vdX2.
   */
  partitions?: "gpt" | "mbr";
}

/** Writes an sfdisk table and two empty filesystems (ext4, FAT32) into the raw image `raw`. */
async function partitionDisk(raw: string, kind: "gpt" | "mbr"): Promise<void> {
  const bytes = (await stat(raw)).size;
  const MiB = 1024 * 1024;
  const half = Math.floor(bytes / 2 / MiB) * MiB;
  // sfdisk: start and size in 512-byte sectors; GPT keeps 33 sectors at the end for its backup.
  const script = [
    `label: ${kind === "gpt" ? "gpt" : "dos"}`,
    `start=2048, size=${(half - MiB) / 512}, type=${kind === "gpt" ? "L" : "83"}`,
    `start=${half / 512}, type=${kind === "gpt" ? "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" : "c"}`,
    "",
  ].join("\n");
  const child = execFile("sfdisk", ["-q", raw]);
  child.stdin!.end(script);
  await new Promise<void>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`sfdisk exited ${code}`))));
  });
  const parts = JSON.parse((await run("sfdisk", ["--json", raw])).stdout) as {
    partitiontable: { partitions: Array<{ start: number; size: number }> };
  };
  const [p1, p2] = parts.partitiontable.partitions;
  await run("mkfs.ext4", ["-q", "-F", "-E", `offset=${p1!.start * 512}`, raw, `${(p1!.size * 512) / 1024}k`]);
  await run("mkfs.vfat", [
    "-F",
    "32",
    `--offset=${p2!.start}`,
    raw,
    String(Math.floor((p2!.size * 512) / 1024)),
  ]);
}

/** Where the VM's teardown is registered: a test's context, or a list the bench runs at its end. */
export interface Teardown {
  after(fn: () => Promise<void>): void;
}

/**
 * Boots the test guest with `disks` (device ids vblk0.. → /dev/vda..); the workload writes every
 * record to each of `workload` (guest device names, none: no workload) at `rate` records/s.
 */
export async function bootWorkloadVm(
  t: Teardown,
  opts: {
    disks: VmDisk[];
    workload: string[];
    data?: string;
    rate?: number;
    report?: number;
    wlsize?: string;
    agent?: boolean;
    extraArgs?: string[];
  },
): Promise<WorkloadVm> {
  const guest = await testGuest();
  const dir = await mkdtemp(join(tmpdir(), "strata-live-"));
  const files: Record<string, string> = {};
  const specs: DiskSpec[] = [];
  for (const [i, d] of opts.disks.entries()) {
    const file = join(dir, `${d.id}.${d.format}`);
    if (d.content) {
      await run("qemu-img", ["convert", "-f", "raw", "-O", d.format, d.content, file]);
    } else if (d.ext4 || d.partitions) {
      const raw = `${file}.tmp`;
      await run("qemu-img", ["create", "-q", "-f", "raw", raw, d.size]);
      if (d.partitions) await partitionDisk(raw, d.partitions);
      else await run("mkfs.ext4", ["-q", "-F", raw]);
      await run("qemu-img", ["convert", "-f", "raw", "-O", d.format, raw, file]);
      await rm(raw);
    } else {
      await run("qemu-img", ["create", "-q", "-f", d.format, file, d.size]);
    }
    files[d.id] = file;
    specs.push({ file, format: d.format, nodeName: `disk${i}`, id: d.id });
  }
  const append = [
    "console=ttyS0 quiet panic=-1",
    `strata.workload=${opts.workload.join(",")}`,
    `strata.rate=${opts.rate ?? 100}`,
    `strata.report=${opts.report ?? 20}`,
    ...(opts.wlsize ? [`strata.wlsize=${opts.wlsize}`] : []),
    ...(opts.data ? [`strata.data=${opts.data}`] : []),
  ].join(" ");
  const launch = () =>
    launchQemu({
      runDir: join(dir, "run"),
      name: "live",
      disks: specs,
      kernel: { kernel: guest.kernel, initrd: guest.initrd, append },
      noReboot: true,
      guestAgent: opts.agent !== false,
      ...(opts.extraArgs ? { extraArgs: opts.extraArgs } : {}),
    });
  let vm = await launch();
  const handle: WorkloadVm = {
    get vm() {
      return vm;
    },
    dir,
    files,
    async seq() {
      const s = parseLatencySummaries(await vm.console());
      return s.at(-1)?.seq ?? 0;
    },
    async waitSeq(n, timeoutMs = 60_000) {
      const end = Date.now() + timeoutMs;
      for (;;) {
        const s = await handle.seq();
        if (s >= n) return s;
        if (Date.now() > end || !vm.running) throw new Error(`workload did not reach seq ${n} (at ${s})`);
        await new Promise((r) => setTimeout(r, 100));
      }
    },
    async restart() {
      await vm.stop({ timeoutMs: 10_000 });
      await rm(join(dir, "run"), { recursive: true, force: true });
      vm = await launch();
      await vm.waitForConsole(/STRATA-GUEST-READY/, 60_000);
    },
  };
  t.after(async () => {
    await vm.stop({ timeoutMs: 5000 }).catch(() => {});
    await rm(dir, { recursive: true, force: true });
  });
  await vm.waitForConsole(/STRATA-GUEST-READY/, 60_000);
  return handle;
}

/** Runs one QMP command on a connection of its own (QEMU serves one QMP client at a time). */
export async function qmpOnce<T>(
  socket: string,
  command: string,
  args?: Record<string, unknown>,
): Promise<T> {
  const qmp = await QmpClient.connect(socket, { connectTimeoutMs: 10_000 });
  try {
    return await qmp.execute<T>(command, args);
  } finally {
    await qmp.close();
  }
}

/** Everything Strata could have left on a VM and in its state directory; empty lists mean clean. */
export async function leftovers(vm: QemuVm, stateDir: string) {
  const qmp = await QmpClient.connect(vm.qmpSocket, { connectTimeoutMs: 10_000 });
  try {
    const nodes = (
      await qmp.execute<Array<{ "node-name": string }>>("query-named-block-nodes", { flat: true })
    )
      .map((n) => n["node-name"])
      .filter((n) => n.startsWith("strata-"));
    const exports = (await qmp.execute<Array<{ id: string }>>("query-block-exports")).map((e) => e.id);
    const jobs = (await qmp.execute<Array<{ id: string }>>("query-jobs")).map((j) => j.id);
    const blocks =
      await qmp.execute<
        Array<{ inserted?: { "node-name": string; "dirty-bitmaps"?: Array<{ name: string }> } }>
      >("query-block");
    const bitmaps: Record<string, string[]> = {};
    for (const b of blocks) {
      if (b.inserted)
        bitmaps[b.inserted["node-name"]] = (b.inserted["dirty-bitmaps"] ?? []).flatMap((x) =>
          x.name === undefined ? [] : [x.name],
        );
    }
    const status = (await qmp.execute<{ status: string }>("query-status")).status;
    let frozen = "no agent";
    if (vm.qgaSocket) {
      const qga = new QgaClient(vm.qgaSocket, { timeoutMs: 5000 });
      frozen = await qga.fsfreezeStatus().finally(() => qga.close());
    }
    const files = (await readdir(stateDir).catch(() => [] as string[])).filter((f) => !f.startsWith("."));
    return { nodes, exports, jobs, bitmaps, status, frozen, files };
  } finally {
    await qmp.close();
  }
}

/** Polls `fn` until it returns something other than undefined, or fails after `timeoutMs`. */
export async function until<T>(
  what: string,
  timeoutMs: number,
  fn: () => Promise<T | undefined>,
): Promise<T> {
  const end = Date.now() + timeoutMs;
  for (;;) {
    const v = await fn();
    if (v !== undefined) return v;
    if (Date.now() > end) throw new Error(`timed out waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 100));
  }
}
