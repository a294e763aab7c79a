/**
 * A minimal tar (POSIX pax) writer: regular files, directories and symlinks, with mode, owner,
 * times. Names or link targets longer than ustar allows, non-ASCII names, sizes of 8 GiB and
 * up and sub-second times go into a pax extended header, so GNU tar and bsdtar restore them
 * exactly.
 */

const BLOCK = 512;

export interface TarHeader {
  /** Path inside the archive, without a leading "/"; directories without a trailing one. */
  path: string;
  kind: "file" | "directory" | "symlink";
  mode: number;
  uid: number;
  gid: number;
  size: number;
  /** Milliseconds since the epoch. */
  mtime: number;
  atime?: number;
  target?: string;
}

/** The header block(s) of one entry (pax header first when needed). */
export function tarHeader(h: TarHeader): Buffer {
  const name = h.kind === "directory" ? `${h.path}/` : h.path;
  const pax: Array<[string, string]> = [];
  const ascii = (s: string) => /^[\x20-\x7e]*$/.test(s);
  if (Buffer.byteLength(name) > 100 || !ascii(name)) pax.push(["path", name]);
  if (h.target !== undefined && (Buffer.byteLength(h.target) > 100 || !ascii(h.target)))
    pax.push(["linkpath", h.target]);
  if (h.size >= 8 ** 11) pax.push(["size", String(h.size)]);
  if (h.mtime % 1000 !== 0 || h.mtime < 0) pax.push(["mtime", seconds(h.mtime)]);
  if (h.atime !== undefined) pax.push(["atime", seconds(h.atime)]);
  const main = ustar(
    name,
    h.kind === "file" ? "0" : h.kind === "directory" ? "5" : "2",
    h,
    h.kind === "file" ? h.size : 0,
  );
  if (pax.length === 0) return main;
  const body = Buffer.from(pax.map(([k, v]) => record(k, v)).join(""));
  const paxHeader = ustar(`PaxHeaders/${name.slice(-80)}`, "x", { ...h, mode: 0o644 }, body.length);
  return Buffer.concat([paxHeader, body, padding(body.length), main]);
}

/** Zero bytes that complete a member of `size` bytes to a whole block. */
export function padding(size: number): Buffer {
  return Buffer.alloc((BLOCK - (size % BLOCK)) % BLOCK);
}

/** The end of an archive: two zero blocks. */
export function tarEnd(): Buffer {
  return Buffer.alloc(2 * BLOCK);
}

function seconds(ms: number): string {
  const s = Math.floor(ms / 1000);
  const frac = ms - s * 1000;
  return frac === 0 ? String(s) : `${s}.${String(frac).padStart(3, "0")}`;
}

/** A pax record: "<length> key=value\n", where length counts itself. */
function record(key: string, value: string): string {
  const rest = ` ${key}=${value}\n`;
  const restLen = Buffer.byteLength(rest);
  let len = restLen + 1;
  while (String(len).length + restLen > len) len++;
  return `${len}${rest}`;
}

function ustar(name: string, type: string, h: TarHeader, size: number): Buffer {
  const b = Buffer.alloc(BLOCK);
  const put = (offset: number, length: number, s: string) => {
    b.write(s, offset, Math.min(length, Buffer.byteLength(s)), "utf8");
  };
  const octal = (offset: number, length: number, n: number) => {
    const v = Math.max(0, Math.min(n, 8 ** (length - 1) - 1));
    put(offset, length, `${v.toString(8).padStart(length - 1, "0")}\0`);
  };
  put(0, 100, asciiTail(name, 100));
  octal(100, 8, h.mode & 0o7777);
  octal(108, 8, h.uid);
  octal(116, 8, h.gid);
  octal(124, 12, size);
  octal(136, 12, Math.floor(h.mtime / 1000));
  b.fill(0x20, 148, 156);
  put(156, 1, type);
  if (h.target !== undefined) put(157, 100, asciiTail(h.target, 100));
  put(257, 6, "ustar\0");
  put(263, 2, "00");
  let sum = 0;
  for (const byte of b) sum += byte;
  put(148, 8, `${sum.toString(8).padStart(6, "0")}\0 `);
  return b;
}

/** Something that fits a ustar field (the pax header carries the real value when it does not). */
function asciiTail(s: string, max: number): string {
  const a = s.replace(/[^\x20-\x7e]/g, "_");
  return a.length <= max ? a : a.slice(a.length - max);
}
