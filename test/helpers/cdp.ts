/**
 * The setting every CDP test starts from: a repository of 256 KiB chunks, a state directory, a
 * journal path, and the test guest running its record workload on two 64 MiB qcow2 disks: on
 * both, or (`data`) on the first while the second holds an ext4 file system the test writes to.
 */
import { join } from "node:path";
import { strataOk, tempDir } from "./cli.js";
import { bootWorkloadVm, type WorkloadVm } from "./vm.js";

type Teardown = Parameters<typeof tempDir>[0] & Parameters<typeof bootWorkloadVm>[0];

export interface ProtectedGuest {
  dir: string;
  repo: string;
  state: string;
  journal: string;
  env: { STRATA_STATE_DIR: string };
  g: WorkloadVm;
}

export async function protectedGuest(
  t: Teardown,
  o: { data?: boolean; wlsize: string; rate?: number; seq: number },
): Promise<ProtectedGuest> {
  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const state = join(dir, "state");
  const journal = join(dir, "journal");
  await strataOk(["init", "--repo", repo, "--chunk-size", "256K"]);
  const g = await bootWorkloadVm(t, {
    disks: [
      { id: "vblk0", format: "qcow2", size: "64M" },
      { id: "vblk1", format: "qcow2", size: "64M", ...(o.data ? { ext4: true } : {}) },
    ],
    workload: o.data ? ["/dev/vda"] : ["/dev/vda", "/dev/vdb"],
    ...(o.data ? { data: "/dev/vdb" } : {}),
    wlsize: o.wlsize,
    ...(o.rate === undefined ? {} : { rate: o.rate }),
  });
  await g.waitSeq(o.seq);
  return { dir, repo, state, journal, env: { STRATA_STATE_DIR: state }, g };
}
