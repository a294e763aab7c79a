/**
 * marks.json: named instants of a protected VM (`strata protect mark`), e.g. "before-upgrade",
 * restorable as VM@mark:NAME. Beside journal.json and sealed the same way (hmac-sha256 under the
 * repository's MAC key when encrypted), so a mark can't be moved to another instant unseen.
 * Written by the mark command, not by the protect that appends: temporary file, fsync, rename.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import type { CodecKeys } from "../repo/codec.js";
import { sealJson, unsealJson } from "../repo/sealed-json.js";
import { ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import { parseDocument } from "../util/schema.js";
import { syncDir } from "./meta.js";

export const MARKS_FILE = "marks.json";
const MARKS_MAX_BYTES = 4 * 1024 * 1024;
export const MARK_NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$/;

const MarkSchema = z.object({
  name: z.string().regex(MARK_NAME_RE, "not a mark name"),
  /** The instant, host time in ns (the journal's clock). */
  atNs: z.string().regex(/^\d{1,20}$/, "not a time in ns"),
  /** The guest's filesystems were frozen through its agent at the instant. */
  quiesced: z.boolean(),
  created: z.iso.datetime(),
});
const MarksSchema = z.object({
  format: z.literal(1),
  marks: z.array(MarkSchema).max(10_000),
});

export type JournalMark = z.infer<typeof MarkSchema>;

/** The marks of the journal in `dir` (none when there is no marks.json). */
export async function readMarks(dir: string, keys: CodecKeys | undefined): Promise<JournalMark[]> {
  const path = join(dir, MARKS_FILE);
  let bytes: Buffer;
  try {
    const st = await fs.stat(path);
    if (st.size > MARKS_MAX_BYTES) throw damaged(path, `${st.size} bytes, more than a marks file holds`);
    bytes = await fs.readFile(path);
  } catch (err) {
    if (isNotFound(err)) return [];
    throw err;
  }
  const r = unsealJson<Record<string, unknown>>(bytes, keys?.macKey, keys !== undefined);
  if (!r.ok) throw damaged(path, r.why);
  return parseDocument(MarksSchema, r.doc, path).marks;
}

/** Adds a mark; a name already used is refused. */
export async function addMark(dir: string, keys: CodecKeys | undefined, mark: JournalMark): Promise<void> {
  const marks = await readMarks(dir, keys);
  if (marks.some((m) => m.name === mark.name))
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `journal ${dir} has a mark named ${mark.name} already`);
  const path = join(dir, MARKS_FILE);
  const tmp = `${path}.tmp-${randomBytes(4).toString("hex")}`;
  const fh = await fs.open(tmp, "wx", 0o600);
  try {
    await fh.writeFile(sealJson({ format: 1, marks: [...marks, mark] }, keys?.macKey));
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, path);
  await syncDir(dir);
}

function damaged(path: string, why: string): StrataError {
  return new StrataError(ErrorCode.DATA_CORRUPT, `journal file ${path} is damaged: ${why}`);
}
