/**
 * Progress events. Long jobs emit these through a {@link ProgressSink}; the CLI renders them as a
 * bar or as newline-delimited JSON, the daemon stores them in its task log, the web UI shows them
 * live. The default sink does nothing, so library code never has to check for one.
 */

export type ProgressEvent =
  | { type: "start"; job: string; total: number; message?: string }
  | { type: "progress"; job: string; done: number; total: number; bytesNew?: number }
  | { type: "log"; level: "info" | "warn"; message: string }
  | { type: "end"; job: string };

export interface ProgressSink {
  emit(event: ProgressEvent): void;
}

export const noProgress: ProgressSink = { emit: () => {} };

/**
 * Wraps a sink so that "progress" events are passed on at most every `intervalMs` (the last one
 * and all other kinds always pass), the way PBS logs only when the percentage moves.
 */
export function throttled(
  sink: ProgressSink,
  intervalMs: number,
  now: () => number = Date.now,
): ProgressSink {
  let last = 0;
  return {
    emit(event) {
      if (event.type === "progress" && event.done < event.total) {
        const t = now();
        if (t - last < intervalMs) return;
        last = t;
      }
      sink.emit(event);
    },
  };
}
