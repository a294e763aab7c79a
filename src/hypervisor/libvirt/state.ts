/**
 * The leave-nothing-behind record of a libvirt backup (the QEMU adapter's state.ts, for what
 * Strata creates through libvirt): a frozen guest, a suspended domain, the pull-mode backup job,
 * its socket directory and scratch files, and the checkpoint created with it. Each item is written
 * and fsynced before it is created and struck off once it is gone. A run that dies leaves the
 * file; the next backup of that domain, or `leftovers(stateDir, fix)`, releases what it names.
 *
 * Records live in `STATE_DIR/libvirt/DOMAIN.json`, apart from the QEMU adapter's records.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { ErrorCode, isNotFound, StrataError } from "../../util/errors.js";

export type LibvirtStateItem =
  | { kind: "freeze" }
  | { kind: "suspended" }
  /** The pull-mode backup job, with the socket that identifies it as ours. */
  | { kind: "job"; socket: string }
  /** A checkpoint this run creates; deleted unless the restore point was committed. */
  | { kind: "checkpoint"; name: string }
  | { kind: "file"; path: string }
  | { kind: "dir"; path: string }
  /** A helper process (qemu-storage-daemon); `marker` is in its command line (not a reused PID). */
  | { kind: "process"; pid: number; marker: string };

export interface LibvirtStateFile {
  adapter: "libvirt";
  uri: string;
  domain: string;
  pid: number;
  started: string;
  items: LibvirtStateItem[];
}

export function stateDirOf(stateDir: string): string {
  return join(stateDir, "libvirt");
}

function same(a: LibvirtStateItem, b: LibvirtStateItem): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

const KINDS = new Set(["freeze", "suspended", "job", "checkpoint", "file", "dir", "process"]);

function validate(data: unknown, path: string): LibvirtStateFile {
  const bad = () =>
    new StrataError(
      ErrorCode.REPO_CORRUPT,
      `state file ${path} is damaged; inspect it and remove it by hand`,
    );
  if (!data || typeof data !== "object") throw bad();
  const d = data as Partial<LibvirtStateFile>;
  if (d.adapter !== "libvirt" || typeof d.uri !== "string" || typeof d.domain !== "string") throw bad();
  if (typeof d.pid !== "number" || !Array.isArray(d.items)) throw bad();
  for (const i of d.items)
    if (!i || typeof i !== "object" || !KINDS.has((i as { kind: string }).kind)) throw bad();
  return d as LibvirtStateFile;
}

export class LibvirtState {
  private constructor(
    readonly path: string,
    readonly data: LibvirtStateFile,
  ) {}

  static pathFor(stateDir: string, domain: string): string {
    return join(stateDirOf(stateDir), `${domain}.json`);
  }

  /** A new record for a run on `domain`; the caller has released any earlier one first. */
  static async create(stateDir: string, uri: string, domain: string): Promise<LibvirtState> {
    await fs.mkdir(stateDirOf(stateDir), { recursive: true, mode: 0o755 });
    const path = LibvirtState.pathFor(stateDir, domain);
    if (await LibvirtState.load(path))
      throw new StrataError(ErrorCode.INTERNAL, `state file ${path} exists; release it first`);
    const rec = new LibvirtState(path, {
      adapter: "libvirt",
      uri,
      domain,
      pid: process.pid,
      started: new Date().toISOString(),
      items: [],
    });
    await rec.save();
    return rec;
  }

  static async load(path: string): Promise<LibvirtState | undefined> {
    let text: string;
    try {
      text = await fs.readFile(path, "utf8");
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    let data: unknown;
    try {
      data = JSON.parse(text);
    } catch {
      data = undefined;
    }
    return new LibvirtState(path, validate(data, path));
  }

  /** Every record in the state directory. */
  static async all(stateDir: string): Promise<LibvirtState[]> {
    let names: string[];
    try {
      names = await fs.readdir(stateDirOf(stateDir));
    } catch (err) {
      if (isNotFound(err)) return [];
      throw err;
    }
    const out: LibvirtState[] = [];
    for (const n of names.filter((x) => x.endsWith(".json"))) {
      const r = await LibvirtState.load(join(stateDirOf(stateDir), n));
      if (r) out.push(r);
    }
    return out;
  }

  get items(): readonly LibvirtStateItem[] {
    return this.data.items;
  }

  has(kind: LibvirtStateItem["kind"]): boolean {
    return this.data.items.some((i) => i.kind === kind);
  }

  /** Records `item` durably; call before creating it. */
  async add(item: LibvirtStateItem): Promise<void> {
    if (!this.data.items.some((x) => same(x, item))) this.data.items.push(item);
    await this.save();
  }

  /** Strikes `item` off; call once it is gone. */
  async remove(item: LibvirtStateItem): Promise<void> {
    this.data.items = this.data.items.filter((x) => !same(x, item));
    await this.save();
  }

  /** Deletes the record: nothing it listed is left. */
  async finish(): Promise<void> {
    if (this.data.items.length > 0)
      throw new StrataError(
        ErrorCode.INTERNAL,
        `state ${this.path} still lists ${this.data.items.length} item(s)`,
      );
    await fs.rm(this.path, { force: true });
  }

  private async save(): Promise<void> {
    const tmp = `${this.path}.tmp-${randomBytes(4).toString("hex")}`;
    const fh = await fs.open(tmp, "w", 0o600);
    try {
      await fh.writeFile(`${JSON.stringify(this.data, null, 2)}\n`);
      await fh.sync();
    } finally {
      await fh.close();
    }
    await fs.rename(tmp, this.path);
  }
}
