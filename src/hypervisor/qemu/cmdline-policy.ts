/**
 * What Strata lets QEMU do when it runs a command line that came from a stored configuration.
 *
 * A restore point of a running VM carries the VM's QEMU command line, and `restore --start`, a
 * clone and instant recovery run it as root. A repository others can write (an unencrypted one,
 * whose manifest seal anyone recomputes) may hold a tampered one, so the command line is held
 * to a policy twice:
 *
 *  1. when the configuration is read ({@link checkRecordedCommandLine}, from config.ts): only
 *     options on an allow-list, each option's sub-options checked: nothing that runs a host
 *     program (`-netdev tap,script=`, `-netdev user,smb=`, `-incoming exec:`, `-plugin`,
 *     `-display spice-app`), hands a host resource to the guest (`-virtfs`, `-fsdev`,
 *     `vfio-pci`, `usb-host`, a `/dev/*` serial, `-semihosting`), opens a monitor on the network
 *     (`-qmp tcp:`), reads more options from elsewhere (`-readconfig`, `-set`, `-add-fd`),
 *     changes who QEMU runs as (`-runas`, `-chroot`), or opens, writable, a host file that is
 *     not one of the VM's disks;
 *  2. right before QEMU is spawned ({@link checkCommandLineToRun}, from start.ts), on the exact
 *     argv: the same policy, and every host path placed: a disk the restore wrote (opened with
 *     the format it was written in, so no guest-written image is probed), a file or socket in
 *     the run directory or the target, Strata's own NBD socket, or a regular file every local
 *     user may read (firmware, a kernel, an ISO: nothing secret reaches the guest). Device
 *     files are never opened (`/dev/watchdog` reboots a host when opened), except
 *     `/dev/urandom` and `/dev/random` for an RNG.
 *
 * The policy reads both of QEMU's option syntaxes (`key=value,...` with `,,` escapes, and the
 * JSON of `-blockdev`, `-device`, `-netdev`, `-object`, `-audiodev`, `-display`) into one flat
 * list of dotted keys, and checks every occurrence of a key (QEMU takes the last of a repeated
 * key, Strata's rewrite the first). Option arity follows QEMU 7.2 (`--opt` is `-opt`), checked
 * against the real binary by test/vmrestore/qemu-options.test.ts: a wrong arity would let an
 * option hide behind another's value.
 *
 * Host programs: a tap's `script=`/`downscript=` may name only a platform's own network
 * scripts ({@link HOST_SCRIPTS}: QEMU's defaults and Proxmox VE's), or `no`; at run time they
 * must be root's regular files nobody else can write. Anything else is refused, naming the
 * option.
 */
import type { Stats } from "node:fs";
import { lstat, realpath, stat, statfs } from "node:fs/promises";
import { basename, dirname, resolve, sep } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";
import { CONTROL, hasDotDot } from "../../util/schema.js";
import { splitOpts } from "./clone.js";

/** Network scripts a tap may run: QEMU's defaults and Proxmox VE's bridge scripts. */
export const HOST_SCRIPTS: readonly string[] = [
  "/etc/qemu-ifup",
  "/etc/qemu-ifdown",
  "/var/lib/qemu-server/pve-bridge",
  "/var/lib/qemu-server/pve-bridgedown",
];
/** The bridge helper QEMU runs by default for `-netdev bridge`. */
const BRIDGE_HELPERS = ["/usr/lib/qemu/qemu-bridge-helper", "/usr/libexec/qemu-bridge-helper"];

/** Options without an argument that Strata passes through. */
const NO_ARG = new Set([
  "-nographic",
  "-no-user-config",
  "-nodefaults",
  "-no-reboot",
  "-no-shutdown",
  "-enable-kvm",
  "-S",
  "-no-hpet",
  "-no-acpi",
  "-no-fd-bootchk",
  "-full-screen",
  "-usb",
  "-mem-prealloc",
  "-snapshot",
  "-only-migratable",
  "-daemonize",
]);

/** Options refused, with why. */
const REFUSED: Record<string, string> = {
  "-plugin": "loads a host library into QEMU",
  "-readconfig": "reads further options from a host file",
  "-writeconfig": "writes a host file",
  "-add-fd": "hands host file descriptors to QEMU",
  "-set": "changes options after they were checked",
  "-runas": "changes the user QEMU runs as",
  "-run-with": "changes the user or root directory QEMU runs with",
  "-chroot": "changes QEMU's root directory",
  "-L": "changes where QEMU looks for firmware",
  "-loadvm": "loads a saved VM state instead of booting",
  "-virtfs": "shares a host directory with the guest",
  "-fsdev": "shares a host directory with the guest",
  "-semihosting": "gives the guest access to host files",
  "-semihosting-config": "gives the guest access to host files",
  "-gdb": "opens a debugger port into the VM",
  "-s": "opens a debugger port into the VM",
  "-trace": "reads or writes host files",
  "-dump-vmstate": "writes a host file",
  "-xen-domid": "is for Xen",
  "-xen-attach": "is for Xen",
  "-xen-domid-restrict": "is for Xen",
  "-hda": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-hdb": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-hdc": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-hdd": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-fda": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-fdb": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-mtdblock": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-sd": "is a legacy disk option Strata cannot rewrite (use -drive or -blockdev)",
  "-pflash": "opens a host file writable as firmware flash (use -drive if=pflash,readonly=on)",
};

/** Options whose value may be JSON (`{...}`), and their type key. */
const JSON_TYPE_KEY: Record<string, string> = {
  "-blockdev": "driver",
  "-device": "driver",
  "-netdev": "type",
  "-object": "qom-type",
  "-audiodev": "driver",
  "-display": "type",
};

/** Block drivers that open only local files, or nothing. */
const BLOCK_LOCAL = new Set([
  "file",
  "host_device",
  "host_cdrom",
  "raw",
  "qcow2",
  "qcow",
  "qed",
  "vdi",
  "vhdx",
  "vmdk",
  "vpc",
  "parallels",
  "luks",
  "nbd",
  "throttle",
  "copy-on-read",
  "preallocate",
  "null-co",
  "null-aio",
]);
/** Network storage: a VM's own disk may live there; a restore replaces it with a local file. */
const BLOCK_NETWORK = new Set([
  "rbd",
  "iscsi",
  "iser",
  "gluster",
  "nfs",
  "ssh",
  "http",
  "https",
  "ftp",
  "ftps",
]);
/** Protocol drivers whose `filename` is a host path. */
const HOST_FILE_DRIVERS = new Set(["file", "host_device", "host_cdrom"]);

