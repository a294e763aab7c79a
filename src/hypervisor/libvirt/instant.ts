/**
 * Instant recovery on libvirt: the restore point's domain XML, rewritten like a clone's (or
 * keeping its identity), started as a *transient* domain (`virsh create`) whose disks are local
 * qcow2 overlays over Strata's NBD exports. libvirt 9.0 takes the NBD backing as an explicit
 * `<backingStore type='network'>` (`<source protocol='nbd'>` over a unix socket) under a
 * `<disk type='file'>` overlay, and QEMU opens it as a read-only nbd node; guest writes land in
 * the overlay. The socket must be writable by QEMU's user, so it is handed to that user.
 *
 * Migrate: per disk `virsh blockcopy` (sync full, the chain flattened) to production storage,
 * with `--bandwidth` and `--synchronous-writes` for active mode, polled until the copy is ready,
 * then `blockjob --pivot`: the guest runs on without a pause it notices. Once every disk is local
 * the overlays are removed and the domain is defined persistently with its production disks.
 * Stop: `shutdown` (with a deadline) or `destroy`; a transient domain is gone with it.
 *
 * The record ({@link LibvirtInstantData} in `data`: connection, domain, the XML file in DIR/run/,
 * the socket, each disk's size) is handed to the engine to save before anything is created and
 * after each step, and checked field by field when read back ({@link checkLibvirtInstantVm}).
 * A migration run again aborts a leftover copy job and removes its half-made file; a disk that
 * pivoted but was not recorded is only recorded. libvirt 9.0 has no reconnect delay for an NBD
 * source, so `reconnectDelay` is not applied: reads of the backing fail while the server is down.
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import { ErrorCode, isStrataError, StrataError } from "../../util/errors.js";
import { runProgram } from "../../util/process.js";
import { absolutePath, matching, object, parseDocument, whole } from "../../util/schema.js";
import {
  type InstantRequest,
  type InstantRuntime,
  type InstantVm,
  type MigratedDisk,
  type MigrateRequest,
  mirrorBufferBytes,
  type VmConfigDocument,
} from "../adapter.js";
import { instantVmSchema } from "../instant-vm.js";
import { checkReachable, qemuUser } from "./access.js";
import { domainState } from "./backup.js";
import { DOMAIN_NAME_RE, TARGET_RE, URI_RE } from "./domain.js";
import { domainDetails, planLibvirtRestore } from "./restore.js";
import { Virsh, VirshError } from "./virsh.js";
import { buildXml, el, kid, kids, parseXml, removeKids } from "./xml.js";

/** InstantVm.data of a libvirt domain. */
export interface LibvirtInstantData {
  uri: string;
  domain: string;
  /** The domain XML the VM runs from (kept current: migrated disks point at production). */
  xmlFile: string;
  socket: string;
  /** Each disk's size (the export's). */
  sizes: Record<string, number>;
}

const LibvirtInstantVmSchema = instantVmSchema({
  adapter: "libvirt",
  platform: "libvirt",
  diskName: matching("the disk name", TARGET_RE, "a libvirt disk target"),
  maxDisks: 256,
  data: object(
    {
      uri: matching("the libvirt connection", URI_RE, "a URI Strata uses"),
      domain: matching("the domain name", DOMAIN_NAME_RE, "one Strata handles"),
      xmlFile: absolutePath("the domain XML file").refine((p) => p.endsWith(".xml"), {
        error: (iss) => `the domain XML file ${JSON.stringify(iss.input)} is not a .xml file`,
      }),
      socket: absolutePath("the NBD socket"),
      sizes: z.record(z.string(), whole("the disk size", Number.MAX_SAFE_INTEGER), {
        error: "the disk sizes are not an object",
      }),
    },
    "the libvirt record",
  ),
}).superRefine((v, ctx) => {
  const refuse = (message: string, path: PropertyKey[]) => ctx.addIssue({ code: "custom", message, path });
  const names = v.disks.map((d) => d.name);
  for (const disk of names)
    if (v.data.sizes[disk] === undefined) refuse(`disk ${disk} has no size`, ["data", "sizes", disk]);
  if (new Set(names).size !== names.length) refuse("a disk is listed twice", ["disks"]);
  for (const k of Object.keys(v.data.sizes))
    if (!names.includes(k)) refuse(`a size for unknown disk ${k}`, ["data", "sizes", k]);
  if (v.data.domain !== v.name)
    refuse(`its domain ${v.data.domain} is not the VM it names (${v.name})`, ["data", "domain"]);
});

/**
 * Checks a libvirt InstantVm read back from the engine's state file against its schema: the
 * generic fields, and `data` (a connection URI, a domain name Strata handles and that the record
 * is named by, absolute paths, a size for every disk). Throws DATA_CORRUPT naming the first bad
 * field with its path.
 */
