// Keeps the layering of ARCHITECTURE.md: each layer imports only from layers above it
// (util → repo, nbd → image, journal → hypervisor → engine → catalog → server → cli).
import assert from "node:assert/strict";
import { readdirSync, readFileSync, statSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");
const src = join(root, "src");

/** Rank of each layer; a file may import from a layer of lower rank, or its own layer. */
const RANK: Record<string, number> = {
  util: 0,
  repo: 1,
  nbd: 1,
  image: 2,
  journal: 2,
  hypervisor: 3,
  engine: 4,
  catalog: 5,
  server: 6,
  cli: 7,
};

/** Same-rank layers that must not see each other. */
const SIBLINGS_APART = [
  ["repo", "nbd"],
  ["image", "journal"],
];

/**
 * The engine, the catalog and the server (daemon) speak to platforms only through the VM adapter
 * interface: of src/hypervisor they may import these files, never an adapter's internals
 * (hypervisor/qemu/*, images/*, libvirt/*, pve/*). Only the CLI's composition root picks adapters.
 */
const PLATFORM_BLIND = new Set(["engine", "catalog", "server"]);
const PLATFORM_BLIND_MAY_IMPORT = new Set(["hypervisor/adapter.ts", "hypervisor/registry.ts"]);

function walk(dir: string, out: string[] = []): string[] {
  for (const name of readdirSync(dir)) {
    const p = join(dir, name);
    if (statSync(p).isDirectory()) walk(p, out);
    else if (name.endsWith(".ts")) out.push(p);
  }
  return out;
}

function layerOf(file: string): string {
  return relative(src, file).split(sep)[0]!;
}

test("every folder under src/ is a known layer", () => {
  for (const name of readdirSync(src)) {
    if (statSync(join(src, name)).isDirectory())
      assert.ok(name in RANK, `src/${name} is not a layer in RANK`);
  }
});

function violations(files: Array<{ path: string; text: string }>): string[] {
  const out: string[] = [];
  const importRe =
    /(?:^|\n)\s*(?:import|export)[^'"]*?from\s*["']([^"']+)["']|import\(\s*["']([^"']+)["']\s*\)/g;
  for (const { path: file, text } of files) {
    const from = layerOf(file);
    for (const m of text.matchAll(importRe)) {
      const spec = m[1] ?? m[2]!;
      if (!spec.startsWith(".")) continue;
      const target = resolve(dirname(file), spec);
      if (!target.startsWith(src + sep)) {
        out.push(`${relative(root, file)} imports ${spec}, outside src/`);
        continue;
      }
      const to = layerOf(target);
      const toPath = relative(src, target).split(sep).join("/").replace(/\.js$/, ".ts");
      if (PLATFORM_BLIND.has(from) && to === "hypervisor" && !PLATFORM_BLIND_MAY_IMPORT.has(toPath)) {
        out.push(
          `${relative(root, file)} (${from}) imports ${spec}: the ${from} may use only hypervisor/adapter.ts and registry.ts`,
        );
        continue;
      }
      if (to === from) continue;
      const apart = SIBLINGS_APART.some((pair) => pair.includes(from) && pair.includes(to));
      if (RANK[to]! >= RANK[from]! || apart)
        out.push(`${relative(root, file)} (${from}) imports ${spec} (${to})`);
    }
  }
  return out;
}

test("no import points upward or across sibling layers", () => {
  const files = walk(src).map((path) => ({ path, text: readFileSync(path, "utf8") }));
  assert.ok(files.length > 0);
  assert.deepEqual(violations(files), []);
});

test("the check reports upward, sibling and outside imports", () => {
  const f = (layer: string, text: string) => ({ path: join(src, layer, "x.ts"), text });
  const found = violations([
    f("repo", 'import { backup } from "../engine/backup.js";'),
    f("nbd", 'import type { Repo } from "../repo/repository.js";'),
    f("util", 'export { x } from "../../test/helpers.js";'),
    f("engine", 'const m = await import("../cli/main.js");'),
    f("engine", 'import { Repo } from "../repo/repository.js";\nimport { z } from "./own.js";'),
    // The catalog sits above the engine and below the server and the CLI.
    f("catalog", 'import { Catalog } from "./catalog.js";\nimport { backup } from "../engine/backup.js";'),
    f("catalog", 'import { loadConfig } from "../server/config.js";'),
    f("catalog", 'import { output } from "../cli/context.js";'),
    f("server", 'import { Catalog } from "../catalog/catalog.js";'),
  ]);
  assert.equal(found.length, 6, found.join("\n"));
  assert.ok(found.some((v) => v.includes("(catalog) imports ../server/config.js (server)")));
  assert.ok(found.some((v) => v.includes("(catalog) imports ../cli/context.js (cli)")));
});

test("the engine, catalog and server reach platforms only through the adapter interface", () => {
  const f = (path: string, text: string) => ({ path: join(src, path), text });
  const found = violations([
    f("engine/a.ts", 'import type { VmHandle } from "../hypervisor/adapter.js";'),
    f("engine/b.ts", 'import { AdapterRegistry } from "../hypervisor/registry.js";'),
    f("engine/c.ts", 'import { openQemuSession } from "../hypervisor/qemu/session.js";'),
    f("engine/d.ts", 'import { parseFileSpecs } from "../hypervisor/images/index.js";'),
    f("engine/sub/e.ts", 'export { LibvirtAdapter } from "../../hypervisor/libvirt/adapter.js";'),
    f("engine/f.ts", 'const pve = await import("../hypervisor/pve/adapter.js");'),
    f("server/g.ts", 'import { QemuAdapter } from "../hypervisor/qemu/adapter.js";'),
    f("server/h.ts", 'import type { VmSummary } from "../hypervisor/adapter.js";'),
    f("catalog/i.ts", 'import { loadInventory } from "../hypervisor/qemu/inventory.js";'),
    // The CLI's composition root may.
    f("cli/adapters.ts", 'import { QemuAdapter } from "../hypervisor/qemu/adapter.js";'),
  ]);
  assert.equal(found.length, 6, found.join("\n"));
  for (const x of [
    "engine/c.ts",
    "engine/d.ts",
    "engine/sub/e.ts",
    "engine/f.ts",
    "server/g.ts",
    "catalog/i.ts",
  ])
    assert.ok(
      found.some((v) => v.startsWith(`src/${x} (${x.split("/")[0]}) imports`)),
      `${x} is reported:\n${found.join("\n")}`,
    );
});