const CHARDEV_BACKENDS = new Set([
  "socket",
  "file",
  "null",
  "pty",
  "stdio",
  "vc",
  "ringbuf",
  "memory",
  "spicevmc",
  "spiceport",
  "udp",
  "msmouse",
  "wctablet",
  "testdev",
  "qemu-vdagent",
]);
const CHARDEV_REFUSED: Record<string, string> = {
  pipe: "opens host named pipes (or any host file) for the guest's device",
  serial: "hands a host serial device to the guest",
  tty: "hands a host serial device to the guest",
  parallel: "hands a host parallel port to the guest",
  parport: "hands a host parallel port to the guest",
};

const NETDEV_TYPES = new Set([
  "user",
  "tap",
  "bridge",
  "socket",
  "stream",
  "dgram",
  "vhost-user",
  "hubport",
  "l2tpv3",
]);

const OBJECT_TYPES = new Set([
  "iothread",
  "main-loop",
  "thread-context",
  "secret",
  "rng-random",
  "rng-builtin",
  "rng-egd",
  "memory-backend-ram",
  "memory-backend-memfd",
  "memory-backend-file",
  "throttle-group",
  "tls-creds-anon",
  "tls-creds-psk",
  "tls-creds-x509",
  "cryptodev-backend-builtin",
  "filter-buffer",
  "pr-manager-helper",
  "sev-guest",
]);

const DEVICE_REFUSED: Record<string, string> = {
  "vfio-pci": "passes a host PCI device through to the guest",
  "vfio-pci-nohotplug": "passes a host PCI device through to the guest",
  "vfio-platform": "passes a host device through to the guest",
  "vfio-ap": "passes a host device through to the guest",
  "vfio-ccw": "passes a host device through to the guest",
  "usb-host": "passes a host USB device through to the guest",
  "u2f-passthru": "passes a host security key through to the guest",
  "vhost-scsi": "hands a host SCSI target to the guest",
  "vhost-scsi-pci": "hands a host SCSI target to the guest",
  "vhost-vdpa-device-pci": "hands a host vDPA device to the guest",
  "virtio-9p-pci": "shares a host directory with the guest",
  "virtio-9p-device": "shares a host directory with the guest",
  "xen-pci-passthrough": "passes a host PCI device through to the guest",
};

const AUDIO_DRIVERS = new Set(["none", "spice", "pa", "sdl", "alsa", "oss", "jack"]);
const DISPLAY_TYPES = new Set(["none", "gtk", "sdl", "egl-headless", "curses"]);

/** Device properties that name a file QEMU loads into the guest. */
const DEVICE_FILE_PROPS = new Set(["romfile", "file", "kernel", "initrd", "dtb"]);
/** Keys that pass file descriptors of the program that started QEMU (libvirt). */
const FD_KEYS = new Set(["fd", "fds", "vhostfd", "vhostfds"]);

const TRUE = new Set(["on", "yes", "true", "y"]);
const isTrue = (v: string | undefined) => v !== undefined && TRUE.has(v);
/** `json:{...}`, `nbd://...`, `rbd:pool/img`: a block filename that is no plain path. */
const PSEUDO = /^[a-z][a-z0-9+.-]*:/;

/** How QEMU uses a host path. */
export type PathUse =
  /** A block node's image; `readOnly` when nothing can write through the node. */
  | "image"
  /** A file QEMU reads and shows the guest (kernel, firmware, an ISO, an option ROM). */
  | "guest-read"
  /** A file QEMU reads for itself (a secret, TLS credentials). */
  | "qemu-read"
  /** A file or socket QEMU creates, truncates or unlinks (sockets, logs, pid file, console). */
  | "create"
  /** A unix socket QEMU connects to. */
  | "connect"
  /** Guest RAM backing (a hugetlbfs or tmpfs directory). */
  | "memory"
  /** A host program QEMU runs (a tap's network script). */
  | "program";

export interface HostPath {
  /** The option, for messages: `-chardev socket,...`. */
  where: string;
  key: string;
  path: string;
  use: PathUse;
  readOnly?: boolean;
  /** For images: the format the node over it opens it with (block graph), if any. */
  formats?: string[];
  /** A client socket only a monitor uses: QEMU serves its monitor there, the guest never sees it. */
  monitorOnly?: boolean;
}

/** What a command line asks of the host, once parsed and checked. */
export interface CommandLineScan {
  paths: HostPath[];
  /** Options passing file descriptors QEMU would inherit (libvirt's `fd=`). */
  fds: string[];
  /** Options the restore drops (-daemonize, -incoming): Strata starts QEMU itself. */
  dropped: string[];
  /** Block nodes on network storage (a VM's own disk may be there; a restore makes it local). */
  network: string[];
}

type Handler = (flag: string, value: string) => void;

/** Options with an argument that Strata passes through (each checked by its own rules). */
export const ARG_OPTIONS: readonly string[] = [
  "-machine",
  "-M",
  "-accel",
  "-cpu",
  "-smp",
  "-numa",
  "-m",
  "-k",
  "-name",
  "-uuid",
  "-rtc",
  "-overcommit",
  "-msg",
  "-sandbox",
  "-action",
  "-watchdog-action",
  "-icount",
  "-compat",
  "-vga",
  "-echr",
  "-iscsi",
  "-id",
  "-append",
  "-d",
  "-global",
  "-boot",
  "-bios",
  "-kernel",
  "-initrd",
  "-dtb",
  "-cdrom",
  "-option-rom",
  "-acpitable",
  "-smbios",
  "-fw_cfg",
  "-mem-path",
  "-pidfile",
  "-D",
  "-usbdevice",
  "-display",
  "-vnc",
  "-spice",
  "-audiodev",
  "-tpmdev",
  "-incoming",
  "-blockdev",
  "-drive",
  "-device",
  "-netdev",
  "-nic",
  "-net",
  "-chardev",
  "-object",
  "-mon",
  "-serial",
  "-parallel",
  "-debugcon",
  "-monitor",
  "-qmp",
  "-qmp-pretty",
];
/** Options without an argument that Strata passes through. */
export const NO_ARG_OPTIONS: readonly string[] = [...NO_ARG];
/** Options refused by name. */
export const REFUSED_OPTIONS: readonly string[] = Object.keys(REFUSED);

