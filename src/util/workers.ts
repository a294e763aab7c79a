/**
 * A small pool of worker threads for CPU-bound work (hashing, compression, encryption), so the
 * event loop stays free for I/O. A worker module calls {@link serveWorker} with its handlers; the
 * pool sends each task to the least-loaded worker. Callers bound their own in-flight work; the
 * pool queues nothing of its own beyond what they send.
 */
import { availableParallelism, setPriority } from "node:os";
import { isMainThread, parentPort, type Transferable, Worker, workerData } from "node:worker_threads";
import { ErrorCode, StrataError } from "./errors.js";
import { PRESTARTED, takePrestarted } from "./prestart.js";

interface Request {
  id: number;
  method: string;
  args: unknown;
}

type Reply = { id: number; ok: true; value: unknown } | { id: number; ok: false; error: SerializedError };

interface SerializedError {
  message: string;
  code?: string;
  strata?: boolean;
}

interface Slot {
  worker: Worker;
  pending: Map<number, { resolve: (v: unknown) => void; reject: (e: unknown) => void }>;
}

/** Number of worker threads to use by default: one per core. */
export function defaultWorkerCount(): number {
  return Math.max(1, availableParallelism());
}

export class WorkerPool {
  private readonly slots: Slot[] = [];
  private nextId = 1;
  private closed = false;
  /** How many of the threads had been started ahead ({@link prestartWorkers}). */
  readonly prestartedTaken: number;

  /**
   * @param moduleUrl URL of the worker module (it must call serveWorker).
   * @param size number of threads.
   * @param data passed to each worker's handlers (keys, settings).
   * @param options.nice the CPU priority each thread sets for itself when it starts (Linux: nice
   *   is per thread), so that a job's codec work runs at its policy's priority.
   */
  constructor(
    moduleUrl: URL,
    size: number = defaultWorkerCount(),
    data?: unknown,
    options: { nice?: number } = {},
  ) {
    const setup: WorkerSetup = { data, nice: options.nice };
    const ahead = takePrestarted(moduleUrl, size);
    this.prestartedTaken = ahead.length;
    for (let i = 0; i < size; i++) {
      const early = ahead[i];
      // A thread started ahead (bin/strata) gets its setup as its first message.
      early?.postMessage({ setup } satisfies SetupMessage);
      const worker = early ?? new Worker(moduleUrl, { workerData: setup });
      const slot: Slot = { worker, pending: new Map() };
      worker.on("message", (reply: Reply) => {
        const p = slot.pending.get(reply.id);
        if (!p) return;
        slot.pending.delete(reply.id);
        if (reply.ok) p.resolve(reply.value);
        else p.reject(deserializeError(reply.error));
      });
      worker.on("error", (err) => this.failSlot(slot, err));
      worker.on("exit", (code) => {
        if (!this.closed) this.failSlot(slot, new Error(`worker thread exited with code ${code}`));
      });
      worker.unref();
      this.slots.push(slot);
    }
  }

  get size(): number {
    return this.slots.length;
  }

  /** Calls sent and not yet answered, over all threads. */
  get pending(): number {
    let n = 0;
    for (const s of this.slots) n += s.pending.size;
    return n;
  }

  /** Runs `method` in the least busy worker. `transfer` lists buffers handed over (not copied). */
  run<T>(method: string, args: unknown, transfer: readonly Transferable[] = []): Promise<T> {
    if (this.closed) return Promise.reject(new StrataError(ErrorCode.INTERNAL, "worker pool is closed"));
    let slot = this.slots[0]!;
    for (const s of this.slots) if (s.pending.size < slot.pending.size) slot = s;
    const id = this.nextId++;
    return new Promise<T>((resolve, reject) => {
      slot.pending.set(id, { resolve: resolve as (v: unknown) => void, reject });
      if (slot.pending.size === 1) slot.worker.ref();
      const req: Request = { id, method, args };
      slot.worker.postMessage(req, transfer as Transferable[]);
    }).finally(() => {
      // Not once closing: close() holds the loop with ref() until the thread is gone, and a call
      // that settles in between (a read-ahead nobody awaits) must not let go of it again.
      if (slot.pending.size === 0 && !this.closed) slot.worker.unref();
    });
  }

