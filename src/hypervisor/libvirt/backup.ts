/**
 * A backup of a running libvirt domain through libvirt's own backup API (pull mode), never by
 * fighting libvirt for the domain's QMP socket:
 *
 *  1. decide which disks can be read incrementally: the previous restore point's
 *     {@link LibvirtCheckpointRecord} names a checkpoint of this repository on this domain (by
 *     UUID), and the checkpoint is there — or is defined again from the XML the record kept
 *     (`checkpoint-create --redefine`, after the domain was undefined and defined again);
 *  2. freeze the guest's filesystems through the agent (`domfsfreeze`) or suspend the domain,
 *     `backup-begin` with a backup XML (pull mode, unix socket and scratch files in the state
 *     directory, `incremental` per disk) and a checkpoint XML, so the next checkpoint starts at
 *     the same instant as the point-in-time view; thaw or resume at once;
 *  3. read each disk's export (named after its target) with Strata's NBD client:
 *     `base:allocation`, and `qemu:dirty-bitmap:backup-<disk>` for incrementals.
 *
 * If libvirt refuses the incremental because a bitmap is missing or broken (restored disks, a
 * QEMU killed before it could store its bitmaps), the broken checkpoint is deleted and the backup
 * begins again as a full one, with the reason in every disk's `fullReadReason`.
 *
 * finish(ok) ends the pull job (`domjobabort`, after checking the job is this run's by its
 * socket), removes the socket directory, and keeps exactly one checkpoint of this repository:
 * the new one when the restore point was committed (older ones are deleted), the previous one
 * otherwise (the new one is deleted). In libvirt 9.0 every checkpoint's bitmap keeps recording
 * until it is deleted, and deleting a checkpoint only drops its own bitmap (no merge into the
 * parent is needed or done): the previous checkpoint's bitmap still holds every change since it
 * was made, so a failed backup forgets nothing.
 */
import { promises as fs } from "node:fs";
import { join, resolve } from "node:path";
import { z } from "zod";
import { BASE_ALLOCATION, NbdClient, StateFlag } from "../../nbd/index.js";
import { describeError, ErrorCode, isStrataError, StrataError } from "../../util/errors.js";
import { processAlive } from "../../util/process.js";
import { list, matching, schemaProblem, text, whole } from "../../util/schema.js";
import type {
  BackupRequest,
  BackupSession,
  CheckpointRecord,
  Extent,
  SessionDisk,
  VmConfigDocument,
} from "../adapter.js";
import { checkReachable, qemuUser } from "./access.js";
import { backupDisks, CHECKPOINT_RE, type DomainDisk, type DomainInfo, parseDomain } from "./domain.js";
import { openOfflineBackup } from "./offline.js";
import { LibvirtState, type LibvirtStateItem, stateDirOf } from "./state.js";
import { type Virsh, VirshError } from "./virsh.js";
import { at, buildXml, kid, kids, parseXml, removeKids, textOf, xmlEscape } from "./xml.js";

export const CHECKPOINT_KIND = "libvirt-checkpoint";

/** What a restore point keeps so that the next backup can be incremental. */
export interface LibvirtCheckpointRecord extends CheckpointRecord {
  kind: typeof CHECKPOINT_KIND;
  repository: string;
  domain: string;
  uuid: string;
  checkpoint: string;
  disks: Array<{ name: string; size: number }>;
  /** `checkpoint-dumpxml` of the checkpoint, to `--redefine` it; null when it was too large. */
  xml: string | null;
}

/** Checkpoints Strata makes: `strata-<first 12 hex of the repository id>-<UTC time>`. */
export const checkpointNames = {
  prefix: (repository: string) =>
    `strata-${repository
      .replace(/[^0-9a-f]/gi, "")
      .slice(0, 12)
      .toLowerCase()}-`,
  make(repository: string, now: Date): string {
    const t = now.toISOString().replace(/[-:.]/g, "").replace("T", "t").replace("Z", "z");
    return `${checkpointNames.prefix(repository)}${t}`;
  },
  isOurs: (name: string) => CHECKPOINT_RE.test(name),
};