interface Pair {
  key: string;
  value: string;
}

/** A block node: a top-level -blockdev or one nested inside another (`file.driver=...`). */
interface BlockNode {
  where: string;
  name: string | undefined;
  driver: string;
  readOnly: boolean;
  autoReadOnly: boolean;
  filename: string | undefined;
  /** The node that holds this one inline. */
  parent: BlockNode | undefined;
  /** Values of its own keys (for references to other nodes). */
  values: string[];
}

type Refuse = (what: string) => never;

/** A short form of an option for messages: the option and its type. */
function describe(flag: string, pairs: readonly Pair[], typeKey: string | undefined): string {
  const type = typeKey ? pairs.find((p) => p.key === typeKey)?.value : undefined;
  return type ? `${flag} ${type}` : flag;
}

function flattenJson(v: unknown, prefix: string, out: Pair[]): void {
  if (Array.isArray(v)) {
    for (const [i, x] of v.entries()) flattenJson(x, `${prefix}${prefix ? "." : ""}${i}`, out);
  } else if (typeof v === "object" && v !== null) {
    for (const [k, x] of Object.entries(v)) flattenJson(x, `${prefix}${prefix ? "." : ""}${k}`, out);
  } else out.push({ key: prefix, value: typeof v === "boolean" ? (v ? "on" : "off") : String(v) });
}

/**
 * An option's value as flat dotted pairs. `implied` names the key of a leading bare value
 * (`-netdev tap,...` is `type=tap`); later bare words are QEMU's flags (`server` = `server=on`,
 * `nowait` = `wait=off`).
 */
function flatten(flag: string, value: string, implied: string | undefined, refuse: Refuse): Pair[] {
  if (value.startsWith("{") && JSON_TYPE_KEY[flag]) {
    let doc: unknown;
    try {
      doc = JSON.parse(value);
    } catch {
      return refuse(`${flag} ${JSON.stringify(value.slice(0, 60))} is not valid JSON`);
    }
    const dup = duplicateJsonKey(value);
    if (dup !== undefined) refuse(`${flag}: key "${dup}" appears twice`);
    const out: Pair[] = [];
    flattenJson(doc, "", out);
    return out;
  }
  const pairs = splitOpts(value).map((o, i) => {
    if (o.key !== undefined) return { key: o.key, value: o.value };
    if (i === 0 && implied !== undefined) return { key: implied, value: o.value };
    if (o.value.startsWith("no") && o.value.length > 2) return { key: o.value.slice(2), value: "off" };
    return { key: o.value, value: "on" };
  });
  // QEMU takes the last of a repeated key, Strata's rewrite the first: no key may be repeated,
  // save those QEMU collects into a list.
  const seen = new Set<string>();
  for (const p of pairs) {
    if (seen.has(p.key) && !REPEATABLE.has(p.key)) refuse(`${flag}: ${p.key}= appears twice`);
    seen.add(p.key);
  }
  return pairs;
}

/** Keys QEMU collects into a list when repeated. */
const REPEATABLE = new Set(["hostfwd", "dnssearch", "value"]);

/** The first key that appears twice in one object of a JSON text (JSON.parse keeps the last). */
function duplicateJsonKey(text: string): string | undefined {
  const objects: Array<Set<string>> = [];
  for (let i = 0; i < text.length; i++) {
    const ch = text[i];
    if (ch === "{") objects.push(new Set());
    else if (ch === "}") objects.pop();
    else if (ch === '"') {
      let j = i + 1;
      while (j < text.length && text[j] !== '"') j += text[j] === "\\" ? 2 : 1;
      const str = JSON.parse(text.slice(i, j + 1)) as string;
      i = j;
      let k = j + 1;
      while (/\s/.test(text[k] ?? "")) k++;
      const keys = objects.at(-1);
      if (text[k] === ":" && keys) {
        if (keys.has(str)) return str;
        keys.add(str);
      }
    }
  }
  return undefined;
}

const last = (key: string) => (k: string) => k === key || k.endsWith(`.${key}`);
const values = (pairs: readonly Pair[], key: string) =>
  pairs.filter((p) => p.key === key).map((p) => p.value);

/** Checks a path's text: no control characters, no `..`, not empty. */
function pathText(where: string, key: string, p: string, refuse: Refuse): void {
  if (p === "") refuse(`${where}: ${key} is empty`);
  if (CONTROL.test(p)) refuse(`${where}: ${key} holds control characters`);
  if (hasDotDot(p)) refuse(`${where}: ${key}=${p} has a ".." segment`);
}

