// The tar writer's headers: valid checksums, ustar fields, pax records for what ustar can't hold.
import assert from "node:assert/strict";
import { test } from "node:test";
import { padding, tarEnd, tarHeader } from "./tar.js";

function checksumOk(block: Buffer): boolean {
  let sum = 0;
  for (let i = 0; i < 512; i++) sum += i >= 148 && i < 156 ? 0x20 : block[i]!;
  return Number.parseInt(block.subarray(148, 154).toString(), 8) === sum;
}

test("a short name fits one ustar header with a valid checksum", () => {
  const h = tarHeader({
    path: "etc/hosts",
    kind: "file",
    mode: 0o644,
    uid: 1000,
    gid: 1001,
    size: 123,
    mtime: 1.6e12,
  });
  assert.equal(h.length, 512);
  assert.ok(checksumOk(h));
  assert.equal(h.subarray(0, 9).toString(), "etc/hosts");
  assert.equal(h.subarray(257, 263).toString(), "ustar\0");
  assert.equal(Number.parseInt(h.subarray(124, 135).toString(), 8), 123);
  assert.equal(String.fromCharCode(h[156]!), "0");
});

test("long and non-ASCII names and link targets go into a pax header whose records count themselves", () => {
  const path = `${"d/".repeat(60)}ünïcödé.txt`;
  const target = "t".repeat(150);
  const h = tarHeader({
    path,
    kind: "symlink",
    mode: 0o777,
    uid: 0,
    gid: 0,
    size: 0,
    mtime: 1_600_000_000_123,
    target,
  });
  assert.equal(String.fromCharCode(h[156]!), "x");
  assert.ok(checksumOk(h.subarray(0, 512)));
  const size = Number.parseInt(h.subarray(124, 135).toString(), 8);
  const body = h.subarray(512, 512 + size).toString();
  const records = new Map<string, string>();
  for (let rest = body; rest.length > 0; ) {
    const len = Number(rest.slice(0, rest.indexOf(" ")));
    const rec = Buffer.from(rest).subarray(0, len).toString();
    assert.ok(rec.endsWith("\n"));
    const [k, v] = rec.slice(rec.indexOf(" ") + 1, -1).split(/=(.*)/s);
    records.set(k!, v!);
    rest = Buffer.from(rest).subarray(len).toString();
  }
  assert.equal(records.get("path"), path);
  assert.equal(records.get("linkpath"), target);
  assert.equal(records.get("mtime"), "1600000000.123");
  const main = h.subarray(h.length - 512);
  assert.ok(checksumOk(main));
  assert.equal(String.fromCharCode(main[156]!), "2");
  assert.equal(h.length % 512, 0);
  assert.equal(padding(513).length, 511);
  assert.equal(tarEnd().length, 1024);
});
