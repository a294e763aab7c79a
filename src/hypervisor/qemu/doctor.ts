/**
 * Finding (and with fix, removing) what backups left behind on VMs, and reporting what others
 * left: hypervisor snapshots, overlays and bitmaps that hold space ("snapshot sprawl").
 *
 * Strata's own leftovers are found two ways: the state files of runs that died (state.ts), and
 * the VM itself, where everything Strata creates is named "strata-…": fleecing nodes, backup
 * jobs, NBD exports, the temporary bitmap, and a frozen guest.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { processAlive } from "../../util/process.js";
import type { Finding } from "../adapter.js";
import { names, release } from "./live.js";
import { QgaClient } from "./qga.js";
import { QmpClient } from "./qmp.js";
import { StateRecord } from "./state.js";

export type { Finding };

interface BlockEntry {
  device: string;
  qdev?: string;
  inserted?: {
    "node-name": string;
    image: {
      filename: string;
      "actual-size"?: number;
      "virtual-size": number;
      snapshots?: Array<{ name: string; "vm-state-size": number }>;
      "backing-image"?: { filename: string; "actual-size"?: number };
    };
    "dirty-bitmaps"?: Array<{ name: string; granularity: number; busy: boolean; inconsistent?: boolean }>;
  };
}

export interface DoctorTarget {
  vm: string;
  qmp: string;
  qga?: string;
}

/** Inspects one VM over QMP (and its agent); with `fix`, removes Strata's leftovers. */
export async function inspectVm(t: DoctorTarget, fix: boolean, stateDir: string): Promise<Finding[]> {
  const out: Finding[] = [];
  const log = () => {};
  const rec = await StateRecord.load(join(stateDir, `${t.vm}.json`));
  const qga =
    t.qga === undefined ? undefined : new QgaClient(t.qga, { timeoutMs: 5000, syncTimeoutMs: 3000 });
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(t.qmp, { connectTimeoutMs: 3000 }).catch(() => undefined);
    if (rec) {
      const items = rec.items.map(
        (i) =>
          `${i.kind}${"node" in i ? ` ${i.node}` : ""}${"id" in i ? ` ${i.id}` : ""}${"name" in i ? ` ${i.name}` : ""}${"path" in i ? ` ${i.path}` : ""}`,
      );
      let fixed = false;
      if (fix) {
        await release(qmp, qga, rec, log, { success: false });
        fixed = true;
      }
      out.push({
        vm: t.vm,
        owner: "strata",
        what: `unfinished run (pid ${rec.data.pid}, ${rec.data.started}): ${items.join(", ") || "nothing listed"}`,
        fixed,
      });
    }
    if (!qmp) {
      out.push({
        vm: t.vm,
        owner: "strata",
        what: `VM not reachable at ${t.qmp}: cannot inspect it`,
        fixed: false,
      });
      return out;
    }
    const exports = await qmp.execute<Array<{ id: string }>>("query-block-exports");
    for (const e of exports.filter((x) => names.isOurs(x.id))) {
      if (fix) await qmp.execute("block-export-del", { id: e.id, mode: "hard" }).catch(() => {});
      out.push({ vm: t.vm, owner: "strata", what: `NBD export ${e.id}`, fixed: fix });
    }
    if (exports.some((x) => names.isOurs(x.id)) && fix) await waitNoExports(qmp);
    if (fix && exports.some((x) => names.isOurs(x.id))) await qmp.execute("nbd-server-stop").catch(() => {});
    const jobs = await qmp.execute<Array<{ id: string }>>("query-jobs");
    for (const j of jobs.filter((x) => names.isOurs(x.id))) {
      if (fix) {
        await qmp.execute("block-job-cancel", { device: j.id, force: true }).catch(() => {});
        await waitNoJob(qmp, j.id);
      }
      out.push({ vm: t.vm, owner: "strata", what: `block job ${j.id}`, fixed: fix });
    }
    const nodes = await qmp.execute<
      Array<{ "node-name": string; file: string; image: { "actual-size"?: number } }>
    >("query-named-block-nodes", { flat: true });
    for (const n of nodes.filter((x) => names.isOurs(x["node-name"]))) {
      if (fix) await qmp.execute("blockdev-del", { "node-name": n["node-name"] }).catch(() => {});
      if (fix) await fs.rm(n.file, { force: true }).catch(() => {});
      out.push({
        vm: t.vm,
        owner: "strata",
        what: `fleecing node ${n["node-name"]} (${n.file})`,
        ...(n.image["actual-size"] === undefined ? {} : { bytes: n.image["actual-size"] }),
        fixed: fix,
      });
    }
    const blocks = await qmp.execute<BlockEntry[]>("query-block");
    for (const b of blocks) {
      const ins = b.inserted;
      if (!ins) continue;
      const dev = b.device || b.qdev || ins["node-name"];
      // Jobs keep bitmaps without a name; those are not anybody's leftovers.
      for (const bm of (ins["dirty-bitmaps"] ?? []).filter((x) => x.name !== undefined)) {
        const size = Math.ceil(ins.image["virtual-size"] / bm.granularity / 8);
        if (bm.name === names.tmpBitmap) {
          if (fix)
            await qmp
              .execute("block-dirty-bitmap-remove", { node: ins["node-name"], name: bm.name })
              .catch(() => {});
          out.push({
            vm: t.vm,
            owner: "strata",
            what: `temporary bitmap ${bm.name} on ${dev}`,
            bytes: size,
            fixed: fix,
          });
        } else if (!names.isOurs(bm.name)) {
          out.push({
            vm: t.vm,
            owner: "foreign",
            what: `dirty bitmap ${bm.name} on ${dev}${bm.inconsistent ? " (inconsistent)" : ""}`,
            bytes: size,
            fixed: false,
          });
        }
      }
      for (const s of ins.image.snapshots ?? []) {
        out.push({
          vm: t.vm,
          owner: "foreign",
          what: `internal snapshot "${s.name}" in ${ins.image.filename}`,
          bytes: s["vm-state-size"],
          fixed: false,
        });
      }
      let backing = ins.image["backing-image"];
      let depth = 0;
      while (backing) {
        depth++;
        out.push({
          vm: t.vm,
          owner: "foreign",
          what: `overlay chain of ${dev}: ${ins.image.filename} sits on ${backing.filename} (layer ${depth})`,
          ...(ins.image["actual-size"] === undefined ? {} : { bytes: ins.image["actual-size"] }),
          fixed: false,
        });
        backing = (backing as { "backing-image"?: typeof backing })["backing-image"];
      }
    }
    if (qga) {
      const status = await qga.fsfreezeStatus({ timeoutMs: 3000 }).catch(() => undefined);
      if (status === "frozen") {
        if (fix) await qga.fsfreezeThaw({ timeoutMs: 5000 }).catch(() => {});
        out.push({ vm: t.vm, owner: "strata", what: "guest filesystems frozen", fixed: fix });
      }
    }
    const status = await qmp.execute<{ status: string }>("query-status");
    if (rec?.items.some((i) => i.kind === "paused") && status.status === "paused") {
      if (fix) await qmp.execute("cont").catch(() => {});
      out.push({ vm: t.vm, owner: "strata", what: "VM left paused by a backup", fixed: fix });
    }
  } finally {
    await qga?.close().catch(() => {});
    await qmp?.close().catch(() => {});
  }
  return out;
}