/** What a checkpoint record read back from a manifest must hold. */
const LibvirtCheckpointSchema = z.object({
  kind: z.literal(CHECKPOINT_KIND),
  repository: text("the repository id", 256),
  domain: text("the domain", 256),
  uuid: text("the UUID", 64),
  checkpoint: matching("the checkpoint", CHECKPOINT_RE, "one Strata makes"),
  disks: list(
    z.object({ name: text("the disk name", 256), size: whole("the disk size", Number.MAX_SAFE_INTEGER) }),
    "the disks",
    256,
  ),
  xml: text("the checkpoint XML", 1024 * 1024).nullable(),
});

/** Validates a checkpoint record read back from a manifest; undefined and a reason if unusable. */
export function readCheckpointRecord(c: CheckpointRecord | null | undefined): {
  record?: LibvirtCheckpointRecord;
  reason?: string;
} {
  if (!c) return { reason: "the previous restore point has no checkpoint" };
  if (c.kind !== CHECKPOINT_KIND)
    return { reason: `the previous restore point's checkpoint is a ${String(c.kind)}` };
  const r = LibvirtCheckpointSchema.safeParse(c);
  if (!r.success)
    return {
      reason: `the previous restore point's checkpoint record is malformed (${schemaProblem(LibvirtCheckpointSchema, c)})`,
    };
  return { record: r.data };
}

/**
 * The checkpoint the latest restore point recorded, when it is this repository's and was made on
 * this domain (same UUID); else why the backup can't build on it.
 */
export function previousCheckpoint(
  req: Pick<BackupRequest, "previous" | "repository">,
  uuid: string,
): { record?: LibvirtCheckpointRecord; reason?: string } {
  const { record, reason } = readCheckpointRecord(req.previous?.checkpoint);
  if (!record) return { reason: reason ?? "no checkpoint" };
  if (record.repository !== req.repository)
    return { reason: "the previous checkpoint belongs to another repository" };
  if (record.uuid !== uuid) return { reason: `the domain's UUID changed (${record.uuid} → ${uuid})` };
  return { record };
}

export interface LibvirtBackupOptions {
  virsh: Virsh;
  domain: string;
  request: BackupRequest;
  /** Time source for checkpoint names (tests). */
  now?: () => Date;
}

/** libvirt's state of a domain, as `virsh domstate` prints it. */
export async function domainState(virsh: Virsh, domain: string): Promise<string> {
  return (await virsh.run(["domstate", domain])).trim().split("\n")[0]!.trim();
}

async function checkpointList(virsh: Virsh, domain: string): Promise<string[]> {
  return (await virsh.run(["checkpoint-list", domain, "--name"]))
    .split("\n")
    .map((l) => l.trim())
    .filter((l) => l !== "");
}

/** Makes `dir` and hands it to the user QEMU runs as, checking QEMU can reach it. */
async function prepareRunDir(dir: string, dac: DomainInfo["dacLabel"]): Promise<void> {
  await fs.mkdir(dir, { recursive: true, mode: 0o700 });
  const user = dac ?? (await qemuUser());
  await fs.chown(dir, user.uid, user.gid);
  // QEMU opens the scratch files and binds the socket by path: every parent must be searchable.
  await checkReachable(join(dir, "nbd.sock"), user, "the backup's socket directory");
}

function backupXml(
  socket: string,
  runDir: string,
  all: readonly DomainDisk[],
  chosen: readonly DomainDisk[],
  incremental: ReadonlyMap<string, string>,
): string {
  const lines = [
    `<domainbackup mode='pull'>`,
    `  <server transport='unix' socket='${xmlEscape(socket)}'/>`,
    "  <disks>",
  ];
  for (const d of all) {
    if (!chosen.includes(d)) {
      lines.push(`    <disk name='${d.target}' backup='no'/>`);
      continue;
    }
    const inc = incremental.get(d.target);
    const mode = inc === undefined ? "backupmode='full'" : `backupmode='incremental' incremental='${inc}'`;
    lines.push(
      `    <disk name='${d.target}' backup='yes' type='file' ${mode}>`,
      `      <scratch file='${xmlEscape(join(runDir, `scratch-${d.target}.qcow2`))}'/>`,
      "    </disk>",
    );
  }
  lines.push("  </disks>", "</domainbackup>", "");
  return lines.join("\n");
}