  /** Stops the threads; calls still pending are rejected (ABORTED) rather than left hanging. */
  async close(): Promise<void> {
    this.closed = true;
    // An idle worker is unref'd; unref'd, its exit may come after Node decided the event loop is
    // empty, and the caller's await never settles (exit code 13). Hold the loop until it is gone.
    for (const s of this.slots) s.worker.ref();
    await Promise.all(this.slots.map((s) => s.worker.terminate()));
    for (const slot of this.slots) {
      for (const p of slot.pending.values()) {
        p.reject(new StrataError(ErrorCode.ABORTED, "worker pool closed before the call finished"));
      }
      slot.pending.clear();
    }
  }

  private failSlot(slot: Slot, err: unknown): void {
    for (const p of slot.pending.values()) {
      p.reject(new StrataError(ErrorCode.INTERNAL, `worker thread failed: ${String(err)}`, { cause: err }));
    }
    slot.pending.clear();
  }
}

function deserializeError(e: SerializedError): Error {
  if (e.strata && e.code) return new StrataError(e.code as ErrorCode, e.message);
  const err = new Error(e.message) as Error & { code?: string };
  if (e.code) err.code = e.code;
  return err;
}

function serializeError(err: unknown): SerializedError {
  if (err instanceof StrataError) return { message: err.message, code: err.code, strata: true };
  if (err instanceof Error) {
    const code = (err as { code?: unknown }).code;
    return typeof code === "string" ? { message: err.message, code } : { message: err.message };
  }
  return { message: String(err) };
}

/** A handler returns its value, or `{ value, transfer }` made by {@link withTransfer}. */
export type Handler = (args: never, data: unknown) => unknown | Promise<unknown>;

const TRANSFER = Symbol("transfer");
interface WithTransfer {
  [TRANSFER]: true;
  value: unknown;
  transfer: Transferable[];
}

/**
 * Marks a handler's result so that the listed buffers are moved, not copied, to the caller.
 * Shared memory is never moved (it is shared already): a SharedArrayBuffer in the list is left out.
 */
export function withTransfer(value: unknown, transfer: Transferable[]): WithTransfer {
  return { [TRANSFER]: true, value, transfer: transfer.filter((t) => !(t instanceof SharedArrayBuffer)) };
}

/** What a pool hands each of its threads. */
interface WorkerSetup {
  data: unknown;
  nice: number | undefined;
}

/** The first message to a thread started ahead. */
interface SetupMessage {
  setup: WorkerSetup;
}

/** Call at the top level of a worker module: answers the pool's requests with `handlers`. */
export function serveWorker(handlers: Record<string, Handler>): void {
  if (isMainThread || !parentPort) return;
  const port = parentPort;
  let data: unknown;
  const apply = (setup: WorkerSetup) => {
    data = setup.data;
    if (setup.nice !== undefined) {
      try {
        setPriority(0, setup.nice); // this thread only
      } catch {
        // Lowering nice needs CAP_SYS_NICE; the thread keeps its creator's.
      }
    }
  };
  // Started ahead (prestart.ts): the setup is the first message, before any request.
  let waiting = workerData === PRESTARTED;
  if (!waiting) apply(workerData as WorkerSetup);
  port.on("message", async (req: Request | SetupMessage) => {
    if (waiting) {
      waiting = false;
      apply((req as SetupMessage).setup);
      return;
    }
    if (!("method" in req)) return;
    try {
      const handler = handlers[req.method];
      if (!handler) throw new Error(`unknown worker method ${req.method}`);
      const result = await handler(req.args as never, data);
      if (typeof result === "object" && result !== null && TRANSFER in result) {
        const r = result as WithTransfer;
        port.postMessage({ id: req.id, ok: true, value: r.value } satisfies Reply, r.transfer);
      } else {
        port.postMessage({ id: req.id, ok: true, value: result } satisfies Reply);
      }
    } catch (err) {
      port.postMessage({ id: req.id, ok: false, error: serializeError(err) } satisfies Reply);
    }
  });
}
