/** Byte sizes: parsing user input ("4M", "1GiB") and printing human figures. */
import { ErrorCode, StrataError } from "./errors.js";

export const KiB = 1024;
export const MiB = 1024 * KiB;
export const GiB = 1024 * MiB;

const UNITS: Record<string, number> = {
  "": 1,
  b: 1,
  k: KiB,
  kb: KiB,
  kib: KiB,
  m: MiB,
  mb: MiB,
  mib: MiB,
  g: GiB,
  gb: GiB,
  gib: GiB,
  t: 1024 * GiB,
  tb: 1024 * GiB,
  tib: 1024 * GiB,
};

/** Parses "4096", "4K", "4 MiB", "1.5G" (binary units) into bytes. */
export function parseSize(text: string): number {
  const m = /^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$/.exec(text);
  const unit = m ? UNITS[m[2]!.toLowerCase()] : undefined;
  if (!m || unit === undefined) {
    throw new StrataError(ErrorCode.USAGE, `not a size: "${text}" (examples: 4096, 512K, 4M, 1.5G)`);
  }
  return Math.round(Number(m[1]) * unit);
}

/** "3.2 GiB" style rendering with one decimal above KiB. */
export function formatBytes(n: number): string {
  const abs = Math.abs(n);
  if (abs < KiB) return `${n} B`;
  const units = ["KiB", "MiB", "GiB", "TiB", "PiB"];
  let v = n / KiB;
  let i = 0;
  while (Math.abs(v) >= 1024 && i < units.length - 1) {
    v /= 1024;
    i++;
  }
  return `${v.toFixed(1)} ${units[i]}`;
}

/** True when n is a power of two (and a positive safe integer). */
export function isPowerOfTwo(n: number): boolean {
  return Number.isSafeInteger(n) && n > 0 && (n & (n - 1)) === 0;
}