function checkpointXml(name: string, all: readonly DomainDisk[], tracked: ReadonlySet<string>): string {
  const lines = [
    "<domaincheckpoint>",
    `  <name>${name}</name>`,
    "  <description>strata backup checkpoint</description>",
    "  <disks>",
    ...all.map(
      (d) => `    <disk name='${d.target}' checkpoint='${tracked.has(d.target) ? "bitmap" : "no"}'/>`,
    ),
    "  </disks>",
    "</domaincheckpoint>",
    "",
  ];
  return lines.join("\n");
}

/** A checkpoint XML ready to `--redefine`: the parent dropped (bitmaps do not depend on it). */
export function redefinableXml(xml: string): string {
  const cp = parseXml(xml, "domaincheckpoint", "stored checkpoint XML");
  removeKids(cp, "parent");
  return buildXml(cp);
}

/** What libvirt 9.0 says when a checkpoint's bitmap is gone or unusable (seen: "checkpoint inconsistent: missing or broken bitmap"). */
const BITMAP_REFUSAL_RE = /missing or broken bitmap|checkpoint inconsistent|not found in backing chain/i;

/** Whether `err` is libvirt refusing an incremental backup because of its checkpoint or bitmap. */
function brokenChain(err: unknown): boolean {
  return err instanceof VirshError && BITMAP_REFUSAL_RE.test(err.stderr);
}

