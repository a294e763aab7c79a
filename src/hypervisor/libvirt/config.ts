/**
 * The configuration document of a libvirt domain (`kind: "libvirt"`): the summary every adapter
 * writes (name, UUID, CPUs, memory, disks with target, source, format and size, NICs) and the
 * persistent domain XML whole (`virsh dumpxml --inactive`), from which a restore defines the
 * domain again. A document read back from a repository is hostile input: the XML is bounded and
 * parsed again, and the summary is rebuilt from it, never trusted beside it.
 */

import { ErrorCode, StrataError } from "../../util/errors.js";
import type { VmConfigDocument } from "../adapter.js";
import { backupDisks, parseDomain } from "./domain.js";
import { MAX_XML } from "./xml.js";

export interface LibvirtConfig extends VmConfigDocument {
  kind: "libvirt";
  name: string;
  uuid: string;
  domainType: string;
  /** The persistent domain XML. */
  xml: string;
}

/** Checks a stored document and rebuilds its summary from its XML. */
export function parseLibvirtConfig(doc: VmConfigDocument): LibvirtConfig {
  const bad = (why: string) => new StrataError(ErrorCode.DATA_CORRUPT, `libvirt configuration: ${why}`);
  if (!doc || typeof doc !== "object" || doc.kind !== "libvirt") throw bad("not a libvirt document");
  if (typeof doc.xml !== "string" || doc.xml.length > MAX_XML) throw bad("no domain XML, or one too large");
  const info = parseDomain(doc.xml, "stored domain XML");
  const sizes = new Map<string, number>();
  if (Array.isArray(doc.disks)) {
    for (const d of doc.disks.slice(0, 256)) {
      if (d && typeof d.name === "string" && Number.isSafeInteger(d.size) && d.size >= 0)
        sizes.set(d.name, d.size);
    }
  }
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
      size: sizes.get(d.target) ?? 0,
      type: d.type,
      device: d.device,
    })),
    nics: info.nics.map((n) => ({ id: n.id, mac: n.mac, type: n.type, model: n.model })),
    domainType: info.type,
    xml: doc.xml,
  };
}
