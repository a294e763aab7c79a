/**
 * A libvirt domain back from its configuration document: the domain XML the restore point kept,
 * defined again in place (same name, UUID, disk paths) or as a clone that runs beside the
 * original: a new name and UUID, new MAC addresses, its disks in the target directory, and every
 * file the domain writes (serial and console logs, channel sockets, NVRAM) moved there too, since
 * libvirt refuses two domains sharing them. Disks of the domain that the restore point does not
 * hold are left out of a clone (never pointed at the original's images).
 */
import { randomBytes, randomUUID } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, join } from "node:path";
import { ErrorCode, isStrataError, StrataError } from "../../util/errors.js";
import type { RestorePlan, RestorePlanOptions, StartedVm, VmConfigDocument } from "../adapter.js";
import { domainState } from "./backup.js";
import { type LibvirtConfig, parseLibvirtConfig } from "./config.js";
import { checkPath, DOMAIN_NAME_RE } from "./domain.js";
import type { Virsh } from "./virsh.js";
import { buildXml, el, kid, kids, parseXml, setText, textEl, type XElement } from "./xml.js";

/** The plan's options; instant recovery has no restore point to name in the definition. */
export type LibvirtPlanOptions = Omit<RestorePlanOptions, "restorePoint"> &
  Partial<Pick<RestorePlanOptions, "restorePoint">>;

/** The namespace of Strata's `<metadata>` element in a restored domain's XML. */
export const METADATA_NS = "urn:strata:restore:1";

export interface LibvirtRestorePlan extends RestorePlan {
  kind: "libvirt";
  config: LibvirtConfig;
  /** The domain the plan defines. */
  domain: string;
}

function randomMac(): string {
  const b = randomBytes(3);
  return `52:54:00:${[...b].map((x) => x.toString(16).padStart(2, "0")).join(":")}`;
}

/** Moves a file the domain writes into `dir`, the same old path always to the same new one. */
function mover(dir: string) {
  const moved = new Map<string, string>();
  const used = new Set<string>();
  return (old: string): string => {
    const known = moved.get(old);
    if (known) return known;
    let name = basename(old) || "file";
    for (let i = 1; used.has(name); i++) name = `${i}-${basename(old)}`;
    used.add(name);
    const p = join(dir, name);
    moved.set(old, p);
    return p;
  };
}

/**
 * Plans a restore. `keepIdentity` (instant recovery of the VM itself): files move to the target
 * directory like a clone's, but name, UUID and MACs stay.
 */