/** Parses and checks an argv (program first) against the option policy; see the module comment. */
export function scanCommandLine(argv: readonly string[], refuse: Refuse): CommandLineScan {
  const scan: CommandLineScan = { paths: [], fds: [], dropped: [], network: [] };
  const nodes: BlockNode[] = [];
  /** Values naming nodes, from devices, -machine, -drive and -global (any value may be a node-name). */
  const outsideRefs: Array<{ where: string; value: string }> = [];
  const chardevs = new Map<string, { where: string; tcp: boolean; clientPaths: HostPath[] }>();
  /** Chardev ids used by monitors, and by anything else. */
  const monitorUses: Array<{ where: string; id: string }> = [];
  const otherUses = new Set<string>();
  const drives: Array<{ where: string; pairs: Pair[] }> = [];

  const add = (p: HostPath) => {
    pathText(p.where, p.key, p.path, refuse);
    scan.paths.push(p);
  };
  const fdKeys = (where: string, pairs: readonly Pair[]) => {
    for (const p of pairs)
      if (FD_KEYS.has(p.key.split(".").at(-1)!)) scan.fds.push(`${where} ${p.key}=${p.value}`);
  };
  /** A file loaded into the guest; plain names (no `/`) are looked up in QEMU's data directories. */
  const guestFile = (where: string, key: string, v: string) => {
    if (v !== "") add({ where, key, path: v, use: "guest-read" });
  };

  /** The short chardev syntax of -serial, -parallel, -debugcon, -monitor, -qmp. */
  const shortChardev = (flag: string, v: string, monitor: boolean) => {
    const o = splitOpts(v);
    const head = o[0]?.value ?? "";
    const where = `${flag} ${v}`;
    const server = o
      .slice(1)
      .some((x) => (x.key === undefined ? x.value === "server" : x.key === "server" && isTrue(x.value)));
    if (head.startsWith("mon:")) {
      if (monitor) refuse(`${where}: a monitor inside a monitor`);
      return shortChardev(flag, v.slice(4), true);
    }
    if (/^(vc|pty|none|null|stdio|msmouse)(:.*)?$/.test(head)) return;
    if (head.startsWith("chardev:")) {
      if (monitor) monitorUses.push({ where, id: head.slice(8) });
      else otherUses.add(head.slice(8));
      return;
    }
    if (/^(tcp|telnet|udp|websocket):/.test(head)) {
      if (monitor) refuse(`${where} opens a QEMU monitor on the network (anyone reaching it controls QEMU)`);
      return;
    }
    if (head.startsWith("unix:")) {
      const path = head.slice(5);
      if (server) return add({ where, key: "unix", path, use: "create" });
      return add({ where, key: "unix", path, use: "connect", monitorOnly: monitor });
    }
    if (head.startsWith("file:")) return add({ where, key: "file", path: head.slice(5), use: "create" });
    if (head.startsWith("pipe:")) refuse(`${where} opens host named pipes (or any host file) for the guest`);
    if (head.startsWith("/dev/") || /^COM\d/.test(head)) refuse(`${where} hands a host device to the guest`);
    refuse(`${where}: "${head}" is not a character device Strata passes through`);
  };

  const machine = (flag: string, pairs: Pair[]) => {
    for (const p of pairs) {
      if (p.key === "dumpdtb") refuse(`${flag} dumpdtb= writes a host file`);
      if (["dtb", "kernel", "initrd", "firmware"].includes(p.key)) guestFile(flag, p.key, p.value);
      else if (p.key !== "type") outsideRefs.push({ where: flag, value: p.value });
    }
  };

  const blockdev = (where: string, pairs: readonly Pair[], top: boolean) => {
    // Nested nodes: every prefix that has a driver (`file.driver=file` → prefix "file").
    const prefixes = pairs
      .filter((p) => last("driver")(p.key))
      .map((p) => p.key.slice(0, -"driver".length).replace(/\.$/, ""));
    if (top && !prefixes.includes("")) refuse(`${where} names no driver`);
    const byPrefix = new Map<string, BlockNode>();
    const ownerOf = (key: string): string => {
      const parts = key.split(".");
      for (let n = parts.length - 1; n >= 0; n--) {
        const pre = parts.slice(0, n).join(".");
        if (byPrefix.has(pre)) return pre;
      }
      return "";
    };
    for (const pre of prefixes.sort((a, b) => a.length - b.length)) {
      const k = (x: string) => (pre === "" ? x : `${pre}.${x}`);
      const driver = values(pairs, k("driver"))[0]!;
      const node: BlockNode = {
        where,
        name: values(pairs, k("node-name"))[0],
        driver,
        readOnly: values(pairs, k("read-only")).some(isTrue),
        autoReadOnly: values(pairs, k("auto-read-only")).some(isTrue),
        filename: undefined,
        parent: undefined,
        values: [],
      };
      byPrefix.set(pre, node);
      if (pre !== "") node.parent = byPrefix.get(ownerOf(pre));
      nodes.push(node);
    }
    for (const p of pairs) {
      const owner = byPrefix.get(ownerOf(p.key));
      if (!owner) continue;
      const own = p.key.slice(ownerOf(p.key).length).replace(/^\./, "");
      if (own === "driver") {
        if (p.value === "vvfat") refuse(`${where}: driver vvfat shares a host directory with the guest`);
        if (!BLOCK_LOCAL.has(p.value) && !BLOCK_NETWORK.has(p.value))
          refuse(`${where}: block driver ${p.value} is not one Strata passes through`);
        if (BLOCK_NETWORK.has(p.value)) scan.network.push(`${where}: driver=${p.value}`);
      } else if (own === "filename") {
        if (HOST_FILE_DRIVERS.has(owner.driver)) owner.filename = p.value;
      } else if (own === "node-name") {
        /* its name */
      } else if (own === "server.type" && owner.driver === "nbd" && p.value !== "unix") {
        scan.network.push(`${where}: server.type=${p.value}`);
      } else if (own === "server.path" || own === "path" || own === "conf" || own === "config") {
        if (owner.driver === "nbd" && own === "server.path")
          add({ where, key: p.key, path: p.value, use: "connect" });
        else if (BLOCK_NETWORK.has(owner.driver)) add({ where, key: p.key, path: p.value, use: "qemu-read" });
      } else if (own.endsWith("filename") && !BLOCK_NETWORK.has(owner.driver)) {
        // A filename QEMU might still open (a driver that takes none fails, but be sure).
        add({ where, key: p.key, path: p.value, use: "image", readOnly: false, formats: [] });
      } else owner.values.push(p.value);
    }
  };

  const drive = (where: string, pairs: Pair[]) => {
    for (const p of pairs) {
      if (last("driver")(p.key) || p.key === "format") {
        if (p.value === "vvfat") refuse(`${where}: driver vvfat shares a host directory with the guest`);
        if (!BLOCK_LOCAL.has(p.value) && !BLOCK_NETWORK.has(p.value))
          refuse(`${where}: block driver ${p.value} is not one Strata passes through`);
      }
      if (p.key === "file" && /^fat:/.test(p.value))
        refuse(`${where}: file=fat: shares a host directory with the guest`);
    }
    drives.push({ where, pairs });
  };

  const chardev = (where: string, pairs: Pair[]) => {
    const backend = values(pairs, "backend")[0] ?? "";
    const id = values(pairs, "id")[0];
    const why = CHARDEV_REFUSED[backend];
    if (why) refuse(`${where} ${why}`);
    if (!CHARDEV_BACKENDS.has(backend))
      refuse(`${where}: backend "${backend}" is not one Strata passes through`);
    const server = values(pairs, "server").some(isTrue);
    const clientPaths: HostPath[] = [];
    let tcp = backend === "udp";
    for (const p of pairs) {
      if (p.key === "abstract" && isTrue(p.value))
        refuse(`${where}: abstract=on reaches host services outside the file system`);
      if (p.key === "host" || p.key === "port" || p.key === "websocket") tcp = true;
      if (p.key === "logfile") add({ where, key: p.key, path: p.value, use: "create" });
      if (p.key === "path" || p.key === "input-path") {
        if (backend === "socket" && !server) {
          const hp: HostPath = { where, key: p.key, path: p.value, use: "connect" };
          clientPaths.push(hp);
          add(hp);
        } else add({ where, key: p.key, path: p.value, use: "create" });
      }
    }
    if (id !== undefined) chardevs.set(id, { where, tcp, clientPaths });
  };

  const netdev = (flag: string, where: string, pairs: Pair[], legacy: boolean) => {
    const type = values(pairs, "type")[0] ?? "";
    if (legacy && (type === "nic" || type === "none")) return;
    if (flag === "-nic" && type === "none") return;
    if (type === "vde") refuse(`${where} connects to a host VDE switch`);
    if (type === "vhost-vdpa") refuse(`${where} hands a host vDPA device to the guest`);
    if (!NETDEV_TYPES.has(type))
      refuse(`${where}: network backend "${type}" is not one Strata passes through`);
    for (const p of pairs) {
      if (p.key === "script" || p.key === "downscript") {
        if (p.value === "no" || p.value === "") continue;
        if (!HOST_SCRIPTS.includes(p.value))
          refuse(
            `${where}: ${p.key}=${p.value} runs a host program (only "no" or a platform's own script: ${HOST_SCRIPTS.join(", ")})`,
          );
        add({ where, key: p.key, path: p.value, use: "program" });
      }
      if (p.key === "helper" && !BRIDGE_HELPERS.includes(p.value))
        refuse(`${where}: helper=${p.value} runs a host program`);
      if (p.key === "smb") refuse(`${where}: smb= runs a host Samba server sharing a host directory`);
      if (p.key === "tftp") refuse(`${where}: tftp= serves a host directory to the guest`);
      if (p.key === "guestfwd")
        refuse(`${where}: guestfwd= forwards guest connections to a host program or socket`);
      if (p.key === "sock") refuse(`${where}: sock= connects to a host socket`);
      if (last("path")(p.key)) add({ where, key: p.key, path: p.value, use: "connect" });
      if (p.key === "romfile") guestFile(where, p.key, p.value);
    }
    if (type === "tap" && !pairs.some((p) => p.key === "fd" || p.key === "fds")) {
      // Without script=, QEMU runs /etc/qemu-ifup and /etc/qemu-ifdown.
      if (!pairs.some((p) => p.key === "script"))
        add({ where, key: "script (default)", path: "/etc/qemu-ifup", use: "program" });
      if (!pairs.some((p) => p.key === "downscript"))
        add({ where, key: "downscript (default)", path: "/etc/qemu-ifdown", use: "program" });
    }
    for (const id of values(pairs, "chardev")) otherUses.add(id);
  };

  const device = (where: string, pairs: Pair[]) => {
    const driver = values(pairs, "driver")[0] ?? "";
    const why = DEVICE_REFUSED[driver];
    if (why) refuse(`${where} ${why}`);
    for (const p of pairs) {
      if (DEVICE_FILE_PROPS.has(p.key)) guestFile(where, p.key, p.value);
      else if (p.key === "chardev") otherUses.add(p.value);
      else if (p.key === "sysfsdev" || p.key === "host") refuse(`${where}: ${p.key}= names a host device`);
      else if (p.key !== "driver" && p.key !== "id") outsideRefs.push({ where, value: p.value });
    }
  };

  const object = (where: string, pairs: Pair[]) => {
    const type = values(pairs, "qom-type")[0] ?? "";
    if (type === "input-linux") refuse(`${where} hands a host input device to the guest`);
    if (type === "filter-dump") refuse(`${where} writes the guest's network traffic to a host file`);
    if (!OBJECT_TYPES.has(type)) refuse(`${where}: object type "${type}" is not one Strata passes through`);
    for (const p of pairs) {
      if (
        type === "rng-random" &&
        p.key === "filename" &&
        p.value !== "/dev/urandom" &&
        p.value !== "/dev/random"
      )
        refuse(`${where}: filename=${p.value} is not /dev/urandom or /dev/random`);
      if (type === "secret" && p.key === "file") add({ where, key: p.key, path: p.value, use: "qemu-read" });
      if (type === "memory-backend-file" && p.key === "mem-path")
        add({ where, key: p.key, path: p.value, use: "memory" });
      if (type === "pr-manager-helper" && p.key === "path")
        add({ where, key: p.key, path: p.value, use: "connect" });
      if (type === "sev-guest" && (p.key === "dh-cert-file" || p.key === "session-file"))
        add({ where, key: p.key, path: p.value, use: "qemu-read" });
      if (p.key === "chardev") otherUses.add(p.value);
    }
  };

  const kv = (implied?: string) => (flag: string, v: string) => {
    const pairs = flatten(flag, v, implied, refuse);
    fdKeys(flag, pairs);
    // Any value may name a chardev (`chardev=`, `chardev1=` of pci-serial-2x, ...): a use.
    if (flag !== "-mon" && flag !== "-chardev") for (const p of pairs) otherUses.add(p.value);
    return pairs;
  };
  const plain: Handler = () => {};
  const guestPath: Handler = (flag, v) => guestFile(flag, flag, v);
  const handlers: Record<string, Handler> = {
    "-machine": (flag, v) => machine(flag, kv("type")(flag, v)),
    "-M": (flag, v) => machine(flag, kv("type")(flag, v)),
    "-accel": plain,
    "-cpu": plain,
    "-smp": plain,
    "-numa": plain,
    "-m": plain,
    "-k": plain,
    "-name": plain,
    "-uuid": plain,
    "-rtc": plain,
    "-overcommit": plain,
    "-msg": plain,
    "-sandbox": plain,
    "-action": plain,
    "-watchdog-action": plain,
    "-icount": (flag, v) => {
      if (kv("shift")(flag, v).some((p) => p.key === "rr" || p.key === "rrfile"))
        refuse(`${flag} rr= records or replays the VM through a host file`);
    },
    "-compat": plain,
    "-vga": plain,
    "-echr": plain,
    "-iscsi": plain,
    // Proxmox VE's QEMU: the VM id (stock QEMU refuses it and exits).
    "-id": plain,
    "-append": plain,
    "-d": plain,
    "-global": (flag, v) => {
      const pairs = kv()(flag, v);
      const prop =
        pairs.length === 1 ? pairs[0]!.key.split(".").slice(1).join(".") : values(pairs, "property")[0];
      const value = pairs.length === 1 ? pairs[0]!.value : values(pairs, "value")[0];
      if (prop === undefined || value === undefined) return;
      if (DEVICE_FILE_PROPS.has(prop)) guestFile(`${flag} ${v}`, prop, value);
      else if (FD_KEYS.has(prop)) scan.fds.push(`${flag} ${v}`);
      else if (prop === "chardev") otherUses.add(value);
      else outsideRefs.push({ where: `${flag} ${v}`, value });
    },
    "-boot": (flag, v) => {
      for (const s of values(kv("order")(flag, v), "splash")) guestFile(`${flag} ${v}`, "splash", s);
    },
    "-bios": guestPath,
    "-kernel": guestPath,
    "-initrd": guestPath,
    "-dtb": guestPath,
    "-cdrom": (flag, v) =>
      add({ where: flag, key: "file", path: v, use: "image", readOnly: true, formats: [] }),
    "-option-rom": (flag, v) => guestFile(flag, flag, splitOpts(v)[0]?.value ?? ""),
    "-acpitable": (flag, v) => {
      for (const p of kv()(flag, v))
        if (p.key === "file" || p.key === "data")
          for (const f of p.value.split(":")) guestFile(flag, p.key, f);
    },
    "-smbios": (flag, v) => {
      for (const f of values(kv()(flag, v), "file")) guestFile(flag, "file", f);
    },
    "-fw_cfg": (flag, v) => {
      for (const f of values(kv()(flag, v), "file")) guestFile(flag, "file", f);
    },
    "-mem-path": (flag, v) => add({ where: flag, key: flag, path: v, use: "memory" }),
    "-pidfile": (flag, v) => add({ where: flag, key: flag, path: v, use: "create" }),
    "-D": (flag, v) => add({ where: flag, key: flag, path: v, use: "create" }),
    "-usbdevice": (flag, v) => {
      if (!["tablet", "mouse", "keyboard", "wacom-tablet", "braille"].includes(v))
        refuse(`${flag} ${v} is not an emulated USB device Strata passes through`);
    },
    "-display": (flag, v) => {
      const pairs = kv("type")(flag, v);
      const type = values(pairs, "type")[0] ?? "";
      if (type === "spice-app") refuse(`${flag} spice-app runs a host viewer program`);
      if (!DISPLAY_TYPES.has(type)) refuse(`${flag}: display "${type}" is not one Strata passes through`);
    },
    "-vnc": (flag, v) => {
      const head = splitOpts(v)[0]?.value ?? "";
      if (head.startsWith("unix:"))
        add({ where: `${flag} ${v}`, key: "unix", path: head.slice(5), use: "create" });
    },
    "-spice": (flag, v) => {
      const pairs = kv()(flag, v);
      if (values(pairs, "unix").some(isTrue))
        for (const a of values(pairs, "addr")) add({ where: flag, key: "addr", path: a, use: "create" });
    },
    "-audiodev": (flag, v) => {
      const driver = values(kv("driver")(flag, v), "driver")[0] ?? "";
      if (driver === "wav") refuse(`${flag} wav writes the guest's sound to a host file`);
      if (!AUDIO_DRIVERS.has(driver))
        refuse(`${flag}: audio driver "${driver}" is not one Strata passes through`);
    },
    "-tpmdev": (flag, v) => {
      const pairs = kv("type")(flag, v);
      const type = values(pairs, "type")[0] ?? "";
      if (type !== "emulator") refuse(`${flag} ${type} hands the host's TPM to the guest`);
      for (const id of values(pairs, "chardev")) otherUses.add(id);
    },
    "-incoming": (flag, v) => {
      if (v !== "defer" && !/^(unix|tcp):/.test(v))
        refuse(
          `${flag} ${v}: ${v.startsWith("exec:") ? "runs a host program" : "is not a migration source Strata accepts"}`,
        );
      scan.dropped.push(`${flag} ${v}`);
    },
    "-blockdev": (flag, v) => {
      const pairs = kv()(flag, v);
      blockdev(describe(flag, pairs, "driver"), pairs, true);
    },
    "-drive": (flag, v) => drive(`${flag} ${v}`, kv()(flag, v)),
    "-device": (flag, v) => {
      const pairs = kv("driver")(flag, v);
      device(describe(flag, pairs, "driver"), pairs);
    },
    "-netdev": (flag, v) => {
      const pairs = kv("type")(flag, v);
      netdev(flag, describe(flag, pairs, "type"), pairs, false);
    },
    "-nic": (flag, v) => {
      const pairs = kv("type")(flag, v);
      netdev(flag, describe(flag, pairs, "type"), pairs, false);
    },
    "-net": (flag, v) => {
      const pairs = kv("type")(flag, v);
      netdev(flag, describe(flag, pairs, "type"), pairs, true);
    },
    "-chardev": (flag, v) => {
      const pairs = kv("backend")(flag, v);
      chardev(describe(flag, pairs, "backend"), pairs);
    },
    "-object": (flag, v) => {
      const pairs = kv("qom-type")(flag, v);
      object(describe(flag, pairs, "qom-type"), pairs);
    },
    "-mon": (flag, v) => {
      const pairs = kv("chardev")(flag, v);
      for (const id of values(pairs, "chardev")) monitorUses.push({ where: `${flag} ${v}`, id });
    },
    "-serial": (flag, v) => shortChardev(flag, v, false),
    "-parallel": (flag, v) => shortChardev(flag, v, false),
    "-debugcon": (flag, v) => shortChardev(flag, v, false),
    "-monitor": (flag, v) => shortChardev(flag, v, true),
    "-qmp": (flag, v) => shortChardev(flag, v, true),
    "-qmp-pretty": (flag, v) => shortChardev(flag, v, true),
  };
  if (Object.keys(handlers).join() !== ARG_OPTIONS.join()) throw new Error("ARG_OPTIONS is out of date");

  for (let i = 1; i < argv.length; i++) {
    const arg = argv[i]!;
    if (!arg.startsWith("-") || arg === "-" || arg === "--")
      refuse(`the bare argument ${JSON.stringify(arg.slice(0, 80))} (QEMU would open it as a disk image)`);
    const flag = arg.startsWith("--") ? arg.slice(1) : arg;
    const why = REFUSED[flag];
    if (why) refuse(`option ${flag} ${why}`);
    if (NO_ARG.has(flag)) {
      if (flag === "-daemonize") scan.dropped.push(flag);
      continue;
    }
    const handler = handlers[flag];
    if (!handler) refuse(`option ${flag} is not one Strata passes through`);
    const v = argv[++i];
    if (v === undefined) refuse(`option ${flag} has no value`);
    if (v.length > 0 && v.includes("\0")) refuse(`${flag} holds a NUL character`);
    handler(flag, v);
  }

  // Monitors: never on the network; a client socket that only a monitor uses may be anywhere.
  for (const m of monitorUses) {
    const c = chardevs.get(m.id);
    if (!c) continue;
    if (c.tcp) refuse(`${m.where} opens a QEMU monitor on the network (${c.where})`);
  }
  for (const [id, c] of chardevs) {
    if (!otherUses.has(id) && monitorUses.some((m) => m.id === id))
      for (const hp of c.clientPaths) hp.monitorOnly = true;
  }

  // Block graph: which images are opened read-only, and with which format.
  const named = new Map(nodes.flatMap((n) => (n.name ? [[n.name, n] as const] : [])));
  const users = new Map<BlockNode, Array<BlockNode | string>>();
  for (const n of nodes) {
    if (n.parent) users.set(n, [...(users.get(n) ?? []), n.parent]);
    for (const v of n.values) {
      const t = named.get(v);
      if (t && t !== n) users.set(t, [...(users.get(t) ?? []), n]);
    }
  }
  for (const r of outsideRefs) {
    const t = named.get(r.value);
    if (t) users.set(t, [...(users.get(t) ?? []), r.where]);
  }
  for (const n of nodes) {
    if (n.filename === undefined) continue;
    const us = users.get(n) ?? [];
    const readOnly =
      n.readOnly || (n.autoReadOnly && us.length > 0 && us.every((u) => typeof u !== "string" && u.readOnly));
    add({
      where: n.where,
      key: "filename",
      path: n.filename,
      use: "image",
      readOnly,
      formats: us.map((u) => (typeof u === "string" ? "raw" : u.driver)),
    });
  }
  for (const d of drives) {
    const file = values(d.pairs, "file").concat(values(d.pairs, "file.filename"));
    // media=cdrom is read-only to QEMU whatever readonly= says.
    const readOnly = values(d.pairs, "readonly").some(isTrue) || values(d.pairs, "media").includes("cdrom");
    const formats = values(d.pairs, "format").concat(values(d.pairs, "driver"));
    for (const f of file) {
      if (PSEUDO.test(f) && !f.startsWith("/"))
        add({ where: d.where, key: "file", path: f, use: "image", readOnly, formats: ["(protocol)"] });
      else add({ where: d.where, key: "file", path: f, use: "image", readOnly, formats });
    }
  }
  return scan;
}

