/**
 * Finding (and with fix, removing) what backups left behind on VMs, and reporting what others
 * left: hypervisor snapshots, overlays and bitmaps that hold space ("snapshot sprawl").
 *
 * Strata's own leftovers are found two ways: the state files of runs that died (state.ts), and
 * the VM itself, where everything Strata creates is named "strata-…": fleecing nodes, backup
 * jobs, NBD exports, the temporary bitmap, and a frozen guest.
 */
import { promises as fs } from "node:fs";
import { basename, join, resolve } from "node:path";
import { describeError, ErrorCode, StrataError } from "../../util/errors.js";
import { processAlive } from "../../util/process.js";
import type { Finding } from "../adapter.js";
import { cdpNames, releaseCapture } from "./cdp.js";
import { names, present, release } from "./live.js";
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

/**
 * Inspects one VM over QMP (and its agent); with `fix`, removes Strata's leftovers. What is
 * removed was seen in QEMU's answers just before, so an error of the removing command is a real
 * failure: the finding stays unfixed and says why.
 */
export async function inspectVm(t: DoctorTarget, fix: boolean, stateDir: string): Promise<Finding[]> {
  const out: Finding[] = [];
  const log = () => {};
  const rec = await StateRecord.load(join(stateDir, `${t.vm}.json`));
  // A running `strata protect` keeps its mirrors and nodes for as long as it runs: not leftovers.
  const protect = await StateRecord.load(StateRecord.pathOf(stateDir, t.vm, "protect"));
  const protecting =
    protect !== undefined && protect.data.pid !== process.pid && processAlive(protect.data.pid);
  const inUse = new Set(
    protecting
      ? protect.items.flatMap((i) => (i.kind === "node" ? [i.node] : i.kind === "job" ? [i.id] : []))
      : [],
  );
  const qga =
    t.qga === undefined ? undefined : new QgaClient(t.qga, { timeoutMs: 5000, syncTimeoutMs: 3000 });
  /** Reports a leftover; with `fix` runs `remove` first, and an error leaves it unfixed. */
  const found = async (what: string, remove: () => Promise<unknown>, bytes?: number): Promise<void> => {
    let fixed = false;
    let failure = "";
    if (fix) {
      try {
        await remove();
        fixed = true;
      } catch (err) {
        failure = ` (not removed: ${describeError(err)})`;
      }
    }
    out.push({
      vm: t.vm,
      owner: "strata",
      what: `${what}${failure}`,
      ...(bytes === undefined ? {} : { bytes }),
      fixed,
    });
  };
  let qmp: QmpClient | undefined;
  try {
    qmp = await QmpClient.connect(t.qmp, { connectTimeoutMs: 3000 }).catch(() => undefined);
    if (rec) {
      const items = rec.items.map(
        (i) =>
          `${i.kind}${"node" in i ? ` ${i.node}` : ""}${"id" in i ? ` ${i.id}` : ""}${"name" in i ? ` ${i.name}` : ""}${"path" in i ? ` ${i.path}` : ""}`,
      );
      await found(
        `unfinished run (pid ${rec.data.pid}, ${rec.data.started}): ${items.join(", ") || "nothing listed"}`,
        () => release(qmp, qga, rec, log, { success: false }),
      );
    }
    if (protect && !protecting) {
      await found(
        `unfinished protect (pid ${protect.data.pid}, ${protect.data.started}): ${protect.items.map((i) => i.kind).join(", ") || "nothing listed"}`,
        () => releaseCapture(qmp, protect, log, { success: false }),
      );
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
    const q = qmp;
    const exports = (await q.execute<Array<{ id: string }>>("query-block-exports")).filter((x) =>
      names.isOurs(x.id),
    );
    for (const e of exports) {
      await found(`NBD export ${e.id}`, async () => {
        await q.execute("block-export-del", { id: e.id, mode: "hard" });
        await waitGone(`NBD export ${e.id}`, () => present.export(q, e.id));
      });
    }
    // QMP cannot say whether the NBD server runs: it is Strata's if it listens on the socket a
    // backup with this state directory uses, or if it served Strata's exports.
    const socket = join(resolve(stateDir), `strata-nbd-${t.vm}.sock`);
    if (exports.length > 0 || (await present.nbdServer(socket))) {
      await found(`QEMU's NBD server started by a backup`, () => q.execute("nbd-server-stop"));
    }
    const jobs = (await q.execute<Array<{ id: string; status: string }>>("query-jobs")).filter(
      (x) => names.isOurs(x.id) && !inUse.has(x.id),
    );
    for (const j of jobs) {
      await found(`block job ${j.id}`, async () => {
        if (j.status === "concluded") await q.execute("job-dismiss", { id: j.id });
        else if (j.status !== "aborting" && j.status !== "null")
          await q.execute("block-job-cancel", { device: j.id, force: true });
        await waitGone(`block job ${j.id}`, async () => (await present.job(q, j.id)) !== undefined);
      });
    }
    const nodes = await q.execute<
      Array<{ "node-name": string; file: string; image: { "actual-size"?: number } }>
    >("query-named-block-nodes", { flat: true });
    for (const n of nodes.filter((x) => names.isOurs(x["node-name"]) && !inUse.has(x["node-name"]))) {
      await found(
        `fleecing node ${n["node-name"]} (${n.file})`,
        async () => {
          await q.execute("blockdev-del", { "node-name": n["node-name"] });
          // Its image, when it is one Strata made (a fleecing file is a plain absolute path).
          if (n.file.startsWith("/") && basename(n.file).startsWith("strata-fleece-"))
            await fs.rm(n.file, { force: true });
        },
        n.image["actual-size"],
      );
    }
    const blocks = await q.execute<BlockEntry[]>("query-block");
    for (const b of blocks) {
      const ins = b.inserted;
      if (!ins) continue;
      const dev = b.device || b.qdev || ins["node-name"];
      // Jobs keep bitmaps without a name; those are not anybody's leftovers.
      for (const bm of (ins["dirty-bitmaps"] ?? []).filter((x) => x.name !== undefined)) {
        const size = Math.ceil(ins.image["virtual-size"] / bm.granularity / 8);
        if (bm.name === names.tmpBitmap) {
          await found(
            `temporary bitmap ${bm.name} on ${dev}`,
            () => q.execute("block-dirty-bitmap-remove", { node: ins["node-name"], name: bm.name }),
            size,
          );
        } else if (cdpNames.isBitmap(bm.name) && !protecting) {
          // A dead protect's bitmap (what its journal may lack): kept for a resume, a leftover
          // once nobody resumes.
          await found(
            `protect's dirty bitmap ${bm.name} on ${dev} (no protect runs; resume it or remove it)`,
            () => q.execute("block-dirty-bitmap-remove", { node: ins["node-name"], name: bm.name }),
            size,
          );
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
      // No agent (or none answering) is no finding: a frozen guest is what is looked for.
      const status = await qga.fsfreezeStatus({ timeoutMs: 3000 }).catch(() => undefined);
      if (status === "frozen") {
        await found("guest filesystems frozen", async () => {
          await qga.fsfreezeThaw({ timeoutMs: 5000 });
          const after = await qga.fsfreezeStatus({ timeoutMs: 5000 });
          if (after !== "thawed") throw new Error(`the agent says ${after} after the thaw`);
        });
      }
    }
    const status = await q.execute<{ status: string }>("query-status");
    if (rec?.items.some((i) => i.kind === "paused") && status.status === "paused") {
      await found("VM left paused by a backup", () => q.execute("cont"));
    }
  } finally {
    await qga?.close().catch(() => {});
    await qmp?.close().catch(() => {});
  }
  return out;
}

/** Waits (10 s at most) until `exists` says false. */
async function waitGone(what: string, exists: () => Promise<boolean>): Promise<void> {
  for (let i = 0; i < 400; i++) {
    if (!(await exists())) return;
    await new Promise((r) => setTimeout(r, 25));
  }
  throw new StrataError(ErrorCode.TIMEOUT, `${what} was still there after 10 s`);
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
  const seen = new Set<string>();
  for (const r of await StateRecord.all(stateDir)) {
    if (seen.has(r.data.vm)) continue;
    seen.add(r.data.vm);
    const t: DoctorTarget = { vm: r.data.vm, qmp: r.data.qmp, ...(r.data.qga ? { qga: r.data.qga } : {}) };
    findings.push(...(await inspectVm(t, fix, stateDir)));
  }
  findings.push(...(await strayFiles(stateDir, fix)));
  return findings;
}
