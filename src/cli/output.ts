/**
 * How commands talk to people and programs. With --json, long commands print one JSON object per
 * line (progress events, then a summary with "type": "summary"); list commands print one JSON
 * document. Without it, a progress bar on a terminal (stderr) and a short text result (stdout).
 */
import { createRequire } from "node:module";
import type cliProgressTypes from "cli-progress";
import { type ProgressEvent, type ProgressSink, throttled } from "../util/progress.js";
import { formatBytes } from "../util/sizes.js";

export interface Output {
  json: boolean;
  quiet: boolean;
  /** Progress sink for a long job. */
  progress(): ProgressSink;
  /** A line of text for people (not printed with --json or --quiet). */
  info(text: string): void;
  /** A warning, always on stderr (as a JSON line with --json). */
  warn(text: string): void;
  /** The command's result: JSON, or the text `render` makes. */
  result(value: unknown, render: () => string): void;
}

export function makeOutput(options: { json?: boolean; quiet?: boolean }): Output {
  const json = options.json === true;
  const quiet = options.quiet === true;
  return {
    json,
    quiet,
    progress() {
      if (json) return throttled({ emit: (e) => process.stdout.write(`${JSON.stringify(e)}\n`) }, 500);
      if (quiet || !process.stderr.isTTY) {
        return {
          emit: (e) =>
            e.type === "log" && e.level === "warn" && process.stderr.write(`warning: ${e.message}\n`),
        };
      }
      return barSink();
    },
    info(text) {
      if (!json && !quiet) process.stdout.write(`${text}\n`);
    },
    warn(text) {
      if (json) process.stderr.write(`${JSON.stringify({ type: "log", level: "warn", message: text })}\n`);
      else process.stderr.write(`warning: ${text}\n`);
    },
    result(value, render) {
      if (json) process.stdout.write(`${JSON.stringify(value)}\n`);
      else if (!quiet) {
        const text = render();
        if (text) process.stdout.write(`${text}\n`);
      }
    },
  };
}

function barSink(): ProgressSink {
  // Loaded here, when a bar is shown: quiet, JSON and non-terminal runs never need its modules.
  const cliProgress = createRequire(import.meta.url)("cli-progress") as typeof cliProgressTypes;
  let bar: cliProgressTypes.SingleBar | undefined;
  let isBytes = true;
  return {
    emit(e: ProgressEvent) {
      switch (e.type) {
        case "start":
          isBytes = e.job !== "verify" && e.job !== "gc";
          bar = new cliProgress.SingleBar(
            {
              stream: process.stderr,
              format: `${e.job} {bar} {percentage}% | {done} of {all} | {speed} | ETA {eta_formatted}`,
              hideCursor: true,
              clearOnComplete: true,
              etaBuffer: 50,
            },
            cliProgress.Presets.shades_classic,
          );
          bar.start(e.total, 0, { done: fmt(0), all: fmt(e.total), speed: "" });
          break;
        case "progress": {
          const secs = bar ? (Date.now() - (bar as unknown as { startTime: number }).startTime) / 1000 : 0;
          const speed = isBytes && secs > 0 ? `${formatBytes(e.done / secs)}/s` : "";
          bar?.update(e.done, { done: fmt(e.done), all: fmt(e.total), speed });
          break;
        }
        case "log":
          process.stderr.write(`${e.level === "warn" ? "warning: " : ""}${e.message}\n`);
          break;
        case "end":
          bar?.stop();
          bar = undefined;
          break;
      }
    },
  };
  function fmt(n: number): string {
    return isBytes ? formatBytes(n) : String(n);
  }
}
