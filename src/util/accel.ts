/**
 * Which accelerator QEMU can use on this host: KVM only where the CPU has vmx/svm and /dev/kvm
 * opens read-write, else TCG. A /dev/kvm without vmx/svm (a nested backend that cannot boot a
 * stock kernel) counts as unusable. Used by everything that starts QEMU: restored and instantly
 * recovered VMs, the libguestfs appliance, the test guest.
 */
import { constants } from "node:fs";
import { access, open, readFile } from "node:fs/promises";
import { describeError } from "./errors.js";

export type Accelerator = "kvm" | "tcg";

export interface AcceleratorChoice {
  accel: Accelerator;
  reason: string;
}

/** Decides between KVM and TCG from /proc/cpuinfo and /dev/kvm. */
export async function chooseAccelerator(
  cpuinfoPath = "/proc/cpuinfo",
  kvmPath = "/dev/kvm",
): Promise<AcceleratorChoice> {
  let cpuinfo = "";
  try {
    cpuinfo = await readFile(cpuinfoPath, "utf8");
  } catch (err) {
    return { accel: "tcg", reason: `cannot read ${cpuinfoPath}: ${describeError(err)}` };
  }
  const flags = /^flags\s*:(.*)$/m.exec(cpuinfo)?.[1]?.split(/\s+/) ?? [];
  const virt = flags.find((f) => f === "vmx" || f === "svm");
  if (!virt) {
    return {
      accel: "tcg",
      reason: `CPU has neither vmx nor svm (${kvmPath} may exist but cannot run stock guests)`,
    };
  }
  try {
    await access(kvmPath, constants.R_OK | constants.W_OK);
    const fh = await open(kvmPath, "r+");
    await fh.close();
  } catch (err) {
    return { accel: "tcg", reason: `CPU has ${virt} but ${kvmPath} is not usable: ${describeError(err)}` };
  }
  return { accel: "kvm", reason: `CPU has ${virt} and ${kvmPath} opens read-write` };
}
