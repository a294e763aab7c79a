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
  assert.match(
    text.stdout,
    /\nAPI restores may write under \/var\/lib\/strata\/restores; onto devices none\n/,
  );
});

test("daemon --check: where API restores may write, summarized, and bad values on their lines", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  const text = (api: string) => `repositories:
  main: { path: ${dir}/repo }
policies:
  p: { repository: main, vms: all, schedule: every 1h }
api:
${api}`;
  await fs.writeFile(
    config,
    text("  restore-targets: [/srv/restores, /srv/vms]\n  restore-devices: [/dev/vg0/*]\n"),
  );
  const ok = await strataOk(["daemon", "--check", "--config", config]);
  assert.match(
    ok.stdout,
    /API restores may write under \/srv\/restores, \/srv\/vms; onto devices \/dev\/vg0\/\*/,
  );
  await fs.writeFile(
    config,
    text(`  restore-targets:
    - /srv/restores
    - srv/relative
    - /srv/../etc
  restore-devices: [/dev/vg0/*, /etc/passwd]
`),
  );
  const bad = await strata(["daemon", "--check", "--config", config]);
  assert.equal(bad.code, 2, bad.stderr);
  const expected: Array<[number, RegExp]> = [
    [8, /api\.restore-targets\.1: a restore target must be an absolute path/],
    [9, /api\.restore-targets\.2: a restore target must not have a "\.\." segment/],
    [10, /api\.restore-devices\.1: a restore device pattern must be under \/dev\//],
  ];
  for (const [line, message] of expected) {
    const found = bad.stderr.split("\n").find((l) => l.includes(`${config}:${line}:`) && message.test(l));
    assert.ok(found, `line ${line} reported as ${message}:\n${bad.stderr}`);
  }
  assert.match(bad.stderr, /3 problem\(s\)/);
  for (const [api, line, message] of [
    ["  restore-targets: []\n", 6, /restore-targets must name at least one directory/],
    ["  restore-targets: [/]\n", 6, /restore-targets must not allow \/ \(the whole host\)/],
    ["  restore-targets: /srv/restores\n", 6, /api\.restore-targets: .*list/],
  ] as const) {
    await fs.writeFile(config, text(api));
    const r = await strata(["daemon", "--check", "--config", config]);
    assert.equal(r.code, 2, r.stderr);
    assert.ok(
      r.stderr.split("\n").some((l) => l.includes(`${config}:${line}:`) && message.test(l)),
      `${api.trim()}: line ${line} reported as ${message}:\n${r.stderr}`,
    );
  }
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

test("daemon --check names how this host enforces disk limits, and refuses them on a policy, on their line", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  const text = (policyLimits: string) => `repositories:
  main: { path: ${dir}/repo }
limits: { io-read: 50, io-write: 40, io-weight: 20 }
policies:
  p:
    repository: main
    vms: { names: [web1] }
    schedule: every 1h
${policyLimits}`;
  await fs.writeFile(config, text(""));
  const ok = await strataOk(["daemon", "--check", "--config", config]);
  assert.match(ok.stdout, /host limits: .*io weight 20, disk reads 50 MiB\/s, disk writes 40 MiB\/s/);
  // This host: cgroup v2 with the io controller, else v1 blkio, else ioprio; each is named.
  assert.match(
    ok.stdout,
    /^disk limits by (cgroup v2 io\.max\/io\.weight|cgroup v1 blkio throttle|ioprio \(ionice\) only)/m,
  );
  await fs.writeFile(config, text("    limits: { nice: 15, io-read: 10 }\n"));
  const bad = await strata(["daemon", "--check", "--config", config]);
  assert.equal(bad.code, 2);
  assert.match(
    bad.stderr,
    /strata\.yaml:9:25: policies\.p\.limits\.io-read: io-read holds for the daemon's whole process: set it in the top-level limits/,
  );
});

test("daemon --check: a policy's boot verification, summarized, and its mistakes on their lines", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  await fs.writeFile(
    config,
    `vms:
  web1: { sources: ["file:${dir}/web1.img"] }
repositories:
  main: { path: ${dir}/repo }
policies:
  web:
    repository: main
    vms: all
    schedule: every 15m
    verify:
      schedule: "0 4 * * *"
      boot:
        schedule: "0 5 * * 0"
        timeout: 2m
        command: ["/bin/sh", "-c", "test -f /etc/hostname"]
`,
  );
  const j = JSON.parse((await strataOk(["daemon", "--check", "--config", config, "--json"])).stdout) as {
    policies: Array<{ verify: { boot: { schedule: string; timeoutMs: number; command: string[] } } }>;
  };
  assert.deepEqual(j.policies[0]!.verify.boot, {
    schedule: "0 5 * * 0",
    timeoutMs: 120_000,
    command: ["/bin/sh", "-c", "test -f /etc/hostname"],
  });
  const text = await strataOk(["daemon", "--check", "--config", config]);
  assert.match(
    text.stdout,
    /\n {2}boot {7}0 5 \* \* 0: each VM's newest restore point boots without a network; its agent must answer within 120 s, then \/bin\/sh -c test -f \/etc\/hostname must exit 0\n/,
  );

  await fs.writeFile(
    config,
    `repositories:
  main: { path: ${dir}/repo }
policies:
  web:
    repository: main
    vms: all
    schedule: every 15m
    verify:
      schedule: "0 4 * * *"
      boot:
        schedule: every 5 minutes
        timeout: 3s
        command: [sh, -c, "true"]
        network: bridge
`,
  );
  const r = await strata(["daemon", "--check", "--config", config, "--json"]);
  assert.equal(r.code, 2, r.stderr);
  const doc = JSON.parse(r.stdout) as { problems: Array<{ line: number; path: string; message: string }> };
  assert.deepEqual(
    doc.problems.map((p) => [p.line, p.path, p.message]),
    [
      [11, "policies.web.verify.boot.schedule", doc.problems[0]!.message],
      [12, "policies.web.verify.boot.timeout", "boot timeout must be at least 10s"],
      [13, "policies.web.verify.boot.command", "command's program must be an absolute path in the guest"],
      [14, "policies.web.verify.boot.network", 'unknown setting "network"'],
    ],
  );
  assert.match(doc.problems[0]!.message, /"every N<unit>"/);
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

test("daemon --check: S3 repositories without their secrets, each policy's immutability, and their mistakes on their lines", async (t) => {
  const dir = tempDir(t);
  const config = join(dir, "strata.yaml");
  const cred = join(dir, "s3.cred");
  await fs.writeFile(
    cred,
    "[default]\naws_access_key_id = AKIDSHOWN\naws_secret_access_key = SECRETNEVERSHOWN\n",
  );
  await fs.writeFile(
    config,
    `vms:
  web1: { sources: ["file:${dir}/web1.img"] }
repositories:
  off:
    url: s3:https://s3.example.com:7480/backups/host1
    credentials-file: ${cred}
    cache-dir: ${dir}/cache
    cache-size: 2G
  env: { url: "s3:http://10.0.0.5/bucket2", cache-size: 0 }
policies:
  web:
    repository: off
    vms: all
    schedule: every 15m
    immutable: { for: 30d, mode: governance }
  db:
    repository: env
    vms: all
    schedule: every 1h
`,
  );
  const json = (await strataOk(["daemon", "--check", "--config", config, "--json"])).stdout;
  assert.doesNotMatch(json, /SECRETNEVERSHOWN|AKIDSHOWN/, "the credentials file is named, never read out");
  const j = JSON.parse(json) as {
    repositories: Array<{ name: string; path: string; s3?: object }>;
    policies: Array<{ name: string; immutable?: { mode: string; seconds: number } }>;
  };
  assert.deepEqual(j.repositories[0], {
    name: "off",
    path: "s3:https://s3.example.com:7480/backups/host1",
    s3: { credentialsFile: cred, cacheDir: `${dir}/cache`, cacheBytes: 2 * 1024 ** 3 },
  });
  assert.deepEqual(
    j.policies.map((p) => [p.name, p.immutable]),
    [
      ["web", { mode: "GOVERNANCE", seconds: 2_592_000 }],
      ["db", undefined],
    ],
  );
  const text = (await strataOk(["daemon", "--check", "--config", config])).stdout;
  assert.doesNotMatch(text, /SECRETNEVERSHOWN|AKIDSHOWN/);
  assert.match(
    text,
    new RegExp(
      `\\n {2}off {2}s3:https://s3\\.example\\.com:7480/backups/host1 \\(not encrypted\\); S3 credentials from ${cred.replace(/[.]/g, "\\.")}, read cache 2\\.0 GiB in ${dir.replace(/[.]/g, "\\.")}/cache\\n`,
    ),
  );
  assert.match(
    text,
    /\n {2}env {2}s3:http:\/\/10\.0\.0\.5\/bucket2 \(not encrypted\); S3 credentials from the environment, read cache off\n/,
  );
  assert.match(text, /\n {2}immutable {2}GOVERNANCE for 30d after each backup \(S3 Object Lock\)\n/);

  await fs.writeFile(
    config,
    `repositories:
  main: { path: ${dir}/repo, cache-size: 1G }
  off: { url: "s3:https://s3.example.com/Bad_Bucket" }
policies:
  web:
    repository: main
    vms: all
    schedule: every 15m
    immutable: { for: 30d, mode: forever }
`,
  );
  const r = await strata(["daemon", "--check", "--config", config, "--json"]);
  assert.equal(r.code, 2, r.stderr);
  const doc = JSON.parse(r.stdout) as { problems: Array<{ line: number; path: string; message: string }> };
  assert.deepEqual(
    doc.problems.map((p) => [p.line, p.path]),
    [
      [2, "repositories.main.cache-size"],
      [3, "repositories.off.url"],
      [9, "policies.web.immutable"],
      [9, "policies.web.immutable.mode"],
    ],
  );
  assert.match(doc.problems[0]!.message, /cache-size is for an S3 repository \(url\), not a directory/);
  assert.match(doc.problems[1]!.message, /"Bad_Bucket" is not a valid bucket name/);
  assert.match(doc.problems[2]!.message, /repository main is a directory: only an S3 repository/);
  assert.match(doc.problems[3]!.message, /immutable mode must be compliance or governance/);
});
