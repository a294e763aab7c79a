/** Reading a configured repository's password file, with errors that name the file and the repository. */
import { readFileSync } from "node:fs";
import { ErrorCode, StrataError } from "../util/errors.js";
import type { RepositoryConfig } from "./config.js";

export function readPassword(r: RepositoryConfig): string | undefined {
  if (r.passwordFile === undefined) return undefined;
  try {
    return readFileSync(r.passwordFile, "utf8").replace(/\r?\n$/, "");
  } catch (err) {
    throw new StrataError(
      ErrorCode.USAGE,
      `repository ${r.name}: cannot read its password file ${r.passwordFile}: ${(err as Error).message}`,
      { cause: err },
    );
  }
}