const normal = (p: string, cwd: string) => (PSEUDO.test(p) && !p.startsWith("/") ? p : resolve(cwd, p));

/**
 * The check made when a stored configuration is read: the option policy, and every image a
 * block node opens writable is one of the VM's disks (`diskFiles`, as recorded). Paths are the
 * original host's, so nothing is looked up on this one. Calls `refuse` with what is wrong.
 */
export function checkRecordedCommandLine(
  argv: readonly string[],
  diskFiles: readonly string[],
  refuse: Refuse,
): CommandLineScan {
  const scan = scanCommandLine(argv, refuse);
  const cwd = resolve(".");
  const disks = new Set(diskFiles.map((f) => normal(f, cwd)));
  for (const p of scan.paths) {
    if (p.use !== "image" || disks.has(normal(p.path, cwd))) continue;
    if (!p.readOnly)
      refuse(`${p.where}: ${p.key}=${p.path} is not one of the VM's disks, and would be opened writable`);
    if (PSEUDO.test(p.path) && !p.path.startsWith("/"))
      refuse(`${p.where}: ${p.key}=${p.path} is not one of the VM's disks, nor a local file`);
  }
  return scan;
}

/** The name of a QEMU system emulator: `qemu-system-<arch>`, or `kvm` (Proxmox VE, Debian's old wrapper). */
export const QEMU_PROGRAM = /^(qemu-system-[A-Za-z0-9_]+|kvm)$/;

