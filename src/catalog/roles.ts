/**
 * What each API token role may do. The REST API asks {@link allows} before every call and logs
 * each refusal; the table is here, beside the tokens, so that the CLI, the API and the docs read
 * one list.
 *
 * - `read`: sees state: VMs, restore points, jobs and their logs, retention previews, statistics,
 *   instantly recovered VMs; never data (files, downloads, VM configurations) and never restores.
 * - `backup`: only adds restore points: starts backups and follows its jobs. It cannot forget,
 *   gc, restore or read any data, nor list restore points: a stolen backup token can't destroy
 *   or read what is protected.
 * - `operator`: everything `read` does, plus runs jobs (backup, verify), cancels them, restores
 *   to a new place (a directory or device the host's `api.restore-targets` / `restore-devices`
 *   allow: src/server/restore-targets.ts), browses and downloads files, and runs instant recovery.
 * - `admin`: everything, including removing data (forget, gc), restoring a VM or disk in place
 *   (over its production disks: `restore.in-place`), changing jobs and managing tokens.
 */
import { ErrorCode, StrataError } from "../util/errors.js";
import type { Role } from "./schema.js";

/** What the `read` role may do: see state, change nothing, read no data. */
const READ_ACTIONS = [
  "vms.list",
  "points.list",
  "jobs.list",
  "jobs.logs",
  "retention.preview",
  "repo.stats",
  "metrics.read",
  "instant.list",
] as const;

/** What the `operator` role may do: read, run jobs, restore, read data; never remove data. */
const OPERATOR_ACTIONS = [
  ...READ_ACTIONS,
  "backup.start",
  "verify.start",
  "jobs.cancel",
  "restore.start",
  "files.read",
  "instant.manage",
] as const;

export const ACTIONS = [
  ...OPERATOR_ACTIONS,
  "restore.in-place",
  "forget.run",
  "gc.run",
  "jobs.manage",
  "tokens.manage",
] as const;

export type Action = (typeof ACTIONS)[number];

export const ROLE_ACTIONS: Readonly<Record<Role, ReadonlySet<Action>>> = {
  read: new Set(READ_ACTIONS),
  backup: new Set<Action>(["backup.start", "jobs.list", "jobs.logs"]),
  operator: new Set(OPERATOR_ACTIONS),
  admin: new Set(ACTIONS),
};

export function allows(role: Role, action: Action): boolean {
  return ROLE_ACTIONS[role].has(action);
}

/** Throws FORBIDDEN unless `role` may do `action`; `who` names the token in the message. */
export function authorize(role: Role, action: Action, who: string): void {
  if (!allows(role, action))
    throw new StrataError(ErrorCode.FORBIDDEN, `token ${who} (role ${role}) may not do ${action}`);
}