async function waitNoExports(qmp: QmpClient): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const ex = await qmp.execute<Array<{ id: string }>>("query-block-exports");
    if (!ex.some((e) => names.isOurs(e.id))) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function waitNoJob(qmp: QmpClient, id: string): Promise<void> {
  for (let i = 0; i < 200; i++) {
    const jobs = await qmp.execute<Array<{ id: string }>>("query-jobs");
    if (!jobs.some((j) => j.id === id)) return;
    await new Promise((r) => setTimeout(r, 25));
  }
}

/** Fleecing images in the state directory that no state file or VM accounts for. */
export async function strayFiles(stateDir: string, fix: boolean): Promise<Finding[]> {
  const out: Finding[] = [];
  let entries: string[];
  try {
    entries = await fs.readdir(stateDir);
  } catch {
    return out;
  }
  // A state file being rewritten when its run was killed leaves "<vm>.json.tmp-<hex>".
  for (const e of entries) {
    const m = /^(.+)\.json\.tmp-[0-9a-f]+$/.exec(e);
    if (!m) continue;
    const rec = await StateRecord.load(join(stateDir, `${m[1]}.json`)).catch(() => undefined);
    if (rec && rec.data.pid !== process.pid && processAlive(rec.data.pid)) continue;
    if (fix) await fs.rm(join(stateDir, e), { force: true });
    out.push({ vm: m[1]!, owner: "strata", what: `unfinished state file ${join(stateDir, e)}`, fixed: fix });
  }
  const records = await StateRecord.all(stateDir);
  const listed = new Set(records.flatMap((r) => r.items.flatMap((i) => (i.kind === "file" ? [i.path] : []))));
  for (const e of entries.filter((n) => n.startsWith("strata-fleece-") && n.endsWith(".qcow2"))) {
    const path = join(stateDir, e);
    if (listed.has(path)) continue;
    const st = await fs.stat(path).catch(() => undefined);
    if (fix) await fs.rm(path, { force: true });
    out.push({
      vm: "-",
      owner: "strata",
      what: `stray fleecing image ${path}`,
      ...(st ? { bytes: st.blocks * 512 } : {}),
      fixed: fix,
    });
  }
  return out;
}

/**
 * Every unfinished run recorded in `stateDir` (each VM inspected through the QMP socket its record
 * names), and the stray files there.
 */
export async function stateDirLeftovers(stateDir: string, fix: boolean): Promise<Finding[]> {
  const findings: Finding[] = [];
  for (const r of await StateRecord.all(stateDir)) {
    const t: DoctorTarget = { vm: r.data.vm, qmp: r.data.qmp, ...(r.data.qga ? { qga: r.data.qga } : {}) };
    findings.push(...(await inspectVm(t, fix, stateDir)));
  }
  findings.push(...(await strayFiles(stateDir, fix)));
  return findings;
}
