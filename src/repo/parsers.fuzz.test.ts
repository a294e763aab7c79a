// Property-based fuzzing (fast-check) of what Strata parses from a repository others may write:
// fixed indexes, stored chunks, sealed manifests, pack indexes, pack directories and trailers. Every input, random or a mutation of a valid
// encoding, must either parse to exactly what was encoded or fail with a StrataError — never
// another exception, never a wrong value. Bounded for CI: STRATA_FUZZ_RUNS runs per property
// (default 5000) and STRATA_FUZZ_SECONDS per property at most (default 10); a failure prints
// the seed and path that replay it.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { test } from "node:test";
import fc from "fast-check";
import { ErrorCode, StrataError } from "../util/errors.js";
import { chunkDigest, decodeChunk, encodeChunk } from "./codec.js";
import { FixedIndex } from "./fixed-index.js";
import { PACK_ENTRY_SIZE, PACK_MAX_ENTRIES, PACK_TRAILER_SIZE } from "./format.js";
import { type Manifest, manifestProblem } from "./manifest.js";
import { decodeDirectory, encodeDirectory, PACK_HEADER_SIZE, parseTrailer } from "./pack.js";
import { decodeIndex, encodeIndex, type IndexDocument } from "./pack-index.js";
import { sealJson, unsealJson } from "./sealed-json.js";

const RUNS = Number(process.env.STRATA_FUZZ_RUNS ?? 5000);
const LIMIT_MS = Number(process.env.STRATA_FUZZ_SECONDS ?? 10) * 1000;
const params = { numRuns: RUNS, interruptAfterTimeLimit: LIMIT_MS };

/** A valid encoding changed at some positions, cut short or extended. */
function mutated(valid: Buffer): fc.Arbitrary<Buffer> {
  return fc
    .record({
      flips: fc.array(fc.tuple(fc.nat(), fc.integer({ min: 1, max: 255 })), { maxLength: 6 }),
      cut: fc.option(fc.nat()),
      extra: fc.uint8Array({ maxLength: 64 }),
    })
    .map(({ flips, cut, extra }) => {
      let b = Buffer.from(valid);
      for (const [at, x] of flips) if (b.length > 0) b[at % b.length]! ^= x;
      if (cut !== null) b = b.subarray(0, cut % (b.length + 1));
      return Buffer.concat([b, Buffer.from(extra)]);
    });
}

/** `valid` mutated, or random bytes of at most `maxLength`. */
function mutatedOrRandom(valid: Buffer, maxLength = 1024): fc.Arbitrary<Buffer> {
  return fc.oneof(
    mutated(valid),
    fc.uint8Array({ maxLength }).map((u) => Buffer.from(u)),
  );
}

function onlyStrataErrors(fn: () => void): boolean {
  try {
    fn();
    return true;
  } catch (err) {
    if (err instanceof StrataError && err.code === ErrorCode.DATA_CORRUPT) return false;
    throw err;
  }
}

test("fixed index: random bytes and mutations decode exactly or fail with DATA_CORRUPT", () => {
  const index = new FixedIndex(10 * 65536 + 123, 65536);
  for (let i = 0; i < index.count; i++) index.setDigest(i, randomBytes(32));
  const valid = index.encode();
  fc.assert(
    fc.property(mutatedOrRandom(valid), (bytes) => {
      let decoded: FixedIndex | undefined;
      if (onlyStrataErrors(() => (decoded = FixedIndex.decode(bytes, "fuzz")))) {
        // Whatever decodes is self-consistent; a decode of the untouched bytes is the original.
        assert.equal(decoded!.encode().equals(bytes), true);
        if (bytes.equals(valid)) assert.equal(decoded!.checksum(), index.checksum());
      }
    }),
    params,
  );
});

test("stored chunk: random bytes and mutations decode to the plaintext or fail with DATA_CORRUPT", () => {
  const keys = { encKey: randomBytes(32), macKey: randomBytes(32) };
  const plain = Buffer.from("a chunk of a guest's disk ".repeat(400));
  for (const k of [undefined, keys]) {
    const digest = chunkDigest(plain, k);
    const valid = encodeChunk(plain, k);
    fc.assert(
      fc.property(mutated(valid), fc.boolean(), (bytes, withPlace) => {
        let out: Buffer | undefined;
        const place = withPlace ? Buffer.alloc(plain.length + 7) : undefined;
        if (onlyStrataErrors(() => (out = decodeChunk(bytes, digest, k, "fuzz", place))))
          assert.equal(out!.equals(plain), true, "a chunk that decodes is the plaintext it is named for");
      }),
      params,
    );
  }
});

const sampleManifest: Manifest = {
  format: "strata-manifest",
  version: 1,
  vm: "web1",
  time: "2026-11-29T08:00:00Z",
  mode: "snapshot",
  consistency: "filesystem-consistent",
  parent: null,
  disks: [
    {
      name: "vda",
      size: 1 << 30,
      indexChecksum: "ab".repeat(32),
      source: "/var/lib/images/web1.qcow2",
      bytesRead: 1,
      bytesNew: 1,
      bytesStored: 1,
      chunksNew: 1,
      chunksReused: 0,
      chunksZero: 1023,
    },
  ],
  config: { name: "config.blob", size: 100, checksum: "cd".repeat(32) },
  bitmap: null,
  host: "host1",
  durationMs: 1000,
  tool: "strata",
};

