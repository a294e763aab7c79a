/**
 * Proxmox VE's VM configuration files (`/etc/pve/qemu-server/VMID.conf`), read and written
 * losslessly.
 *
 * The format (qemu-server's PVE::QemuServer::parse_vm_config) is one `key: value` per line; `#`
 * lines are the VM's description; `[name]` starts a snapshot section (`[PENDING]` holds changes
 * waiting for a restart, `[special:cloudinit]` the cloud-init state), each with its own keys:
 *
 * ```
 * # web server        (description)
 * boot: order=scsi0
 * scsi0: local-lvm:vm-100-disk-0,size=32G
 * parent: before-upgrade
 *
 * [before-upgrade]
 * scsi0: local-lvm:vm-100-disk-0,size=32G
 * snaptime: 1700000000
 * ```
 *
 * {@link PveConf} keeps every line as it was read. Lines are only re-rendered when {@link PveConf.set}
 * changed them, so a file with no changes is written back byte for byte, with its comments,
 * unknown keys and sections. Values that are property strings (`virtio=BC:24:11:..,bridge=vmbr0`)
 * are edited element by element by {@link parseProps}/{@link joinProps}, keeping the others as
 * they were.
 *
 * A configuration may come from a repository others can write: it is bounded (size, lines, line
 * length, sections, keys) and every line must be one of the forms above; anything else is an
 * error naming the line.
 */
import { ErrorCode, StrataError } from "../../util/errors.js";

/** pmxcfs refuses files above 1 MiB; a configuration can't be larger. */
export const MAX_CONF_BYTES = 1024 * 1024;
export const MAX_CONF_LINES = 20_000;
export const MAX_LINE_BYTES = 64 * 1024;
export const MAX_SECTIONS = 1000;

/** Keys as qemu-server accepts them (`[a-z][a-z_]*\d*`), bounded. */
const KEY_RE = /^([a-z][a-z_]{0,62}\d{0,4}):(?:[ \t]*)(.*)$/;
/** Snapshot names (`[a-zA-Z][a-zA-Z0-9_-]+` in qemu-server), `PENDING`, `special:cloudinit`. */
const SECTION_RE = /^\[(special:cloudinit|[A-Za-z][A-Za-z0-9_-]{0,127})\][ \t]*$/;
const CONTROL_RE = /[\u0000-\u0008\u000a-\u001f\u007f]/;

export type ConfLine =
  | { kind: "entry"; key: string; value: string; raw: string }
  | { kind: "comment"; text: string; raw: string }
  | { kind: "blank"; raw: string };

export interface ConfSection {
  /** null for the main section; the snapshot name, `PENDING` or `special:cloudinit`. */
  name: string | null;
  /** The `[name]` line as read (null for the main section). */
  header: string | null;
  lines: ConfLine[];
}

export interface ParseOptions {
  /** Where the text comes from, for messages ("/etc/pve/qemu-server/100.conf"). */
  where: string;
  /** Error code of a malformed configuration (default SOURCE_UNREADABLE; DATA_CORRUPT for one read from a repository). */
  code?: ErrorCode;
}

/** A VM configuration; see the module comment. */
export class PveConf {
  private constructor(
    readonly sections: ConfSection[],
    private readonly trailingNewline: boolean,
  ) {}

  static parse(input: string | Buffer, o: ParseOptions): PveConf {
    const code = o.code ?? ErrorCode.SOURCE_UNREADABLE;
    const fail = (line: number | undefined, why: string): never => {
      throw new StrataError(
        code,
        `Proxmox VM configuration ${o.where}${line === undefined ? "" : `, line ${line}`}: ${why}`,
      );
    };
    let text: string;
    if (typeof input === "string") {
      if (Buffer.byteLength(input) > MAX_CONF_BYTES) fail(undefined, `larger than ${MAX_CONF_BYTES} bytes`);
      text = input;
    } else {
      if (input.length > MAX_CONF_BYTES) fail(undefined, `larger than ${MAX_CONF_BYTES} bytes`);
      try {
        text = new TextDecoder("utf-8", { fatal: true }).decode(input);
      } catch {
        return fail(undefined, "not valid UTF-8");
      }
    }
    const rawLines = text.split("\n");
    const trailingNewline = rawLines.length > 1 && rawLines.at(-1) === "";
    if (trailingNewline) rawLines.pop();
    if (text === "") rawLines.length = 0;
    if (rawLines.length > MAX_CONF_LINES) fail(undefined, `more than ${MAX_CONF_LINES} lines`);
    const sections: ConfSection[] = [{ name: null, header: null, lines: [] }];
    const seenSections = new Set<string>();
    let keys = new Map<string, number>();
    for (const [i, raw] of rawLines.entries()) {
      const n = i + 1;
      if (Buffer.byteLength(raw) > MAX_LINE_BYTES) fail(n, `longer than ${MAX_LINE_BYTES} bytes`);
      if (CONTROL_RE.test(raw)) fail(n, "holds a control character");
      const section = sections.at(-1)!;
      if (/^[ \t]*$/.test(raw)) {
        section.lines.push({ kind: "blank", raw });
        continue;
      }
      if (raw.startsWith("#")) {
        section.lines.push({ kind: "comment", text: raw.slice(1), raw });
        continue;
      }
      const h = SECTION_RE.exec(raw);
      if (h) {
        const name = h[1]!;
        if (seenSections.has(name)) fail(n, `section [${name}] appears twice`);
        if (seenSections.size >= MAX_SECTIONS) fail(n, `more than ${MAX_SECTIONS} sections`);
        seenSections.add(name);
        sections.push({ name, header: raw, lines: [] });
        keys = new Map();
        continue;
      }
      const m = KEY_RE.exec(raw);
      if (!m) fail(n, `not "key: value", a [section] or a # comment: ${JSON.stringify(raw.slice(0, 80))}`);
      const key = m![1]!;
      const value = m![2]!.replace(/[ \t]+$/, "");
      if (value === "") fail(n, `key ${key} has no value`);
      const first = keys.get(key);
      if (first !== undefined) fail(n, `key ${key} appears twice in one section (also line ${first})`);
      keys.set(key, n);
      section.lines.push({ kind: "entry", key, value, raw });
    }
    return new PveConf(sections, trailingNewline);
  }