export async function openLibvirtBackup(o: LibvirtBackupOptions): Promise<BackupSession> {
  const { virsh, domain, request: req } = o;
  const log = req.log;
  const state = await domainState(virsh, domain);
  await releaseStale(virsh, req.stateDir, domain, log);
  if (state === "shut off") return openOfflineBackup(virsh, domain, req);
  if (state !== "running" && state !== "paused") {
    throw new StrataError(
      ErrorCode.SOURCE_UNREADABLE,
      `domain ${domain} is ${state}: back it up running, paused or shut off`,
    );
  }
  if (req.mode === "offline") {
    throw new StrataError(
      ErrorCode.USAGE,
      `domain ${domain} is ${state}: an offline backup needs it shut off (shutting it down for the backup is not supported for libvirt domains yet)`,
    );
  }
  // Another tool's pull job (virtnbdbackup, ...) holds the domain: libvirt would block a second
  // backup-begin for 30 s on its state lock and then fail obscurely. Say so at once.
  if (/Operation:\s+Backup/.test(await virsh.run(["domjobinfo", domain]))) {
    const socket = await jobSocket(virsh, domain).catch(() => undefined);
    throw new StrataError(
      ErrorCode.LOCKED,
      `domain ${domain} is running another tool's backup job${socket ? ` (NBD socket ${socket})` : ""}: try again once it has ended`,
    );
  }
  const present = await checkpointList(virsh, domain);
  const foreign = present.filter((n) => !checkpointNames.isOurs(n));
  if (foreign.some((n) => n.startsWith("virtnbdbackup."))) {
    log(
      `${domain} also has virtnbdbackup checkpoints (${foreign.join(", ")}): Strata's chain does not depend on them, but virtnbdbackup refuses to run ("Foreign checkpoint found") while a checkpoint it did not create, such as Strata's, exists on the domain`,
    );
  }
  const info = parseDomain(await virsh.run(["dumpxml", domain]), `domain ${domain}`);
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
  const tracked = new Set(disks.filter((d) => d.format === "qcow2").map((d) => d.target));
  const reasons = new Map<string, string>();
  for (const d of disks) {
    if (!tracked.has(d.target))
      reasons.set(d.target, `libvirt keeps no checkpoint bitmap on a ${d.format || "raw"} disk`);
  }

  // 1. The chain.
  let base: LibvirtCheckpointRecord | undefined;
  if (req.previous) {
    const { record, reason } = previousCheckpoint(req, info.uuid);
    let why = reason;
    if (record) {
      if (present.includes(record.checkpoint)) base = record;
      else if (record.xml === null) why = `checkpoint ${record.checkpoint} is gone from the domain`;
      else {
        try {
          await redefine(virsh, domain, record.xml, req.stateDir);
          log(
            `checkpoint ${record.checkpoint} was not defined on ${domain}; redefined it from the restore point`,
          );
          base = record;
        } catch (err) {
          why = `checkpoint ${record.checkpoint} is gone from the domain and could not be redefined (${describeError(err)})`;
        }
      }
    }
    if (why !== undefined) for (const d of disks) if (!reasons.has(d.target)) reasons.set(d.target, why);
  }
  const incremental = new Map<string, string>();
  if (base) {
    for (const d of disks) {
      if (!tracked.has(d.target)) continue;
      if (base.disks.some((b) => b.name === d.target)) incremental.set(d.target, base.checkpoint);
      else reasons.set(d.target, `checkpoint ${base.checkpoint} does not track disk ${d.target}`);
    }
  }

  // 2. Cut the view.
  const rec = await LibvirtState.create(req.stateDir, virsh.uri, domain);
  const runDir = join(resolve(stateDirOf(req.stateDir)), `${domain}.run`);
  const socket = join(runDir, "nbd.sock");
  if (socket.length > 107)
    throw new StrataError(ErrorCode.USAGE, `state directory path too long for a unix socket: ${socket}`);
  const clients: NbdClient[] = [];
  const now = o.now ?? (() => new Date());
  const newCheckpoint = checkpointNames.make(req.repository, now());
  let finished = false;
  const details: Record<string, number | string> = {};
  const finish = async (ok: boolean): Promise<void> => {
    if (finished) return;
    finished = true;
    for (const c of clients) await c.close().catch(() => {});
    await release(virsh, rec, log, ok);
    if (ok) await deleteOlder(virsh, domain, req.repository, newCheckpoint, log);
  };
  try {
    await rec.add({ kind: "dir", path: runDir });
    await fs.rm(runDir, { recursive: true, force: true });
    await prepareRunDir(runDir, info.dacLabel);
    const bxmlPath = join(runDir, "backup.xml");
    const cxmlPath = join(runDir, "checkpoint.xml");
    await fs.writeFile(cxmlPath, checkpointXml(newCheckpoint, info.disks, tracked));
    const begin = async (inc: ReadonlyMap<string, string>) => {
      await fs.writeFile(bxmlPath, backupXml(socket, runDir, info.disks, disks, inc));
      await rec.add({ kind: "checkpoint", name: newCheckpoint });
      await rec.add({ kind: "job", socket });
      const t0 = Date.now();
      await virsh.run(["backup-begin", domain, bxmlPath, cxmlPath], { timeoutMs: 120_000 });
      details.backupBeginMs = Date.now() - t0;
    };
    let cut: Awaited<ReturnType<typeof quiesced>>;
    try {
      cut = await quiesced(virsh, rec, domain, req, state, () => begin(incremental));
    } catch (err) {
      if (incremental.size === 0 || !brokenChain(err)) throw err;
      // libvirt refused the incremental (a missing or broken bitmap): full backup, new chain.
      const text = (err as VirshError).stderr;
      await strikeFailedBegin(virsh, rec, domain, newCheckpoint);
      const why = `libvirt refused an incremental from checkpoint ${base!.checkpoint} (${text})`;
      log(`${domain}: ${why}; deleting that checkpoint and reading every disk`);
      await deleteCheckpoint(virsh, domain, base!.checkpoint, log).catch((e: unknown) =>
        log(`could not delete checkpoint ${base!.checkpoint}: ${describeError(e)}`),
      );
      for (const d of incremental.keys()) reasons.set(d, why);
      incremental.clear();
      cut = await quiesced(virsh, rec, domain, req, state, () => begin(incremental));
    }
    details.quiescedMs = cut.quiescedMs;
    details.frozen = cut.frozen;
    details.checkpoint = newCheckpoint;
    if (foreign.length > 0) details.foreignCheckpoints = foreign.join(", ");

    // 3. The exports.
    const bx = parseXml(await virsh.run(["backup-dumpxml", domain]), "domainbackup", "backup-dumpxml");
    const serverSocket = at(bx, "server")?.attrs.socket;
    if (serverSocket !== socket)
      throw new StrataError(
        ErrorCode.EXTERNAL,
        `the domain's backup job is not this run's (socket ${String(serverSocket)}); another backup tool is using ${domain}`,
      );
    const exported = new Map(kids(at(bx, "disks"), "disk").map((x) => [x.attrs.name ?? "", x.attrs]));
    const sessionDisks: SessionDisk[] = [];
    const sizes: Array<{ name: string; size: number }> = [];
    for (const d of disks) {
      const a = exported.get(d.target);
      if (a?.backup !== "yes")
        throw new StrataError(ErrorCode.EXTERNAL, `libvirt did not export disk ${d.target} of ${domain}`);
      const exportName = a.exportname ?? d.target;
      const bitmap = incremental.has(d.target) ? a.exportbitmap : undefined;
      if (incremental.has(d.target) && !bitmap)
        throw new StrataError(ErrorCode.EXTERNAL, `libvirt exported ${d.target} without its dirty bitmap`);
      const dirty = bitmap === undefined ? undefined : `qemu:dirty-bitmap:${bitmap}`;
      const client = await NbdClient.connect(
        { path: socket },
        { exportName, metaContexts: [BASE_ALLOCATION, ...(dirty ? [dirty] : [])] },
      );
      clients.push(client);
      sessionDisks.push(
        nbdDisk(
          client,
          d,
          `libvirt:${domain} ${d.target} (${d.source})`,
          dirty,
          req.previous?.time,
          reasons.get(d.target),
        ),
      );
      sizes.push({ name: d.target, size: client.size });
    }
    let cpXml: string | null = await virsh.run(["checkpoint-dumpxml", domain, newCheckpoint]);
    if (cpXml.length > 1024 * 1024) {
      log(
        `checkpoint XML of ${newCheckpoint} is ${cpXml.length} bytes: not kept, it can't be redefined later`,
      );
      cpXml = null;
    }
    const checkpoint: LibvirtCheckpointRecord = {
      kind: CHECKPOINT_KIND,
      repository: req.repository,
      domain,
      uuid: info.uuid,
      checkpoint: newCheckpoint,
      disks: sizes.filter((s) => tracked.has(s.name)),
      xml: cpXml,
    };
    const config = await describeDomain(virsh, domain, sizes);
    return {
      disks: sessionDisks,
      mode: req.mode === "pause" ? "pause" : "snapshot",
      consistency: cut.consistency,
      checkpoint,
      config,
      details,
      finish,
    };
  } catch (err) {
    await finish(false).catch((e: unknown) =>
      log(`cleanup after a failed backup start: ${describeError(e)}`),
    );
    throw err;
  }
}