export function checkLibvirtInstantVm(vm: InstantVm): InstantVm {
  return parseDocument(
    LibvirtInstantVmSchema,
    vm,
    `the instant recovery record of ${JSON.stringify(String(vm?.name))} is damaged`,
  ) as InstantVm;
}

function dataOf(vm: InstantVm): LibvirtInstantData {
  return checkLibvirtInstantVm(vm).data as unknown as LibvirtInstantData;
}

/** A domain's state, or undefined when libvirt knows no domain of this name. */
async function stateOf(virsh: Virsh, domain: string): Promise<string | undefined> {
  try {
    return await domainState(virsh, domain);
  } catch (err) {
    if (isStrataError(err, ErrorCode.NOT_FOUND)) return undefined;
    throw err;
  }
}

async function pidOf(domain: string): Promise<number | null> {
  const n = Number((await fs.readFile(`/run/libvirt/qemu/${domain}.pid`, "utf8").catch(() => "")).trim());
  return n > 0 ? n : null;
}

const exists = (p: string) =>
  fs.lstat(p).then(
    () => true,
    () => false,
  );

/** The source file of disk `target` in a running domain's live XML, or undefined. */
async function liveSource(virsh: Virsh, domain: string, target: string): Promise<string | undefined> {
  const dom = parseXml(await virsh.run(["dumpxml", domain]), "domain", `live XML of ${domain}`);
  for (const x of kids(kid(dom, "devices"), "disk"))
    if (kid(x, "target")?.attrs.dev === target) return kid(x, "source")?.attrs.file;
  return undefined;
}

/** Rewrites the disk `target` of a domain XML file to a plain local image. */
async function pointDiskAt(xmlFile: string, target: string, path: string, format: string): Promise<void> {
  const dom = parseXml(await fs.readFile(xmlFile, "utf8"), "domain", xmlFile);
  for (const x of kids(kid(dom, "devices"), "disk")) {
    if (kid(x, "target")?.attrs.dev !== target) continue;
    x.attrs.type = "file";
    removeKids(x, "backingStore");
    const driver = kid(x, "driver");
    if (driver) driver.attrs.type = format;
    const src = kid(x, "source");
    if (src) src.attrs = { file: path };
  }
  await fs.writeFile(xmlFile, buildXml(dom));
}

export class LibvirtInstant implements InstantRuntime {
  constructor(private readonly uri: string) {}

  private virsh(uri = this.uri): Virsh {
    return new Virsh(uri);
  }

  checkRecord(vm: InstantVm): InstantVm {
    return checkLibvirtInstantVm(vm);
  }

