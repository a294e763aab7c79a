/**
 * A restored VM's QEMU command line: the recorded one (VmConfig.commandLine) rewritten, or one
 * synthesised from the VmConfig when QEMU's process was not found at backup time.
 *
 * Rewriting is a pass over the argv that knows the handful of options carrying what two VMs on
 * one host must not share, and leaves everything else as it was recorded:
 *
 *   disks       `-blockdev ...filename=`, `-drive file=`        → the restored paths; the
 *               format node's `driver=` / `-drive format=`        → the restored format
 *   identity    `-name`, `-uuid` (added when absent)            → the clone's
 *   NICs        `-device <nic>,mac=`, `-nic ...,mac=`, `-net nic,macaddr=` → new random,
 *               locally administered MACs (52:54:00:xx:xx:xx, QEMU's prefix)
 *   run files   `-chardev socket|file|pipe,path=`, `logfile=`, `-qmp/-monitor/-serial unix:|file:`,
 *               `-pidfile`, `-D`, `-vnc` (made a unix socket)   → the clone's run directory
 *   accelerator `-machine accel=`, `-accel`, `-enable-kvm`, `-cpu host` → what this host runs
 *               ({@link chooseAccelerator}: KVM only where it works)
 *   dropped     `-daemonize` (Strata detaches QEMU itself and keeps its pid), `-incoming` (the
 *               VM boots from its restored disks instead of waiting for a migration)
 *   isolated    (boot verification) every `-netdev` becomes a `hubport` on a hub of its own, so
 *               the NICs stay but nothing they send leaves QEMU; `-nic` and `-net` are dropped
 *               and `-nic none` keeps QEMU from adding its default NIC
 *
 * A restore to the original paths keeps identity, NICs and run files; only the accelerator is
 * adjusted. Values use QEMU's option syntax (`,,` is a comma inside a value); JSON-syntax
 * `-blockdev {...}` is rewritten as JSON. Things not rewritten (a tap `ifname=`, SPICE ports,
 * host devices) are reported as warnings.
 */
import { randomBytes, randomUUID } from "node:crypto";
import { basename, extname, join, resolve } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { type Accelerator, buildCommandLine } from "./launcher.js";
import type { VmConfig } from "./live.js";

/** A random MAC with QEMU's locally administered prefix 52:54:00. */
export function randomMac(): string {
  const b = randomBytes(3);
  return ["52", "54", "00", ...[...b].map((x) => x.toString(16).padStart(2, "0"))].join(":");
}

/** One `key=value` (or bare `flag`) of a QEMU option string, value unescaped. */
interface Opt {
  key: string | undefined;
  value: string;
}

/** Splits `a=b,c=d,,e,flag` on single commas (`,,` is a literal comma). */
export function splitOpts(s: string): Opt[] {
  const parts: string[] = [];
  let cur = "";
  for (let i = 0; i < s.length; i++) {
    const ch = s[i]!;
    if (ch === ",") {
      if (s[i + 1] === ",") {
        cur += ",";
        i++;
        continue;
      }
      parts.push(cur);
      cur = "";
      continue;
    }
    cur += ch;
  }
  parts.push(cur);
  return parts.map((p) => {
    const eq = p.indexOf("=");
    return eq < 0 ? { key: undefined, value: p } : { key: p.slice(0, eq), value: p.slice(eq + 1) };
  });
}

export function joinOpts(opts: readonly Opt[]): string {
  return opts
    .map((o) => (o.key === undefined ? o.value : `${o.key}=${o.value}`).replaceAll(",", ",,"))
    .join(",");
}

const get = (opts: readonly Opt[], key: string) => opts.find((o) => o.key === key)?.value;
function set(opts: Opt[], key: string, value: string): void {
  const o = opts.find((x) => x.key === key);
  if (o) o.value = value;
  else opts.push({ key, value });
}

const NIC_TYPE = /net|e1000|rtl8139|vmxnet|ne2k|pcnet|i8255|eepro/;

/** First hub id of an isolated VM's NICs (one hub each; QEMU's own hubs count from 0). */
const ISOLATED_HUB = 4000;

/** The QEMU guest agent's channel name (`-device virtserialport,...,name=`). */
export const GUEST_AGENT_CHANNEL = "org.qemu.guest_agent.0";

