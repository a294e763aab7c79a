/**
 * The demo's VM part: the test guest (built from Debian packages by scripts/build-test-guest.sh,
 * cached) booted under QEMU with a workload disk and an ext4 data disk, backed up live twice
 * (the second time only what changed), a file read back out of the restore point, and the VM
 * stopped. Runs from a checkout, where the script is.
 */
import { execFile } from "node:child_process";
import { existsSync, promises as fs } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";
import { FileBrowser } from "../engine/files/index.js";
import { backupVm } from "../engine/vm-backup.js";
import { launchQemu } from "../hypervisor/qemu/launcher.js";
import { manifestTotals } from "../repo/manifest.js";
import type { Repository } from "../repo/repository.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes } from "../util/sizes.js";
import { buildRegistry } from "./adapters.js";
import type { Output } from "./output.js";

const run = promisify(execFile);
const REPO_ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

export async function demoVm(
  repo: Repository,
  dir: string,
  out: Output,
): Promise<{ ids: string[]; marker: string }> {
  const script = join(REPO_ROOT, "scripts", "build-test-guest.sh");
  if (!existsSync(script))
    throw new StrataError(ErrorCode.USAGE, `the demo VM needs a Strata checkout (${script} is missing)`);
  out.info("building the demo VM from Debian packages (once; cached in .cache/guest)");
  const { stdout } = await run("bash", [script], { maxBuffer: 16 * 1024 * 1024 });
  const guest = JSON.parse(
    await fs.readFile(join(stdout.trim().split("\n").pop()!, "guest.json"), "utf8"),
  ) as {
    kernel: string;
    initrd: string;
  };
  const vmDir = join(dir, "vm");
  await fs.rm(vmDir, { recursive: true, force: true });
  await fs.mkdir(vmDir, { recursive: true });
  const wl = join(vmDir, "workload.qcow2");
  const data = join(vmDir, "data.qcow2");
  await run("qemu-img", ["create", "-q", "-f", "qcow2", wl, "64M"]);
  await run("qemu-img", ["create", "-q", "-f", "raw", `${data}.raw`, "64M"]);
  await run("mkfs.ext4", ["-q", "-F", `${data}.raw`]);
  await run("qemu-img", ["convert", "-f", "raw", "-O", "qcow2", `${data}.raw`, data]);
  await fs.rm(`${data}.raw`);
  const vm = await launchQemu({
    runDir: join(vmDir, "run"),
    name: "demo-live",
    disks: [
      { file: wl, format: "qcow2", nodeName: "disk0", id: "vblk0" },
      { file: data, format: "qcow2", nodeName: "disk1", id: "vblk1" },
    ],
    kernel: {
      kernel: guest.kernel,
      initrd: guest.initrd,
      append: "console=ttyS0 quiet panic=-1 strata.workload=/dev/vda strata.rate=50 strata.data=/dev/vdb",
    },
    noReboot: true,
  });
  try {
    out.info(`booting the demo VM (${vm.accelerator.accel}: ${vm.accelerator.reason})`);
    await vm.waitForConsole(/STRATA-GUEST-READY/, 120_000);
    const ids: string[] = [];
    for (const label of ["live backup", "incremental live backup"]) {
      const t0 = Date.now();
      const source = `qmp:${vm.qmpSocket}${vm.qgaSocket ? `,qga=${vm.qgaSocket}` : ""}`;
      const r = await backupVm(repo, await buildRegistry().resolve(source), {
        vm: "demo-live",
        mode: "snapshot",
        quiesce: "try",
        stateDir: join(vmDir, "state"),
        progress: out.progress(),
        log: (m) => out.info(`  ${m}`),
      });
      const t = manifestTotals(r.manifest);
      out.info(
        `${label}: ${r.id} (${r.manifest.consistency}, guest frozen ${r.details.quiescedMs} ms) read ${formatBytes(t.bytesRead)} of ${formatBytes(t.size)} in ${((Date.now() - t0) / 1000).toFixed(1)} s`,
      );
      ids.push(r.id);
      await new Promise((res) => setTimeout(res, 2000));
    }
    const snap = await repo.findSnapshot(ids[1]!);
    const browser = await FileBrowser.open(repo, snap, { disk: "vblk1" });
    let marker: string;
    try {
      const pieces: Buffer[] = [];
      for await (const piece of browser.fs.read("/boot-marker")) pieces.push(piece);
      marker = Buffer.concat(pieces).toString("utf8").trim();
    } finally {
      await browser.close();
    }
    out.info(`a file the guest wrote, read straight from the restore point: /boot-marker = "${marker}"`);
    return { ids, marker };
  } finally {
    await vm.stop({ timeoutMs: 10_000 });
  }
}
