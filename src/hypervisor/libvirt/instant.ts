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
 */
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { ErrorCode, isStrataError, StrataError } from "../../util/errors.js";
import { runProgram } from "../../util/process.js";
import type {
  InstantRequest,
  InstantRuntime,
  InstantVm,
  MigrateRequest,
  VmConfigDocument,
} from "../adapter.js";
import { checkReachable, qemuUser } from "./access.js";
import { domainState } from "./backup.js";
import { planLibvirtRestore } from "./restore.js";
import { Virsh, VirshError } from "./virsh.js";
import { buildXml, el, kid, kids, parseXml, removeKids } from "./xml.js";

interface InstantData {
  uri: string;
  domain: string;
  /** The domain XML the VM runs from (kept current: migrated disks point at production). */
  xmlFile: string;
  socket: string;
}

function dataOf(vm: InstantVm): InstantData {
  const d = vm.data as Partial<InstantData>;
  if (
    vm.adapter !== "libvirt" ||
    typeof d.uri !== "string" ||
    typeof d.domain !== "string" ||
    typeof d.xmlFile !== "string" ||
    typeof d.socket !== "string"
  )
    throw new StrataError(
      ErrorCode.DATA_CORRUPT,
      `instant recovery record of ${vm.name} is not a libvirt one`,
    );
  return d as InstantData;
}

async function pidOf(domain: string): Promise<number | null> {
  const n = Number((await fs.readFile(`/run/libvirt/qemu/${domain}.pid`, "utf8").catch(() => "")).trim());
  return n > 0 ? n : null;
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

  async start(config: VmConfigDocument, req: InstantRequest): Promise<InstantVm> {
    const virsh = this.virsh();
    const available = req.disks.map((d) => ({ name: d.name, size: d.size }));
    const plan = planLibvirtRestore(
      config,
      { target: req.dir, ...(req.clone ? { name: req.name } : {}), available },
      !req.clone,
    );
    const sockets = [...new Set(req.disks.map((d) => d.socket))];
    const user = await qemuUser();
    await fs.mkdir(join(req.dir, "run"), { recursive: true });
    await checkReachable(join(req.dir, "run", "x"), user, "the instant-recovery directory");
    for (const s of sockets) {
      await checkReachable(s, user, "Strata's NBD socket");
      // QEMU connects to the export as its own user: connect() needs write permission on the socket.
      await fs.chown(s, user.uid, user.gid);
    }
    const dom = parseXml(plan.definition.text, "domain", "planned domain XML");
    const disks: InstantVm["disks"] = [];
    for (const x of kids(kid(dom, "devices"), "disk")) {
      const t = kid(x, "target")?.attrs.dev ?? "";
      const nbd = req.disks.find((d) => d.name === t);
      if (!nbd) continue;
      const overlay = join(req.dir, `${t}.overlay.qcow2`);
      if (
        await fs.stat(overlay).then(
          () => true,
          () => false,
        )
      )
        throw new StrataError(
          ErrorCode.TARGET_CONFLICT,
          `${overlay} exists: not starting over an earlier run's overlay`,
        );
      const backing = `nbd+unix:///${nbd.exportName}?socket=${nbd.socket}`;
      await runProgram("qemu-img", [
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-F",
        "raw",
        "-b",
        backing,
        overlay,
        String(nbd.size),
      ]);
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
    const xmlFile = join(req.dir, `${plan.domain}.xml`);
    await fs.writeFile(xmlFile, buildXml(dom));
    const t0 = Date.now();
    await virsh.run(["create", xmlFile], { timeoutMs: 120_000 });
    req.log(`started transient domain ${plan.domain} in ${Date.now() - t0} ms`);
    return {
      adapter: "libvirt",
      name: plan.domain,
      where: `libvirt domain ${plan.domain}`,
      pid: await pidOf(plan.domain),
      disks,
      data: { uri: this.uri, domain: plan.domain, xmlFile, socket: sockets[0] ?? "" } satisfies InstantData,
      warnings: plan.warnings,
    };
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
    await this.virsh(d.uri).run(["create", d.xmlFile], { timeoutMs: 120_000 });
    log(`started ${d.domain} again from ${d.xmlFile}`);
    return { ...vm, pid: await pidOf(d.domain) };
  }

  async migrate(vm: InstantVm, req: MigrateRequest): Promise<InstantVm> {
    const d = dataOf(vm);
    const virsh = this.virsh(d.uri);
    await fs.mkdir(req.target, { recursive: true });
    const disks = vm.disks.map((x) => ({ ...x }));
    for (const disk of disks) {
      if (disk.production) continue;
      req.signal?.throwIfAborted();
      const path = join(req.target, `${disk.name}.${req.format}`);
      if (
        await fs.stat(path).then(
          () => true,
          () => false,
        )
      )
        throw new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists: not copying ${disk.name} over it`);
      const args = ["blockcopy", d.domain, disk.name, path, "--format", req.format];
      if (req.limitBytes !== null) args.push("--bandwidth", String(req.limitBytes), "--bytes");
      if (req.active) args.push("--synchronous-writes");
      const t0 = Date.now();
      await virsh.run(args);
      try {
        await this.waitAndPivot(virsh, d.domain, disk.name, req);
      } catch (err) {
        await virsh.run(["blockjob", d.domain, disk.name, "--abort"]).catch(() => {});
        await fs.rm(path, { force: true });
        throw err;
      }
      req.log(`${disk.name}: copied to ${path} and pivoted in ${Date.now() - t0} ms`);
      disk.production = { path, format: req.format };
      await pointDiskAt(d.xmlFile, disk.name, path, req.format);
    }
    for (const disk of disks) await fs.rm(disk.overlay, { force: true });
    // Every disk is local now: the domain no longer needs Strata; make it a defined one.
    await virsh.run(["define", d.xmlFile]);
    req.log(`${d.domain} runs on production storage and is defined persistently`);
    return { ...vm, disks };
  }

  /** Polls the copy (`blockjob --raw`: cur/end) until it is ready, then pivots. */
  private async waitAndPivot(virsh: Virsh, domain: string, disk: string, req: MigrateRequest): Promise<void> {
    let last = -1;
    let lastChange = Date.now();
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
      req.progress?.(cur, end);
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
        try {
          await virsh.run(["blockjob", domain, disk, "--pivot"]);
          return;
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