/**
 * The unix socket of the guest agent's channel in an argv (binary first): the `-chardev socket`
 * of the `virtserialport` named {@link GUEST_AGENT_CHANNEL}, when QEMU is its server.
 */
export function findAgentSocket(argv: readonly string[]): string | undefined {
  const sockets = new Map<string, string>();
  let chardev: string | undefined;
  for (let i = 1; i < argv.length - 1; i++) {
    const o = splitOpts(argv[i + 1]!);
    if (argv[i] === "-chardev") {
      const id = get(o, "id");
      const path = get(o, "path");
      const server = get(o, "server");
      if (
        o[0]?.key === undefined &&
        o[0]?.value === "socket" &&
        id &&
        path &&
        (server === "on" || o.some((x) => x.key === undefined && x.value === "server"))
      )
        sockets.set(id, path);
    } else if (argv[i] === "-device") {
      const type = o[0]?.key === undefined ? o[0]?.value : get(o, "driver");
      if (type === "virtserialport" && get(o, "name") === GUEST_AGENT_CHANNEL) chardev = get(o, "chardev");
    }
  }
  return chardev === undefined ? undefined : sockets.get(chardev);
}

/** What the clone or restore changes; absent fields are kept. */
export interface Rewrite {
  /** Old disk path (resolved) → new path. */
  files: ReadonlyMap<string, string>;
  /** Disk node-name → its format (the format node's `driver=`). */
  formats: ReadonlyMap<string, string>;
  /** Old disk path (resolved) → its format (`-drive format=`, set even when unchanged: no probing). */
  fileFormats: ReadonlyMap<string, string>;
  clone?: {
    name: string;
    uuid: string;
    /** NIC id → new MAC. */
    macs: ReadonlyMap<string, string>;
    runDir: string;
  };
  accel: Accelerator;
  /** No network: NICs keep their devices but reach nothing (see the module comment). */
  isolate?: boolean;
  /** Where a QMP socket goes when the recorded line has none (a clone's run directory otherwise). */
  runDir?: string;
}

export interface RewriteResult {
  argv: string[];
  /** The QMP socket of the result (added when the recorded line had none). */
  qmpSocket: string;
  warnings: string[];
}

/** Finds the QMP unix socket of an argv (binary first): `-mon chardev=X,mode=control` or `-qmp unix:P`. */
export function findQmpSocket(argv: readonly string[]): string | undefined {
  const sockets = new Map<string, string>();
  let monId: string | undefined;
  let qmp: string | undefined;
  for (let i = 1; i < argv.length - 1; i++) {
    const flag = argv[i]!;
    const val = argv[i + 1]!;
    if (flag === "-chardev") {
      const o = splitOpts(val);
      const id = get(o, "id");
      const path = get(o, "path");
      if (o[0]?.key === undefined && o[0]?.value === "socket" && id && path) sockets.set(id, path);
    } else if (flag === "-mon") {
      const o = splitOpts(val);
      if (get(o, "mode") === "control") monId = get(o, "chardev");
    } else if (flag === "-qmp" || flag === "-qmp-pretty") {
      const first = splitOpts(val)[0]?.value ?? "";
      if (first.startsWith("unix:")) qmp ??= first.slice(5);
    }
  }
  return qmp ?? (monId === undefined ? undefined : sockets.get(monId));
}

