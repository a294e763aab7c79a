import assert from "node:assert/strict";
import { test } from "node:test";
import { checkpoint } from "./checkpoint.js";

test("a loop of resolved awaits lets timers run at its checkpoints, and stops when aborted", async () => {
  const ac = new AbortController();
  // The timer can only fire if the loop lets the event loop turn.
  setTimeout(() => ac.abort(new Error("stop")), 20);
  const tick = checkpoint(ac.signal, 5);
  let n = 0;
  const started = Date.now();
  await assert.rejects(
    (async () => {
      for (;;) {
        await Promise.resolve(n++);
        await tick();
      }
    })(),
    /stop/,
  );
  assert.ok(Date.now() - started < 1000);
  assert.ok(n > 0);
});
