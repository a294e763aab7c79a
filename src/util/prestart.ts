/**
 * Worker threads started before they are needed. A worker thread takes 0.15-0.2 s of CPU to start
 * here (Node's own bootstrap, before a line of the module runs), and a backup or restore used to
 * start its codec threads only once the repository was open: on an incremental backup of the
 * benchmark's Debian disk the chunks waited for them until 0.59 s into a 2.5 s run. bin/strata
 * starts them first thing for the commands that use them, beside the loading of the CLI itself;
 * the first {@link WorkerPool} of that module takes them over and sends them their setup.
 *
 * Imported by bin/strata on its own (before the bundle) and bundled into the CLI too: the two
 * copies meet through a global registry, not module state.
 */
import { Worker } from "node:worker_threads";

/** workerData of a thread started ahead: its setup comes as its first message. */
export const PRESTARTED = "strata-prestarted";

const REGISTRY = Symbol.for("strata.prestarted-workers");

type Registry = Map<string, Worker[]>;

function registry(): Registry {
  const g = globalThis as { [REGISTRY]?: Registry };
  g[REGISTRY] ??= new Map();
  return g[REGISTRY];
}

/**
 * Starts `count` threads of the worker module at `moduleUrl`, unreferenced (they keep no process
 * alive), for a pool made later to take over. A thread that fails or exits before then is dropped.
 */
export function prestartWorkers(moduleUrl: URL, count: number): void {
  const list = registry().get(moduleUrl.href) ?? [];
  registry().set(moduleUrl.href, list);
  for (let i = 0; i < count; i++) {
    const worker = new Worker(moduleUrl, { workerData: PRESTARTED });
    const drop = () => {
      const at = list.indexOf(worker);
      if (at >= 0) list.splice(at, 1);
    };
    // Its failure is the pool's business only if the pool takes it: until then, dropped quietly.
    worker.once("error", drop);
    worker.once("exit", drop);
    worker.unref();
    list.push(worker);
  }
}

/**
 * Up to `count` threads started ahead for `moduleUrl`, taken out of the registry; the rest of
 * them are stopped (a pool smaller than what was started ahead).
 */
export function takePrestarted(moduleUrl: URL, count: number): Worker[] {
  const list = registry().get(moduleUrl.href);
  if (!list) return [];
  registry().delete(moduleUrl.href);
  const taken = list.splice(0, count);
  for (const w of taken) w.removeAllListeners();
  for (const w of list) void w.terminate();
  return taken;
}
