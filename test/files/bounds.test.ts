// Hostile images against the parsers of guest data, each built here from scratch (sfdisk-free
// hand-made GPT headers, mkfs.vfat with its FAT and directory entries patched, mkfs.ext4 and
// debugfs, a hand-made LVM physical volume): every one must end, through the real CLI, within
// 30 s and with its peak memory (VmHWM) under 512 MiB, with an error that says what is wrong
// or with what can be read.
import assert from "node:assert/strict";
import { promises as fs, readFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, type TestContext, test } from "node:test";
import { crc32 } from "node:zlib";
import { lvmCrc } from "../../src/image/lvm.js";
import { collect, startStrata, strataOk } from "../helpers/cli.js";
import { sh, writeAt } from "./images.js";

const MiB = 1024 * 1024;
const GiB = 1024 * MiB;
const SECTOR = 512;
const LIMIT_MS = 30_000;
const LIMIT_KIB = 512 * 1024;

let dir = "";
let repo = "";

before(async () => {
  dir = await fs.mkdtemp(join(tmpdir(), "strata-bounds-"));
  repo = join(dir, "repo");
  await strataOk(["init", "--repo", repo, "--chunk-size", "64K"]);
});

after(async () => {
  if (dir) await fs.rm(dir, { recursive: true, force: true });
});

interface Bounded {
  code: number | null;
  stdout: string;
  stderr: string;
  ms: number;
  peakKiB: number;
}

/** Runs the CLI with V8's heap capped at 512 MiB, sampling its peak resident memory; killed after 30 s. */
async function bounded(args: string[]): Promise<Bounded> {
  const started = Date.now();
  const child = startStrata(args, { nodeArgs: ["--max-old-space-size=512"] });
  const out = collect(child);
  let peakKiB = 0;
  const sample = setInterval(() => {
    try {
      const m = /VmHWM:\s+(\d+) kB/.exec(readFileSync(`/proc/${child.pid}/status`, "utf8"));
      if (m) peakKiB = Math.max(peakKiB, Number(m[1]));
    } catch {
      // Exited between two samples.
    }
  }, 20);
  const killer = setTimeout(() => child.kill("SIGKILL"), LIMIT_MS);
  const { code, stdout, stderr } = await out.result;
  clearInterval(sample);
  clearTimeout(killer);
  return { code, stdout, stderr, ms: Date.now() - started, peakKiB };
}

function within(t: TestContext, r: Bounded, what: string): void {
  t.diagnostic(`${what}: ${r.ms} ms, peak ${Math.round(r.peakKiB / 1024)} MiB, exit ${r.code}`);
  assert.ok(r.ms < LIMIT_MS, `${what}: ${r.ms} ms\n${r.stderr}`);
  assert.ok(r.peakKiB < LIMIT_KIB, `${what}: peak ${Math.round(r.peakKiB / 1024)} MiB`);
  assert.ok(r.peakKiB > 0, `${what}: memory was sampled`);
}

/** The last JSON error line of a failed --json run. */
function error(r: Bounded): { code: string; message: string } {
  return JSON.parse(r.stderr.trim().split("\n").at(-1)!) as { code: string; message: string };
}

async function backup(vm: string, image: string): Promise<void> {
  await strataOk(["backup", "--repo", repo, "--vm", vm, `file:${image},name=disk`]);
}

