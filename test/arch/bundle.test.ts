// bin/strata runs the bundle that `npm run build` makes (scripts/bundle-cli.mjs): it exists, is
// newer than the modules it was made from, loads the AWS SDK only for S3 repositories, and a
// backup and restore through it (its chunk worker included) come back bit-exact. Every other CLI
// test runs through it too.
import assert from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { promises as fs, readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";
import { strataOk, tempDir } from "../helpers/cli.js";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const bundle = join(root, "dist", "src", "bundle");

test("the CLI runs from its bundle, which loads the AWS SDK only for S3", async (t) => {
  const entry = join(bundle, "strata.js");
  assert.ok(
    statSync(entry).mtimeMs >= statSync(join(root, "dist", "src", "cli", "main.js")).mtimeMs,
    "the bundle is newer than the compiled modules (npm run build makes both)",
  );
  assert.ok(statSync(join(bundle, "chunk-worker.js")).isFile(), "the chunk worker is bundled beside it");
  const staticImports = (file: string) =>
    [
      ...readFileSync(join(bundle, file), "utf8").matchAll(/^import\s+(?:[^"';]*?\s*from\s*)?"([^"]+)"/gm),
    ].map((m) => m[1]!);
  const eager = new Set<string>();
  const seen = new Set<string>();
  const visit = (file: string) => {
    if (seen.has(file)) return;
    seen.add(file);
    for (const spec of staticImports(file)) {
      if (spec.startsWith("./")) visit(spec.slice(2));
      else eager.add(spec);
    }
  };
  visit("strata.js");
  assert.ok(seen.size > 1 && eager.has("zstd-napi/binding.js"), `followed: ${[...seen].join(", ")}`);
  assert.ok(
    ![...eager].some((s) => s.startsWith("@aws-sdk/")),
    `loaded at every start: ${[...eager].join(", ")}`,
  );
  assert.ok(
    readdirSync(bundle).some((f) => f.startsWith("s3-store-")),
    "the S3 store is a chunk of its own",
  );

  const dir = tempDir(t);
  const repo = join(dir, "repo");
  const img = join(dir, "disk.img");
  const data = Buffer.concat([randomBytes(3 * 1024 * 1024), Buffer.alloc(1024 * 1024)]);
  await fs.writeFile(img, data);
  await strataOk(["init", "--repo", repo]);
  await strataOk(["backup", "--repo", repo, "--vm", "vm", `file:${img},name=disk`]);
  await strataOk(["restore", "--repo", repo, "vm/latest", "--target", join(dir, "out")]);
  assert.deepEqual(await fs.readFile(join(dir, "out", "disk.raw")), data);
});
