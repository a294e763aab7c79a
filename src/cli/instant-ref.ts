/**
 * VM@INSTANT wherever a restore point is named (serve, files, instant, restore): an ISO time
 * (web1@2026-11-29T08:01:23.250Z) or one relative to now (web1@-90s), with the VM's write
 * journal given by --journal DIR.
 */
import { resolve } from "node:path";
import { type InstantRef, isInstantRef, openInstant } from "../engine/pit.js";
import { MARK_NAME_RE, readMarks } from "../journal/marks.js";
import type { CodecKeys } from "../repo/codec.js";
import { checkName, type Repository, type SnapshotRef } from "../repo/repository.js";
import { parseInstant } from "../util/duration.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { journalCompleteUntil } from "./cmd-protect.js";

export const JOURNAL_OPTION = [
  "--journal <dir>",
  "VM@INSTANT: the VM's write journal (as given to strata protect --journal)",
] as const;

export const INSTANT_HELP = `Any instant of a VM protected by "strata protect" is a restore point too: VM@TIME (ISO,
e.g. web1@2026-11-29T08:01:23.250Z), VM@-90s (90 seconds ago) or VM@mark:NAME (strata protect
mark), with --journal DIR. Its disks are the journal's writes up to that instant over the
journal's base, read on demand: no image is written first. It is crash-consistent (a power cut
at that instant), or filesystem-consistent at a mark made with --quiesce.`;

/** `VM@WHEN` split and checked; undefined when `ref` names no instant. WHEN may be mark:NAME. */
export function parseInstantRef(
  ref: string,
  now = Date.now(),
):
  | { vm: string; atMs: number; mark?: undefined }
  | { vm: string; mark: string; atMs?: undefined }
  | undefined {
  if (!ref.includes("@")) return undefined;
  const m = /^([^@/]+)@(.+)$/.exec(ref);
  if (!m)
    throw new StrataError(
      ErrorCode.USAGE,
      `"${ref}": name an instant as VM@TIME (e.g. web1@2026-11-29T08:01:23.250Z or web1@-90s) or VM@mark:NAME`,
    );
  const [, vm, when] = m as unknown as [string, string, string];
  checkName("VM", vm);
  if (when.startsWith("mark:")) {
    const mark = when.slice(5);
    if (!MARK_NAME_RE.test(mark))
      throw new StrataError(ErrorCode.USAGE, `"${mark}" is not a mark name (see strata protect status)`);
    return { vm, mark };
  }
  return { vm, atMs: parseInstant(when, now) };
}

/**
 * The instant `ref` names, in ms, with the journal's marks looked up for VM@mark:NAME;
 * undefined when `ref` names no instant.
 */
export async function resolveInstantRef(
  ref: string,
  journal: string | undefined,
  keys: CodecKeys | undefined,
): Promise<{ vm: string; atMs: number; quiesced: boolean } | undefined> {
  const at = parseInstantRef(ref);
  if (!at) return undefined;
  if (journal === undefined)
    throw new StrataError(ErrorCode.USAGE, `${ref}: give the VM's write journal with --journal DIR`);
  if (at.mark === undefined) return { vm: at.vm, atMs: at.atMs, quiesced: false };
  const mark = (await readMarks(resolve(journal), keys)).find((m) => m.name === at.mark);
  if (!mark)
    throw new StrataError(
      ErrorCode.NOT_FOUND,
      `journal ${journal} has no mark named ${at.mark} (strata protect status lists them)`,
    );
  return { vm: at.vm, atMs: Number(BigInt(mark.atNs) / 1_000_000n), quiesced: mark.quiesced };
}

/**
 * The restore point `ref` names: VM/TIME, VM/latest, or VM@INSTANT with `journal`. An instant
 * holds segment files open: call `release` when done.
 */
export async function findRestorePoint(
  repo: Repository,
  ref: string,
  journal: string | undefined,
  options: { cacheBytes?: number } = {},
): Promise<{ snap: SnapshotRef; instant?: InstantRef; release(): Promise<void> }> {
  const at = await resolveInstantRef(ref, journal, repo.keys);
  if (!at) {
    if (journal !== undefined)
      throw new StrataError(
        ErrorCode.USAGE,
        `--journal goes with an instant (VM@TIME or VM@-90s), not with the restore point ${ref}`,
      );
    return { snap: await repo.findSnapshot(ref), release: async () => {} };
  }
  const dir = resolve(journal!);
  const completeUntilNs = await journalCompleteUntil(dir);
  const instant = await openInstant(repo, dir, {
    vm: at.vm,
    atNs: BigInt(at.atMs) * 1_000_000n,
    ...(completeUntilNs === undefined ? {} : { completeUntilNs }),
    ...(at.quiesced ? { consistency: "filesystem-consistent" as const } : {}),
    ...(options.cacheBytes === undefined ? {} : { cacheBytes: options.cacheBytes }),
  });
  return { snap: instant, instant, release: () => instant.close() };
}

/** How a restore point is named in messages and ids: VM/TIME, or VM@TIME for an instant. */
export function pointId(snap: SnapshotRef): string {
  return isInstantRef(snap) ? `${snap.vm}@${snap.time}` : `${snap.vm}/${snap.time}`;
}