test("GPT: an entry size of 1 GiB on a sparse 8 GiB disk is refused without reading it", async (t) => {
  const image = join(dir, "gpt.img");
  await fs.writeFile(image, "");
  await fs.truncate(image, 8 * GiB);
  const head = Buffer.alloc(2 * SECTOR);
  const o = 446;
  head[o + 4] = 0xee;
  head.writeUInt32LE(1, o + 8);
  head.writeUInt32LE(0xffffffff, o + 12);
  head[510] = 0x55;
  head[511] = 0xaa;
  const h = head.subarray(SECTOR);
  h.write("EFI PART", 0, "latin1");
  h.writeUInt32LE(0x10000, 8);
  h.writeUInt32LE(92, 12);
  h.writeBigUInt64LE(2n, 72);
  h.writeUInt32LE(4, 80); // 4 entries...
  h.writeUInt32LE(GiB, 84); // ...of 1 GiB each
  h.writeUInt32LE(crc32(h.subarray(0, 92)), 16);
  await writeAt(image, 0, head);
  await backup("gpt", image);
  const r = await bounded(["files", "ls", "--repo", repo, "gpt/latest", "--json"]);
  within(t, r, "gpt");
  assert.equal(r.code, 3, r.stderr);
  assert.equal(error(r).code, "DATA_CORRUPT");
  assert.match(error(r).message, /entry size 1073741824 .*Linux only 128/);
});

/** mkfs.vfat of `size` bytes, holding `dirs` (nested paths), then `patch(image bytes)`. */
async function fatImage(name: string, size: number, bits: 16 | 32, dirs: string[]): Promise<string> {
  const image = join(dir, `${name}.img`);
  const tree = join(dir, `${name}-tree`);
  for (const d of dirs) await fs.mkdir(join(tree, d), { recursive: true });
  await fs.writeFile(join(tree, "keep.txt"), "keep\n");
  await fs.writeFile(image, "");
  await fs.truncate(image, size);
  await sh("mkfs.vfat", ["-F", String(bits), image]);
  await sh("mcopy", ["-s", "-i", image, ...(await fs.readdir(tree)).map((n) => join(tree, n)), "::/"]);
  return image;
}

/** Offset in `img` of the 32-byte short entry named `short` (11 characters, space padded). */
function shortEntry(img: Buffer, short: string): number {
  const at = img.indexOf(Buffer.from(short.padEnd(11), "latin1"));
  assert.ok(at >= 0 && (img[at + 11]! & 0x10) !== 0, `directory entry ${short}`);
  return at;
}

test("FAT: a directory that contains itself again (a loop) stops files get before anything is written", async (t) => {
  const image = await fatImage("fatloop", 16 * MiB, 16, ["LOOPDIR/INNER/DEEPER"]);
  const img = await fs.readFile(image);
  const loop = shortEntry(img, "LOOPDIR");
  const inner = shortEntry(img, "INNER");
  // INNER's first cluster becomes LOOPDIR's: LOOPDIR/INNER is LOOPDIR, and so on forever.
  img.writeUInt16LE(img.readUInt16LE(loop + 26), inner + 26);
  await writeAt(image, inner, img.subarray(inner, inner + 32));
  await backup("fatloop", image);
  const to = join(dir, "loop-target");
  const r = await bounded(["files", "get", "--repo", repo, "fatloop/latest", "/", "--to", to, "--json"]);
  within(t, r, "fat loop");
  assert.equal(r.code, 3, r.stderr);
  assert.match(error(r).message, /\/LOOPDIR\/INNER is the directory \/LOOPDIR again/i);
  assert.equal(await fs.stat(to).catch(() => undefined), undefined, "nothing written");
  // Listing one directory of it is harmless.
  const ls = await bounded([
    "files",
    "ls",
    "--repo",
    repo,
    "fatloop/latest",
    "/LOOPDIR/INNER/INNER",
    "--json",
  ]);
  within(t, ls, "fat loop ls");
  assert.equal(ls.code, 0, ls.stderr);
});

