#!/usr/bin/env node
// Builds the web UI (web/) into dist/web: one bundled, minified script and style sheet under
// assets/ with a content hash in their names, and index.html naming them. The daemon serves
// dist/web at / (src/server/static.ts); nothing is fetched at run time.
import { readFileSync, rmSync, writeFileSync } from "node:fs";
import { basename } from "node:path";
import { build } from "esbuild";

const out = "dist/web";
rmSync(out, { recursive: true, force: true });
const result = await build({
  entryPoints: ["web/src/main.tsx"],
  bundle: true,
  minify: true,
  format: "esm",
  target: ["chrome110", "firefox110", "safari16"],
  jsx: "automatic",
  jsxImportSource: "preact",
  outdir: `${out}/assets`,
  entryNames: "[name]-[hash]",
  metafile: true,
  legalComments: "linked",
  logLevel: "warning",
});
const files = Object.keys(result.metafile.outputs);
const js = files.find((f) => f.endsWith(".js"));
const css = files.find((f) => f.endsWith(".css"));
if (!js || !css) throw new Error(`build-web: expected a .js and a .css output, got ${files.join(", ")}`);
const html = readFileSync("web/index.html", "utf8")
  .replace("%JS%", `/assets/${basename(js)}`)
  .replace("%CSS%", `/assets/${basename(css)}`);
writeFileSync(`${out}/index.html`, html);
console.log(`build-web: ${out}/index.html, ${files.map((f) => basename(f)).join(", ")}`);
