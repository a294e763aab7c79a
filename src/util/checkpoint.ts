/**
 * Checkpoints for long loops over data that is mostly cached. A loop whose awaits all resolve
 * at once (cached chunks, an in-memory WebAssembly filesystem) runs on microtasks only and
 * never lets Node's event loop turn: signal handlers (Ctrl-C, SIGTERM), timers and I/O wait
 * until it ends. A checkpoint lets the event loop turn every few tens of milliseconds and then
 * stops the loop with the signal's reason if it was aborted, as PBS's `check_abort` does.
 */
import { setImmediate as turn } from "node:timers/promises";

/** How often a checkpoint lets the event loop turn. */
const EVERY_MS = 50;

/** Returns a function to await once per iteration of a long loop. */
export function checkpoint(signal?: AbortSignal, everyMs = EVERY_MS): () => Promise<void> {
  let last = Date.now();
  return async () => {
    if (Date.now() - last >= everyMs) {
      await turn();
      last = Date.now();
    }
    signal?.throwIfAborted();
  };
}