/**
 * A program named by path runs only when root alone can have put it there: a regular file of
 * root's that nobody else can write, in directories of root's that nobody else can write (a
 * `/tmp/x/qemu-system-x86_64` is someone's program, whatever its name).
 */
async function trustedProgram(program: string, refuse: Refuse): Promise<void> {
  const real = await realpath(program).catch(() => undefined);
  if (real === undefined) return refuse(`the program ${program} does not exist on this host`);
  const st = await statOf(real);
  if (!st?.isFile() || st.uid !== 0 || (st.mode & 0o022) !== 0)
    refuse(`the program ${program} is not a file of root's that only root can change`);
  for (let d = dirname(real); ; d = dirname(d)) {
    const ds = await statOf(d);
    if (ds === undefined || ds.uid !== 0 || ((ds.mode & 0o022) !== 0 && (ds.mode & 0o1000) === 0))
      refuse(`the program ${program} is in ${d}, which others than root can change`);
    if (d === dirname(d)) break;
  }
}

/** Where a command line about to run may touch the host; see {@link checkCommandLineToRun}. */
export interface RunPolicy {
  /** The disks this restore wrote (or the VM's own, in place): absolute path → format. */
  disks: ReadonlyMap<string, string>;
  /** Directories QEMU may create files and sockets in: the run directory, a clone's target. */
  dirs: readonly string[];
  /** Unix sockets outside those QEMU may connect to (Strata's NBD server for instant recovery). */
  sockets?: readonly string[];
  /** QEMU's working directory (relative names resolve there): the run directory. */
  cwd: string;
}

