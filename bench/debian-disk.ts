/**
 * The headline benchmark disk: a 4 GiB ext4 image of an installed Debian 12 system
 * (debootstrap: kernel, systemd, Python, Perl, a compiler, PostgreSQL, a JRE, libraries, docs),
 * and "next day" images made by using that system in a chroot (apt-get install and purge, logs
 * rotated and appended, a SQLite database grown and updated, configuration edited, user files
 * created and deleted). scripts/bench-debian-disk.sh does the building; this module caches its
 * result under <cache>/bench/debian-<key>, the key being a hash of the script and the number of
 * days, so a changed recipe builds anew (the debootstrap'd tree and the package downloads stay
 * cached in <cache>/bench/debian-base across recipes).
 *
 * The content is deterministic where it can be (seeded generators, a fixed package list), not
 * byte for byte: Debian's mirror moves, and ext4 and dpkg record times.
 */
import { execFileSync } from "node:child_process";
import { createHash } from "node:crypto";
import {
  closeSync,
  existsSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  readSync,
  renameSync,
  rmSync,
  statSync,
  writeFileSync,
} from "node:fs";
import { join } from "node:path";

const MiB = 1024 * 1024;
/** Granularity of the day-to-day change figures. */
const BLOCK = 64 * 1024;

export interface DebianDisks {
  images: string[];
  /** Bytes allocated in day 0's image (the file system's used blocks and its metadata). */
  allocated: number;
  /** For day d ≥ 1 (index d - 1): bytes of 64 KiB blocks that differ from day d - 1's image. */
  changed: number[];
}

/** Bytes of `BLOCK`-sized blocks at which two equally long files differ. */
function changedBytes(a: string, b: string): number {
  const fa = openSync(a, "r");
  const fb = openSync(b, "r");
  const size = statSync(a).size;
  const step = 16 * MiB;
  const ba = Buffer.allocUnsafe(step);
  const bb = Buffer.allocUnsafe(step);
  let changed = 0;
  try {
    for (let off = 0; off < size; off += step) {
      const n = readSync(fa, ba, 0, step, off);
      if (readSync(fb, bb, 0, step, off) !== n) throw new Error(`${b}: shorter than ${a}`);
      for (let i = 0; i < n; i += BLOCK) {
        const end = Math.min(n, i + BLOCK);
        if (!ba.subarray(i, end).equals(bb.subarray(i, end))) changed += end - i;
      }
    }
  } finally {
    closeSync(fa);
    closeSync(fb);
  }
  return changed;
}

/** Builds (or finds cached) day0..dayN images of the Debian system; `root` is the repository. */
export function debianDisks(root: string, cacheDir: string, days: number): DebianDisks {
  const script = join(root, "scripts", "bench-debian-disk.sh");
  const key = createHash("sha256")
    .update(readFileSync(script))
    .update(`days=${days}`)
    .digest("hex")
    .slice(0, 12);
  const benchDir = join(cacheDir, "bench");
  const dir = join(benchDir, `debian-${key}`);
  const info = join(dir, "disks.json");
  // The images are where this cache is now (a cache folder may have been moved or copied).
  const images = Array.from({ length: days + 1 }, (_, d) => join(dir, `day${d}.img`));
  if (existsSync(info)) return { ...(JSON.parse(readFileSync(info, "utf8")) as DebianDisks), images };

  mkdirSync(benchDir, { recursive: true });
  // Images of older recipes: 2 GiB each, of no further use.
  for (const name of readdirSync(benchDir))
    if (/^debian-[0-9a-f]{12}(\.tmp)?$/.test(name))
      rmSync(join(benchDir, name), { recursive: true, force: true });
  const tmp = `${dir}.tmp`;
  console.error("bench: building the Debian benchmark disk (once; cached in .cache/bench)");
  execFileSync(script, [tmp, String(days), join(benchDir, "debian-base")], {
    stdio: ["ignore", "inherit", "inherit"],
  });
  const tmpImages = images.map((p) => join(tmp, p.slice(dir.length + 1)));
  const changed: number[] = [];
  for (let d = 1; d <= days; d++) changed.push(changedBytes(tmpImages[d - 1]!, tmpImages[d]!));
  const disks: DebianDisks = { images, allocated: statSync(tmpImages[0]!).blocks * 512, changed };
  writeFileSync(join(tmp, "disks.json"), `${JSON.stringify(disks, null, 2)}\n`);
  renameSync(tmp, dir);
  return disks;
}
