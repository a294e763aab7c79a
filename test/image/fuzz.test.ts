// Property-based fuzzing (fast-check) of the parsers that read guest-owned bytes: partition
// tables (GPT, MBR with a chain of logical partitions), FAT, the ext journal, LVM metadata text.
// Seeds are real images made with sfdisk, mkfs.vfat/mcopy, mkfs.ext4 and debugfs (a committed,
// unreplayed journal); fast-check flips, overwrites and zeroes bytes in their metadata. Each
// mutated image must parse or fail with a StrataError, within 5 s — never another exception,
// a hang or a crash. Bounded for CI: STRATA_FUZZ_RUNS cases per parser (default 300) and
// STRATA_FUZZ_SECONDS per parser (default 15); a failure prints the seed and path that replay it.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import fc from "fast-check";
import type { ByteSource } from "../../src/image/byte-source.js";
import { slice } from "../../src/image/byte-source.js";
import { replayJournal } from "../../src/image/ext-journal.js";
import { FatReader } from "../../src/image/fs-fat.js";
import { parseLvmText, parseVolumeGroup } from "../../src/image/lvm.js";
import { readPartitionTable } from "../../src/image/partitions.js";
import { isStrataError } from "../../src/util/errors.js";
import { makeDisk, makeExt4, makeFat, sh } from "../files/images.js";
import { tempDir } from "../helpers/cli.js";

const RUNS = Number(process.env.STRATA_FUZZ_RUNS ?? 300);
const LIMIT_MS = Number(process.env.STRATA_FUZZ_SECONDS ?? 15) * 1000;
const CASE_MS = 5000;
const MiB = 1024 * 1024;

function memory(buf: Buffer): ByteSource {
  return {
    size: buf.length,
    read: async (o, l) => {
      if (o < 0 || l < 0 || o + l > buf.length) throw new RangeError(`read ${o}+${l} beyond ${buf.length}`);
      return buf.subarray(o, o + l);
    },
  };
}

/** Byte edits inside the metadata ranges of a seed. */
function edits(hot: ReadonlyArray<[number, number]>) {
  const at = fc
    .tuple(fc.nat(hot.length - 1), fc.nat())
    .map(([r, x]) => hot[r]![0] + (x % (hot[r]![1] - hot[r]![0])));
  return fc.array(
    fc.oneof(
      fc.tuple(fc.constant("xor" as const), at, fc.integer({ min: 1, max: 255 })),
      fc.tuple(fc.constant("set" as const), at, fc.constantFrom(0x00, 0xff, 0x7f, 0x80, 0x01)),
      fc.tuple(
        fc.constant("u32" as const),
        at,
        fc.constantFrom(0, 1, 0xffffffff, 0x7fffffff, 0x80000000, 4096),
      ),
    ),
    { minLength: 1, maxLength: 8 },
  );
}

function apply(seed: Buffer, list: ReadonlyArray<readonly ["xor" | "set" | "u32", number, number]>): Buffer {
  const b = Buffer.from(seed);
  for (const [op, at, v] of list) {
    if (op === "xor") b[at]! ^= v;
    else if (op === "set") b[at] = v;
    else if (at + 4 <= b.length) b.writeUInt32LE(v >>> 0, at);
  }
  return b;
}

