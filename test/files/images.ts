/**
 * Builds disk images for single-file restore tests without root: directory trees with modes,
 * times and symlinks, ext4 images from them (`mkfs.ext4 -d`, owners set with debugfs), FAT
 * images (`mkfs.vfat` + `mcopy`), partition tables (`sfdisk`), and a tree walker that records
 * what a restored tree must match.
 */
import { execFile } from "node:child_process";
import { createHash } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { promisify } from "node:util";

const run = promisify(execFile);

export async function sh(
  cmd: string,
  args: readonly string[],
  env?: Record<string, string>,
): Promise<string> {
  const r = await run(cmd, args, { maxBuffer: 64 * 1024 * 1024, env: { ...process.env, ...env } });
  return r.stdout;
}

/** What a tree entry must look like after a restore. */
export interface Expected {
  kind: "file" | "directory" | "symlink";
  mode: number;
  mtime: number;
  sha256?: string;
  target?: string;
  uid?: number;
  gid?: number;
}

/** Every entry under `root` (relative paths), as lstat and the bytes say. */
export async function describeTree(root: string, withOwners: boolean): Promise<Map<string, Expected>> {
  const out = new Map<string, Expected>();
  const visit = async (rel: string) => {
    const p = rel === "" ? root : join(root, rel);
    const st = await fs.lstat(p);
    const e: Expected = {
      kind: st.isDirectory() ? "directory" : st.isSymbolicLink() ? "symlink" : "file",
      mode: st.mode & 0o7777,
      mtime: Math.floor(st.mtimeMs / 1000),
    };
    if (withOwners) Object.assign(e, { uid: st.uid, gid: st.gid });
    if (e.kind === "file")
      e.sha256 = createHash("sha256")
        .update(await fs.readFile(p))
        .digest("hex");
    if (e.kind === "symlink") {
      e.target = await fs.readlink(p);
      e.mode = 0o777;
    }
    if (rel !== "") out.set(rel, e);
    if (e.kind === "directory")
      for (const name of (await fs.readdir(p)).sort()) await visit(rel === "" ? name : `${rel}/${name}`);
  };
  await visit("");
  return out;
}

/** Writes `data` into `image` at byte `offset`. */
export async function writeAt(image: string, offset: number, data: Buffer): Promise<void> {
  const fh = await fs.open(image, "r+");
  try {
    await fh.write(data, 0, data.length, offset);
  } finally {
    await fh.close();
  }
}

/** An ext4 image of `size` bytes holding `dir`; `owners` maps paths to [uid, gid] (set with debugfs). */
export async function makeExt4(
  image: string,
  size: number,
  dir: string,
  owners: Record<string, [number, number]> = {},
): Promise<void> {
  await fs.writeFile(image, "");
  await fs.truncate(image, size);
  await sh("mkfs.ext4", ["-q", "-F", "-b", "4096", "-d", dir, image]);
  const cmds = Object.entries(owners).flatMap(([p, [uid, gid]]) => [
    `sif ${p} uid ${uid}`,
    `sif ${p} gid ${gid}`,
  ]);
  if (cmds.length > 0) {
    const file = `${image}.debugfs`;
    await fs.writeFile(file, `${cmds.join("\n")}\n`);
    await sh("debugfs", ["-w", "-f", file, image]);
    await fs.rm(file);
  }
}

/** A FAT image (bits 12, 16 or 32) holding the contents of `dir`, times kept (read as UTC). */
export async function makeFat(image: string, size: number, bits: 12 | 16 | 32, dir: string): Promise<void> {
  await fs.writeFile(image, "");
  await fs.truncate(image, size);
  await sh("mkfs.vfat", ["-F", String(bits), "-n", "STRATA", image]);
  const names = await fs.readdir(dir);
  if (names.length > 0)
    await sh("mcopy", ["-s", "-m", "-i", image, ...names.map((n) => join(dir, n)), "::/"], {
      TZ: "UTC",
      LANG: "C.UTF-8",
      LC_ALL: "C.UTF-8",
    });
}

/** A disk image of `size` bytes partitioned by an sfdisk script. */
export async function makeDisk(image: string, size: number, script: string): Promise<void> {
  await fs.writeFile(image, "");
  await fs.truncate(image, size);
  const child = execFile("sfdisk", ["-q", image]);
  child.stdin!.end(script);
  await new Promise<void>((resolve, reject) => {
    child.on("error", reject);
    child.on("close", (code) => (code === 0 ? resolve() : reject(new Error(`sfdisk exited ${code}`))));
  });
}
