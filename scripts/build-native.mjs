#!/usr/bin/env node
// Builds native/build/Release/strata_native.node (native/strata.c: AES-256-GCM in the caller's
// memory and huge pages for shared buffers, see src/util/native.ts) with node-gyp, against the headers of the node that runs this (the Debian and
// NodeSource packages put them in /usr/include/node; nothing is downloaded). Skipped when the
// addon is newer than its sources. Strata runs without it (Node's own AES-GCM, slower), so a
// machine that can't build it gets a warning, not a failed build; the test suite checks it loaded.
import { spawnSync } from "node:child_process";
import { existsSync, statSync } from "node:fs";
import { dirname, join, resolve } from "node:path";

const dir = "native";
const addon = join(dir, "build", "Release", "strata_native.node");
const sources = [join(dir, "strata.c"), join(dir, "binding.gyp")];
const mtime = (p) => statSync(p, { throwIfNoEntry: false })?.mtimeMs ?? -1;
if (mtime(addon) > Math.max(...sources.map(mtime))) process.exit(0);

// node-gyp comes with npm: npm names it to the scripts it runs, else it sits beside npm-cli.js.
const candidates = [
  process.env.npm_config_node_gyp,
  process.env.npm_execpath &&
    join(dirname(process.env.npm_execpath), "..", "node_modules", "node-gyp", "bin", "node-gyp.js"),
  resolve(
    process.execPath,
    "..",
    "..",
    "lib",
    "node_modules",
    "npm",
    "node_modules",
    "node-gyp",
    "bin",
    "node-gyp.js",
  ),
].filter((p) => p && existsSync(p));
const nodeDir = resolve(process.execPath, "..", "..");
const headers = existsSync(join(nodeDir, "include", "node", "node_api.h"));
const warn = (why) => {
  console.error(
    `build-native: ${addon} not built (${why}); AES-GCM runs through Node's crypto and chunk buffers in small pages, slower`,
  );
  process.exit(0);
};
if (candidates.length === 0) warn("node-gyp not found beside npm");
if (!headers) warn(`no Node headers in ${join(nodeDir, "include", "node")}`);
const r = spawnSync(
  process.execPath,
  [candidates[0], "rebuild", `--nodedir=${nodeDir}`, "--loglevel=error"],
  {
    cwd: dir,
    stdio: ["ignore", "ignore", "inherit"],
  },
);
if (r.status !== 0) warn(`node-gyp exited with ${r.status}`);
console.log(`build-native: ${addon}`);
