// A policy's `read-data: 1/T`: each completed verify run reads the next T-th of the chunks, so T
// runs read every chunk once (runs that were cancelled or interrupted do not count).
import assert from "node:assert/strict";
import { test } from "node:test";
import { daemonOf, setup } from "./helpers.js";

test("verify with read-data 1/3 reads parts 1, 2 and 3 on three runs, every chunk once", async (t) => {
  const s = await setup(t, {
    vms: ["vm1"],
    mib: 8,
    policies: `  p:
    repository: main
    vms: all
    schedule: every 1h
    verify: { schedule: "0 4 * * *", read-data: 1/3 }`,
  });
  const d = daemonOf(t, s);
  await d.start();
  const job = (kind: string) => s.catalog.jobs().find((j) => j.kind === kind)!;
  const run = async (kind: string) => {
    const r = d.runNow(job(kind).id);
    assert.equal(r.status, "started");
    if (r.status !== "started") throw new Error("not started");
    await d.idle();
    const done = s.catalog.run(r.run.id)!;
    assert.equal(done.outcome, "success", done.error ?? "");
    return s.catalog.logs(r.run.id).map((l) => l.message);
  };
  await run("backup");
  let read = 0;
  let checked = 0;
  for (const part of [1, 2, 3]) {
    const logs = await run("verify");
    assert.ok(logs.includes(`reading part ${part}/3 of the chunks (a rotating sample)`), logs.join("\n"));
    const m = logs.map((l) => /, (\d+) chunks checked, (\d+) of them read$/.exec(l)).find((x) => x)!;
    assert.ok(m, logs.join("\n"));
    checked = Number(m[1]);
    read += Number(m[2]);
  }
  assert.ok(checked >= 4, `${checked} chunks`);
  assert.equal(read, checked, "three runs read every chunk once");
  // The fourth starts over.
  assert.ok((await run("verify")).includes("reading part 1/3 of the chunks (a rotating sample)"));
});