test("manifest: resealed documents with hostile fields are refused by the schema", () => {
  // What an attacker who can write an unencrypted repository does: change fields, reseal.
  const hostile = fc.oneof(
    fc.constantFrom("../../etc/passwd", "a/b", ".", "..", "", "x\u0000y", "-rf", "a".repeat(65)),
    fc.string({ maxLength: 80 }),
  );
  const tamper = fc.oneof(
    hostile.map((n) => (m: Manifest) => ({ ...m, disks: [{ ...m.disks[0]!, name: n }] })),
    hostile.map((n) => (m: Manifest) => ({ ...m, config: { ...m.config!, name: n } })),
    hostile.map((n) => (m: Manifest) => ({ ...m, vm: n })),
    fc.jsonValue().map((v) => (m: Manifest) => ({ ...m, disks: v })),
    fc.jsonValue().map((v) => (m: Manifest) => ({ ...m, disks: [{ ...m.disks[0]!, size: v }] })),
    fc.double().map((v) => (m: Manifest) => ({ ...m, durationMs: v })),
  );
  fc.assert(
    fc.property(tamper, (change) => {
      const doc = change(structuredClone(sampleManifest)) as Manifest;
      const r = unsealJson<Manifest>(sealJson(doc));
      assert.equal(r.ok, true, "a plain seal can be recomputed by anyone");
      const problem = manifestProblem(r.ok ? r.doc : undefined);
      if (problem === undefined) {
        // Accepted: then every name is plain and every number a safe non-negative integer.
        for (const d of doc.disks) {
          assert.match(d.name, /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/);
          assert.ok(Number.isSafeInteger(d.size) && d.size >= 0);
        }
        assert.match(doc.vm, /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/);
      }
    }),
    params,
  );
  assert.equal(manifestProblem(sampleManifest), undefined);
  assert.match(
    manifestProblem({
      ...sampleManifest,
      disks: [{ ...sampleManifest.disks[0]!, name: "../../etc/passwd" }],
    })!,
    /disks\.0\.name: not a plain name/,
  );
});

test("sealed JSON: mutations of a sealed manifest never unseal to something else", () => {
  const key = randomBytes(32);
  for (const k of [undefined, key]) {
    const valid = sealJson(sampleManifest, k);
    fc.assert(
      fc.property(mutated(valid), (bytes) => {
        const r = unsealJson<Manifest>(bytes, k, k !== undefined);
        if (r.ok) assert.deepEqual(r.doc, sampleManifest, "only the untouched document unseals");
      }),
      params,
    );
  }
});

const entry = (i: number) => ({
  digest: randomBytes(32).toString("hex"),
  offset: 16 + i * 1000,
  length: 900,
});

test("pack index: random bytes and mutations decode to what re-encodes to them, or fail with DATA_CORRUPT", () => {
  const doc: IndexDocument = {
    supersedes: [randomBytes(32).toString("hex")],
    packs: [
      { id: randomBytes(16).toString("hex"), condemnedAt: 0, flags: 0, entries: [entry(0), entry(1)] },
      { id: randomBytes(16).toString("hex"), condemnedAt: 1_700_000_000_000, flags: 1, entries: [entry(0)] },
    ],
  };
  const valid = encodeIndex(doc);
  assert.deepEqual(decodeIndex(valid, "fuzz"), doc);
  fc.assert(
    fc.property(mutatedOrRandom(valid), (bytes) => {
      let decoded: IndexDocument | undefined;
      if (onlyStrataErrors(() => (decoded = decodeIndex(bytes, "fuzz")))) {
        // Counts were checked against the length before any loop: nothing decodes past the bytes.
        assert.ok(decoded!.packs.every((p) => p.entries.length <= PACK_MAX_ENTRIES));
        assert.equal(encodeIndex(decoded!).equals(bytes), true);
      }
    }),
    params,
  );
});

test("pack directory and trailer: every entry decoded lies inside the pack's chunks", () => {
  const valid = encodeDirectory([entry(0), entry(1), entry(2)]);
  const end = 16 + 3 * 1000;
  fc.assert(
    fc.property(mutatedOrRandom(valid, 512), fc.integer({ min: 0, max: 1 << 30 }), (bytes, packSize) => {
      let entries: ReturnType<typeof decodeDirectory> | undefined;
      if (onlyStrataErrors(() => (entries = decodeDirectory(bytes, end, "fuzz")))) {
        assert.equal(bytes.length, 16 + entries!.length * PACK_ENTRY_SIZE);
        for (const e of entries!) assert.ok(e.offset >= PACK_HEADER_SIZE && e.offset + e.length <= end);
      }
      const tail = bytes.subarray(0, PACK_TRAILER_SIZE);
      let at: ReturnType<typeof parseTrailer> | undefined;
      if (onlyStrataErrors(() => (at = parseTrailer(tail, packSize, "fuzz")))) {
        assert.ok(at!.offset >= PACK_HEADER_SIZE && at!.offset + at!.length + PACK_TRAILER_SIZE === packSize);
      }
    }),
    params,
  );
});
