/**
 * Type checks for documents read back from storage others may have written (a repository, a
 * state file): each check returns the value typed or throws DATA_CORRUPT saying
 * "<context>: <what is wrong>", so the first bad field is named.
 */
import { ErrorCode, StrataError } from "./errors.js";

export const CONTROL = /[\u0000-\u001f\u007f]/;

/** True when a path has a `..` segment. */
export function hasDotDot(path: string): boolean {
  return path.split("/").includes("..");
}

export type Checker = ReturnType<typeof checker>;

/** Type checks that throw DATA_CORRUPT: "`context`: `what is wrong`". */
export function checker(context: string) {
  const refuse = (what: string): never => {
    throw new StrataError(ErrorCode.DATA_CORRUPT, `${context}: ${what}`);
  };
  const str = (v: unknown, where: string, max = 4096): string => {
    if (typeof v !== "string") return refuse(`${where} is not a string`);
    if (v.length > max) refuse(`${where} is longer than ${max} characters`);
    if (v.includes("\0")) refuse(`${where} holds a NUL character`);
    return v;
  };
  return {
    refuse,
    str,
    strOrNull: (v: unknown, where: string): string | null =>
      v === null || v === undefined ? null : str(v, where),
    int: (v: unknown, where: string, max: number): number => {
      if (typeof v !== "number" || !Number.isInteger(v) || v < 0 || v > max)
        refuse(`${where} is not a whole number from 0 to ${max}`);
      return v as number;
    },
    arr: (v: unknown, where: string, max: number): unknown[] => {
      if (!Array.isArray(v)) return refuse(`${where} is not a list`);
      if (v.length > max) refuse(`${where} has more than ${max} entries`);
      return v;
    },
    obj: (v: unknown, where: string): Record<string, unknown> => {
      if (typeof v !== "object" || v === null || Array.isArray(v)) refuse(`${where} is not an object`);
      return v as Record<string, unknown>;
    },
    /** An absolute path without `..` segments or control characters. */
    path: (v: unknown, where: string): string => {
      const p = str(v, where);
      if (!p.startsWith("/") || hasDotDot(p) || CONTROL.test(p))
        refuse(`${where} ${JSON.stringify(p)} is not an absolute path without ".."`);
      return p;
    },
  };
}
