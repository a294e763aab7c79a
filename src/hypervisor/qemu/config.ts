/**
 * The QEMU configuration document stored with a restore point (`config.blob`, kind "qemu"), read
 * back. A repository can be written by others than the host that restores from it, and a
 * restore runs the recorded command line and writes to the recorded paths, so nothing is taken
 * on trust: every field is type-checked and bounded, names that become file names are plain
 * names, paths hold no `..`, the command line's program is a `qemu-system-*` binary, and its
 * options pass the command-line policy (cmdline-policy.ts).
 */
import { basename } from "node:path";
import { type Checker, CONTROL, checker, hasDotDot } from "../../util/check.js";
import { checkRecordedCommandLine, QEMU_PROGRAM } from "./cmdline-policy.js";
import type { VmConfig } from "./live.js";

/** Limits on what a stored configuration may hold; far above any real VM. */
export const CONFIG_LIMITS = {
  disks: 256,
  nics: 256,
  cpus: 4096,
  memoryBytes: 2 ** 46, // 64 TiB
  diskBytes: Number.MAX_SAFE_INTEGER,
  string: 4096,
  args: 8192,
  argBytes: 64 * 1024,
  commandLineBytes: 1024 * 1024,
} as const;

/** A name that may become a file name: what repository names allow, up to 128 characters. */
export const PLAIN_NAME = /^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/;
/** QEMU's own rule for ids and node-names: a letter first, then letters, digits, `-`, `.`, `_`. */
export const QEMU_ID = /^[A-Za-z][A-Za-z0-9_.-]{0,127}$/;
const UUID = /^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$/;
const MAC = /^[0-9a-fA-F]{2}(:[0-9a-fA-F]{2}){5}$/;
const FORMAT = /^[a-z0-9][a-z0-9_-]{0,31}$/;
const NIC_TYPE = /^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/;
/** `json:{...}`, `nbd://...`: a QEMU filename that is not a local path. */
const PSEUDO_PROTOCOL = /^[a-z][a-z0-9+.-]*:/;

const base = checker("the restore point's QEMU configuration is not usable (was it written by Strata?)");
const { refuse, str, strOrNull, int, arr, obj } = base;

/** A VM name as QEMU reports it: any text, but nothing that walks out of a directory. */
function vmName(v: unknown): string | null {
  const name = strOrNull(v, "the VM name");
  if (name === null) return null;
  if (name === "" || name === "." || name === ".." || name.includes("/") || CONTROL.test(name))
    refuse(`the VM name ${JSON.stringify(name)} is not a plain name`);
  return name;
}

function diskFile(v: unknown, where: string): string {
  const file = str(v, where);
  if (file === "") refuse(`${where} is empty`);
  if (CONTROL.test(file)) refuse(`${where} holds control characters`);
  if (!PSEUDO_PROTOCOL.test(file) && hasDotDot(file))
    refuse(`${where} ${JSON.stringify(file)} has a ".." segment`);
  return file;
}

/**
 * The program of a recorded command line: `qemu-system-<arch>` (or Proxmox VE's `kvm`), by name
 * or absolute path. Where such a path lies is checked when it is about to run (cmdline-policy.ts).
 */
export function isQemuProgram(bin: string): boolean {
  return (
    QEMU_PROGRAM.test(basename(bin)) && (bin === basename(bin) || (bin.startsWith("/") && !hasDotDot(bin)))
  );
}

function emulator(v: unknown, c: Checker = base): string {
  const bin = c.str(v, "the command line's program");
  if (!isQemuProgram(bin))
    c.refuse(
      `the command line runs ${JSON.stringify(bin)}, not a qemu-system-* binary: Strata runs only QEMU`,
    );
  return bin;
}

