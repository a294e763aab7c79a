/**
 * Stand-ins for a Proxmox VE host, which can't be installed here: a root directory holding
 * fixtures of its files (etc/pve/qemu-server/VMID.conf, etc/pve/storage.cfg; var/run/qemu-server
 * for the sockets), for the pve adapter's `root` option.
 */
import { mkdirSync, readFileSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { ROOT, tempDir } from "./cli.js";

export const PVE_FIXTURES = join(ROOT, "test", "pve", "fixtures");

export function pveFixture(name: string): string {
  return readFileSync(join(PVE_FIXTURES, name), "utf8");
}

export interface PveRoot {
  root: string;
  etc: string;
  run: string;
  /** The dir storage `local`'s path (root/var/lib/vz). */
  local: string;
}

/**
 * A fixture root: the given VMID.conf files (fixture names or text) and the fixture storage.cfg,
 * whose file storages' paths are moved under the root.
 */
export function pveRoot(t: TestContext, confs: Record<number, string>): PveRoot {
  const root = tempDir(t, "strata-pve-");
  const etc = join(root, "etc", "pve");
  const run = join(root, "var", "run", "qemu-server");
  mkdirSync(join(etc, "qemu-server"), { recursive: true });
  mkdirSync(run, { recursive: true });
  const local = join(root, "var", "lib", "vz");
  mkdirSync(local, { recursive: true });
  writeFileSync(
    join(etc, "storage.cfg"),
    pveFixture("storage.cfg")
      .replace("path /var/lib/vz", `path ${local}`)
      .replace("path /mnt/pve/nas", `path ${join(root, "mnt", "pve", "nas")}`),
  );
  for (const [vmid, conf] of Object.entries(confs)) {
    const text = conf.endsWith(".conf") ? pveFixture(conf) : conf;
    writeFileSync(join(etc, "qemu-server", `${vmid}.conf`), text);
  }
  return { root, etc, run, local };
}