/** Rewrites a recorded QEMU argv (binary first) as described in the module comment. Pure. */
export function rewriteCommandLine(argv: readonly string[], rw: Rewrite): RewriteResult {
  const warnings: string[] = [];
  const out: string[] = [argv[0]!];
  const c = rw.clone;
  const usedRunNames = new Map<string, string>();
  /** A clone's private copy of a run file (socket, log, pid file): same base name, its run dir. */
  const runPath = (p: string): string => {
    if (!c) return p;
    const abs = resolve(p);
    const known = usedRunNames.get(abs);
    if (known) return known;
    let name = basename(p);
    const taken = new Set(usedRunNames.values());
    for (let n = 1; taken.has(join(c.runDir, name)); n++)
      name = `${basename(p, extname(p))}-${n}${extname(p)}`;
    const np = join(c.runDir, name);
    usedRunNames.set(abs, np);
    return np;
  };
  const diskPath = (p: string): string | undefined => rw.files.get(resolve(p));
  const otherMacs = new Set<string>();
  const macFor = (id: string | undefined): string => {
    const m = id === undefined ? undefined : c?.macs.get(id);
    if (m) return m;
    let r = randomMac();
    while (otherMacs.has(r)) r = randomMac();
    otherMacs.add(r);
    return r;
  };
  let sawUuid = false;
  let sawAccel = false;
  let hubs = 0;
  const tcg = rw.accel === "tcg";

  const rewriteJson = (node: unknown, nodeName?: string): unknown => {
    if (Array.isArray(node)) return node.map((x) => rewriteJson(x));
    if (typeof node !== "object" || node === null) return node;
    const obj = { ...(node as Record<string, unknown>) };
    const nn = typeof obj["node-name"] === "string" ? (obj["node-name"] as string) : nodeName;
    for (const [k, v] of Object.entries(obj)) {
      if (k === "filename" && typeof v === "string") obj[k] = diskPath(v) ?? v;
      else if (typeof v === "object") obj[k] = rewriteJson(v);
    }
    const fmt = nn === undefined ? undefined : rw.formats.get(nn);
    if (fmt && typeof obj.driver === "string" && obj["node-name"] === nn) obj.driver = fmt;
    return obj;
  };

  for (let i = 1; i < argv.length; i++) {
    const flag = argv[i]!;
    const val = argv[i + 1];
    switch (flag) {
      case "-blockdev": {
        i++;
        if (val === undefined) break;
        if (val.startsWith("{")) {
          out.push(flag, JSON.stringify(rewriteJson(JSON.parse(val) as unknown)));
          break;
        }
        const o = splitOpts(val);
        for (const x of o) {
          if (x.key !== undefined && /(^|\.)filename$/.test(x.key)) x.value = diskPath(x.value) ?? x.value;
        }
        const nn = get(o, "node-name");
        const fmt = nn === undefined ? undefined : rw.formats.get(nn);
        if (fmt && get(o, "driver") !== undefined) set(o, "driver", fmt);
        out.push(flag, joinOpts(o));
        break;
      }
      case "-drive": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        const file = get(o, "file");
        if (file !== undefined) {
          const np = diskPath(file);
          const fmt = rw.fileFormats.get(resolve(file));
          if (np) set(o, "file", np);
          if (fmt) {
            // Every format key QEMU would read: a -drive without one probes the (guest-written) image.
            for (const x of o) if (x.key === "format" || x.key === "driver") x.value = fmt;
            set(o, "format", fmt);
          }
        }
        out.push(flag, joinOpts(o));
        break;
      }
      case "-device": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        const type = o[0]?.key === undefined ? (o[0]?.value ?? "") : (get(o, "driver") ?? "");
        if (c && NIC_TYPE.test(type) && !/^virtio-serial|vhost-user-fs/.test(type))
          set(o, "mac", macFor(get(o, "id")));
        out.push(flag, joinOpts(o));
        break;
      }
      case "-nic": {
        i++;
        if (val === undefined) break;
        if (rw.isolate) break;
        const o = splitOpts(val);
        if (c && o[0]?.value !== "none") set(o, "mac", macFor(get(o, "id")));
        if (c && get(o, "ifname") !== undefined)
          warnings.push(
            `-nic ${val}: the clone shares the host interface ${get(o, "ifname")} with the original`,
          );
        out.push(flag, joinOpts(o));
        break;
      }
      case "-net": {
        i++;
        if (val === undefined) break;
        if (rw.isolate) break;
        const o = splitOpts(val);
        if (c && o[0]?.key === undefined && o[0]?.value === "nic") set(o, "macaddr", macFor(undefined));
        out.push(flag, joinOpts(o));
        break;
      }
      case "-netdev": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        if (rw.isolate) {
          // A hub with one port: the NIC's frames go nowhere.
          out.push(
            flag,
            joinOpts([
              { key: undefined, value: "hubport" },
              { key: "id", value: get(o, "id") ?? `strata-net${hubs}` },
              { key: "hubid", value: String(ISOLATED_HUB + hubs++) },
            ]),
          );
          break;
        }
        if (c && get(o, "ifname") !== undefined)
          warnings.push(
            `-netdev ${val}: the clone uses the same host interface ${get(o, "ifname")} as the original; change it before running both`,
          );
        out.push(flag, val);
        break;
      }
      case "-chardev": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        const backend = o[0]?.key === undefined ? o[0]?.value : get(o, "backend");
        for (const x of o) {
          if (x.key === "logfile") x.value = runPath(x.value);
          if (x.key === "path" && (backend === "socket" || backend === "file" || backend === "pipe"))
            x.value = runPath(x.value);
        }
        out.push(flag, joinOpts(o));
        break;
      }
      case "-qmp":
      case "-qmp-pretty":
      case "-monitor":
      case "-serial":
      case "-parallel": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        const first = o[0];
        if (first && first.key === undefined) {
          const m = /^(unix|file):(.*)$/.exec(first.value);
          if (m) first.value = `${m[1]}:${runPath(m[2]!)}`;
        }
        out.push(flag, joinOpts(o));
        break;
      }
      case "-pidfile":
      case "-D": {
        i++;
        if (val === undefined) break;
        out.push(flag, runPath(val));
        break;
      }
      case "-vnc": {
        i++;
        if (val === undefined) break;
        if (c && val !== "none" && !val.startsWith("unix:")) {
          out.push(flag, `unix:${join(c.runDir, "vnc.sock")}`);
          warnings.push(`-vnc ${val} became a unix socket, ${join(c.runDir, "vnc.sock")}, so it can't clash`);
        } else if (c && val.startsWith("unix:")) {
          const o = splitOpts(val);
          o[0]!.value = `unix:${runPath(o[0]!.value.slice(5))}`;
          out.push(flag, joinOpts(o));
        } else out.push(flag, val);
        break;
      }
      case "-spice": {
        i++;
        if (val === undefined) break;
        if (c) warnings.push(`-spice ${val} is kept: the clone's SPICE port may clash with the original's`);
        out.push(flag, val);
        break;
      }
      case "-name": {
        i++;
        if (val === undefined) break;
        if (!c) {
          out.push(flag, val);
          break;
        }
        const o = splitOpts(val);
        if (o[0]?.key === undefined) o[0]!.value = c.name;
        else set(o, "guest", c.name);
        if (get(o, "process") !== undefined) set(o, "process", c.name);
        out.push(flag, joinOpts(o));
        break;
      }
      case "-uuid": {
        i++;
        sawUuid = true;
        out.push(flag, c ? c.uuid : (val ?? ""));
        break;
      }
      case "-machine":
      case "-M": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        if (get(o, "accel") !== undefined) {
          sawAccel = true;
          set(o, "accel", rw.accel);
        }
        out.push(flag, joinOpts(o));
        break;
      }
      case "-accel": {
        i++;
        if (val === undefined) break;
        sawAccel = true;
        const o = splitOpts(val);
        if (o[0]?.key === undefined) o[0]!.value = rw.accel;
        else set(o, "accel", rw.accel);
        out.push(flag, joinOpts(o));
        break;
      }
      case "-enable-kvm": {
        if (rw.accel === "kvm") {
          sawAccel = true;
          out.push(flag);
        }
        break;
      }
      case "-daemonize":
        warnings.push("-daemonize dropped: Strata starts QEMU detached itself and keeps its pid");
        break;
      case "-incoming": {
        i++;
        warnings.push(`-incoming ${val ?? ""} dropped: the restored VM boots from its disks`);
        break;
      }
      case "-cpu": {
        i++;
        if (val === undefined) break;
        const o = splitOpts(val);
        if (tcg && o[0]?.key === undefined && o[0]?.value === "host") o[0]!.value = "max";
        out.push(flag, joinOpts(o));
        break;
      }
      default:
        out.push(flag);
    }
  }
  if (!sawAccel && !tcg) out.push("-accel", rw.accel);
  if (c && !sawUuid) out.push("-uuid", c.uuid);
  if (rw.isolate) out.push("-nic", "none");
  let qmpSocket = findQmpSocket(out);
  if (qmpSocket === undefined) {
    qmpSocket = join(c?.runDir ?? rw.runDir ?? ".", "qmp.sock");
    out.push(
      "-chardev",
      `socket,id=strata-qmp,path=${qmpSocket.replaceAll(",", ",,")},server=on,wait=off`,
      "-mon",
      "chardev=strata-qmp,mode=control",
    );
    warnings.push(`the recorded command line has no QMP socket: added ${qmpSocket}`);
  }
  return { argv: out, qmpSocket, warnings };
}

