/**
 * A backup of a shut-off libvirt domain: its images are exported read-only by
 * qemu-storage-daemon (which takes QEMU's image locks, so the domain cannot start and write
 * while they are read) and read over NBD.
 *
 * libvirt 9.0 creates no checkpoint on an inactive domain ("cannot create checkpoint for inactive
 * domain"), but QEMU stored every checkpoint's bitmap in the qcow2 images when it exited. So the
 * read is incremental when the previous restore point's checkpoint is still defined and its
 * bitmap is in each image with no "in-use" flag (an image QEMU did not close cleanly has it): the
 * bitmap is exported as `qemu:dirty-bitmap:NAME`. The restore point keeps the same checkpoint
 * record: its bitmap holds every change since it was made, a superset of the changes since this
 * restore point, so the next backup (live or not) builds on it correctly.
 *
 * Consistency: `clean-shutdown` when libvirt says the domain was shut down by its guest,
 * otherwise (destroyed, crashed) `crash-consistent`.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import { StorageDaemon } from "../../image/storage-daemon.js";
import { BASE_ALLOCATION, NbdClient } from "../../nbd/index.js";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { runProgram } from "../../util/process.js";
import type { BackupRequest, BackupSession, SessionDisk } from "../adapter.js";
import { describeDomain, type LibvirtCheckpointRecord, nbdDisk, previousCheckpoint } from "./backup.js";
import { backupDisks, parseDomain } from "./domain.js";
import { LibvirtState, stateDirOf } from "./state.js";
import type { Virsh } from "./virsh.js";

async function bitmapsOf(file: string): Promise<Array<{ name: string; flags: string[] }>> {
  const text = await runProgram("qemu-img", ["info", "--output=json", "-f", "qcow2", file]);
  const j = JSON.parse(text) as {
    "format-specific"?: { data?: { bitmaps?: Array<{ name: string; flags: string[] }> } };
  };
  return (j["format-specific"]?.data?.bitmaps ?? []).filter(
    (b) => typeof b.name === "string" && Array.isArray(b.flags),
  );
}

export async function openOfflineBackup(
  virsh: Virsh,
  domain: string,
  req: BackupRequest,
): Promise<BackupSession> {
  const reasonText = (await virsh.run(["domstate", domain, "--reason"])).trim();
  const consistency = /\(shutdown\)/.test(reasonText) ? "clean-shutdown" : "crash-consistent";
  const xml = await virsh.run(["dumpxml", "--inactive", domain]);
  const info = parseDomain(xml, `domain ${domain}`);
  const disks = backupDisks(info);
  if (disks.length === 0)
    throw new StrataError(ErrorCode.SOURCE_UNREADABLE, `domain ${domain} has no disk to back up`);
  for (const d of disks) {
    if (d.type !== "file" && d.type !== "block")
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `disk ${d.target} of domain ${domain} is of type ${d.type}; Strata backs up file and block disks only`,
      );
  }
  // Which disks can be read through the previous checkpoint's bitmap.
  const reasons = new Map<string, string>();
  let base: LibvirtCheckpointRecord | undefined;
  if (req.previous) {
    const { record, reason } = previousCheckpoint(req, info.uuid);
    let why = reason;
    if (record) {
      const present = (await virsh.run(["checkpoint-list", domain, "--name"]))
        .split("\n")
        .map((l) => l.trim());
      if (present.includes(record.checkpoint)) base = record;
      else why = `checkpoint ${record.checkpoint} is gone from the domain`;
    }
    if (why !== undefined) for (const d of disks) reasons.set(d.target, why);
  }
  const bitmapOf = new Map<string, string>();
  for (const d of disks) {
    if (d.format !== "qcow2") {
      reasons.set(d.target, `libvirt keeps no checkpoint bitmap on a ${d.format || "raw"} disk`);
      continue;
    }
    if (!base) continue;
    if (!base.disks.some((b) => b.name === d.target)) {
      reasons.set(d.target, `checkpoint ${base.checkpoint} does not track disk ${d.target}`);
      continue;
    }
    const b = (await bitmapsOf(d.source!)).find((x) => x.name === base.checkpoint);
    if (!b) reasons.set(d.target, `bitmap ${base.checkpoint} is missing from ${d.source}`);
    else if (b.flags.includes("in-use"))
      reasons.set(
        d.target,
        `bitmap ${base.checkpoint} in ${d.source} is inconsistent (QEMU did not close the image cleanly)`,
      );
    else bitmapOf.set(d.target, base.checkpoint);
  }

  const rec = await LibvirtState.create(req.stateDir, virsh.uri, domain);
  const runDir = join(resolve(stateDirOf(req.stateDir)), `${domain}.run`);
  const clients: NbdClient[] = [];
  let daemon: StorageDaemon | undefined;
  let finished = false;
  const finish = async (_ok: boolean): Promise<void> => {
    if (finished) return;
    finished = true;
    for (const c of clients) await c.close().catch(() => {});
    if (daemon) {
      await daemon.stop().catch((e: unknown) => req.log(`stopping qemu-storage-daemon: ${describeError(e)}`));
      await rec.remove({ kind: "process", pid: daemon.pid ?? 0, marker: daemon.socket });
    }
    await fs.rm(runDir, { recursive: true, force: true });
    for (const i of [...rec.items]) if (i.kind === "dir") await rec.remove(i);
    await rec.finish();
  };
  try {
    await rec.add({ kind: "dir", path: runDir });
    await fs.mkdir(runDir, { recursive: true, mode: 0o700 });
    daemon = await StorageDaemon.start(
      disks.map((d) => ({
        path: d.source!,
        format: d.format || "raw",
        name: d.target,
        ...(bitmapOf.has(d.target) ? { bitmaps: [bitmapOf.get(d.target)!] } : {}),
      })),
      { runDir },
    ).catch((err: unknown) => {
      throw new StrataError(
        ErrorCode.SOURCE_UNREADABLE,
        `cannot open the images of ${domain} read-only (${describeError(err)}); is the domain starting?`,
        { cause: err },
      );
    });
    await rec.add({ kind: "process", pid: daemon.pid ?? 0, marker: daemon.socket });
    const sessionDisks: SessionDisk[] = [];
    const sizes: Array<{ name: string; size: number }> = [];
    for (const d of disks) {
      const bm = bitmapOf.get(d.target);
      const dirty = bm === undefined ? undefined : `qemu:dirty-bitmap:${bm}`;
      const client = await NbdClient.connect(
        { path: daemon.socket },
        { exportName: d.target, metaContexts: [BASE_ALLOCATION, ...(dirty ? [dirty] : [])] },
      );
      clients.push(client);
      sessionDisks.push(
        nbdDisk(
          client,
          d,
          `libvirt:${domain} ${d.target} (${d.source}, shut off)`,
          dirty,
          req.previous?.time,
          reasons.get(d.target),
        ),
      );
      sizes.push({ name: d.target, size: client.size });
    }
    return {
      disks: sessionDisks,
      mode: "offline",
      consistency,
      // The previous checkpoint goes on: its bitmap covers every change since this restore point.
      checkpoint: base ?? null,
      config: await describeDomain(virsh, domain, sizes),
      details: { domainState: reasonText },
      finish,
    };
  } catch (err) {
    await finish(false).catch((e: unknown) =>
      req.log(`cleanup after a failed backup start: ${describeError(e)}`),
    );
    throw err;
  }
}
