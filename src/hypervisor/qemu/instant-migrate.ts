/**
 * Live migration of an instantly recovered QEMU VM to production storage. Per disk: a file and
 * a format node for TARGET/<disk>.<format> (`blockdev-add`), `blockdev-mirror sync=full` from
 * the disk's node (the overlay, with its NBD backing) with `speed` = the limit, progress from
 * `query-block-jobs` until READY, `job-complete` (the device pivots to the new node without a
 * pause the guest notices), then `blockdev-del` of the overlay's format and file nodes and of
 * the raw and nbd nodes (monitor-owned nodes are never freed implicitly). A mirror copies the
 * writes made while it runs, so no guest write is lost and there is no second outage.
 * `active` uses `copy-mode: write-blocking`, which converges under any write load at the cost
 * of guest write latency.
 *
 * Run again after an interruption (Strata or the host killed mid-way), a leftover job and
 * half-made target nodes are cancelled and removed first; disks already pivoted are skipped.
 */
import { join, resolve } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { runProgram } from "../../util/process.js";
import { type InstantVm, type MigratedDisk, type MigrateRequest, mirrorBufferBytes } from "../adapter.js";
import { checkQemuInstantVm, type QemuInstantData } from "./instant-record.js";
import { QmpClient } from "./qmp.js";

interface BlockJob {
  device: string;
  type: string;
  len: number;
  offset: number;
  ready: boolean;
  status: string;
}

interface Job {
  id: string;
  status: string;
  error?: string;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

/** Cancels a job (a mirror stops without pivot, READY or not) and waits until it is gone. */
async function cancelJob(qmp: QmpClient, id: string, timeoutMs = 30_000): Promise<void> {
  const end = Date.now() + timeoutMs;
  let cancelled = false;
  for (;;) {
    const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === id);
    if (!j) return;
    if (j.status === "concluded") await qmp.execute("job-dismiss", { id });
    else if (!cancelled && j.status !== "aborting") {
      await qmp.execute("job-cancel", { id });
      cancelled = true;
    }
    if (Date.now() > end)
      throw new StrataError(
        ErrorCode.TIMEOUT,
        `job ${id} did not end within ${timeoutMs / 1000} s (${j.status})`,
      );
    await sleep(50);
  }
}

/** Moves every disk of a running instantly recovered VM to `TARGET/<disk>.<format>` (see the module comment). */
export async function migrateQemuInstant(
  record: InstantVm,
  o: MigrateRequest,
): Promise<{ vm: InstantVm; disks: MigratedDisk[] }> {
  const vm = structuredClone(checkQemuInstantVm(record));
  const data = vm.data as unknown as QemuInstantData;
  const target = resolve(o.target);
  const qmp = await QmpClient.connect(data.qmpSocket, { connectTimeoutMs: 10_000 });
  const results: MigratedDisk[] = [];
  try {
    const nodeNames = async () =>
      new Set(
        (await qmp.execute<Array<{ "node-name": string }>>("query-named-block-nodes", { flat: true })).map(
          (n) => n["node-name"],
        ),
      );
    for (const [i, d] of vm.disks.entries()) {
      const nd = data.disks.find((x) => x.name === d.name)!;
      const size = nd.size;
      if (d.production) {
        results.push({
          disk: d.name,
          path: d.production.path,
          format: d.production.format,
          size,
          copied: 0,
          readyMs: 0,
          pivotMs: 0,
          skipped: true,
        });
        continue;
      }
      o.signal?.throwIfAborted();
      const path = join(target, `${d.name}.${o.format}`);
      // Not "strata-…": backups skip such nodes and doctor --fix removes them as its leftovers.
      const node = `instant-prod${i}`;
      const fileNode = `instant-prod${i}-file`;
      const jobId = `instant-migrate${i}`;
      // Leftovers of an interrupted run: its job and target nodes.
      const jobs = await qmp.execute<Job[]>("query-jobs");
      if (jobs.some((j) => j.id === jobId)) await cancelJob(qmp, jobId);
      let nodes = await nodeNames();
      if (!nodes.has(nd.node) && nodes.has(node)) {
        // Pivoted, but the record was not written: finish the bookkeeping only.
        o.log(`disk ${d.name} had pivoted to ${path} already`);
      } else {
        if (nodes.has(node)) await qmp.execute("blockdev-del", { "node-name": node });
        if (nodes.has(fileNode)) await qmp.execute("blockdev-del", { "node-name": fileNode });
        await runProgram("qemu-img", ["create", "-q", "-f", o.format, path, String(size)]);
        await qmp.execute("blockdev-add", { driver: "file", filename: path, "node-name": fileNode });
        await qmp.execute("blockdev-add", { driver: o.format, file: fileNode, "node-name": node });
        const t0 = Date.now();
        await qmp.execute("blockdev-mirror", {
          "job-id": jobId,
          device: nd.node,
          target: node,
          sync: "full",
          "auto-dismiss": false,
          ...(o.limitBytes
            ? { speed: Math.round(o.limitBytes), "buf-size": mirrorBufferBytes(o.limitBytes) }
            : {}),
          ...(o.active ? { "copy-mode": "write-blocking" } : {}),
        });
        o.progress?.(d.name, 0, size);
        let copied = 0;
        for (;;) {
          if (o.signal?.aborted) {
            await cancelJob(qmp, jobId).catch(() => {});
            o.signal.throwIfAborted();
          }
          const bj = (await qmp.execute<BlockJob[]>("query-block-jobs")).find((j) => j.device === jobId);
          if (bj) {
            copied = bj.len;
            // Not yet the end: `done === total` means moved.
            o.progress?.(
              d.name,
              Math.min(size - 1, Math.round((bj.offset / Math.max(1, bj.len)) * size)),
              size,
            );
            if (bj.ready) break;
          }
          const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === jobId);
          if (!j || j.status === "concluded" || j.status === "aborting" || j.status === "null") {
            const why = j?.error ?? `job ${j?.status ?? "gone"}`;
            if (j) await qmp.execute("job-dismiss", { id: jobId }).catch(() => {});
            throw new StrataError(ErrorCode.EXTERNAL, `mirror of disk ${d.name} to ${path} failed: ${why}`);
          }
          await sleep(200);
        }
        const readyMs = Date.now() - t0;
        // Pivot: from here on the device writes to the production node only.
        await qmp.execute("job-complete", { id: jobId });
        for (;;) {
          const j = (await qmp.execute<Job[]>("query-jobs")).find((x) => x.id === jobId);
          if (!j) break;
          if (j.status === "concluded") {
            await qmp.execute("job-dismiss", { id: jobId });
            if (j.error)
              throw new StrataError(
                ErrorCode.EXTERNAL,
                `pivot of disk ${d.name} to ${path} failed: ${j.error}`,
              );
            break;
          }
          await sleep(50);
        }
        const pivotMs = Date.now() - t0;
        o.progress?.(d.name, size, size);
        results.push({
          disk: d.name,
          path,
          format: o.format,
          size,
          copied,
          readyMs,
          pivotMs,
          skipped: false,
        });
      }
      d.production = { path, format: o.format };
      nd.production = { node, fileNode };
      vm.data = { ...data };
      await o.record(vm);
      // The overlay's file node and the backing chain: monitor-owned, never freed implicitly.
      nodes = await nodeNames();
      for (const n of [nd.node, nd.fileNode, nd.backingNode, nd.nbdNode]) {
        if (nodes.has(n)) await qmp.execute("blockdev-del", { "node-name": n });
      }
    }
  } finally {
    await qmp.close().catch(() => {});
  }
  return { vm, disks: results };
}
