// The write journal's parsers against hostile bytes. Entry headers with any field changed and a
// valid checksum recomputed (an unencrypted journal's checksum is no secret) decode to values
// inside their bounds, or are refused with a reason; whole segments with bytes changed anywhere
// are read back exactly, or refused with DATA_CORRUPT, never another exception. Bounded for CI:
// STRATA_FUZZ_RUNS cases per property (default 300).
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { mkdtemp, rm } from "node:fs/promises";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { blake3 } from "@napi-rs/blake-hash";
import fc from "fast-check";
import { storedSizeBound } from "../repo/codec.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { decodeEntryHeader, EntryKind, encodeEntryHeader, MAX_ENTRY_DATA } from "./format.js";
import { JournalReader, listSegments } from "./reader.js";
import { JournalWriter } from "./writer.js";

const RUNS = Number(process.env.STRATA_FUZZ_RUNS ?? 300);
const ENTRY_MACED = 80;

test("entry headers: any fields under a recomputed checksum decode within bounds or are refused", () => {
  const journalId = randomBytes(16);
  const valid = encodeEntryHeader(
    {
      kind: EntryKind.WRITE,
      disk: 1,
      seq: 7n,
      timeNs: 1_800_000_000_000_000_000n,
      offset: 65536,
      length: 4096,
      storedLength: 300,
      digest: randomBytes(32),
    },
    journalId,
    undefined,
  );
  fc.assert(
    fc.property(
      fc.array(fc.tuple(fc.nat(ENTRY_MACED - 1), fc.integer({ min: 0, max: 255 })), { maxLength: 12 }),
      (changes) => {
        const b = Buffer.from(valid);
        for (const [at, v] of changes) b[at] = v;
        blake3(Buffer.concat([journalId, b.subarray(0, ENTRY_MACED)])).copy(b, ENTRY_MACED);
        const r = decodeEntryHeader(b, journalId, undefined);
        if (!r.ok) {
          assert.equal(typeof r.why, "string");
          return;
        }
        const h = r.header;
        assert.ok([EntryKind.WRITE, EntryKind.ZEROES, EntryKind.TRIM].includes(h.kind));
        assert.ok(h.length > 0 && Number.isSafeInteger(h.offset + h.length));
        if (h.kind === EntryKind.WRITE) {
          assert.ok(h.length <= MAX_ENTRY_DATA);
          assert.ok(h.storedLength > 0 && h.storedLength <= storedSizeBound(h.length));
        } else assert.equal(h.storedLength, 0);
      },
    ),
    { numRuns: RUNS },
  );
  // Another journal's id: the same bytes are not an entry of this one.
  assert.equal(decodeEntryHeader(valid, randomBytes(16), undefined).ok, false);
});

test("segments with changed bytes read back exactly, or fail with DATA_CORRUPT", async (t) => {
  const dir = await mkdtemp(join(tmpdir(), "strata-journal-fuzz-"));
  t.after(() => rm(dir, { recursive: true, force: true }));
  const journal = join(dir, "j");
  const disks = [{ name: "vda", size: 1024 * 1024 }];
  const w = await JournalWriter.open({ dir: journal, keys: undefined, vm: "fuzz", repository: "r", disks });
  await w.write("vda", 0, Buffer.from("text that compresses\n".repeat(300)));
  await w.write("vda", 8192, randomBytes(3000));
  await w.writeZeroes("vda", 65536, 4096);
  await w.write("vda", 1024 * 1024 - 512, randomBytes(512));
  await w.close();
  const [segment] = await listSegments(journal);
  const path = join(journal, segment!.name);
  const original = await fs.readFile(path);
  const read = async () => {
    const r = await JournalReader.open(journal, undefined);
    const out: string[] = [];
    await r.walk((e) => {
      out.push(`${e.kind}:${e.disk}:${e.offset}:${e.length}:${e.data ? blake3(e.data).toString("hex") : ""}`);
      return true;
    });
    return out;
  };
  const expected = await read();
  assert.equal(expected.length, 4);
  let refused = 0;
  await fc.assert(
    fc.asyncProperty(
      fc.array(fc.tuple(fc.nat(original.length - 1), fc.integer({ min: 0, max: 255 })), {
        minLength: 1,
        maxLength: 4,
      }),
      fc.option(fc.nat(original.length), { nil: undefined }),
      async (changes, cut) => {
        const b = Buffer.from(original);
        for (const [at, v] of changes) b[at] = v;
        await fs.writeFile(path, cut === undefined ? b : b.subarray(0, cut));
        try {
          const got = await read();
          // A read that succeeds gives the entries as written, or a prefix of them (a cut or
          // damaged final entry is a torn tail).
          assert.deepEqual(got, expected.slice(0, got.length));
        } catch (err) {
          if (!(err instanceof StrataError) || err.code !== ErrorCode.DATA_CORRUPT) throw err;
          refused++;
        }
      },
    ),
    { numRuns: Math.min(RUNS, 200) },
  );
  await fs.writeFile(path, original);
  assert.ok(refused > 0, "some damage was refused");
});
