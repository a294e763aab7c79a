#!/usr/bin/env node
// Bundles the compiled CLI (dist/src/cli/main.js) and its chunk worker into dist/src/bundle/, which
// bin/strata runs. Every command starts by loading the code: as ~250 modules (and zod's ~100) that
// took 0.08-0.1 s of a command's start, cold or warm, against one file. Only Strata's own code and
// its plain-JS packages go in; native addons, the AWS SDK (loaded only for S3 repositories) and the
// packages loaded at run time through createRequire stay in node_modules. Code split: the S3 store
// stays a chunk of its own, imported when a repository is on S3.
//
// dist/src/bundle sits as deep as dist/src/cli, so the paths the code finds relative to itself
// (../../web/, the checkout's root, package.json, ./chunk-worker.js) are the same in both.
import { rmSync } from "node:fs";
import { build } from "esbuild";

const out = "dist/src/bundle";
rmSync(out, { recursive: true, force: true });
const result = await build({
  entryPoints: { strata: "dist/src/cli/main.js", "chunk-worker": "dist/src/repo/chunk-worker.js" },
  bundle: true,
  splitting: true,
  format: "esm",
  platform: "node",
  target: "node20",
  outdir: out,
  metafile: true,
  logLevel: "warning",
  external: [
    "zstd-napi",
    "zstd-napi/*",
    "@napi-rs/*",
    "better-sqlite3",
    "@aws-sdk/*",
    "ext2fs",
    "fatfs",
    "file-disk",
    "partitioninfo",
  ],
  // CommonJS packages bundled into an ES module still call require() for Node's own modules.
  banner: {
    js: 'import { createRequire as __strataCreateRequire } from "node:module"; const require = __strataCreateRequire(import.meta.url);',
  },
});
const outputs = Object.entries(result.metafile.outputs);
const bytes = outputs.reduce((n, [, o]) => n + o.bytes, 0);
console.log(`bundle-cli: ${out}, ${outputs.length} files, ${(bytes / 1048576).toFixed(1)} MiB`);
