/**
 * The "files" adapter: disk images and block devices named on the command line as
 * `file:PATH[,name=DISK]`. No hypervisor is involved; Strata can't tell how the VM left the
 * disks, so such restore points are recorded as crash-consistent.
 */
import { basename } from "node:path";
import { RawFileSource } from "../../image/raw-file.js";
import { NAME_RE } from "../../repo/format.js";
import { ErrorCode, StrataError } from "../../util/errors.js";

export interface FileSpec {
  path: string;
  name: string;
}

/** Parses `file:PATH[,name=DISK]` specs; disk names default to the file name without extension. */
export function parseFileSpecs(specs: readonly string[]): FileSpec[] {
  const out: FileSpec[] = [];
  for (const spec of specs) {
    if (!spec.startsWith("file:")) {
      throw new StrataError(
        ErrorCode.USAGE,
        `unknown source "${spec}": sources look like file:/path/to/disk.img[,name=DISK]`,
      );
    }
    const parts = spec.slice(5).split(",");
    const path = parts[0] ?? "";
    if (path === "") throw new StrataError(ErrorCode.USAGE, `source "${spec}" names no file`);
    let name = basename(path).replace(/\.(img|raw|bin|disk)$/i, "");
    for (const opt of parts.slice(1)) {
      const [k, v] = opt.split("=", 2);
      if (k === "name" && v) name = v;
      else
        throw new StrataError(
          ErrorCode.USAGE,
          `unknown option "${opt}" in source "${spec}" (known: name=DISK)`,
        );
    }
    name = name.replace(/[^A-Za-z0-9._-]/g, "_").replace(/^[^A-Za-z0-9]+/, "") || "disk";
    if (!NAME_RE.test(name))
      throw new StrataError(ErrorCode.USAGE, `bad disk name "${name}" in source "${spec}"`);
    out.push({ path, name });
  }
  const seen = new Map<string, number>();
  for (const s of out) {
    const n = seen.get(s.name) ?? 0;
    seen.set(s.name, n + 1);
    if (n > 0) s.name = `${s.name}-${n}`;
  }
  return out;
}

export interface OpenedDisk {
  name: string;
  source: string;
  size: number;
  read(offset: number, length: number): Promise<Buffer>;
  close(): Promise<void>;
}

/** Opens every file source; closes what it opened if one fails. */
export async function openFileDisks(specs: readonly FileSpec[]): Promise<OpenedDisk[]> {
  const opened: OpenedDisk[] = [];
  try {
    for (const s of specs) {
      const src = await RawFileSource.open(s.path);
      opened.push({
        name: s.name,
        source: s.path,
        size: src.size,
        read: (o, l) => src.read(o, l),
        close: () => src.close(),
      });
    }
    return opened;
  } catch (err) {
    await Promise.all(opened.map((d) => d.close()));
    throw err;
  }
}
