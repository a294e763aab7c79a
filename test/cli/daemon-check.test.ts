// strata daemon --check through the real CLI: a good configuration summarized (policies, the VMs
// each covers from the VM inventory, next run times), a bad one with every problem on its line.
import assert from "node:assert/strict";
import { promises as fs } from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { jitterOffset } from "../../src/server/schedule.js";
import { strata, strataOk, tempDir } from "../helpers/cli.js";

interface Summary {
  ok: boolean;
  policies: Array<{
    name: string;
    repository: string;
    schedule: string;
    nextSlot: string;
    vms: Array<{ name: string; source: string; nextRun: string }>;
    verify?: { nextRun: string };
  }>;
  uncovered: string[];
}

test("daemon --check summarizes a good configuration: the VMs of each policy and their next runs", async (t) => {
  const dir = tempDir(t);
  const inventory = join(dir, "vms.yaml");
  await fs.writeFile(
    inventory,
    `vms:
  web-a: { qmp: ${dir}/web-a.qmp, tags: [production] }
  web-test: { qmp: ${dir}/web-test.qmp }
  db1: { qmp: ${dir}/db1.qmp, tags: [production, sql] }
  lab1: { qmp: ${dir}/lab1.qmp }
`,
  );
  const config = join(dir, "strata.yaml");
  await fs.writeFile(
    config,
    `inventory: ${inventory}
vms:
  web-lab: { sources: ["file:${dir}/web-lab.img"] }
repositories:
  main: { path: ${dir}/repo }
policies:
  web:
    repository: main
    vms: { globs: ["web-*"], exclude: ["*-test"] }
    schedule: every 15m
    jitter: 5m
    verify: { schedule: "0 4 * * *" }
  prod:
    repository: main
    vms: { tags: [sql] }
    schedule: "0 2 * * *"
`,
  );
  const before = Date.now();
  const r = await strataOk(["daemon", "--check", "--config", config, "--json"]);
  const s = JSON.parse(r.stdout) as Summary;
  assert.equal(s.ok, true);
  const web = s.policies.find((p) => p.name === "web")!;
  const prod = s.policies.find((p) => p.name === "prod")!;
  assert.deepEqual(
    web.vms.map((v) => [v.name, v.source]),
    [
      ["web-a", "vm:web-a"],
      ["web-lab", `file:${dir}/web-lab.img`],
    ],
    "the inventory's VMs and those the file names by their sources",
  );
  assert.deepEqual(
    prod.vms.map((v) => v.name),
    ["db1"],
  );
  assert.ok(s.uncovered.includes("lab1") && s.uncovered.includes("web-test"));
  // Next runs: the next 15-minute slot plus web-a's own jitter offset, in the future.
  const slot = Date.parse(web.nextSlot);
  assert.equal(slot % 900_000, 0);
  assert.ok(slot > before && slot <= before + 900_000 + 1000);
  const due = Date.parse(web.vms[0]!.nextRun);
  const offset = Math.floor(jitterOffset("web/web-a/backup", 300_000) / 1000) * 1000;
  assert.ok(
    due === slot + offset || due === slot - 900_000 + offset,
    `web-a is due at a slot plus its offset (${web.vms[0]!.nextRun}, slot ${web.nextSlot})`,
  );
  assert.ok(due > before - 1000);
  assert.ok(Date.parse(web.verify!.nextRun) > before);

  const text = await strataOk(["daemon", "--check", "--config", config]);
  assert.match(text.stdout, /valid; 1 repository, 2 policies/);
  assert.match(
    text.stdout,
    /policy web -> repository main\n {2}schedule {3}every 15m, jitter 5m; next slot /,
  );
  assert.match(text.stdout, /web-a\s+\S+Z\s+vm:web-a/);
  assert.match(text.stdout, /VMs no policy covers: .*lab1/);
  assert.match(text.stdout, /\nAPI: unix socket \/run\/strata\/strata\.sock\n/);
});

test("daemon --check prints every problem with its line and exits 2", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  await fs.writeFile(
    config,
    `repositories:
  main: { path: relative/repo }
policies:
  web:
    repository: nope
    vms: all
    schedule: every 5 minutes
    retention: { keep-dayly: 7 }
  db:
    repository: main
    vms: { names: [db1] }
    schedule: "0 2 * * *"
    limits: { nice: 40 }
`,
  );
  const r = await strata(["daemon", "--check", "--config", config]);
  assert.equal(r.code, 2, r.stderr);
  const expected: Array<[number, RegExp]> = [
    [2, /path must be an absolute path/],
    [5, /unknown repository "nope"/],
    [7, /"every N<unit>"/],
    [8, /unknown setting "keep-dayly"/],
    [13, /nice must be at most 19/],
  ];
  for (const [line, message] of expected) {
    const found = r.stderr.split("\n").find((l) => l.includes(`${config}:${line}:`));
    assert.ok(found && message.test(found), `line ${line} reported as ${message}:\n${r.stderr}`);
  }
  assert.match(r.stderr, /5 problem\(s\)/);

  const j = await strata(["daemon", "--check", "--config", config, "--json"]);
  assert.equal(j.code, 2);
  const doc = JSON.parse(j.stdout) as {
    ok: boolean;
    problems: Array<{ line: number; col: number; path: string }>;
  };
  assert.equal(doc.ok, false);
  assert.deepEqual(
    doc.problems.map((p) => p.line),
    [2, 5, 7, 8, 13],
  );
  assert.deepEqual(doc.problems[3], {
    line: 8,
    col: 18,
    path: "policies.web.retention.keep-dayly",
    message: 'unknown setting "keep-dayly"',
  });

  const missing = await strata(["daemon", "--check", "--config", join(dir, "none.yaml")]);
  assert.equal(missing.code, 2);
  assert.match(missing.stderr, /cannot read the configuration .*none\.yaml/);
  // The service refuses to start on the same file, with the same problems.
  const noCheck = await strata(["daemon", "--config", config]);
  assert.equal(noCheck.code, 2);
  assert.match(
    noCheck.stderr,
    /strata\.yaml: 5 problem\(s\):\n.*strata\.yaml:2:17: repositories\.main\.path/,
  );
});

test("daemon --check places notification problems on their lines", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  await fs.writeFile(
    config,
    `repositories:
  main: { path: /backup/strata }
policies:
  web: { repository: main, vms: all, schedule: every 1h }
notifications:
  webhooks:
    - url: hooks.example.com/in
  email:
    host: smtp.example.com
    from: strata@example.com
    to: [ops]
    events: [failure, explosion]
`,
  );
  const r = await strata(["daemon", "--check", "--config", config]);
  assert.equal(r.code, 2, r.stderr);
  const expected: Array<[number, RegExp]> = [
    [7, /notifications\.webhooks\.0\.url: url must be an http:\/\/ or https:\/\/ URL/],
    [11, /an address in to must be an e-mail address/],
    [12, /an event must be one of failure, recovered, rpo-missed, rpo-met/],
  ];
  for (const [line, message] of expected) {
    const found = r.stderr.split("\n").find((l) => l.includes(`${config}:${line}:`));
    assert.ok(found && message.test(found), `line ${line} reported as ${message}:\n${r.stderr}`);
  }
  assert.match(r.stderr, /3 problem\(s\)/);
});
