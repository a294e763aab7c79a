/** Small file helpers shared by the layers. */
import { promises as fs } from "node:fs";
import { dirname } from "node:path";
import { ErrorCode, isNotFound, StrataError } from "./errors.js";

/** Writes `text` to `path` (creating its directory), refusing an existing file without `force`. */
export async function writeNew(path: string, text: string, force: boolean): Promise<void> {
  await fs.mkdir(dirname(path), { recursive: true });
  try {
    await fs.writeFile(path, text, { flag: force ? "w" : "wx" });
  } catch (err) {
    if ((err as NodeJS.ErrnoException).code === "EEXIST")
      throw new StrataError(ErrorCode.TARGET_CONFLICT, `${path} exists (use --force to replace it)`);
    throw new StrataError(ErrorCode.TARGET_CONFLICT, `cannot write ${path}: ${(err as Error).message}`);
  }
}

/** `lstat`, or undefined when nothing is there. */
export async function lstatOrUndefined(path: string) {
  return fs.lstat(path).catch((err: unknown) => {
    if (isNotFound(err)) return undefined;
    throw err;
  });
}