/** Top-level and system directories a run directory may never be. */
const SYSTEM_EXACT = [
  "/",
  "/var",
  "/var/lib",
  "/var/run",
  "/run",
  "/tmp",
  "/var/tmp",
  "/home",
  "/srv",
  "/opt",
  "/root",
  "/mnt",
  "/media",
];
const SYSTEM_TREES = [
  "/etc",
  "/usr",
  "/bin",
  "/sbin",
  "/lib",
  "/lib32",
  "/lib64",
  "/libx32",
  "/boot",
  "/proc",
  "/sys",
  "/dev",
];
const HUGETLBFS_MAGIC = 0x958458f6;
const TMPFS_MAGIC = 0x01021994;

const inside = (p: string, dir: string) => p === dir || p.startsWith(dir.endsWith(sep) ? dir : dir + sep);
const statOf = (p: string, how: (p: string) => Promise<Stats> = stat) => how(p).catch(() => undefined);

/**
 * The check made on the exact argv (program first) right before QEMU is spawned: the option
 * policy, nothing inherited from another program (`fd=`), nothing the restore drops
 * (`-daemonize`, `-incoming`), and every host path placed (see the module comment). Throws
 * DATA_CORRUPT naming the option; returns warnings (a firmware or kernel file that is not
 * root's, or that others can write).
 */