export function planLibvirtRestore(
  doc: VmConfigDocument,
  o: LibvirtPlanOptions,
  keepIdentity = false,
): LibvirtRestorePlan {
  const original = parseLibvirtConfig(doc);
  const dom = parseXml(original.xml, "domain", "stored domain XML");
  const moved = o.target !== undefined;
  const clone = moved && !keepIdentity;
  const warnings: string[] = [];
  const name = clone ? (o.name ?? `${original.name}-restored`) : original.name;
  if (o.name !== undefined && !clone && o.name !== original.name)
    throw new StrataError(ErrorCode.USAGE, "a new name needs a target directory (a clone)");
  if (!DOMAIN_NAME_RE.test(name))
    throw new StrataError(
      ErrorCode.USAGE,
      `"${name}" is not a domain name Strata handles (letters, digits, . _ + -)`,
    );
  if (clone && name === original.name)
    throw new StrataError(ErrorCode.USAGE, `a clone needs a name other than ${original.name}`);
  const target = moved ? checkPath(o.target!, "target directory") : undefined;
  const available = new Map(o.available.map((d) => [d.name, d.size]));
  if (o.disk !== undefined && !original.disks.some((d) => d.name === o.disk))
    throw new StrataError(ErrorCode.NOT_FOUND, `the domain has no disk ${o.disk}`);

  if (clone) {
    setText(kid(dom, "name")!, name);
    const uuid = kid(dom, "uuid");
    if (uuid) setText(uuid, randomUUID());
    else dom.children.splice(1, 0, textEl("uuid", randomUUID()));
  }
  const devices = kid(dom, "devices");
  const disks: LibvirtRestorePlan["disks"] = [];
  for (const x of kids(devices, "disk")) {
    const t = kid(x, "target")?.attrs.dev ?? "";
    const rec = original.disks.find((d) => d.name === t);
    if (!rec) continue; // a CD-ROM, an empty drive: as it was
    const size = available.get(t);
    const wanted = o.disk === undefined || o.disk === t;
    if (size === undefined || !wanted) {
      if (size === undefined) warnings.push(`disk ${t} is not in the restore point: not restored`);
      if (moved && devices) {
        devices.children = devices.children.filter((c) => c !== x);
        warnings.push(`disk ${t} is left out of the clone`);
      }
      continue;
    }
    const format = o.format ?? (rec.format === "qcow2" ? "qcow2" : "raw");
    const path = moved ? join(target!, `${t}.${format}`) : rec.file;
    const driver = kid(x, "driver");
    if (driver) driver.attrs.type = format;
    const src = kid(x, "source");
    if (src) {
      if (x.attrs.type === "block" && !moved) src.attrs.dev = path;
      else {
        x.attrs.type = "file";
        src.attrs = { file: path };
      }
    }
    // A backing chain is flattened by the restore.
    if (devices) x.children = x.children.filter((c) => c.tag !== "backingStore");
    disks.push({ name: t, format, path, size });
  }
  if (moved) {
    const move = mover(join(target!, "run"));
    for (const x of clone ? kids(devices, "interface") : []) {
      const mac = kid(x, "mac");
      if (mac) mac.attrs.address = randomMac();
      else x.children.unshift({ tag: "mac", attrs: { address: randomMac() }, children: [] });
    }
    for (const tag of ["serial", "console", "channel", "parallel"]) {
      for (const x of kids(devices, tag)) {
        const src = kid(x, "source");
        if (!src) continue;
        if ((x.attrs.type === "file" || x.attrs.type === "unix") && src.attrs.path)
          src.attrs.path = move(checkPath(src.attrs.path, `${tag} path`));
      }
      for (const x of kids(devices, tag)) {
        const log = kid(x, "log");
        if (log?.attrs.file) log.attrs.file = move(checkPath(log.attrs.file, `${tag} log`));
      }
    }
    const nvram = kid(kid(dom, "os"), "nvram");
    if (nvram) {
      setText(nvram, join(target!, `${name}_VARS.fd`));
      warnings.push("the clone's UEFI variables start from the template (they are not in the restore point)");
    }
    for (const g of kids(devices, "graphics")) {
      if (g.attrs.port && g.attrs.port !== "-1") {
        g.attrs.autoport = "yes";
        delete g.attrs.port;
      }
    }
  }
  const rp = o.restorePoint;
  if (rp) {
    // Where it came from, kept with the domain (virsh dumpxml shows it); an earlier one is replaced.
    let metadata = kid(dom, "metadata");
    if (!metadata) {
      metadata = el("metadata");
      const after = Math.max(kid(dom, "uuid") ? dom.children.indexOf(kid(dom, "uuid")!) : 0, 0);
      dom.children.splice(after + 1, 0, metadata);
    }
    metadata.children = metadata.children.filter((c) => c.tag !== "strata:restore");
    metadata.children.push(
      el("strata:restore", {
        "xmlns:strata": METADATA_NS,
        from: `${rp.vm}/${rp.time}`,
        consistency: rp.consistency,
      }),
    );
  }
  const xml = buildXml(dom);
  const config = parseLibvirtConfig({ ...original, xml });
  if (rp) Object.assign(config, { restoredFrom: `${rp.vm}/${rp.time}`, consistency: rp.consistency });
  config.disks = config.disks.map((d) => ({ ...d, size: available.get(d.name) ?? d.size }));
  return {
    kind: "libvirt",
    clone,
    domain: name,
    config,
    disks,
    definition: {
      text: xml,
      mediaType: "application/xml",
      ...(moved ? { file: join(target!, `${name}.xml`) } : {}),
    },
    warnings,
  };
}

function asPlan(plan: RestorePlan): LibvirtRestorePlan {
  if (plan.kind !== "libvirt" || typeof plan.domain !== "string")
    throw new StrataError(ErrorCode.INTERNAL, `a ${plan.kind} plan given to the libvirt adapter`);
  return plan as LibvirtRestorePlan;
}

async function stateOf(virsh: Virsh, domain: string): Promise<string | undefined> {
  try {
    return await domainState(virsh, domain);
  } catch (err) {
    if (isStrataError(err, ErrorCode.NOT_FOUND)) return undefined;
    throw err;
  }
}

