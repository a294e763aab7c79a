/**
 * The leave-nothing-behind record. Before Strata creates anything on a VM (a frozen filesystem,
 * a paused CPU, a fleecing node and its file, a backup job, an NBD server or export, a bitmap), it
 * writes that item to a state file and fsyncs it; when the item is gone it is struck off. A run
 * that dies leaves the file; the next run on the VM, or `strata doctor --fix`, reads it and
 * releases everything it names, in the safe order (thaw and resume first).
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, join, resolve } from "node:path";
import { z } from "zod";
import { NAME_RE } from "../../repo/format.js";
import { ErrorCode, isNotFound, StrataError } from "../../util/errors.js";
import { CONTROL, hasDotDot } from "../../util/schema.js";

/**
 * Bounds of a record, far above what a run writes (a handful of items per disk, a QEMU command
 * line). A state file may have been written by someone else: everything in it is checked when it
 * is read, since release() acts on it as root (removes the files, starts the command line).
 */
export const STATE_LIMITS = {
  fileBytes: 4 * 1024 * 1024,
  items: 4096,
  args: 8192,
  argBytes: 64 * 1024,
  path: 4096,
} as const;

const absolutePath = z
  .string()
  .max(STATE_LIMITS.path)
  .refine((p) => p.startsWith("/"), "not an absolute path")
  .refine((p) => !hasDotDot(p), 'has a ".." segment')
  .refine((p) => !CONTROL.test(p), "holds control characters");
/** QEMU ids (jobs, exports, node-names); QEMU names nodes it made itself "#block<N>". */
const qemuId = z.string().regex(/^[A-Za-z][A-Za-z0-9_.-]{0,127}$/, "not a QEMU id");
const nodeName = z.string().regex(/^(#block\d{1,10}|[A-Za-z][A-Za-z0-9_.-]{0,127})$/, "not a QEMU node-name");
const bitmapName = z.string().regex(/^[A-Za-z0-9._-]{1,128}$/, "not a bitmap name Strata makes");

const StateItemSchema = z.discriminatedUnion("kind", [
  z.object({ kind: z.literal("freeze") }),
  z.object({ kind: z.literal("paused") }),
  z.object({ kind: z.literal("file"), path: absolutePath }),
  z.object({ kind: z.literal("node"), node: nodeName }),
  z.object({ kind: z.literal("job"), id: qemuId }),
  /** `socket`: where it listens (records of older versions lack it). */
  z.object({ kind: z.literal("nbd-server"), socket: absolutePath.optional() }),
  z.object({ kind: z.literal("export"), id: qemuId }),
  z.object({ kind: z.literal("bitmap"), node: nodeName, name: bitmapName }),
  /** The VM was shut down by an offline backup and must be started again with this command line. */
  z.object({
    kind: z.literal("restart"),
    argv: z.array(z.string().max(STATE_LIMITS.argBytes)).min(1).max(STATE_LIMITS.args),
  }),
]);

/** A record of a long-running job beside backups ("protect": CDP capture) is kept in `<vm>.<role>.json`. */
export const ROLES = ["protect"] as const;
export type StateRole = (typeof ROLES)[number];

const StateFileSchema = z.object({
  vm: z.string().regex(NAME_RE, "not a VM name"),
  role: z.enum(ROLES).optional(),
  qmp: absolutePath,
  qga: absolutePath.optional(),
  pid: z
    .number()
    .int()
    .min(1)
    .max(2 ** 31),
  started: z.iso.datetime(),
  items: z.array(StateItemSchema).max(STATE_LIMITS.items),
});

export type StateItem = z.infer<typeof StateItemSchema>;
export type StateFile = z.infer<typeof StateFileSchema>;

/** Where `value` fails the schema: "items.3.kind: ..." (the first problem), or undefined. */
function problem(schema: z.ZodType, value: unknown): string | undefined {
  const r = schema.safeParse(value);
  if (r.success) return undefined;
  const issue = r.error.issues[0]!;
  return `${issue.path.length > 0 ? issue.path.join(".") : "document"}: ${issue.message}`;
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

  /** The file of `vm`'s record (of a backup, or of a `role` job). */
  static pathOf(dir: string, vm: string, role?: StateRole): string {
    return join(resolve(dir), role === undefined ? `${vm}.json` : `${vm}.${role}.json`);
  }

  /**
   * Starts a record for a run on `vm` (a backup, or a `role` job such as protect, which keeps a
   * record of its own beside the backups it takes). Refuses if an earlier run's record is still there.
   */
  static async create(
    dir: string,
    vm: string,
    qmp: string,
    qga?: string,
    role?: StateRole,
  ): Promise<StateRecord> {
    await fs.mkdir(dir, { recursive: true, mode: 0o755 });
    const path = StateRecord.pathOf(dir, vm, role);
    if (await StateRecord.load(path)) {
      throw new StrataError(
        ErrorCode.LOCKED,
        `an earlier run on VM ${vm} left ${path}: run "strata doctor --fix" for it first (or it is still running)`,
      );
    }
    const rec = new StateRecord(path, {
      vm,
      ...(role === undefined ? {} : { role }),
      qmp: resolve(qmp),
      ...(qga === undefined ? {} : { qga: resolve(qga) }),
      pid: process.pid,
      started: new Date().toISOString(),
      items: [],
    });
    await rec.save();
    return rec;
  }

  /**
   * Reads the record at `path` (undefined when there is none). One that is not JSON, too big, or
   * does not fit the schema is DATA_CORRUPT naming the file and the first bad field: nothing in
   * it is acted on.
   */
  static async load(path: string): Promise<StateRecord | undefined> {
    let text: string;
    try {
      const fh = await fs.open(path, "r");
      try {
        const { size } = await fh.stat();
        if (size > STATE_LIMITS.fileBytes) throw damaged(path, `${size} bytes, more than a record holds`);
        text = await fh.readFile("utf8");
      } finally {
        await fh.close();
      }
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    let doc: unknown;
    try {
      doc = JSON.parse(text);
    } catch {
      throw damaged(path, "not JSON");
    }
    const bad = problem(StateFileSchema, doc);
    if (bad !== undefined) throw damaged(path, bad);
    const data = StateFileSchema.parse(doc);
    if (basename(StateRecord.pathOf("/", data.vm, data.role)) !== basename(path))
      throw damaged(path, `vm: "${data.vm}" is not the VM the file is named after`);
    return new StateRecord(path, data);
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
    const bad = problem(StateItemSchema, item);
    if (bad !== undefined)
      throw new StrataError(ErrorCode.INTERNAL, `state ${this.path}: refusing to record ${bad}`);
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

function damaged(path: string, what: string): StrataError {
  return new StrataError(
    ErrorCode.DATA_CORRUPT,
    `state file ${path} is damaged or was not written by Strata (${what}); inspect it and remove it by hand`,
  );
}
