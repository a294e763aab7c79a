/**
 * Where the REST API may write: the host's policy `api.restore-targets` (directories) and
 * `api.restore-devices` (globs of block devices) bound every path a caller names for a restore,
 * a clone, an instant recovery's overlays or a migration. The daemon runs as root, so without
 * this a token that may restore could overwrite any file of the host. The list binds every token,
 * admin too: it is the host's, not a role's (the CLI on the host is not bound: it is root already).
 *
 * A directory is checked on what it resolves to, never on its spelling: no ".." segment; the
 * deepest existing ancestor is resolved with realpath (so a symlink inside an allowed directory
 * that leads out of it is refused), the directory is then made and resolved again (so a symlink
 * put in place meanwhile is caught too), and the resolved path is what the engine gets. A device
 * is matched with its directories resolved and its last component as given (udev's
 * /dev/vg0/lv → ../dm-3 is the name the host's policy means). A refusal is FORBIDDEN (403),
 * naming the path and the setting; the API logs it like every refusal.
 */
import { promises as fs } from "node:fs";
import { basename, dirname, join, relative, resolve } from "node:path";
import { describeError, ErrorCode, StrataError } from "../util/errors.js";
import { hasDotDot } from "../util/schema.js";
import { type ApiConfig, globRegExp } from "./config.js";

type Policy = Pick<ApiConfig, "restoreTargets" | "restoreDevices">;

const forbidden = (message: string) => new StrataError(ErrorCode.FORBIDDEN, message);

function isInside(path: string, root: string): boolean {
  const r = relative(root, path);
  return r === "" || (r !== ".." && !r.startsWith("../") && !r.startsWith("/"));
}

/** `path` with its deepest existing ancestor resolved (symlinks followed) and the rest appended. */
async function resolveExisting(path: string): Promise<string> {
  const missing: string[] = [];
  let at = path;
  for (;;) {
    try {
      return join(await fs.realpath(at), ...missing.reverse());
    } catch (err) {
      if ((err as NodeJS.ErrnoException).code !== "ENOENT" || at === "/")
        throw new StrataError(ErrorCode.USAGE, `cannot resolve ${path}: ${describeError(err)}`, {
          cause: err,
        });
      missing.push(basename(at));
      at = dirname(at);
    }
  }
}

/** The configured roots as they resolve now (a root not made yet stands as written). */
async function roots(dirs: readonly string[]): Promise<string[]> {
  return Promise.all(dirs.map((d) => resolveExisting(resolve(d))));
}

function lexical(path: string, field: string, setting: string): string {
  if (!path.startsWith("/") || path.includes("\0"))
    throw new StrataError(ErrorCode.USAGE, `field "${field}" must be an absolute path on the host`);
  if (hasDotDot(path))
    throw forbidden(`${field} ${path} has a ".." segment: name the path itself (api.${setting})`);
  return resolve(path);
}

/**
 * The directory `path` (a body's `field`) resolved, made, and inside one of
 * `policy.restoreTargets`; FORBIDDEN otherwise. What the engine should be given.
 */
export async function confineDirectory(policy: Policy, path: string, field: string): Promise<string> {
  const wanted = lexical(path, field, "restore-targets");
  const allowed = await roots(policy.restoreTargets);
  const refuse = (resolved: string) =>
    forbidden(
      `${field} ${path}${resolved === wanted ? "" : ` (which resolves to ${resolved})`} is outside the directories API restores may write to: api.restore-targets is ${policy.restoreTargets.join(", ")}`,
    );
  const before = await resolveExisting(wanted);
  if (!allowed.some((r) => isInside(before, r))) throw refuse(before);
  let after: string;
  try {
    await fs.mkdir(before, { recursive: true });
    after = await fs.realpath(before);
  } catch (err) {
    throw new StrataError(
      ErrorCode.USAGE,
      `cannot make the directory ${field} ${path}: ${describeError(err)}`,
      {
        cause: err,
      },
    );
  }
  if (!allowed.some((r) => isInside(after, r))) throw refuse(after);
  return after;
}

/** The block device `path` when one of `policy.restoreDevices` matches it; FORBIDDEN otherwise. */
export async function confineDevice(policy: Policy, path: string, field: string): Promise<string> {
  const wanted = lexical(path, field, "restore-devices");
  const device = join(await resolveExisting(dirname(wanted)), basename(wanted));
  // A glob's * and ? stand within one segment: /dev/vg0/* is not /dev/vg0/a/b.
  const segments = device.split("/").length;
  if (!policy.restoreDevices.some((g) => g.split("/").length === segments && globRegExp(g).test(device)))
    throw forbidden(
      `${field} ${path}${device === wanted ? "" : ` (which resolves to ${device})`} matches none of the devices API restores may write onto: api.restore-devices is ${policy.restoreDevices.length === 0 ? "empty" : policy.restoreDevices.join(", ")}`,
    );
  return device;
}