  /** The text: byte for byte what was parsed, except lines changed since. */
  toString(): string {
    const out: string[] = [];
    for (const s of this.sections) {
      if (s.header !== null) out.push(s.header);
      for (const l of s.lines) out.push(l.raw);
    }
    if (out.length === 0) return "";
    return out.join("\n") + (this.trailingNewline ? "\n" : "");
  }

  /** A deep copy to edit. */
  clone(): PveConf {
    return new PveConf(
      this.sections.map((s) => ({ ...s, lines: s.lines.map((l) => ({ ...l })) })),
      this.trailingNewline,
    );
  }

  private section(name: string | null): ConfSection | undefined {
    return this.sections.find((s) => s.name === name);
  }

  /** The value of `key` in the main section (or the named one). */
  get(key: string, section: string | null = null): string | undefined {
    const l = this.section(section)?.lines.find((x) => x.kind === "entry" && x.key === key);
    return l?.kind === "entry" ? l.value : undefined;
  }

  /** Every `key: value` of the main section (or the named one), in order. */
  entries(section: string | null = null): Array<[string, string]> {
    return (this.section(section)?.lines ?? []).flatMap((l) =>
      l.kind === "entry" ? [[l.key, l.value] as [string, string]] : [],
    );
  }

  /** Sets `key` in the main section: in its place when present, else after the last key. */
  set(key: string, value: string): void {
    if (!KEY_RE.test(`${key}: ${value}`) || CONTROL_RE.test(value) || value.trim() !== value || value === "")
      throw new StrataError(ErrorCode.INTERNAL, `not a valid configuration line: ${key}: ${value}`);
    const main = this.sections[0]!;
    const raw = `${key}: ${value}`;
    const l = main.lines.find((x) => x.kind === "entry" && x.key === key);
    if (l?.kind === "entry") {
      if (l.value === value) return;
      l.value = value;
      l.raw = raw;
      return;
    }
    let at = main.lines.length;
    while (at > 0 && main.lines[at - 1]!.kind === "blank") at--;
    main.lines.splice(at, 0, { kind: "entry", key, value, raw });
  }

  /** Removes `key` from the main section; true when it was there. */
  delete(key: string): boolean {
    const main = this.sections[0]!;
    const i = main.lines.findIndex((x) => x.kind === "entry" && x.key === key);
    if (i < 0) return false;
    main.lines.splice(i, 1);
    return true;
  }

  /** Names of the snapshot sections (not PENDING or special:cloudinit). */
  snapshots(): string[] {
    return this.sections.flatMap((s) =>
      s.name !== null && s.name !== "PENDING" && !s.name.startsWith("special:") ? [s.name] : [],
    );
  }

  /** Drops every section but the main one, and the blank lines that separated them. */
  dropSections(): string[] {
    const dropped = this.sections.slice(1).map((s) => s.name!);
    this.sections.length = 1;
    const main = this.sections[0]!;
    while (main.lines.length > 0 && main.lines.at(-1)!.kind === "blank") main.lines.pop();
    return dropped;
  }
}

/** One element of a property string: `key=value`, or a bare value (the default key's). */
export interface Prop {
  key: string | undefined;
  value: string;
}

/** Splits a property string (`local-lvm:vm-100-disk-0,size=32G,cache=writeback`) on commas. */
export function parseProps(value: string): Prop[] {
  return value.split(",").map((p) => {
    const eq = p.indexOf("=");
    return eq < 0 ? { key: undefined, value: p } : { key: p.slice(0, eq), value: p.slice(eq + 1) };
  });
}

export function joinProps(props: readonly Prop[]): string {
  return props.map((p) => (p.key === undefined ? p.value : `${p.key}=${p.value}`)).join(",");
}

/** The value of `key` in a property string. */
export function prop(props: readonly Prop[], key: string): string | undefined {
  return props.find((p) => p.key === key)?.value;
}

/** Sets `key` in place (or appends it). */
export function setProp(props: Prop[], key: string, value: string): void {
  const p = props.find((x) => x.key === key);
  if (p) p.value = value;
  else props.push({ key, value });
}