/** After a failed backup-begin: nothing was created; strike the job and checkpoint off. */
async function strikeFailedBegin(virsh: Virsh, rec: LibvirtState, domain: string, cp: string): Promise<void> {
  const present = await checkpointList(virsh, domain);
  if (present.includes(cp)) await deleteCheckpoint(virsh, domain, cp, () => {});
  for (const i of rec.items.filter((x) => x.kind === "job" || x.kind === "checkpoint")) await rec.remove(i);
}

/**
 * A disk read over NBD as a session disk: data, `base:allocation`, and the changes in the dirty
 * bitmap context `dirty` since restore point `since`. (The engine's openNbdDisk does the same one
 * layer up; this adapter may not import the engine.)
 */
export function nbdDisk(
  client: NbdClient,
  d: DomainDisk,
  source: string,
  dirty: string | undefined,
  since: string | undefined,
  reason: string | undefined,
): SessionDisk {
  const extents = async (context: string, zero: (flags: number) => boolean): Promise<Extent[]> =>
    (await client.blockStatus(0, client.size, context)).map((e) => ({
      offset: e.offset,
      length: e.length,
      zero: zero(e.flags),
    }));
  return {
    name: d.target,
    source,
    size: client.size,
    read: (off, len) => client.read(off, len),
    allocation: () => extents(BASE_ALLOCATION, (f) => (f & StateFlag.ZERO) !== 0),
    ...(dirty !== undefined && since !== undefined
      ? { changes: { since, extents: () => extents(dirty, (f) => (f & 1) === 0) } }
      : {}),
    ...(reason === undefined || dirty !== undefined ? {} : { fullReadReason: reason }),
  };
}

