/**
 * The leave-nothing-behind record. Before Strata creates anything on a VM (a frozen filesystem,
 * a paused CPU, a fleecing node and its file, a backup job, an NBD server or export, a bitmap), it
 * writes that item to a state file and fsyncs it; when the item is gone it is struck off. A run
 * that dies leaves the file; the next run on the VM, or `strata doctor --fix`, reads it and
 * releases everything it names, in the safe order (thaw and resume first).
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { ErrorCode, isNotFound, StrataError } from "../../util/errors.js";

export type StateItem =
  | { kind: "freeze" }
  | { kind: "paused" }
  | { kind: "file"; path: string }
  | { kind: "node"; node: string }
  | { kind: "job"; id: string }
  | { kind: "nbd-server" }
  | { kind: "export"; id: string }
  | { kind: "bitmap"; node: string; name: string }
  /** The VM was shut down by an offline backup and must be started again with this command line. */
  | { kind: "restart"; argv: string[] };

export interface StateFile {
  vm: string;
  qmp: string;
  qga?: string;
  pid: number;
  started: string;
  items: StateItem[];
}

/** Default place for state files and fleecing images; `STRATA_STATE_DIR` or --state-dir override it. */
export function defaultStateDir(): string {
  return process.env.STRATA_STATE_DIR ?? "/var/lib/strata/state";
}

function same(a: StateItem, b: StateItem): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

export class StateRecord {
  private constructor(
    readonly path: string,
    readonly data: StateFile,
  ) {}

  /** Starts a record for a run on `vm`. Refuses if an earlier run's record is still there. */
  static async create(dir: string, vm: string, qmp: string, qga?: string): Promise<StateRecord> {
    await fs.mkdir(dir, { recursive: true, mode: 0o755 });
    const path = join(dir, `${vm}.json`);
    if (await StateRecord.load(path)) {
      throw new StrataError(
        ErrorCode.LOCKED,
        `an earlier run on VM ${vm} left ${path}: run "strata doctor --fix" for it first (or it is still running)`,
      );
    }
    const rec = new StateRecord(path, {
      vm,
      qmp,
      ...(qga === undefined ? {} : { qga }),
      pid: process.pid,
      started: new Date().toISOString(),
      items: [],
    });
    await rec.save();
    return rec;
  }

  static async load(path: string): Promise<StateRecord | undefined> {
    let text: string;
    try {
      text = await fs.readFile(path, "utf8");
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    try {
      return new StateRecord(path, JSON.parse(text) as StateFile);
    } catch {
      throw new StrataError(
        ErrorCode.REPO_CORRUPT,
        `state file ${path} is damaged; inspect it and remove it by hand`,
      );
    }
  }

  /** Every record in `dir`. */
  static async all(dir: string): Promise<StateRecord[]> {
    let names: string[];
    try {
      names = await fs.readdir(dir);
    } catch (err) {
      if (isNotFound(err)) return [];
      throw err;
    }
    const out: StateRecord[] = [];
    for (const n of names.filter((x) => x.endsWith(".json"))) {
      const r = await StateRecord.load(join(dir, n));
      if (r) out.push(r);
    }
    return out;
  }

  get items(): readonly StateItem[] {
    return this.data.items;
  }

  /** Records `item` durably; call before creating it. */
  async add(item: StateItem): Promise<void> {
    if (!this.data.items.some((x) => same(x, item))) this.data.items.push(item);
    await this.save();
  }

  /** Strikes `item` off; call once it is gone. */
  async remove(item: StateItem): Promise<void> {
    this.data.items = this.data.items.filter((x) => !same(x, item));
    await this.save();
  }

  /** Deletes the record: nothing is left on the VM. */
  async finish(): Promise<void> {
    if (this.data.items.length > 0) {
      throw new StrataError(
        ErrorCode.INTERNAL,
        `state ${this.path} still lists ${this.data.items.length} item(s)`,
      );
    }
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
