/**
 * The test guest built by scripts/build-test-guest.sh (cached under .cache/guest; the script is a
 * no-op when nothing changed). Tests call {@link testGuest} and boot the kernel and initrd it names.
 */
import { execFile } from "node:child_process";
import { readFile } from "node:fs/promises";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import { promisify } from "node:util";

/** The repository root (this file runs from dist/test/helpers/). */
export const repoRoot = resolve(dirname(fileURLToPath(import.meta.url)), "..", "..", "..");

export interface TestGuest {
  version: string;
  kernelPackage: string;
  kernelRelease: string;
  /** Kernel image for -kernel (an ELF vmlinux when kernelFormat is "vmlinux"). */
  kernel: string;
  kernelFormat: "vmlinux" | "bzImage";
  /** Uncompressed newc initramfs for -initrd. */
  initrd: string;
  /** The static strata-workload binary (runs on the host too). */
  workload: string;
}

let cached: Promise<TestGuest> | undefined;

/** Builds the guest if needed and returns its files. */
export function testGuest(): Promise<TestGuest> {
  cached ??= (async () => {
    const { stdout } = await promisify(execFile)("bash", [join(repoRoot, "scripts", "build-test-guest.sh")], {
      maxBuffer: 16 * 1024 * 1024,
    });
    const dir = stdout.trim().split("\n").pop() ?? "";
    return JSON.parse(await readFile(join(dir, "guest.json"), "utf8")) as TestGuest;
  })();
  return cached;
}