export async function refuseIfDomainRunning(virsh: Virsh, plan: RestorePlan): Promise<void> {
  const p = asPlan(plan);
  const s = await stateOf(virsh, p.domain);
  if (s !== undefined && s !== "shut off" && s !== "crashed")
    throw new StrataError(
      ErrorCode.TARGET_CONFLICT,
      `domain ${p.domain} is ${s}: shut it down first (virsh shutdown ${p.domain}), or restore a clone (--target DIR --name NEW)`,
    );
}

export async function defineDomain(virsh: Virsh, plan: RestorePlan, force: boolean): Promise<void> {
  const p = asPlan(plan);
  await refuseIfDomainRunning(virsh, p);
  const existing = await stateOf(virsh, p.domain);
  if (existing !== undefined) {
    const uuid = (await virsh.run(["domuuid", p.domain])).trim();
    if (uuid !== p.config.uuid)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `a domain named ${p.domain} already exists (UUID ${uuid}); choose another name`,
      );
    if (!force)
      throw new StrataError(
        ErrorCode.TARGET_CONFLICT,
        `domain ${p.domain} is defined: --force replaces its definition with the restore point's`,
      );
  }
  const file = p.definition.file ?? join(await fs.mkdtemp("/tmp/strata-define-"), `${p.domain}.xml`);
  if (p.definition.file) {
    await fs.mkdir(join(file, ".."), { recursive: true });
    if (
      !force &&
      (await fs.stat(file).then(
        () => true,
        () => false,
      ))
    )
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `${file} exists (use --force to replace it)`);
  }
  for (const d of p.disks)
    await fs.stat(d.path).catch(() => {
      throw new StrataError(ErrorCode.NOT_FOUND, `disk ${d.name} is not restored yet (${d.path})`);
    });
  if (p.definition.file) await fs.mkdir(join(p.definition.file, "..", "run"), { recursive: true });
  await fs.writeFile(file, p.definition.text);
  try {
    await virsh.run(["define", file]);
  } finally {
    if (!p.definition.file) await fs.rm(join(file, ".."), { recursive: true, force: true });
  }
}

export async function startDomain(virsh: Virsh, plan: RestorePlan): Promise<StartedVm> {
  const p = asPlan(plan);
  await virsh.run(["start", p.domain], { timeoutMs: 120_000 });
  const pid = Number((await fs.readFile(`/run/libvirt/qemu/${p.domain}.pid`, "utf8").catch(() => "")).trim());
  return {
    where: `libvirt domain ${p.domain}`,
    ...(pid > 0 ? { pid } : {}),
    details: domainDetails(virsh.uri, p.domain, p.definition.text),
  };
}

/**
 * Facts about a domain for people and summaries: its name and connection, and the file its
 * serial console writes to, when it has one.
 */
export function domainDetails(uri: string, domain: string, xml: string): Record<string, string> {
  const dom = parseXml(xml, "domain", "domain XML");
  const devices = kid(dom, "devices");
  let console: string | undefined;
  for (const tag of ["serial", "console"]) {
    for (const x of kids(devices, tag)) {
      const path = x.attrs.type === "file" ? kid(x, "source")?.attrs.path : kid(x, "log")?.attrs.file;
      console ??= path;
    }
  }
  return { domain, uri, ...(console ? { console } : {}) };
}

export function renderLibvirtConfig(doc: VmConfigDocument, as: string): string {
  const c = parseLibvirtConfig(doc);
  if (as === "xml") return c.xml;
  if (as === "json") return `${JSON.stringify(c, null, 2)}\n`;
  throw new StrataError(
    ErrorCode.USAGE,
    `a libvirt domain's configuration renders as xml or json, not ${as}`,
  );
}

/** The parts of a domain XML a clone changes, for tests and people. */
export function cloneFacts(xml: string): { name: string; uuid: string; macs: string[]; files: string[] } {
  const d: XElement = parseXml(xml, "domain", "domain XML");
  const devices = kid(d, "devices");
  const files: string[] = [];
  for (const x of devices?.children ?? []) {
    const src = kid(x, "source");
    const f = src?.attrs.file ?? src?.attrs.path;
    if (f) files.push(f);
  }
  return {
    name: (kid(d, "name")?.children[0]?.text ?? "").trim(),
    uuid: (kid(d, "uuid")?.children[0]?.text ?? "").trim(),
    macs: kids(devices, "interface").map((x) => kid(x, "mac")?.attrs.address ?? ""),
    files,
  };
}