/** The domain's configuration document, with its persistent XML. */
export async function describeDomain(
  virsh: Virsh,
  domain: string,
  sizes: ReadonlyArray<{ name: string; size: number }>,
): Promise<VmConfigDocument> {
  const xml = await virsh.run(["dumpxml", "--inactive", domain]);
  const info = parseDomain(xml, `domain ${domain}`);
  return {
    kind: "libvirt",
    name: info.name,
    uuid: info.uuid,
    cpus: info.cpus,
    memoryBytes: info.memoryBytes,
    disks: backupDisks(info).map((d) => ({
      name: d.target,
      file: d.source ?? "",
      format: d.format || "raw",
      size: sizes.find((s) => s.name === d.target)?.size ?? 0,
      type: d.type,
      device: d.device,
    })),
    nics: info.nics.map((n) => ({ id: n.id, mac: n.mac, type: n.type, model: n.model })),
    domainType: info.type,
    xml,
  };
}

async function redefine(virsh: Virsh, domain: string, xml: string, stateDir: string): Promise<void> {
  const dir = stateDirOf(stateDir);
  await fs.mkdir(dir, { recursive: true });
  const file = join(dir, `${domain}.redefine.xml`);
  await fs.writeFile(file, redefinableXml(xml));
  try {
    await virsh.run(["checkpoint-create", domain, file, "--redefine"]);
  } finally {
    await fs.rm(file, { force: true });
  }
}

type Cut = { consistency: BackupSession["consistency"]; quiescedMs: number; frozen: number };

/** Freezes (agent) or suspends the domain around `cut`, and always undoes it. */
async function quiesced(
  virsh: Virsh,
  rec: LibvirtState,
  domain: string,
  req: BackupRequest,
  state: string,
  cut: () => Promise<void>,
): Promise<Cut> {
  const log = req.log;
  if (req.mode === "pause" || state === "paused") {
    if (state === "paused") {
      const t0 = Date.now();
      await cut();
      return { consistency: "paused", quiescedMs: Date.now() - t0, frozen: 0 };
    }
    await rec.add({ kind: "suspended" });
    const t0 = Date.now();
    await virsh.run(["suspend", domain]);
    try {
      await cut();
    } finally {
      await virsh.run(["resume", domain]);
      await rec.remove({ kind: "suspended" });
    }
    return { consistency: "paused", quiescedMs: Date.now() - t0, frozen: 0 };
  }
  let frozen = 0;
  if (req.quiesce !== "off") {
    try {
      await rec.add({ kind: "freeze" });
      const out = await virsh.run(["domfsfreeze", domain], { timeoutMs: 15_000 });
      frozen = Number(/Froze (\d+) filesystem/.exec(out)?.[1] ?? "0");
    } catch (err) {
      // Not sent to the guest at all (no agent channel, agent not running): nothing is frozen.
      if (err instanceof VirshError && AGENT_ABSENT_RE.test(err.stderr)) await rec.remove({ kind: "freeze" });
      else await thaw(virsh, rec, domain, log).catch(() => {});
      if (req.quiesce === "require")
        throw new StrataError(
          ErrorCode.EXTERNAL,
          `cannot freeze the guest's filesystems: ${describeError(err)}`,
          {
            cause: err,
          },
        );
      log(`the guest agent did not freeze (${describeError(err)}): the restore point is crash-consistent`);
      frozen = -1;
    }
  }
  const t0 = Date.now();
  try {
    await cut();
  } finally {
    if (rec.has("freeze")) await thaw(virsh, rec, domain, log);
  }
  const quiescedMs = Date.now() - t0;
  if (frozen > 0) return { consistency: "filesystem-consistent", quiescedMs, frozen };
  if (frozen === 0 && req.quiesce !== "off")
    log("the guest agent froze no filesystem: the restore point is crash-consistent");
  return { consistency: "crash-consistent", quiescedMs, frozen: Math.max(frozen, 0) };
}

/** libvirt's words for "there is no guest agent to talk to". */
const AGENT_ABSENT_RE = /agent is not connected|agent is not configured|agent not available|not running/i;