test("FAT: a directory whose cluster chain runs through a whole 1 GiB volume is refused at 65536 entries", async (t) => {
  const image = await fatImage("fatchain", GiB, 32, ["BIG"]);
  const img = await fs.open(image, "r+");
  try {
    const bs = Buffer.alloc(512);
    await img.read(bs, 0, 512, 0);
    const bps = bs.readUInt16LE(11);
    const reserved = bs.readUInt16LE(14);
    const fatSize = bs.readUInt32LE(36);
    const spc = bs[13]!;
    const clusters = Math.floor((bs.readUInt32LE(32) - reserved - 2 * fatSize) / spc);
    const root = Buffer.alloc(bps * spc);
    await img.read(root, 0, root.length, (reserved + 2 * fatSize) * bps); // the root directory: cluster 2
    const big = shortEntry(root, "BIG");
    const first = root.readUInt16LE(big + 20) * 65536 + root.readUInt16LE(big + 26);
    // Every cluster from BIG's first to the volume's last, chained.
    const chain = Buffer.alloc((clusters + 2 - first) * 4);
    for (let c = first; c < clusters + 1; c++) chain.writeUInt32LE(c + 1, (c - first) * 4);
    chain.writeUInt32LE(0x0fffffff, chain.length - 4);
    await img.write(chain, 0, chain.length, reserved * bps + first * 4);
  } finally {
    await img.close();
  }
  await backup("fatchain", image);
  const r = await bounded(["files", "ls", "--repo", repo, "fatchain/latest", "/BIG", "--json"]);
  within(t, r, "fat chain");
  assert.equal(r.code, 3, r.stderr);
  assert.match(error(r).message, /longer than FAT allows \(65536 entries\)/);
});

test("ext4: a journal inode of absurd size (2^50 bytes) is refused before allocating", async (t) => {
  const tree = join(dir, "jtree");
  await fs.mkdir(tree);
  await fs.writeFile(join(tree, "a.txt"), "a\n");
  const image = join(dir, "journal.img");
  await fs.writeFile(image, "");
  await fs.truncate(image, 32 * MiB);
  await sh("mkfs.ext4", ["-q", "-F", "-b", "4096", "-d", tree, image]);
  await fs.writeFile(join(dir, "jcmds"), "sif <8> size 0x4000000000000\nfeature needs_recovery\n");
  await sh("debugfs", ["-w", "-f", join(dir, "jcmds"), image]);
  await backup("journal", image);
  const r = await bounded(["files", "ls", "--repo", repo, "journal/latest", "/", "--json"]);
  within(t, r, "journal");
  assert.equal(r.code, 3, r.stderr);
  assert.match(error(r).message, /journal inode claims 1125899906842624 bytes .*at most/);
});

test("ext4: a name holding / is listed as invalid and skipped; the rest of its directory reads", async (t) => {
  const tree = join(dir, "ntree");
  await fs.mkdir(tree);
  await fs.writeFile(join(tree, "good.txt"), "good\n");
  await fs.writeFile(join(tree, "slashXname"), "bad\n");
  const image = join(dir, "names.img");
  await fs.writeFile(image, "");
  await fs.truncate(image, 16 * MiB);
  // Without metadata_csum, so that the patched directory block still checks.
  await sh("mkfs.ext4", ["-q", "-F", "-b", "4096", "-O", "^metadata_csum", "-d", tree, image]);
  const img = await fs.readFile(image);
  const at = img.indexOf("slashXname");
  assert.ok(at > 0);
  await writeAt(image, at + 5, Buffer.from("/"));
  await backup("names", image);
  const ls = await bounded(["files", "ls", "--repo", repo, "names/latest", "/", "--json"]);
  within(t, ls, "ext names");
  assert.equal(ls.code, 0, ls.stderr);
  const entries = (JSON.parse(ls.stdout) as { entries: Array<{ name: string; invalid?: string }> }).entries;
  assert.deepEqual(
    entries.filter((e) => e.name !== "lost+found").map((e) => [e.name, e.invalid]),
    [
      ["good.txt", undefined],
      ["slash/name", 'a name containing "/"'],
    ],
  );
  const to = join(dir, "names-target");
  const get = await bounded(["files", "get", "--repo", repo, "names/latest", "/", "--to", to]);
  assert.equal(get.code, 0, get.stderr);
  assert.match(get.stderr, /\/slash\/name: a name containing "\/"; skipped/);
  assert.equal(await fs.readFile(join(to, "good.txt"), "utf8"), "good\n");
  assert.equal(await fs.stat(join(to, "slash")).catch(() => undefined), undefined);
});