  async start(config: VmConfigDocument, req: InstantRequest): Promise<InstantVm> {
    if (req.isolateNetwork)
      throw new StrataError(
        ErrorCode.USAGE,
        "libvirt domains are not started without their network yet: boot verification needs the QEMU adapter",
      );
    const virsh = this.virsh();
    const available = req.disks.map((d) => ({ name: d.name, size: d.size }));
    const plan = planLibvirtRestore(
      config,
      { target: req.dir, ...(req.clone ? { name: req.name } : {}), available },
      !req.clone,
    );
    const sockets = [...new Set(req.disks.map((d) => d.socket))];
    const user = await qemuUser();
    const runDir = join(req.dir, "run");
    await fs.mkdir(runDir, { recursive: true });
    await checkReachable(join(runDir, "x"), user, "the instant-recovery directory");
    for (const s of sockets) await checkReachable(s, user, "Strata's NBD socket");
    // Everything is planned (and refused) before anything is created.
    const dom = parseXml(plan.definition.text, "domain", "planned domain XML");
    const disks: InstantVm["disks"] = [];
    const overlays: Array<{ path: string; backing: string; size: number }> = [];
    for (const x of kids(kid(dom, "devices"), "disk")) {
      const t = kid(x, "target")?.attrs.dev ?? "";
      const nbd = req.disks.find((d) => d.name === t);
      if (!nbd) continue;
      const overlay = join(req.dir, `${t}.overlay.qcow2`);
      if (await exists(overlay))
        throw new StrataError(
          ErrorCode.TARGET_CONFLICT,
          `${overlay} exists: not starting over an earlier run's overlay`,
        );
      overlays.push({
        path: overlay,
        backing: `nbd+unix:///${nbd.exportName}?socket=${nbd.socket}`,
        size: nbd.size,
      });
      x.attrs.type = "file";
      const driver = kid(x, "driver");
      if (driver) driver.attrs.type = "qcow2";
      else x.children.unshift(el("driver", { name: "qemu", type: "qcow2" }));
      const src = kid(x, "source");
      if (src) src.attrs = { file: overlay };
      removeKids(x, "backingStore");
      const host = el("host", { transport: "unix", socket: nbd.socket });
      const source = el("source", { protocol: "nbd", name: nbd.exportName }, [host]);
      x.children.push(el("backingStore", { type: "network" }, [el("format", { type: "raw" }), source]));
      disks.push({ name: t, overlay });
    }
    const missing = req.disks.filter((d) => !disks.some((x) => x.name === d.name));
    if (missing.length > 0)
      throw new StrataError(
        ErrorCode.USAGE,
        `the domain has no disk ${missing.map((d) => d.name).join(", ")}`,
      );
    const state = await stateOf(virsh, plan.domain);
    if (state !== undefined && state !== "shut off" && state !== "crashed")
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `domain ${plan.domain} is ${state}: ${req.clone ? "pick another --name" : "run it as a clone with --name NEW"}`,
      );
    const xmlFile = join(runDir, `${plan.domain}.xml`);
    const text = buildXml(dom);
    const data: LibvirtInstantData = {
      uri: this.uri,
      domain: plan.domain,
      xmlFile,
      socket: sockets[0] ?? "",
      sizes: Object.fromEntries(req.disks.map((d) => [d.name, d.size])),
    };
    const vm: InstantVm = {
      adapter: "libvirt",
      name: plan.domain,
      where: `libvirt domain ${plan.domain}`,
      pid: null,
      disks,
      data: { ...data },
      details: { ...domainDetails(this.uri, plan.domain, text), definition: xmlFile },
      warnings: plan.warnings,
    };
    checkLibvirtInstantVm(vm);
    await req.record(vm);
    let created = false;
    try {
      for (const s of sockets) {
        // QEMU connects to the export as its own user: connect() needs write permission on the socket.
        await fs.chown(s, user.uid, user.gid);
      }
      for (const o of overlays)
        await runProgram("qemu-img", [
          "create",
          "-q",
          "-f",
          "qcow2",
          "-u",
          "-F",
          "raw",
          "-b",
          o.backing,
          o.path,
          String(o.size),
        ]);
      await fs.writeFile(xmlFile, text);
      const t0 = Date.now();
      created = true;
      await virsh.run(["create", xmlFile], { timeoutMs: 120_000 });
      req.log(`started transient domain ${plan.domain} in ${Date.now() - t0} ms`);
      vm.pid = await pidOf(plan.domain);
      await req.record(vm);
    } catch (err) {
      if (created) await virsh.run(["destroy", plan.domain]).catch(() => {});
      for (const o of overlays) await fs.rm(o.path, { force: true });
      await fs.rm(xmlFile, { force: true });
      throw err;
    }
    return vm;
  }

  async running(vm: InstantVm): Promise<boolean> {
    const d = dataOf(vm);
    try {
      const s = await domainState(this.virsh(d.uri), d.domain);
      return s === "running" || s === "paused" || s === "idle" || s === "in shutdown";
    } catch (err) {
      if (isStrataError(err, ErrorCode.NOT_FOUND)) return false;
      throw err;
    }
  }

  async resume(vm: InstantVm, log: (message: string) => void): Promise<InstantVm> {
    const d = dataOf(vm);
    if (await this.running(vm)) return vm;
    for (const x of vm.disks) {
      if (!x.production && !(await exists(x.overlay)))
        throw new StrataError(ErrorCode.DATA_MISSING, `overlay ${x.overlay} of disk ${x.name} is gone`);
    }
    const virsh = this.virsh(d.uri);
    if (vm.disks.every((x) => x.production)) {
      // Migrated: defined persistently on its production disks.
      await virsh.run(["start", d.domain], { timeoutMs: 120_000 });
      log(`started ${d.domain} again`);
    } else {
      await virsh.run(["create", d.xmlFile], { timeoutMs: 120_000 });
      log(`started ${d.domain} again from ${d.xmlFile}`);
    }
    return { ...vm, pid: await pidOf(d.domain) };
  }

  async migrate(record: InstantVm, req: MigrateRequest): Promise<{ vm: InstantVm; disks: MigratedDisk[] }> {
    const vm = structuredClone(checkLibvirtInstantVm(record));
    const d = vm.data as unknown as LibvirtInstantData;
    const virsh = this.virsh(d.uri);
    await fs.mkdir(req.target, { recursive: true });
    const results: MigratedDisk[] = [];
    for (const disk of vm.disks) {
      const size = d.sizes[disk.name]!;
      if (disk.production) {
        results.push({
          disk: disk.name,
          path: disk.production.path,
          format: disk.production.format,
          size,
          copied: 0,
          readyMs: 0,
          pivotMs: 0,
          skipped: true,
        });
        continue;
      }
      req.signal?.throwIfAborted();
      const path = join(req.target, `${disk.name}.${req.format}`);
      let copied = 0;
      let readyMs = 0;
      let pivotMs = 0;
      if ((await liveSource(virsh, d.domain, disk.name)) === path) {
        // Pivoted by an interrupted run whose record was not written: bookkeeping only.
        req.log(`disk ${disk.name} had pivoted to ${path} already`);
      } else {
        // An interrupted run's copy: its job ends, its half-made file goes (the engine checked
        // that a file there is this migration's own).
        await virsh.run(["blockjob", d.domain, disk.name, "--abort"]).catch(() => {});
        await fs.rm(path, { force: true });
        const args = ["blockcopy", d.domain, disk.name, path, "--format", req.format];
        if (req.limitBytes !== null)
          args.push(
            "--bandwidth",
            String(Math.round(req.limitBytes)),
            "--bytes",
            "--buf-size",
            String(mirrorBufferBytes(req.limitBytes)),
          );
        if (req.active) args.push("--synchronous-writes");
        const t0 = Date.now();
        await virsh.run(args);
        req.progress?.(disk.name, 0, size);
        try {
          ({ copied, readyMs } = await this.waitAndPivot(virsh, d.domain, disk.name, size, req));
        } catch (err) {
          await virsh.run(["blockjob", d.domain, disk.name, "--abort"]).catch(() => {});
          await fs.rm(path, { force: true });
          throw err;
        }
        readyMs -= t0;
        pivotMs = Date.now() - t0;
        req.progress?.(disk.name, size, size);
        req.log(`${disk.name}: copied to ${path} and pivoted in ${pivotMs} ms`);
        results.push({
          disk: disk.name,
          path,
          format: req.format,
          size,
          copied,
          readyMs,
          pivotMs,
          skipped: false,
        });
      }
      disk.production = { path, format: req.format };
      await pointDiskAt(d.xmlFile, disk.name, path, req.format);
      await req.record(vm);
    }
    for (const disk of vm.disks) await fs.rm(disk.overlay, { force: true });
    // Every disk is local now: the domain no longer needs Strata; make it a defined one.
    await virsh.run(["define", d.xmlFile]);
    req.log(`${d.domain} runs on production storage and is defined persistently`);
    return { vm, disks: results };
  }

  /**
   * Polls the copy (`blockjob --raw`: cur/end) until it is ready, then pivots. Returns the bytes
   * the job reported and the time it was ready (epoch ms).
   */
  private async waitAndPivot(
    virsh: Virsh,
    domain: string,
    disk: string,
    size: number,
    req: MigrateRequest,
  ): Promise<{ copied: number; readyMs: number }> {
    let last = -1;
    let lastChange = Date.now();
    let readyMs = 0;
    for (;;) {
      req.signal?.throwIfAborted();
      const info = await virsh.run(["blockjob", domain, disk, "--raw"]);
      const cur = Number(/\bcur=(\d+)/.exec(info)?.[1] ?? Number.NaN);
      const end = Number(/\bend=(\d+)/.exec(info)?.[1] ?? Number.NaN);
      if (!/type=/.test(info) || Number.isNaN(cur) || Number.isNaN(end))
        throw new StrataError(
          ErrorCode.EXTERNAL,
          `the copy of ${disk} ended before it could pivot (${info.trim()})`,
        );
      // Not yet the end: `done === total` means moved.
      req.progress?.(disk, Math.min(size - 1, Math.round((cur / Math.max(1, end)) * size)), size);
      if (cur !== last) {
        last = cur;
        lastChange = Date.now();
      } else if (Date.now() - lastChange > 300_000) {
        throw new StrataError(
          ErrorCode.TIMEOUT,
          `the copy of ${disk} made no progress for 5 minutes (${cur}/${end})`,
        );
      }
      if (cur === end && end > 0) {
        readyMs ||= Date.now();
        try {
          await virsh.run(["blockjob", domain, disk, "--pivot"]);
          return { copied: end, readyMs };
        } catch (err) {
          if (!(err instanceof VirshError) || !/not ready|not yet ready|not in ready/i.test(err.stderr))
            throw err;
        }
      }
      await new Promise((r) => setTimeout(r, 250));
    }
  }

  async stop(vm: InstantVm, powerdownMs: number): Promise<"quit" | "powerdown" | "killed" | "not running"> {
    const d = dataOf(vm);
    const virsh = this.virsh(d.uri);
    if (!(await this.running(vm))) return "not running";
    if (powerdownMs > 0) {
      await virsh.run(["shutdown", d.domain]).catch(() => {});
      const end = Date.now() + powerdownMs;
      while (Date.now() < end) {
        if (!(await this.running(vm))) return "powerdown";
        await new Promise((r) => setTimeout(r, 250));
      }
    }
    try {
      await virsh.run(["destroy", d.domain]);
    } catch (err) {
      if (!isStrataError(err, ErrorCode.NOT_FOUND)) throw err;
      return "not running";
    }
    return powerdownMs > 0 ? "killed" : "quit";
  }
}