async function thaw(
  virsh: Virsh,
  rec: LibvirtState,
  domain: string,
  log: (m: string) => void,
): Promise<void> {
  let last: unknown;
  for (let attempt = 1; attempt <= 5; attempt++) {
    try {
      await virsh.run(["domfsthaw", domain], { timeoutMs: 15_000 });
      await rec.remove({ kind: "freeze" });
      return;
    } catch (err) {
      last = err;
      if (isStrataError(err, ErrorCode.NOT_FOUND)) {
        await rec.remove({ kind: "freeze" });
        return;
      }
      if (err instanceof VirshError && AGENT_ABSENT_RE.test(err.stderr)) {
        // No agent to ask: a guest whose agent went away can't be thawed from outside.
        log(
          `cannot thaw ${domain}: ${err.stderr}; if its filesystems are frozen, thaw them from the console`,
        );
        await rec.remove({ kind: "freeze" });
        return;
      }
      log(`thaw attempt ${attempt} failed: ${describeError(err)}`);
      await new Promise((r) => setTimeout(r, 200 * attempt));
    }
  }
  throw new StrataError(
    ErrorCode.EXTERNAL,
    `the guest's filesystems of ${domain} could not be thawed (${describeError(last)}): run "virsh domfsthaw ${domain}" now`,
  );
}

/** The socket of the domain's running backup job, or undefined when it has none. */
async function jobSocket(virsh: Virsh, domain: string): Promise<string | undefined> {
  let xml: string;
  try {
    xml = await virsh.run(["backup-dumpxml", domain]);
  } catch (err) {
    if (
      err instanceof VirshError &&
      /no (domain )?backup job|does not have|not active|no active/i.test(err.stderr)
    )
      return undefined;
    throw err;
  }
  return at(parseXml(xml, "domainbackup", "backup-dumpxml"), "server")?.attrs.socket ?? "";
}

async function waitNoJob(virsh: Virsh, domain: string): Promise<void> {
  for (let i = 0; i < 300; i++) {
    const info = await virsh.run(["domjobinfo", domain]);
    if (/Job type:\s+None/.test(info)) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new StrataError(ErrorCode.TIMEOUT, `the backup job of ${domain} did not end within 30 s`);
}

/**
 * Releases everything `rec` lists, in the safe order: thaw and resume first, then the job, the
 * checkpoint (kept when `ok`, deleted otherwise), files and the socket directory.
 */
export async function release(
  virsh: Virsh,
  rec: LibvirtState,
  log: (m: string) => void,
  ok: boolean,
): Promise<void> {
  const domain = rec.data.domain;
  const errors: string[] = [];
  const items = [...rec.items];
  const of = <K extends LibvirtStateItem["kind"]>(k: K) =>
    items.filter((i): i is Extract<LibvirtStateItem, { kind: K }> => i.kind === k);
  let gone = false;
  try {
    await domainState(virsh, domain);
  } catch (err) {
    if (!isStrataError(err, ErrorCode.NOT_FOUND)) throw err;
    gone = true;
  }
  const step = async (item: LibvirtStateItem, fn: () => Promise<unknown>) => {
    try {
      await fn();
      await rec.remove(item);
    } catch (err) {
      if (isStrataError(err, ErrorCode.NOT_FOUND)) {
        await rec.remove(item);
        return;
      }
      errors.push(`${item.kind}: ${describeError(err)}`);
    }
  };
  for (const i of of("process")) await step(i, () => stopProcess(i.pid, i.marker));
  if (!gone) {
    for (const i of of("freeze")) await step(i, () => thaw(virsh, rec, domain, log));
    for (const i of of("suspended")) {
      await step(i, async () => {
        if ((await domainState(virsh, domain)) === "paused") await virsh.run(["resume", domain]);
      });
    }
    for (const i of of("job")) {
      await step(i, async () => {
        const s = await jobSocket(virsh, domain);
        if (s === undefined) return;
        if (s !== i.socket) {
          log(`${domain} runs another tool's backup job (socket ${s}): left alone`);
          return;
        }
        await virsh.run(["domjobabort", domain]);
        await waitNoJob(virsh, domain);
      });
    }
    for (const i of of("checkpoint")) {
      if (ok) {
        await rec.remove(i);
        continue;
      }
      await step(i, async () => {
        if ((await checkpointList(virsh, domain)).includes(i.name))
          await deleteCheckpoint(virsh, domain, i.name, log);
      });
    }
  } else {
    for (const i of items.filter((x) => x.kind !== "file" && x.kind !== "dir" && x.kind !== "process"))
      await rec.remove(i);
  }
  for (const i of of("file")) await step(i, () => fs.rm(i.path, { force: true }));
  for (const i of of("dir")) await step(i, () => fs.rm(i.path, { recursive: true, force: true }));
  if (errors.length > 0)
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `cleanup left work undone on ${domain} (state kept in ${rec.path}): ${errors.join("; ")}`,
    );
  await rec.finish();
}