/** Runs `fn`; only a StrataError may come out of it, and within CASE_MS. */
async function mustEndCleanly(what: string, fn: () => Promise<unknown>): Promise<void> {
  let timer: NodeJS.Timeout | undefined;
  const timeout = new Promise<never>((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what} did not end within ${CASE_MS} ms`)), CASE_MS);
  });
  try {
    await Promise.race([fn(), timeout]);
  } catch (err) {
    if (!isStrataError(err)) throw err;
  } finally {
    clearTimeout(timer);
  }
}

const params = { numRuns: RUNS, interruptAfterTimeLimit: LIMIT_MS };

test("partition tables: mutated GPT and MBR chains parse or fail cleanly", async (t) => {
  const dir = tempDir(t);
  const gpt = join(dir, "gpt.img");
  await makeDisk(gpt, 8 * MiB, "label: gpt\nsize=2MiB, type=L\nsize=2MiB, type=L\n");
  const mbr = join(dir, "mbr.img");
  await makeDisk(
    mbr,
    8 * MiB,
    "label: dos\nsize=1MiB, type=83\ntype=5\nsize=1MiB, type=83\nsize=1MiB, type=83\n",
  );
  const seeds: Array<[string, Buffer, Array<[number, number]>]> = [
    [
      "gpt",
      await fs.readFile(gpt),
      [
        [0, 34 * 512],
        [8 * MiB - 33 * 512, 8 * MiB],
      ],
    ],
    [
      "mbr",
      await fs.readFile(mbr),
      Array.from({ length: 8 }, (_, i) => [i * MiB, i * MiB + 512] as [number, number]),
    ],
  ];
  for (const [name, seed, hot] of seeds) {
    const table = await readPartitionTable(memory(seed));
    assert.ok(table.partitions.length >= 2, `${name} seed has its partitions`);
    await fc.assert(
      fc.asyncProperty(edits(hot), async (list) => {
        await mustEndCleanly(`${name} table`, async () => {
          const parsed = await readPartitionTable(memory(apply(seed, list)));
          for (const p of parsed.partitions) {
            assert.ok(
              p.start >= 0 && p.size >= 0 && p.start + p.size <= seed.length,
              `${name}: partition within the disk`,
            );
          }
        });
      }),
      params,
    );
  }
});

test("FAT: a mutated volume lists and reads, or fails cleanly", async (t) => {
  const dir = tempDir(t);
  const src = join(dir, "src");
  await fs.mkdir(join(src, "a long directory name/deeper"), { recursive: true });
  for (let i = 0; i < 20; i++)
    await fs.writeFile(join(src, `file number ${i}.txt`), `content ${i}\n`.repeat(i * 50));
  await fs.writeFile(join(src, "a long directory name/deeper/big.bin"), randomBytes(300 * 1024));
  const seeds: Array<[string, Buffer]> = [];
  for (const bits of [12, 16, 32] as const) {
    const img = join(dir, `fat${bits}.img`);
    await makeFat(img, bits === 32 ? 40 * MiB : bits === 16 ? 16 * MiB : 4 * MiB, bits, src);
    seeds.push([`fat${bits}`, await fs.readFile(img)]);
  }
  for (const [name, seed] of seeds) {
    await fc.assert(
      fc.asyncProperty(edits([[0, 512 * 1024]]), async (list) => {
        await mustEndCleanly(name, async () => {
          const reader = await FatReader.open(memory(apply(seed, list)));
          try {
            const walk = async (path: string, depth: number): Promise<void> => {
              for (const e of await reader.list(path)) {
                if (e.kind === "directory" && depth < 8) await walk(e.path, depth + 1);
                else if (e.kind === "file") for await (const _ of reader.read(e.path));
              }
            };
            await walk("/", 0);
          } finally {
            await reader.close();
          }
        });
      }),
      params,
    );
  }
});

test("ext journal: a mutated journal replays or fails cleanly", async (t) => {
  const dir = tempDir(t);
  const src = join(dir, "src");
  await fs.mkdir(src);
  await fs.writeFile(join(src, "hello.txt"), "hello\n");
  const img = join(dir, "ext4.img");
  await makeExt4(img, 16 * MiB, src);
  // A committed, unreplayed transaction of three blocks (v3 checksums, as the kernel writes).
  const blocks = join(dir, "blocks");
  await fs.writeFile(blocks, randomBytes(3 * 4096));
  await fs.writeFile(join(dir, "cmds"), `jo -c -v 3\njw -b 300,301,302 ${blocks}\njw -r 301\njc\n`);
  await sh("debugfs", ["-w", "-f", join(dir, "cmds"), img]);
  const seed = await fs.readFile(img);
  const journalStart = Number(/\d+/.exec(await sh("debugfs", ["-R", "bmap <8> 0", img]))![0]) * 4096;
  const overlay = await replayJournal(memory(seed));
  assert.ok(overlay, "the seed's journal needs replaying");
  await fc.assert(
    fc.asyncProperty(
      edits([
        [1024, 2048],
        [journalStart, journalStart + 8 * 4096],
      ]),
      async (list) => {
        await mustEndCleanly("journal", async () => {
          const fs2 = memory(apply(seed, list));
          await replayJournal(slice(fs2, 0, fs2.size));
        });
      },
    ),
    params,
  );
});

const VG_TEXT = `vg0 {
id = "0wJ1Zq-1111-2222-3333-4444-5555-666666"
seqno = 4
format = "lvm2"
status = ["RESIZEABLE", "READ", "WRITE"]
flags = []
extent_size = 8192
max_lv = 0
max_pv = 0
metadata_copies = 0

physical_volumes {

pv0 {
id = "aaaaaa-bbbb-cccc-dddd-eeee-ffff-gggggg"
device = "/dev/vda2"
status = ["ALLOCATABLE"]
flags = []
dev_size = 2097152
pe_start = 2048
pe_count = 255
}
}

logical_volumes {

root {
id = "rrrrrr-bbbb-cccc-dddd-eeee-ffff-gggggg"
status = ["READ", "WRITE", "VISIBLE"]
flags = []
creation_time = 1700000000
segment_count = 2

segment1 {
start_extent = 0
extent_count = 100
type = "striped"
stripe_count = 1
stripes = [
"pv0", 0
]
}
segment2 {
start_extent = 100
extent_count = 20
type = "striped"
stripe_count = 1
stripes = [
"pv0", 150
]
}
}
}
}
# Generated by LVM2 version 2.03.16(2) (2022-05-18): Sun Nov 29 10:00:00 2026

contents = "Text Format Volume"
version = 1
`;

test("LVM metadata text: mutated and spliced text parses or fails cleanly", async () => {
  assert.equal(parseVolumeGroup(VG_TEXT).lvs.length, 1);
  const pieces = [
    "{",
    "}",
    "[",
    "]",
    '"',
    "=",
    ",",
    "\n",
    "segment_count = 99999999",
    "#",
    "\\",
    "extent_count = -1",
  ];
  const text = fc.oneof(
    fc
      .array(fc.tuple(fc.nat(VG_TEXT.length), fc.nat(40), fc.constantFrom(...pieces)), {
        minLength: 1,
        maxLength: 6,
      })
      .map((cuts) => {
        let s = VG_TEXT;
        for (const [at, len, put] of cuts)
          s = s.slice(0, at % s.length) + put + s.slice((at % s.length) + (len % 8));
        return s;
      }),
    fc.string({ maxLength: 2000 }),
  );
  await fc.assert(
    fc.asyncProperty(text, async (s) => {
      await mustEndCleanly("lvm text", async () => {
        parseLvmText(s);
        const vg = parseVolumeGroup(s);
        for (const lv of vg.lvs) assert.ok(Array.isArray(lv.segments));
      });
    }),
    params,
  );
});
