import assert from "node:assert/strict";
import { test } from "node:test";
import { badName, badRelativePath, printable } from "./names.js";

test("badName refuses what could leave a directory or cannot be created", () => {
  for (const ok of [
    "a",
    "name with spaces",
    "ünïcödé",
    "..a",
    "a..",
    "...",
    "x".repeat(255),
    "é".repeat(127),
  ])
    assert.equal(badName(ok), undefined, ok);
  for (const bad of ["", ".", "..", "a/b", "../x", "/", "a\0b", "x".repeat(256), "é".repeat(128)])
    assert.notEqual(badName(bad), undefined, JSON.stringify(bad));
  assert.equal(badRelativePath("a/b/c"), undefined);
  assert.notEqual(badRelativePath("a/../b"), undefined);
  assert.notEqual(badRelativePath("/etc/passwd"), undefined);
  assert.notEqual(badRelativePath("a//b"), undefined);
});

test("printable escapes what a terminal would act on, and nothing else", () => {
  assert.equal(printable("plain ünïcödé name.txt"), "plain ünïcödé name.txt");
  assert.equal(printable("\x1b]0;owned\x07title"), "\\e]0;owned\\x07title");
  assert.equal(printable("a\nb\tc\rd\x7f\x9b"), "a\\nb\\tc\\rd\\x7f\\x9b");
  assert.equal(printable("evil\u202etxt.exe"), "evil\\u{202e}txt.exe");
  assert.equal(printable("back\\slash"), "back\\\\slash");
  assert.doesNotMatch(printable("\x1b[2J\x1b[31m"), /\x1b/);
});