test("LVM: 40,000 logical volumes are listed up to 4096, with a warning, in seconds", async (t) => {
  const n = 40_000;
  const lvs: string[] = [];
  for (let k = 0; k < n; k++)
    lvs.push(
      `lv${k} {\nid = "aaaaaa-aaaa-aaaa-aaaa-aaaa-aaaa-aaaaaa"\nstatus = ["READ", "WRITE", "VISIBLE"]\n` +
        `segment_count = 1\nsegment1 {\nstart_extent = 0\nextent_count = 1\ntype = "striped"\n` +
        `stripe_count = 1\nstripes = ["pv0", ${k % 10}]\n}\n}\n`,
    );
  const text = Buffer.from(
    `vg0 {\nid = "zlKE9r-3ml5-lZoU-Gaf2-N2RA-nvMI-zU6IgC"\nseqno = 1\nextent_size = 8192\n` +
      `physical_volumes {\npv0 {\nid = "xJwcBs-6Wsk-15PE-Uojz-1ZC2-vmT6-CghnDe"\npe_start = 40960\npe_count = 10\n}\n}\n` +
      `logical_volumes {\n${lvs.join("")}}\n}\n`,
  );
  // A whole-disk PV: label in sector 1, a 16 MiB metadata area at 4 KiB, extents from 20 MiB.
  const size = 64 * MiB;
  const mdaOffset = 4096;
  const mdaSize = 16 * MiB;
  assert.ok(text.length < mdaSize - 512, `${text.length} bytes of metadata`);
  const head = Buffer.alloc(mdaOffset + 512);
  const label = head.subarray(512, 1024);
  label.write("LABELONE", 0, "latin1");
  label.writeBigUInt64LE(1n, 8);
  label.writeUInt32LE(32, 20);
  label.write("LVM2 001", 24, "latin1");
  label.write("xJwcBs6Wsk15PEUojz1ZC2vmT6CghnDe", 32, "latin1");
  label.writeBigUInt64LE(BigInt(size), 64);
  label.writeBigUInt64LE(BigInt(20 * MiB), 72);
  label.writeBigUInt64LE(BigInt(mdaOffset), 104);
  label.writeBigUInt64LE(BigInt(mdaSize), 112);
  label.writeUInt32LE(lvmCrc(label.subarray(20)), 16);
  const h = head.subarray(mdaOffset);
  h.write(" LVM2 x[5A%r0N*>", 4, "latin1");
  h.writeUInt32LE(1, 20);
  h.writeBigUInt64LE(BigInt(mdaOffset), 24);
  h.writeBigUInt64LE(BigInt(mdaSize), 32);
  h.writeBigUInt64LE(512n, 40);
  h.writeBigUInt64LE(BigInt(text.length), 48);
  h.writeUInt32LE(lvmCrc(text), 56);
  h.writeUInt32LE(lvmCrc(h.subarray(4)), 0);
  const image = join(dir, "lvm.img");
  await fs.writeFile(image, "");
  await fs.truncate(image, size);
  await writeAt(image, 0, head);
  await writeAt(image, mdaOffset + 512, text);
  await backup("lvm", image);
  const r = await bounded(["files", "ls", "--repo", repo, "lvm/latest", "--json"]);
  within(t, r, "lvm");
  assert.equal(r.code, 0, r.stderr);
  const doc = JSON.parse(r.stdout) as { volumeGroups: Array<{ lvs: unknown[] }>; warnings: string[] };
  assert.equal(doc.volumeGroups[0]!.lvs.length, 4096);
  assert.match(doc.warnings.join("\n"), /lists 40000 logical .* the first 4096/);
  const text2 = await bounded(["files", "ls", "--repo", repo, "lvm/latest"]);
  within(t, text2, "lvm text");
  assert.match(text2.stdout, /warning: volume group vg0 lists 40000 logical/);
});
