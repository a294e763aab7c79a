/** demo: the whole cycle on a made-up disk, in a folder of its own. */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import type { Command } from "commander";
import { restoreDiskToFile } from "../engine/restore.js";
import { backupVm } from "../engine/vm-backup.js";
import { mutateImage, sha256File, writeSyntheticImage } from "../image/synthetic.js";
import { FsStore } from "../repo/fs-store.js";
import { manifestTotals } from "../repo/manifest.js";
import { Repository } from "../repo/repository.js";
import { verifyRepository } from "../repo/verify.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { formatBytes, parseSize } from "../util/sizes.js";
import { buildRegistry, defaultStateDir } from "./adapters.js";
import { output } from "./context.js";
import { demoVm } from "./demo-vm.js";

export function registerDemoCommand(program: Command): void {
  program
    .command("demo")
    .description(
      "show the whole cycle: a demo disk (backup, change 1 %, backup, verify, restore) and a demo VM backed up live",
    )
    .option("--dir <dir>", "folder for the demo disk and repository", "demo")
    .option("--size <size>", "size of the demo disk", "512M")
    .option("--no-vm", "skip the demo VM (a test guest booted under QEMU and backed up live)")
    .action(async (opts: { dir: string; size: string; vm: boolean }, cmd: Command) => {
      const out = output(cmd);
      const dir = resolve(opts.dir);
      await fs.mkdir(dir, { recursive: true });
      const image = join(dir, "demo-disk.img");
      const store = new FsStore(join(dir, "repo"));
      if (!(await store.stat("config"))) {
        await Repository.init(store);
        out.info(`created repository ${store.location}`);
      }
      if (!(await fs.stat(image).catch(() => undefined))) {
        out.info(`writing demo disk ${image} (${opts.size}, half of it holes)`);
        await writeSyntheticImage(image, { size: parseSize(opts.size), seed: "strata demo" });
      }
      const repo = await Repository.open(store);
      try {
        const disk = await buildRegistry().resolve(`file:${image},name=disk0`);
        const once = async (label: string) => {
          const t0 = Date.now();
          const r = await backupVm(repo, disk, {
            vm: "demo-disk",
            mode: "snapshot",
            quiesce: "off",
            stateDir: defaultStateDir(),
            progress: out.progress(),
          });
          const t = manifestTotals(r.manifest);
          const s = (Date.now() - t0) / 1000;
          out.info(
            `${label}: ${r.id} read ${formatBytes(t.bytesRead)} in ${s.toFixed(1)} s, stored ${formatBytes(t.bytesStored)} new`,
          );
          return r;
        };
        await once("backup");
        const changed = await mutateImage(image, 0.01, `demo ${Date.now()}`);
        out.info(`the guest changed ${formatBytes(changed)}`);
        const second = await once("backup");
        const report = await verifyRepository(repo, { readData: true, progress: out.progress() });
        out.info(`verify --read-data: ${report.chunksChecked} chunks, ${report.ok ? "no errors" : "ERRORS"}`);
        const snap = await repo.findSnapshot(second.id);
        const target = join(dir, "restored-disk0.raw");
        await restoreDiskToFile(repo, snap, "disk0", target, { force: true, progress: out.progress() });
        const same = (await sha256File(target)) === (await sha256File(image));
        out.info(`restored ${target}: ${same ? "identical to the source" : "DIFFERENT from the source"}`);
        if (!same || !report.ok)
          throw new StrataError(ErrorCode.INTERNAL, "demo failed: restore or verify did not match");
        const live = opts.vm ? await demoVm(repo, dir, out) : undefined;
        out.result(
          {
            type: "summary",
            repo: store.location,
            latest: second.id,
            verified: report.ok,
            identical: same,
            ...(live ? { vm: live.ids, marker: live.marker } : {}),
          },
          () => "",
        );
        out.info(`\nTry: bin/strata snapshots --repo ${store.location}`);
      } finally {
        await repo.close();
      }
    });
}
