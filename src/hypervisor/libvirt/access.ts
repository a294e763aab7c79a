/**
 * QEMU under libvirt runs as its own user (`libvirt-qemu` on Debian; qemu.conf `user`/`group`),
 * and opens sockets and files Strata hands it by path: every parent directory must be searchable
 * by that user, and a unix socket it connects to must be writable by it. libvirt relabels disk
 * images (dynamic_ownership), but neither NBD sockets nor directories.
 */
import { promises as fs } from "node:fs";
import { dirname } from "node:path";
import { ErrorCode, StrataError } from "../../util/errors.js";

export interface QemuUser {
  uid: number;
  gid: number;
}

function field(text: string, key: string): string | undefined {
  const m = new RegExp(`^\\s*${key}\\s*=\\s*"([^"]*)"`, "m").exec(text);
  return m?.[1];
}

async function lookup(file: string, name: string): Promise<{ id: number; gid: number } | undefined> {
  if (/^\+\d+$/.test(name)) return { id: Number(name.slice(1)), gid: -1 };
  const text = await fs.readFile(file, "utf8").catch(() => "");
  for (const line of text.split("\n")) {
    const f = line.split(":");
    if (f[0] === name && f.length >= 4) return { id: Number(f[2]), gid: Number(f[3]) };
  }
  return undefined;
}

/** The user and group a system libvirtd runs QEMU as (qemu.conf, else Debian's default). */
export async function qemuUser(conf = "/etc/libvirt/qemu.conf"): Promise<QemuUser> {
  const text = await fs.readFile(conf, "utf8").catch(() => "");
  const userName = field(text, "user") ?? "libvirt-qemu";
  const user = await lookup("/etc/passwd", userName);
  if (!user)
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `QEMU's user ${userName} (${conf}) does not exist on this host`,
    );
  const groupName = field(text, "group");
  const group = groupName === undefined ? undefined : await lookup("/etc/group", groupName);
  return { uid: user.id, gid: group?.id ?? (user.gid >= 0 ? user.gid : user.id) };
}

/** Throws a clear USAGE error unless every parent of `path` is searchable by `user`. */
export async function checkReachable(path: string, user: QemuUser, what: string): Promise<void> {
  for (let p = dirname(path); ; p = dirname(p)) {
    const st = await fs.stat(p);
    const x =
      (st.mode & 0o001) !== 0 ||
      (st.uid === user.uid && (st.mode & 0o100) !== 0) ||
      (st.gid === user.gid && (st.mode & 0o010) !== 0);
    if (!x) {
      throw new StrataError(
        ErrorCode.USAGE,
        `QEMU runs as uid ${user.uid} and cannot reach ${what} ${path}: ${p} is not searchable by it (mode ${(st.mode & 0o777).toString(8)})`,
      );
    }
    if (p === "/") break;
  }
}
