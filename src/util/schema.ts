/**
 * Pieces of zod schemas for documents read back from storage others may have written (a
 * repository, a state file), worded so that the first problem found names the field: every
 * piece takes `what` ("the NBD socket"), and {@link parseDocument} throws DATA_CORRUPT saying
 * "<context>: <path>: <what is wrong>".
 */
import { z } from "zod";
import { ErrorCode, StrataError } from "./errors.js";

export const CONTROL = /[\u0000-\u001f\u007f]/;

/** True when a path has a `..` segment. */
export function hasDotDot(path: string): boolean {
  return path.split("/").includes("..");
}

/** A string of at most `max` characters without NUL. */
export const text = (what: string, max = 4096) =>
  z
    .string({ error: `${what} is not a string` })
    .max(max, `${what} is longer than ${max} characters`)
    .refine((v) => !v.includes("\0"), `${what} holds a NUL character`);

/** A whole number from 0 to `max`. */
export const whole = (what: string, max: number) =>
  z
    .number({ error: `${what} is not a whole number from 0 to ${max}` })
    .int()
    .min(0)
    .max(max);

/** An absolute path without `..` segments or control characters. */
export const absolutePath = (what: string, max = 4096) =>
  text(what, max).refine((p) => p.startsWith("/") && !hasDotDot(p) && !CONTROL.test(p), {
    error: (iss) => `${what} ${JSON.stringify(iss.input)} is not an absolute path without ".."`,
  });

/** A string matching `re`, else "`what` "value" is not `kind`". */
export const matching = (what: string, re: RegExp, kind: string, max = 4096) =>
  text(what, max).refine((v) => re.test(v), {
    error: (iss) => `${what} ${JSON.stringify(iss.input)} is not ${kind}`,
  });

/** A list of at most `max` items. */
export const list = <T extends z.ZodType>(item: T, what: string, max: number) =>
  z.array(item, { error: `${what} is not a list` }).max(max, `${what} has more than ${max} entries`);

/** An object with these fields. */
export const object = <T extends z.ZodRawShape>(shape: T, what: string) =>
  z.object(shape, { error: `${what} is not an object` });

/** One of `values`. */
export const oneOf = <const T extends readonly [string, ...string[]]>(values: T, what: string) =>
  z.enum(values, { error: `${what} is not ${values.join(" or ")}` });

/** Where `value` fails `schema`: "disks.3.name: ..." (the first problem), or undefined. */
export function schemaProblem(schema: z.ZodType, value: unknown): string | undefined {
  const r = schema.safeParse(value);
  if (r.success) return undefined;
  const issue = r.error.issues[0]!;
  return `${issue.path.length > 0 ? issue.path.join(".") : "document"}: ${issue.message}`;
}

/** `value` parsed by `schema`, or DATA_CORRUPT "`context`: <path>: <what is wrong>". */
export function parseDocument<T extends z.ZodType>(schema: T, value: unknown, context: string): z.output<T> {
  const r = schema.safeParse(value);
  if (r.success) return r.data;
  const issue = r.error.issues[0]!;
  const where = issue.path.length > 0 ? `${issue.path.join(".")}: ` : "";
  throw new StrataError(ErrorCode.DATA_CORRUPT, `${context}: ${where}${issue.message}`);
}
