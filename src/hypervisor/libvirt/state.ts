/**
 * The leave-nothing-behind record of a libvirt backup (the QEMU adapter's state.ts, for what
 * Strata creates through libvirt): a frozen guest, a suspended domain, the pull-mode backup job,
 * its socket directory and scratch files, and the checkpoint created with it. Each item is written
 * and fsynced before it is created and struck off once it is gone. A run that dies leaves the
 * file; the next backup of that domain, or `leftovers(stateDir, fix)`, releases what it names.
 *
 * Records live in `STATE_DIR/libvirt/DOMAIN.json`, apart from the QEMU adapter's records. One
 * may have been written by someone else and release acts on it as root (removes files and
 * directories, stops processes, deletes checkpoints), so it is checked against a schema when
 * read: one that does not fit is DATA_CORRUPT naming the file and the first bad field.
 */
import { randomBytes } from "node:crypto";
import { promises as fs } from "node:fs";
import { basename, join } from "node:path";
import { z } from "zod";
import { ErrorCode, isNotFound, StrataError } from "../../util/errors.js";
import { absolutePath, list, matching, object, schemaProblem, whole } from "../../util/schema.js";
import { CHECKPOINT_RE, DOMAIN_NAME_RE, URI_RE } from "./domain.js";

/** Bounds of a record, far above what a run writes; anything in it is acted on as root. */
const MAX_FILE_BYTES = 1024 * 1024;
const MAX_ITEMS = 4096;

const LibvirtStateItemSchema = z.discriminatedUnion(
  "kind",
  [
    z.object({ kind: z.literal("freeze") }),
    z.object({ kind: z.literal("suspended") }),
    /** The pull-mode backup job, with the socket that identifies it as ours. */
    z.object({ kind: z.literal("job"), socket: absolutePath("the job's socket") }),
    /** A checkpoint this run creates; deleted unless the restore point was committed. */
    z.object({
      kind: z.literal("checkpoint"),
      name: matching("the checkpoint", CHECKPOINT_RE, "a checkpoint Strata makes"),
    }),
    z.object({ kind: z.literal("file"), path: absolutePath("the file") }),
    z.object({ kind: z.literal("dir"), path: absolutePath("the directory") }),
    /** A helper process (qemu-storage-daemon); `marker` is in its command line (not a reused PID). */
    z.object({
      kind: z.literal("process"),
      pid: whole("the process id", 2 ** 31),
      marker: absolutePath("the process's marker"),
    }),
  ],
  {
    error: (iss) =>
      iss.code === "invalid_union"
        ? "not an item Strata records"
        : iss.code === "invalid_type"
          ? "the item is not an object"
          : undefined,
  },
);

const LibvirtStateFileSchema = object(
  {
    adapter: z.literal("libvirt", { error: "it is not a libvirt record" }),
    uri: matching("the libvirt connection", URI_RE, "a URI Strata uses"),
    domain: matching("the domain name", DOMAIN_NAME_RE, "one Strata handles"),
    pid: whole("the pid", 2 ** 31),
    started: z.iso.datetime({ error: "the start time is not an ISO time" }),
    items: list(LibvirtStateItemSchema, "the items", MAX_ITEMS),
  },
  "the record",
);

export type LibvirtStateItem = z.infer<typeof LibvirtStateItemSchema>;
export type LibvirtStateFile = z.infer<typeof LibvirtStateFileSchema>;

export function stateDirOf(stateDir: string): string {
  return join(stateDir, "libvirt");
}

function same(a: LibvirtStateItem, b: LibvirtStateItem): boolean {
  return JSON.stringify(a) === JSON.stringify(b);
}

function damaged(path: string, what: string): StrataError {
  return new StrataError(
    ErrorCode.DATA_CORRUPT,
    `state file ${path} is damaged or was not written by Strata (${what}); inspect it and remove it by hand`,
  );
}

/** The record in `text`, checked against its schema and the file's name. */
function validate(text: string, path: string): LibvirtStateFile {
  let doc: unknown;
  try {
    doc = JSON.parse(text);
  } catch {
    throw damaged(path, "not JSON");
  }
  const bad = schemaProblem(LibvirtStateFileSchema, doc);
  if (bad !== undefined) throw damaged(path, bad);
  const data = LibvirtStateFileSchema.parse(doc);
  if (`${data.domain}.json` !== basename(path))
    throw damaged(path, `domain: "${data.domain}" is not the domain the file is named after`);
  return data;
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
      const fh = await fs.open(path, "r");
      try {
        const { size } = await fh.stat();
        if (size > MAX_FILE_BYTES) throw damaged(path, `${size} bytes, more than a record holds`);
        text = await fh.readFile("utf8");
      } finally {
        await fh.close();
      }
    } catch (err) {
      if (isNotFound(err)) return undefined;
      throw err;
    }
    return new LibvirtState(path, validate(text, path));
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
