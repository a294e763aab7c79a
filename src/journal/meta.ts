/**
 * journal.json: what a journal directory holds besides its segments. Written once when the
 * journal is created and again when a base restore point is added; sealed (hmac-sha256 under the
 * repository's MAC key when encrypted), so that disk names and bases can't be swapped unseen.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { z } from "zod";
import type { CodecKeys } from "../repo/codec.js";
import { sealJson, unsealJson } from "../repo/sealed-json.js";
import { ErrorCode, isNotFound, StrataError } from "../util/errors.js";
import { parseDocument } from "../util/schema.js";
import { JOURNAL_ID_SIZE, MAX_DISKS } from "./format.js";

export const META_FILE = "journal.json";
const META_MAX_BYTES = 1024 * 1024;

const nsString = z.string().regex(/^\d{1,20}$/, "not a time in ns");
const DiskSchema = z.object({
  id: z
    .number()
    .int()
    .min(0)
    .max(MAX_DISKS - 1),
  name: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, "not a disk name"),
  size: z.number().int().min(0).max(Number.MAX_SAFE_INTEGER),
});
const BaseSchema = z.object({
  /** The restore point (VM/TIME) whose disks are the base. */
  snapshot: z.string().max(512),
  /**
   * Host time (ns) just before the base's backup started: every entry older than it was
   * written to the disk before the view was cut, so the base holds it; replay onto this base
   * starts here.
   */
  startNs: nsString,
  /**
   * Host time (ns) by which the base's view was certainly cut: replaying the journal up to any
   * T at or after it onto the base gives the disks at T.
   */
  cutNs: nsString,
});
const MetaSchema = z.object({
  format: z.literal(1),
  id: z.string().regex(new RegExp(`^[0-9a-f]{${JOURNAL_ID_SIZE * 2}}$`), "not a journal id"),
  vm: z.string().regex(/^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$/, "not a VM name"),
  encrypted: z.boolean(),
  /** The repository the bases are in (its config id). */
  repository: z.string().max(128),
  created: z.iso.datetime(),
  disks: z.array(DiskSchema).min(1).max(MAX_DISKS),
  bases: z.array(BaseSchema).max(100_000),
  /**
   * Host time (ns) from which the journal alone holds every disk whole: the capture's initial
   * copy was done. Replaying from the first entry up to any T at or after it gives the disks at T.
   */
  syncedNs: nsString.optional(),
  /** Segments with entries older than this (ns) were dropped (--window); absent: none were. */
  droppedBeforeNs: nsString.optional(),
  /**
   * The dirty bitmaps on the VM's disks whose union records every write the journal may lack
   * (a capture rotates them; a protect started again on this journal re-reads their ranges),
   * and the number the newest one's name carries (`strata-cdp-<seq>`).
   */
  cover: z
    .object({
      bitmaps: z.array(z.string().regex(/^strata-cdp-\d{1,12}$/, "not a capture bitmap")).max(256),
      seq: z.number().int().min(0).max(1e12),
    })
    .optional(),
  /**
   * Spans (ns) the journal does not hold: from the last entry a dead capture left to the end of
   * the re-read that resumed it (absent `toNs`: a resume under way or interrupted). Instants
   * inside are refused.
   */
  gaps: z
    .array(z.object({ fromNs: nsString, toNs: nsString.optional() }))
    .max(100_000)
    .optional(),
});

export type JournalMeta = z.infer<typeof MetaSchema>;
export type JournalDisk = z.infer<typeof DiskSchema>;
export type JournalBase = z.infer<typeof BaseSchema>;
export type JournalGap = NonNullable<JournalMeta["gaps"]>[number];

export function newJournalId(): string {
  return randomBytes(JOURNAL_ID_SIZE).toString("hex");
}

/** Reads journal.json of `dir`; undefined when there is none. */
export async function readMeta(dir: string, keys: CodecKeys | undefined): Promise<JournalMeta | undefined> {
  const path = join(dir, META_FILE);
  let bytes: Buffer;
  try {
    const fh = await fs.open(path, "r");
    try {
      const { size } = await fh.stat();
      if (size > META_MAX_BYTES) throw damaged(path, `${size} bytes, more than a journal.json holds`);
      bytes = await fh.readFile();
    } finally {
      await fh.close();
    }
  } catch (err) {
    if (isNotFound(err)) return undefined;
    throw err;
  }
  const r = unsealJson<Record<string, unknown>>(bytes, keys?.macKey, keys !== undefined);
  if (!r.ok && !keys && /"seal": "hmac-sha256:/.test(bytes.toString("utf8")))
    throw new StrataError(
      ErrorCode.USAGE,
      `journal ${dir} is encrypted: open it with its repository's password`,
    );
  if (!r.ok) throw damaged(path, r.why);
  const meta = parseDocument(MetaSchema, r.doc, path);
  if (meta.encrypted !== (keys !== undefined))
    throw new StrataError(
      ErrorCode.USAGE,
      meta.encrypted
        ? `journal ${dir} is encrypted: open it with its repository's password`
        : `journal ${dir} is not encrypted, but a key was given`,
    );
  const ids = new Set(meta.disks.map((d) => d.id));
  const names = new Set(meta.disks.map((d) => d.name));
  if (ids.size !== meta.disks.length || names.size !== meta.disks.length)
    throw damaged(path, "two disks with one id or one name");
  return meta;
}

/** Writes journal.json of `dir` atomically (temporary file, fsync, rename, directory fsync). */
export async function writeMeta(dir: string, meta: JournalMeta, keys: CodecKeys | undefined): Promise<void> {
  const path = join(dir, META_FILE);
  const tmp = `${path}.tmp-${randomBytes(4).toString("hex")}`;
  const fh = await fs.open(tmp, "wx", 0o600);
  try {
    await fh.writeFile(sealJson(meta, keys?.macKey));
    await fh.sync();
  } finally {
    await fh.close();
  }
  await fs.rename(tmp, path);
  await syncDir(dir);
}

export async function syncDir(dir: string): Promise<void> {
  const d = await fs.open(dir, "r");
  try {
    await d.sync();
  } finally {
    await d.close();
  }
}

function damaged(path: string, why: string): StrataError {
  return new StrataError(ErrorCode.DATA_CORRUPT, `journal file ${path} is damaged: ${why}`);
}