/** The qdev id of a disk's device ("vblk0" of /machine/peripheral/vblk0/virtio-backend). */
export function deviceId(device: string, fallback: string): string {
  return /\/machine\/peripheral\/([^/]+)/.exec(device)?.[1] ?? (device !== "" ? device : fallback);
}

/**
 * A QEMU argv for a VmConfig without a recorded command line, built by the launcher's
 * {@link buildCommandLine}: virtio-blk disks in their recorded order (the first boots), user-mode
 * NICs with the config's MACs, firmware boot (a direct-kernel-boot VM needs its kernel named).
 */
export function synthesiseCommandLine(
  config: VmConfig,
  runDir: string,
  accel: Accelerator,
): { argv: string[]; qmpSocket: string; warnings: string[] } {
  const warnings: string[] = [
    "the restore point holds no recorded QEMU command line: synthesised one from the configuration (virtio disks and NICs, firmware boot)",
  ];
  if (config.firmware === "direct kernel boot")
    warnings.push("the VM booted a kernel given on the command line: add -kernel/-initrd/-append to boot it");
  if (config.disks.length === 0) throw new StrataError(ErrorCode.USAGE, "the configuration names no disks");
  const extra: string[] = [];
  if (config.uuid) extra.push("-uuid", config.uuid);
  for (const n of config.nics) {
    extra.push("-netdev", `user,id=${n.id}-net`);
    extra.push(
      "-device",
      `${n.type.replaceAll(",", ",,")},id=${n.id},netdev=${n.id}-net${n.mac ? `,mac=${n.mac}` : ""}`,
    );
  }
  const args = buildCommandLine(
    {
      runDir,
      name: config.name ?? "strata-vm",
      memoryMiB: Math.max(16, Math.round(config.memoryBytes / 1024 / 1024)) || 256,
      cpus: Math.max(1, config.cpus),
      ...(config.machine ? { machine: config.machine } : {}),
      disks: config.disks.map((d, i) => ({
        file: d.file,
        format: d.format,
        nodeName: d.node,
        id: deviceId(d.device, d.name),
        ...(i === 0 ? { bootIndex: 0 } : {}),
      })),
      extraArgs: extra,
    },
    accel,
  );
  return { argv: ["qemu-system-x86_64", ...args], qmpSocket: join(runDir, "qmp.sock"), warnings };
}

