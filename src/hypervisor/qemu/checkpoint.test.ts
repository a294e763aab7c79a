import assert from "node:assert/strict";
import { test } from "node:test";
import {
  bitmapPrefix,
  checkpointRecord,
  newBitmapName,
  parseQemuCheckpoint,
  QEMU_CHECKPOINT_KIND,
  trustBitmaps,
} from "./checkpoint.js";
import type { BitmapInfo } from "./live.js";

const REPO = "0123456789abcdef0123456789abcdef";
const OLD = `${bitmapPrefix(REPO)}old1`;

const bitmap = (name: string, over: Partial<BitmapInfo> = {}): BitmapInfo => ({
  name,
  granularity: 65536,
  recording: true,
  busy: false,
  persistent: true,
  inconsistent: false,
  count: 0,
  ...over,
});

const disk = (name: string, bitmaps: BitmapInfo[], size = 1 << 26, format = "qcow2") => ({
  name,
  node: `node-${name}`,
  size,
  format,
  bitmaps,
});

const previous = (disks: ReturnType<typeof disk>[], repository = REPO) => ({
  time: "2026-11-29T10:00:00Z",
  checkpoint: checkpointRecord(repository, OLD, disks),
});

test("a new bitmap carries this repository's prefix; the record is typed", () => {
  assert.match(newBitmapName(REPO, 1_700_000_000_000), /^strata-01234567-[0-9a-z]+$/);
  const rec = checkpointRecord(REPO, OLD, [disk("vda", []), disk("vdb", [], 1 << 20, "raw")]);
  assert.equal(rec.kind, QEMU_CHECKPOINT_KIND);
  assert.deepEqual(rec.disks.vdb, { node: "node-vdb", bitmap: OLD, size: 1 << 20, persistent: false });
});

test("a checkpoint bitmap is trusted only when it provably belongs to the latest restore point", () => {
  const d = disk("vda", [bitmap(OLD)]);
  assert.deepEqual([...trustBitmaps(REPO, [d], previous([d])).trusted], [["vda", OLD]]);
  const why = (disks: ReturnType<typeof disk>[], prev: Parameters<typeof trustBitmaps>[2]) =>
    trustBitmaps(REPO, disks, prev).reasons.get("vda");
  assert.equal(why([d], undefined), "first backup of this VM");
  assert.match(
    why([d], previous([d], "another-repository")) ?? "",
    /no checkpoint bitmap from this repository/,
  );
  assert.match(why([d], { time: "t", checkpoint: null }) ?? "", /no checkpoint bitmap from this repository/);
  assert.match(why([d], previous([disk("vdb", [])])) ?? "", /no checkpoint bitmap for this disk/);
  assert.match(why([disk("vda", [bitmap(OLD)], 1 << 27)], previous([d])) ?? "", /changed size/);
  assert.match(why([disk("vda", [])], previous([d])) ?? "", /is missing/);
  assert.match(
    why([disk("vda", [], 1 << 26, "raw")], previous([disk("vda", [], 1 << 26, "raw")])) ?? "",
    /live in QEMU's memory and the VM was restarted/,
  );
  assert.match(
    why([disk("vda", [bitmap(OLD, { inconsistent: true })])], previous([d])) ?? "",
    /inconsistent/,
  );
  assert.match(
    why([disk("vda", [bitmap(OLD, { busy: true })])], previous([d])) ?? "",
    /in use by another job/,
  );
  assert.match(why([disk("vda", [bitmap(OLD, { recording: false })])], previous([d])) ?? "", /not recording/);
});

test("a record from a repository others may write is checked before it is used", () => {
  const d = disk("vda", [bitmap(OLD), bitmap("other-tool")]);
  const prev = (disks: unknown, kind = QEMU_CHECKPOINT_KIND) => ({
    time: "t",
    checkpoint: { kind, repository: REPO, disks },
  });
  const why = (p: ReturnType<typeof prev>) => trustBitmaps(REPO, [d], p).reasons.get("vda") ?? "trusted";
  assert.match(
    why(prev({ vda: { node: "n", bitmap: OLD, size: 1 << 26, persistent: true } }, "vmware-cbt")),
    /from this repository/,
  );
  assert.deepEqual(parseQemuCheckpoint(prev({}, "vmware-cbt").checkpoint), {
    reason: "the latest restore point's checkpoint is a vmware-cbt record, not QEMU's",
  });
  assert.match(why(prev("not a map")), /from this repository/);
  assert.match(
    (parseQemuCheckpoint(prev("not a map").checkpoint) as { reason: string }).reason,
    /checkpoint record is malformed \(disks: the disks are not a map\)/,
  );
  assert.match(
    why(prev({ vda: { node: "n", bitmap: OLD, size: "big", persistent: true } })),
    /for this disk/,
  );
  assert.match(
    why(prev({ vda: { node: "n", bitmap: "a b;c", size: 1 << 26, persistent: true } })),
    /for this disk/,
  );
  // Someone else's bitmap named in the record is never taken for a Strata checkpoint.
  assert.match(
    why(prev({ vda: { node: "n", bitmap: "other-tool", size: 1 << 26, persistent: true } })),
    /not one of this repository's/,
  );
  assert.equal(why(prev({ vda: { node: "n", bitmap: OLD, size: 1 << 26, persistent: true } })), "trusted");
});