export async function checkCommandLineToRun(argv: readonly string[], policy: RunPolicy): Promise<string[]> {
  const refuse: Refuse = (what) => {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `refusing to run QEMU: ${what}`);
  };
  const program = argv[0] ?? "";
  if (!QEMU_PROGRAM.test(basename(program)) || (program.includes("/") && !program.startsWith("/")))
    refuse(`the program ${JSON.stringify(program)} is not a qemu-system-* binary`);
  if (program.startsWith("/")) await trustedProgram(program, refuse);
  const scan = scanCommandLine(argv, refuse);
  if (scan.dropped.length > 0) refuse(`${scan.dropped[0]}: Strata starts QEMU itself, booting the VM`);
  if (scan.fds.length > 0)
    refuse(
      `${scan.fds[0]} passes a file descriptor of the program that started the VM (libvirt?), which Strata cannot hand over`,
    );
  if (scan.network.length > 0)
    refuse(
      `${scan.network[0]} reaches storage over the network: a restored VM runs on the disks Strata wrote`,
    );
  const warnings: string[] = [];
  const cwd = resolve(policy.cwd);
  const dirs = policy.dirs.map((d) => resolve(d));
  for (const d of dirs) {
    if (SYSTEM_EXACT.includes(d) || SYSTEM_TREES.some((t) => inside(d, t)))
      refuse(`the run directory ${d} is a system directory: restore as a clone (--target DIR)`);
    const st = await statOf(d);
    if (st && (st.mode & 0o002) !== 0)
      refuse(`the run directory ${d} is writable by every user: restore as a clone (--target DIR)`);
  }
  const disks = new Map([...policy.disks].map(([p, f]) => [resolve(p), f]));
  const sockets = new Set((policy.sockets ?? []).map((s) => resolve(s)));
  const inRun = (p: string) => dirs.some((d) => inside(p, d));

  /** A file shown to the guest: a regular file every local user may read. */
  const publicFile = async (hp: HostPath, abs: string) => {
    const real = await realpath(abs).catch(() => undefined);
    if (real === undefined) return refuse(`${hp.where}: ${hp.key}=${hp.path} does not exist on this host`);
    const st = await statOf(real);
    if (!st?.isFile()) return refuse(`${hp.where}: ${hp.key}=${hp.path} is not a regular file`);
    if ((st.mode & 0o004) === 0)
      refuse(
        `${hp.where}: ${hp.key}=${hp.path} is not readable by every user of this host, and QEMU would show it to the guest`,
      );
    for (let d = dirname(real); ; d = dirname(d)) {
      const ds = await statOf(d);
      if (ds && (ds.mode & 0o001) === 0)
        refuse(
          `${hp.where}: ${hp.key}=${hp.path} is in ${d}, which not every user of this host may enter, and QEMU would show it to the guest`,
        );
      if (d === dirname(d)) break;
    }
    if (st.uid !== 0 || (st.mode & 0o022) !== 0)
      warnings.push(
        `${hp.where}: ${hp.path} is not root's own file, or others can change it: the VM boots what it holds`,
      );
  };

  for (const hp of scan.paths) {
    const pseudo = PSEUDO.test(hp.path) && !hp.path.startsWith("/");
    const abs = pseudo ? hp.path : resolve(cwd, hp.path);
    switch (hp.use) {
      case "image": {
        if (pseudo) refuse(`${hp.where}: ${hp.key}=${hp.path} is not a local file this restore wrote`);
        const format = disks.get(abs);
        if (format !== undefined) {
          const wrong = (hp.formats ?? []).find((f) => f !== format);
          if (wrong !== undefined || (hp.formats ?? []).length === 0)
            refuse(
              `${hp.where}: disk ${hp.path} is ${format}, but would be opened ${wrong === undefined ? "without a format (probed)" : `as ${wrong}`}`,
            );
          break;
        }
        if (!hp.readOnly)
          refuse(
            `${hp.where}: ${hp.key}=${hp.path} is not a disk this restore wrote, and would be opened writable`,
          );
        await publicFile(hp, abs);
        break;
      }
      case "guest-read":
        // A plain name is looked up in the working directory (the run directory), then in
        // QEMU's own data directories.
        if (!hp.path.includes("/") && !(await statOf(abs, lstat))) break;
        await publicFile(hp, abs);
        break;
      case "qemu-read": {
        const st = await statOf(abs);
        if (st && !st.isFile()) refuse(`${hp.where}: ${hp.key}=${hp.path} is not a regular file`);
        break;
      }
      case "create": {
        if (!inRun(abs))
          refuse(`${hp.where}: ${hp.key}=${hp.path} is outside the run directory (${dirs.join(", ")})`);
        const st = await statOf(abs, lstat);
        if (st?.isSymbolicLink()) refuse(`${hp.where}: ${hp.key}=${hp.path} is a symbolic link`);
        if (st?.isDirectory()) refuse(`${hp.where}: ${hp.key}=${hp.path} is a directory`);
        break;
      }
      case "connect":
        if (!inRun(abs) && !sockets.has(abs) && !hp.monitorOnly)
          refuse(
            `${hp.where}: ${hp.key}=${hp.path} connects to a socket outside the run directory (${dirs.join(", ")})`,
          );
        break;
      case "memory": {
        if (inRun(abs)) break;
        const st = await statOf(abs);
        const fs = st?.isDirectory() ? await statfs(abs).catch(() => undefined) : undefined;
        if (!fs || (fs.type !== HUGETLBFS_MAGIC && fs.type !== TMPFS_MAGIC))
          refuse(
            `${hp.where}: ${hp.key}=${hp.path} is not a hugetlbfs or tmpfs directory, nor in the run directory`,
          );
        break;
      }
      case "program": {
        const st = await statOf(abs, lstat);
        if (st && (!st.isFile() || st.uid !== 0 || (st.mode & 0o022) !== 0))
          refuse(
            `${hp.where}: ${hp.key}=${hp.path} is not a regular file of root's that only root can change`,
          );
        break;
      }
    }
  }
  return warnings;
}