/**
 * Deletes a checkpoint and its bitmaps. A checkpoint whose bitmap is gone from an image (QEMU was
 * killed before it stored it) can't be deleted whole ("not found in backing chain"): then only
 * libvirt's metadata goes, and a bitmap of that name left broken in another image stays there,
 * unused (`qemu-img bitmap --remove` clears it while the domain is off).
 */
export async function deleteCheckpoint(
  virsh: Virsh,
  domain: string,
  name: string,
  log: (m: string) => void,
): Promise<void> {
  try {
    await virsh.run(["checkpoint-delete", domain, name]);
  } catch (err) {
    if (
      !(err instanceof VirshError) ||
      !/not found in backing chain|missing or broken bitmap/i.test(err.stderr)
    )
      throw err;
    await virsh.run(["checkpoint-delete", domain, name, "--metadata"]);
    log(`checkpoint ${name} of ${domain} had lost its bitmap (${err.stderr}): deleted its metadata`);
  }
}

/** Deletes this repository's checkpoints on `domain` other than `keep` (the chain needs one). */
async function deleteOlder(
  virsh: Virsh,
  domain: string,
  repository: string,
  keep: string,
  log: (m: string) => void,
): Promise<void> {
  try {
    const prefix = checkpointNames.prefix(repository);
    for (const name of await checkpointList(virsh, domain)) {
      if (name === keep || !name.startsWith(prefix) || !checkpointNames.isOurs(name)) continue;
      await deleteCheckpoint(virsh, domain, name, log).catch((e: unknown) =>
        log(`could not delete the older checkpoint ${name} of ${domain}: ${describeError(e)}`),
      );
    }
  } catch (err) {
    log(`could not list the checkpoints of ${domain}: ${describeError(err)}`);
  }
}

/** Kills a helper process of a dead run, if it is still that process (its command line names `marker`). */
async function stopProcess(pid: number, marker: string): Promise<void> {
  const cmdline = await fs.readFile(`/proc/${pid}/cmdline`, "utf8").catch(() => "");
  if (pid <= 0 || !cmdline.includes(marker)) return;
  process.kill(pid, "SIGKILL");
  for (let i = 0; i < 100 && processAlive(pid); i++) await new Promise((r) => setTimeout(r, 50));
}

/** Releases what a dead run left on `domain` before a new run starts; refuses if that run lives. */
async function releaseStale(
  virsh: Virsh,
  stateDir: string,
  domain: string,
  log: (m: string) => void,
): Promise<void> {
  const rec = await LibvirtState.load(LibvirtState.pathFor(stateDir, domain));
  if (!rec) return;
  if (rec.data.pid !== process.pid && processAlive(rec.data.pid)) {
    throw new StrataError(
      ErrorCode.LOCKED,
      `another Strata run (pid ${rec.data.pid}) is backing up ${domain} (state ${rec.path})`,
    );
  }
  log(`an earlier run on ${domain} (pid ${rec.data.pid}) left ${rec.items.length} item(s): releasing them`);
  await release(virsh, rec, log, false);
}

/** The stored checkpoint record's domain XML, for people and tests. */
export function checkpointDomainName(xml: string): string | undefined {
  return textOf(kid(kid(parseXml(xml, "domaincheckpoint", "checkpoint XML"), "domain"), "name"));
}
