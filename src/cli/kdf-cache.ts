/**
 * The password's derived key, kept in the kernel's user keyring between commands (as cryptsetup
 * keeps LUKS2 volume keys), so that a backup every hour does not pay scrypt's half second of CPU
 * and 128 MiB of memory each time. The entry holds what unwraps the repository key, so it is
 * exactly as secret as the password file (--password-file) the same user already reads: it lives
 * in kernel memory only (never on disk), readable by this user's processes, and expires after
 * STRATA_KEY_CACHE seconds (default 12 hours; 0 turns the cache off). The repository's key file
 * itself keeps its full scrypt cost against anyone who only has the repository.
 *
 * Uses keyctl (keyutils). Anything that fails here is a cache miss: the key is derived again.
 */
import { execFile } from "node:child_process";
import type { KdfCache } from "../repo/keys.js";
import { ErrorCode, StrataError } from "../util/errors.js";

const DEFAULT_TTL_SECONDS = 12 * 3600;

function run(file: string, args: string[], input?: Buffer): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const child = execFile(file, args, { encoding: "buffer", timeout: 5000 }, (err, stdout) =>
      err ? reject(err) : resolve(stdout),
    );
    child.stdin?.end(input);
  });
}

const keyctl = (args: string[], input?: Buffer) => run("keyctl", args, input);

/**
 * Finds the key in the user keyring and prints it, in one program run: every command with a
 * password looks, and each program this process starts costs it a fork (tens of ms, and a fault
 * on each page it writes afterwards).
 */
const LOOKUP =
  'id=$(keyctl search @u user "$1") || exit 1; case "$id" in *[!0-9]*|"") exit 1;; esac; exec keyctl pipe "$id"';

export class KeyringKdfCache implements KdfCache {
  constructor(private readonly ttlSeconds: number = DEFAULT_TTL_SECONDS) {}

  async get(name: string): Promise<Buffer | undefined> {
    return run("sh", ["-c", LOOKUP, "sh", `strata:${name}`]).catch(() => undefined);
  }

  async set(name: string, value: Buffer): Promise<void> {
    const id = (await keyctl(["padd", "user", `strata:${name}`, "@u"], value)).toString().trim();
    if (!/^\d+$/.test(id)) return;
    // Readable by this user's processes whatever their session keyring (a systemd service's is
    // private), and by nobody else; gone after the time to live.
    await keyctl(["setperm", id, "0x3f3f0000"]);
    await keyctl(["timeout", id, String(this.ttlSeconds)]);
  }
}

/** The cache STRATA_KEY_CACHE asks for: seconds to keep a key (default 12 h), 0 for none. */
export function kdfCacheFromEnv(env: NodeJS.ProcessEnv = process.env): KdfCache | undefined {
  const text = env.STRATA_KEY_CACHE;
  if (text === undefined || text === "") return new KeyringKdfCache();
  const seconds = Number(text);
  if (!Number.isInteger(seconds) || seconds < 0)
    throw new StrataError(
      ErrorCode.USAGE,
      `STRATA_KEY_CACHE must be a number of seconds to keep the derived key (0: don't keep it), not "${text}"`,
    );
  return seconds === 0 ? undefined : new KeyringKdfCache(seconds);
}