function commandLine(v: unknown, diskFiles: readonly string[]): string[] | null {
  if (v === null || v === undefined) return null;
  const argv = arr(v, "the command line", CONFIG_LIMITS.args).map((a, i) =>
    str(a, `argument ${i} of the command line`, CONFIG_LIMITS.argBytes),
  );
  if (argv.length === 0) return null;
  emulator(argv[0]);
  const total = argv.reduce((n, a) => n + a.length, 0);
  if (total > CONFIG_LIMITS.commandLineBytes)
    refuse(`the command line is longer than ${CONFIG_LIMITS.commandLineBytes} bytes`);
  checkRecordedCommandLine(argv, diskFiles, (what) => refuse(`its command line: ${what}`));
  return argv;
}

/**
 * Checks a stored QEMU configuration document and returns it typed, holding only the fields
 * Strata knows. Throws DATA_CORRUPT naming the first field that is wrong.
 */
export function parseQemuConfig(doc: unknown): VmConfig {
  const c = obj(doc, "the configuration");
  if (c.kind !== "qemu") refuse(`its kind is ${JSON.stringify(c.kind)}, not "qemu"`);
  const uuid = strOrNull(c.uuid, "the UUID");
  if (uuid !== null && !UUID.test(uuid)) refuse(`the UUID ${JSON.stringify(uuid)} is not a UUID`);
  const names = new Set<string>();
  const disks = arr(c.disks, "the disk list", CONFIG_LIMITS.disks).map((x, i) => {
    const d = obj(x, `disk ${i}`);
    const name = str(d.name, `the name of disk ${i}`);
    if (!PLAIN_NAME.test(name))
      refuse(`disk name ${JSON.stringify(name)} is not a plain name (letters, digits, ".", "_", "-")`);
    if (names.has(name)) refuse(`disk name ${name} appears twice`);
    names.add(name);
    const node = str(d.node, `the node-name of disk ${name}`);
    if (!QEMU_ID.test(node)) refuse(`disk ${name}'s node-name ${JSON.stringify(node)} is not a QEMU id`);
    const format = str(d.format, `the format of disk ${name}`);
    if (!FORMAT.test(format))
      refuse(`disk ${name}'s format ${JSON.stringify(format)} is not an image format`);
    return {
      name,
      node,
      device: str(d.device, `the device of disk ${name}`),
      format,
      file: diskFile(d.file, `disk ${name}'s file`),
      size: int(d.size, `the size of disk ${name}`, CONFIG_LIMITS.diskBytes),
    };
  });
  const nicIds = new Set<string>();
  const nics = arr(c.nics, "the NIC list", CONFIG_LIMITS.nics).map((x, i) => {
    const n = obj(x, `NIC ${i}`);
    const id = str(n.id, `the id of NIC ${i}`);
    if (!QEMU_ID.test(id)) refuse(`NIC id ${JSON.stringify(id)} is not a QEMU id`);
    if (nicIds.has(id)) refuse(`NIC id ${id} appears twice`);
    nicIds.add(id);
    const type = str(n.type, `the type of NIC ${id}`);
    if (!NIC_TYPE.test(type)) refuse(`NIC ${id}'s type ${JSON.stringify(type)} is not a device type`);
    const mac = strOrNull(n.mac, `the MAC of NIC ${id}`);
    if (mac !== null && !MAC.test(mac)) refuse(`NIC ${id}'s MAC ${JSON.stringify(mac)} is not a MAC address`);
    return { id, type, mac };
  });
  return {
    kind: "qemu",
    name: vmName(c.name),
    uuid,
    machine: strOrNull(c.machine, "the machine type"),
    cpus: int(c.cpus ?? 0, "the CPU count", CONFIG_LIMITS.cpus),
    memoryBytes: int(c.memoryBytes ?? 0, "the memory size", CONFIG_LIMITS.memoryBytes),
    disks,
    nics,
    firmware: strOrNull(c.firmware, "the firmware"),
    commandLine: commandLine(
      c.commandLine,
      disks.map((d) => d.file),
    ),
  };
}
