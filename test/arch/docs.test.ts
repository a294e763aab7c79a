// The README and docs/ speak only of the repository: every relative link and every path in
// backticks that names a Markdown file resolves to a file inside the checkout.
import assert from "node:assert/strict";
import { existsSync, readdirSync, readFileSync } from "node:fs";
import { dirname, join, relative, resolve, sep } from "node:path";
import { test } from "node:test";
import { fileURLToPath } from "node:url";

const root = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

function docs(): string[] {
  const out = [join(root, "README.md"), join(root, "test", "README.md")];
  for (const name of readdirSync(join(root, "docs")))
    if (name.endsWith(".md")) out.push(join(root, "docs", name));
  return out;
}

/** Problems with the links of one Markdown text found at `file`. */
export function badLinks(file: string, text: string, exists: (p: string) => boolean): string[] {
  const out: string[] = [];
  const targets = [
    ...[...text.matchAll(/\]\(([^)\s]+)\)/g)].map((m) => m[1]!),
    ...[...text.matchAll(/`([^`\s]*\.md)`/g)].map((m) => m[1]!),
  ];
  for (const t of targets) {
    if (/^[a-z]+:/i.test(t) || t.startsWith("#")) continue;
    const path = resolve(dirname(file), t.split("#")[0]!);
    if (!(path + sep).startsWith(root + sep))
      out.push(`${relative(root, file)} points outside the repository: ${t}`);
    else if (!exists(path)) out.push(`${relative(root, file)} links to a missing file: ${t}`);
  }
  return out;
}

test("README and docs link only to files inside the repository", () => {
  const problems = docs().flatMap((f) => badLinks(f, readFileSync(f, "utf8"), existsSync));
  assert.deepEqual(problems, []);
});

test("the link check reports outside and missing targets", () => {
  const f = join(root, "README.md");
  const found = badLinks(
    f,
    "see `../shared/ARCHITECTURE.md` and [x](docs/nope.md) and [y](https://x.org/a.md)",
    () => false,
  );
  assert.equal(found.length, 2, found.join("\n"));
  assert.ok(
    found.some((x) => /outside the repository: \.\.\/shared/.test(x)),
    found.join("\n"),
  );
  assert.ok(
    found.some((x) => /missing file: docs\/nope\.md/.test(x)),
    found.join("\n"),
  );
});
