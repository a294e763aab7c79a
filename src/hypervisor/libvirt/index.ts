/**
 * The libvirt adapter: domains of a libvirt host, `libvirt:DOMAIN[?uri=qemu:///system]`.
 *
 * On a libvirt host the domain's QMP socket belongs to libvirtd (a second client connects but is
 * never greeted), so Strata goes through libvirt's own API, driving `virsh` (virsh.ts):
 *
 *  - backup (backup.ts): libvirt's pull-mode backup with a checkpoint created atomically with each
 *    backup; Strata reads the NBD exports libvirt opens; the guest agent freezes through libvirt;
 *  - configuration (domain.ts): the persistent domain XML, kept whole in the restore point;
 *  - restore (restore.ts): define the domain again, in place or as a clone beside the original;
 *  - leftovers: what a dead run left (state records, strata-* checkpoints, backup jobs).
 *
 * Nothing here sends QMP to a libvirt domain: that would taint it and race libvirt's own view.
 */

import { ErrorCode, StrataError } from "../../util/errors.js";
import type {
  BackupRequest,
  BackupSession,
  Finding,
  InstantRuntime,
  RestorePlan,
  RestorePlanOptions,
  StartedVm,
  VmAdapter,
  VmConfigDocument,
  VmHandle,
  VmSummary,
} from "../adapter.js";
import { openLibvirtBackup } from "./backup.js";
import { parseLibvirtConfig } from "./config.js";
import { DOMAIN_NAME_RE, URI_RE } from "./domain.js";
import { LibvirtInstant } from "./instant.js";
import { findLeftovers } from "./leftovers.js";
import {
  defineDomain,
  planLibvirtRestore,
  refuseIfDomainRunning,
  renderLibvirtConfig,
  startDomain,
} from "./restore.js";
import { Virsh } from "./virsh.js";

export { CHECKPOINT_KIND, type LibvirtCheckpointRecord } from "./backup.js";
export { type LibvirtConfig, parseLibvirtConfig } from "./config.js";
export { cloneFacts, type LibvirtRestorePlan } from "./restore.js";
export { Virsh, VirshError } from "./virsh.js";

export const DEFAULT_URI = "qemu:///system";

export interface LibvirtTarget {
  domain: string;
  uri: string;
}

/** Parses `libvirt:DOMAIN[?uri=URI]`. */
export function parseLibvirtUri(source: string): LibvirtTarget {
  const usage = "libvirt:DOMAIN[?uri=qemu:///system]";
  if (!source.startsWith("libvirt:"))
    throw new StrataError(ErrorCode.USAGE, `not a libvirt source: "${source}" (${usage})`);
  const rest = source.slice("libvirt:".length);
  const q = rest.indexOf("?");
  const domain = q < 0 ? rest : rest.slice(0, q);
  if (!DOMAIN_NAME_RE.test(domain))
    throw new StrataError(
      ErrorCode.USAGE,
      `source "${source}": "${domain}" is not a domain name Strata handles (letters, digits, . _ + -) (${usage})`,
    );
  let uri = DEFAULT_URI;
  if (q >= 0) {
    for (const part of rest.slice(q + 1).split("&")) {
      const eq = part.indexOf("=");
      const k = eq < 0 ? part : part.slice(0, eq);
      const v = eq < 0 ? "" : part.slice(eq + 1);
      if (k === "uri" && URI_RE.test(v)) uri = v;
      else
        throw new StrataError(
          ErrorCode.USAGE,
          `source "${source}": unknown or bad option "${part}" (${usage})`,
        );
    }
  }
  return { domain, uri };
}

function summaryState(s: string): VmSummary["state"] {
  if (s === "running" || s === "idle" || s === "in shutdown") return "running";
  if (s === "paused" || s === "pmsuspended") return "paused";
  if (s === "shut off" || s === "crashed") return "shut off";
  return "unknown";
}

export interface LibvirtAdapterOptions {
  /** The connection `list()` and `leftovers()` look at. */
  uri?: string;
}

export class LibvirtAdapter implements VmAdapter {
  readonly id = "libvirt";
  readonly schemes = ["libvirt"] as const;
  readonly usage = "libvirt:DOMAIN[?uri=qemu:///system]";
  readonly uri: string;
  readonly instant: InstantRuntime;

  constructor(options: LibvirtAdapterOptions = {}) {
    this.uri = options.uri ?? DEFAULT_URI;
    this.instant = new LibvirtInstant(this.uri);
  }

  virsh(uri = this.uri): Virsh {
    return new Virsh(uri);
  }

  async resolve(uri: string): Promise<VmHandle> {
    const t = parseLibvirtUri(uri);
    const virsh = this.virsh(t.uri);
    return {
      adapter: this,
      source: uri,
      defaultName: t.domain,
      openBackup: (request: BackupRequest): Promise<BackupSession> =>
        openLibvirtBackup({ virsh, domain: t.domain, request }),
      // Runs are recorded by domain (a domain's checkpoints are one chain whatever it is filed under).
      leftovers: (_vm: string, stateDir: string, fix: boolean): Promise<Finding[]> =>
        findLeftovers(virsh, stateDir, fix, t.domain),
    };
  }

  async list(): Promise<VmSummary[]> {
    const out = await this.virsh().run(["list", "--all"]);
    const vms: VmSummary[] = [];
    for (const line of out.split("\n").slice(2)) {
      const m = /^\s*(\S+)\s+(\S+)\s+(.+?)\s*$/.exec(line);
      if (!m) continue;
      const name = m[2]!;
      vms.push({
        adapter: this.id,
        source: this.uri === DEFAULT_URI ? `libvirt:${name}` : `libvirt:${name}?uri=${this.uri}`,
        name,
        state: summaryState(m[3]!),
      });
    }
    return vms;
  }

  parseConfig(doc: VmConfigDocument): VmConfigDocument {
    return parseLibvirtConfig(doc);
  }

  async planRestore(config: VmConfigDocument, options: RestorePlanOptions): Promise<RestorePlan> {
    return planLibvirtRestore(config, options);
  }

  refuseIfRunning(plan: RestorePlan): Promise<void> {
    return refuseIfDomainRunning(this.virsh(), plan);
  }

  define(plan: RestorePlan, force: boolean): Promise<void> {
    return defineDomain(this.virsh(), plan, force);
  }

  start(plan: RestorePlan): Promise<StartedVm> {
    return startDomain(this.virsh(), plan);
  }

  renderConfig(config: VmConfigDocument, as: string): string {
    return renderLibvirtConfig(config, as);
  }

  leftovers(stateDir: string, fix: boolean): Promise<Finding[]> {
    return findLeftovers(this.virsh(), stateDir, fix);
  }
}
