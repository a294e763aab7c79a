/** A daemon set up in-process for tests: a temp repository, image-file VMs, a catalog, a runner. */
import { randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { Catalog } from "../../src/catalog/catalog.js";
import { ImageFileAdapter } from "../../src/hypervisor/images/adapter.js";
import { AdapterRegistry } from "../../src/hypervisor/registry.js";
import { FsStore } from "../../src/repo/fs-store.js";
import { Repository } from "../../src/repo/repository.js";
import { checkConfig, type DaemonConfig } from "../../src/server/config.js";
import { createJobRunner, type JobRunner } from "../../src/server/runner.js";
import { Daemon, type DaemonOptions } from "../../src/server/service.js";
import type { Clock } from "../../src/util/clock.js";

export interface Setup {
  dir: string;
  repoPath: string;
  images: Record<string, string>;
  catalog: Catalog;
  config: DaemonConfig;
  runner: JobRunner;
}

/** A raw image of `mib` MiB: random data in its first half, zeros after. */
export function writeImage(path: string, mib: number): void {
  const b = Buffer.alloc(mib << 20);
  randomBytes(mib << 19).copy(b);
  writeFileSync(path, b);
}

/**
 * A repository, one raw image per VM named in `vms`, a catalog on `clock`, and the real runner
 * (image-file adapter). `policies` is YAML for the configuration's policies section (indented by
 * two spaces); `extra` more top-level YAML.
 */
/** A policy `p` backing up every VM of the host hourly into `main`: the `policies` of many tests. */
export const HOURLY_ALL = `  p:
    repository: main
    vms: all
    schedule: every 1h`;

export async function setup(
  t: TestContext,
  options: { vms: string[]; policies: string; clock?: Clock; extra?: string; mib?: number },
): Promise<Setup> {
  const dir = mkdtempSync(join(tmpdir(), "strata-daemon-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const repoPath = join(dir, "repo");
  await Repository.init(new FsStore(repoPath), { chunkSize: 64 << 10 });
  const images: Record<string, string> = {};
  for (const vm of options.vms) {
    images[vm] = join(dir, `${vm}.img`);
    writeImage(images[vm], options.mib ?? 2);
  }
  const text = `repositories:
  main: { path: ${repoPath} }
state-dir: ${join(dir, "state")}
api: { socket: ${join(dir, "strata.sock")} }
${options.vms.length === 0 ? "" : "vms:\n"}${options.vms.map((vm) => `  ${vm}: { sources: ["file:${images[vm]}"] }`).join("\n")}
${options.extra ?? ""}
policies:
${options.policies}
`;
  const checked = checkConfig(text, join(dir, "strata.yaml"));
  if (!checked.config) throw new Error(`bad test configuration: ${JSON.stringify(checked.problems)}`);
  const catalog = Catalog.open(join(dir, "catalog.db"), options.clock ? { clock: options.clock } : {});
  t.after(() => catalog.close());
  const registry = new AdapterRegistry().register(new ImageFileAdapter());
  const bandwidth = checked.config.limits.bandwidth;
  const runner = createJobRunner({
    registry,
    catalog,
    stateDir: join(dir, "state"),
    ...(bandwidth === undefined ? {} : { hostBandwidth: bandwidth }),
  });
  return { dir, repoPath, images, catalog, config: checked.config, runner };
}

/** A daemon over `s` without its own timer unless asked; stopped after the test. */
export function daemonOf(t: TestContext, s: Setup, options: Partial<DaemonOptions> = {}): Daemon {
  const d = new Daemon({
    config: s.config,
    catalog: s.catalog,
    runner: s.runner,
    listVms: async () => ({ vms: [], unreachable: [] }),
    timers: false,
    ...options,
  });
  t.after(() => d.stop());
  return d;
}