/** A fresh identity for a clone: UUID and one MAC per NIC. */
export function newIdentity(config: VmConfig): { uuid: string; macs: Map<string, string> } {
  const macs = new Map<string, string>();
  const taken = new Set(config.nics.map((n) => n.mac?.toLowerCase()));
  for (const n of config.nics) {
    let m = randomMac();
    while (taken.has(m)) m = randomMac();
    taken.add(m);
    macs.set(n.id, m);
  }
  return { uuid: randomUUID(), macs };
}

/** Shell-quotes an argv for printing as one command. */
export function shellQuote(argv: readonly string[]): string {
  return argv
    .map((a) => (/^[A-Za-z0-9_@%+=:,./-]+$/.test(a) ? a : `'${a.replaceAll("'", `'\\''`)}'`))
    .join(" ");
}

/** The file the guest's serial console goes to (`-serial chardev:X` + `-chardev file,id=X,path=P`, or `-serial file:P`). */
export function findConsoleLog(argv: readonly string[]): string | undefined {
  const files = new Map<string, string>();
  let serial: string | undefined;
  for (let i = 1; i < argv.length - 1; i++) {
    const val = argv[i + 1]!;
    if (argv[i] === "-chardev") {
      const o = splitOpts(val);
      const id = get(o, "id");
      const path = get(o, "path");
      if (o[0]?.value === "file" && id && path) files.set(id, path);
    } else if (argv[i] === "-serial" && serial === undefined) serial = val;
  }
  if (serial?.startsWith("file:")) return serial.slice(5);
  if (serial?.startsWith("chardev:")) return files.get(serial.slice(8));
  return undefined;
}
