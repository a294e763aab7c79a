/**
 * The benchmark disk: a 4 GiB ext4 image holding a Linux-like tree (shared libraries, binaries,
 * documentation, logs, incompressible media, duplicated directories), built with mkfs.ext4 -d
 * from files of this machine plus generated ones, and "next day" versions of it changed with
 * debugfs the way a day of use changes a disk (logs rewritten longer, binaries upgraded, a new
 * download, an old one deleted). Cached under .cache/bench; rebuilt when VERSION changes.
 */
import { execFileSync } from "node:child_process";
import { existsSync, mkdirSync, readdirSync, rmSync, statSync, writeFileSync } from "node:fs";
import { join } from "node:path";
import { fillContent, Prng } from "../src/image/synthetic.js";

const VERSION = "3";
const MiB = 1024 * 1024;

function sh(cmd: string, args: string[]): string {
  return execFileSync(cmd, args, {
    encoding: "utf8",
    maxBuffer: 64 * MiB,
    stdio: ["ignore", "pipe", "pipe"],
  });
}

function writeGenerated(path: string, size: number, kind: "text" | "random" | "binary", seed: string): void {
  const buf = Buffer.alloc(size);
  fillContent(buf, kind, new Prng(seed));
  writeFileSync(path, buf);
}

/** Builds (or finds cached) day0..dayN images; returns their paths. */
export function benchDisks(cacheDir: string, days: number): string[] {
  const dir = join(cacheDir, `bench-v${VERSION}`);
  const images = Array.from({ length: days + 1 }, (_, d) => join(dir, `day${d}.img`));
  if (images.every((p) => existsSync(p))) return images;
  rmSync(dir, { recursive: true, force: true });
  mkdirSync(dir, { recursive: true });
  const tree = join(dir, "tree");
  mkdirSync(join(tree, "var", "log"), { recursive: true });
  mkdirSync(join(tree, "home", "user", "media"), { recursive: true });
  console.error("bench: building the benchmark disk (once; cached in .cache/bench)");
  // Real binaries and text from this machine: hard links cost no space.
  for (const [src, dst] of [
    ["/usr/lib/x86_64-linux-gnu", "usr/lib/x86_64-linux-gnu"],
    ["/usr/bin", "usr/bin"],
    ["/usr/share", "usr/share"],
  ] as const) {
    mkdirSync(join(tree, dst, ".."), { recursive: true });
    sh("cp", ["-a", "--link", src, join(tree, dst)]);
  }
  // A backup copy of /usr/bin: duplicate data, as real disks have.
  sh("cp", ["-a", "--link", "/usr/bin", join(tree, "home", "user", "bin-backup")]);
  for (let i = 0; i < 20; i++)
    writeGenerated(join(tree, "var", "log", `app${i}.log`), 8 * MiB, "text", `log${i}`);
  for (let i = 0; i < 12; i++)
    writeGenerated(join(tree, "home", "user", "media", `video${i}.bin`), 40 * MiB, "random", `media${i}`);
  for (let i = 0; i < 8; i++)
    writeGenerated(join(tree, "home", "user", `data${i}.db`), 16 * MiB, "binary", `db${i}`);
  sh("mkfs.ext4", ["-q", "-F", "-b", "4096", "-E", "root_owner=0:0", "-d", tree, images[0]!, "4G"]);
  rmSync(tree, { recursive: true, force: true });

  const work = join(dir, "changes");
  mkdirSync(work, { recursive: true });
  const bins = readdirSync("/usr/bin")
    .filter((n) => statSync(join("/usr/bin", n)).isFile())
    .sort();
  for (let d = 1; d <= days; d++) {
    sh("cp", ["--sparse=always", images[d - 1]!, images[d]!]);
    const rng = new Prng(`day${d}`);
    const cmds: string[] = [];
    // Logs grow: three rewritten 1 MiB longer.
    for (let i = 0; i < 3; i++) {
      const n = rng.below(20);
      const f = join(work, `app${n}.log`);
      const size = 8 * MiB + d * MiB;
      const buf = Buffer.alloc(size);
      fillContent(buf, "text", new Prng(`log${n}`));
      fillContent(buf.subarray(8 * MiB), "text", new Prng(`log${n} day${d}`));
      writeFileSync(f, buf);
      cmds.push(`rm /var/log/app${n}.log`, `write ${f} /var/log/app${n}.log`);
    }
    // A package upgrade: ten binaries replaced by slightly different builds.
    for (let i = 0; i < 10; i++) {
      const name = bins[rng.below(bins.length)]!;
      const src = join("/usr/bin", name);
      const f = join(work, `bin-${name}`);
      const buf = execFileSync("cat", [src], { maxBuffer: 512 * MiB });
      for (let k = 0; k < 64 && buf.length > 0; k++) buf[rng.below(buf.length)] = rng.below(256);
      writeFileSync(f, buf);
      cmds.push(`rm /usr/bin/${name}`, `write ${f} /usr/bin/${name}`);
    }
    // A new download, an old one deleted; a database page rewrite.
    const dl = join(work, `dl${d}.bin`);
    writeGenerated(dl, 12 * MiB, "random", `download${d}`);
    cmds.push(`write ${dl} /home/user/media/download${d}.bin`);
    cmds.push(`rm /home/user/media/video${d % 12}.bin`);
    const db = join(work, `data${d}.db`);
    const dbBuf = Buffer.alloc(16 * MiB);
    fillContent(dbBuf, "binary", new Prng(`db${d % 8}`));
    fillContent(dbBuf.subarray(4 * MiB, 5 * MiB), "binary", new Prng(`db day${d}`));
    writeFileSync(db, dbBuf);
    cmds.push(`rm /home/user/data${d % 8}.db`, `write ${db} /home/user/data${d % 8}.db`);
    const cmdFile = join(work, `day${d}.cmds`);
    writeFileSync(cmdFile, `${cmds.join("\n")}\n`);
    sh("debugfs", ["-w", "-f", cmdFile, images[d]!]);
    rmSync(work, { recursive: true, force: true });
    mkdirSync(work, { recursive: true });
  }
  rmSync(work, { recursive: true, force: true });
  return images;
}
