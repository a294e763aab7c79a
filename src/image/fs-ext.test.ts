import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";

test("reading ext4 leaves no process-wide error handlers behind (the WASM runtime adds some)", async (t) => {
  const dir = mkdtempSync(join(tmpdir(), "strata-ext-"));
  t.after(() => rmSync(dir, { recursive: true, force: true }));
  const tree = join(dir, "tree");
  execFileSync("mkdir", ["-p", tree]);
  writeFileSync(join(tree, "hello.txt"), "hello ext4\n");
  const img = join(dir, "fs.img");
  execFileSync("mkfs.ext4", ["-q", "-F", "-d", tree, img, "8M"]);
  const bytes = readFileSync(img);
  const before = [
    process.listeners("uncaughtException").length,
    process.listeners("unhandledRejection").length,
  ];
  // Loaded here, after counting: the module and the WASM runtime it loads must add no listener.
  const { ExtReader } = await import("./fs-ext.js");
  const reader = await ExtReader.open(
    {
      size: bytes.length,
      read: async (offset: number, length: number) => bytes.subarray(offset, offset + length),
    },
    "ext4",
  );
  const names = (await reader.list("/")).map((e) => e.name);
  await reader.close();
  assert.ok(names.includes("hello.txt"), names.join(","));
  assert.deepEqual(
    [process.listeners("uncaughtException").length, process.listeners("unhandledRejection").length],
    before,
  );
});
