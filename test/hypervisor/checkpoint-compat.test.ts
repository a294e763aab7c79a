// Restore points written before the adapter interface kept QEMU's checkpoint record without a
// `kind`: the engine hands them to the adapter as "qemu-bitmap" records, and the bitmaps they
// name are trusted as before (the first backup after an upgrade is still incremental).
import assert from "node:assert/strict";
import { test } from "node:test";
import { checkpointOf } from "../../src/engine/vm-backup.js";
import { bitmapPrefix, trustBitmaps } from "../../src/hypervisor/qemu/checkpoint.js";

const REPO = "fedcba9876543210fedcba9876543210";
const BITMAP = `${bitmapPrefix(REPO)}lq3x9z`;

const live = {
  name: "vblk0",
  size: 64 << 20,
  format: "qcow2",
  bitmaps: [
    {
      name: BITMAP,
      granularity: 262144,
      recording: true,
      busy: false,
      persistent: true,
      inconsistent: false,
      count: 3,
    },
  ],
};

test("an old-format bitmap record (no kind) is still trusted", () => {
  // As engine/live-backup.ts wrote it into the manifest's bitmap field.
  const old = {
    repository: REPO,
    disks: { vblk0: { node: "disk0", bitmap: BITMAP, size: 64 << 20, persistent: true } },
  };
  const checkpoint = checkpointOf(old);
  assert.equal(checkpoint?.kind, "qemu-bitmap");
  const { trusted, reasons } = trustBitmaps(REPO, [live], { time: "2026-11-01T00:00:00Z", checkpoint });
  assert.deepEqual([...trusted], [["vblk0", BITMAP]], JSON.stringify([...reasons]));
});

test("manifests without a checkpoint, or with other shapes, mean a full read with a reason", () => {
  for (const bitmap of [null, undefined, {}, { disks: {} }, { repository: 7 }]) {
    const checkpoint = checkpointOf(bitmap as Record<string, unknown> | null | undefined);
    assert.equal(checkpoint, null);
    const { trusted, reasons } = trustBitmaps(REPO, [live], { time: "t", checkpoint });
    assert.equal(trusted.size, 0);
    assert.match(reasons.get("vblk0") ?? "", /no checkpoint bitmap from this repository/);
  }
  // A kind written by another adapter is kept, and not taken for QEMU's.
  const other = checkpointOf({ kind: "vmware-cbt", repository: REPO, disks: {} });
  assert.equal(other?.kind, "vmware-cbt");
  assert.equal(trustBitmaps(REPO, [live], { time: "t", checkpoint: other }).trusted.size, 0);
});
