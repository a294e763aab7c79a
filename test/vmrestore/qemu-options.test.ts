// The command-line policy (src/hypervisor/qemu/cmdline-policy.ts) knows which options take an
// argument: if it thought an option took one that QEMU does not, the next option would hide
// behind it, unchecked. Every option it passes is put to this host's QEMU, last on a command
// line after -version: QEMU's first pass over the options fails "requires an argument" for
// one that takes an argument, and -version exits 0 for one that does not.
import assert from "node:assert/strict";
import { execFile } from "node:child_process";
import { test } from "node:test";
import { promisify } from "node:util";
import { ARG_OPTIONS, NO_ARG_OPTIONS } from "../../src/hypervisor/qemu/cmdline-policy.js";

const run = promisify(execFile);

/** Options of Proxmox VE's patched QEMU that stock QEMU does not have. */
const PROXMOX_ONLY = new Set(["-id"]);

async function arity(option: string): Promise<"arg" | "none" | "unknown"> {
  try {
    await run("qemu-system-x86_64", ["-version", option]);
    return "none";
  } catch (err) {
    const stderr = String((err as { stderr?: unknown }).stderr ?? "");
    if (/requires an argument/.test(stderr)) return "arg";
    if (/invalid option/.test(stderr)) return "unknown";
    throw err;
  }
}

test("every option the policy passes has the arity QEMU gives it", async () => {
  const wrong: string[] = [];
  for (const o of ARG_OPTIONS) {
    const a = await arity(o);
    if (a !== (PROXMOX_ONLY.has(o) ? "unknown" : "arg"))
      wrong.push(`${o}: QEMU says ${a}, the policy says arg`);
  }
  for (const o of NO_ARG_OPTIONS) {
    const a = await arity(o);
    if (a !== "none") wrong.push(`${o}: QEMU says ${a}, the policy says none`);
  }
  assert.deepEqual(wrong, []);
  // The check itself tells the two apart.
  assert.equal(await arity("-machine"), "arg");
  assert.equal(await arity("-nographic"), "none");
});
