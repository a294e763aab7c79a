import assert from "node:assert/strict";
import { test } from "node:test";
import { type ConfigProblem, checkConfig, globRegExp, repoArgs, selectVms } from "./config.js";

/** The problems of `text`, as "LINE:COL path: message". */
function problems(text: string): ConfigProblem[] {
  const r = checkConfig(text, "strata.yaml");
  assert.equal(r.config, undefined, "the configuration is refused");
  return r.problems;
}

/** Asserts that a problem matching `message` is reported at `line` (and `col` when given). */
function hasProblem(ps: ConfigProblem[], line: number, message: RegExp, col?: number): void {
  const found = ps.find((p) => p.line === line && message.test(`${p.path}: ${p.message}`));
  assert.ok(
    found && (col === undefined || found.col === col),
    `expected a problem at line ${line}${col === undefined ? "" : `:${col}`} matching ${message}; got:\n${ps
      .map((p) => `  ${p.line}:${p.col} ${p.path}: ${p.message}`)
      .join("\n")}`,
  );
}

const GOOD = `# a full configuration
timezone: Europe/Berlin
catalog: /var/lib/strata/catalog.db
inventory: /etc/strata/vms.yaml
repositories:
  main:
    path: /backup/strata
    password-file: /etc/strata/main.pass
  offsite:
    path: /mnt/offsite/strata
limits:
  jobs: 3
  jobs-per-repository: 2
  bandwidth: 400
  job-bandwidth: 150
  worker-threads: 2
  nice: 12
  io-weight: 50
  io-read: 300
  io-write: 200
policies:
  web:
    repository: main
    vms:
      names: [web1]
      globs: ["web-*"]
      tags: [production]
      exclude: ["*-test"]
    schedule: every 15m
    jitter: 2m
    mode: snapshot
    quiesce: try
    retention: { keep-last: 4, keep-daily: 7, keep-weekly: 4, keep-monthly: 6 }
    verify: { schedule: "0 4 * * *", read-data: true }
    limits: { job-bandwidth: 100, nice: 15 }
  everything:
    repository: offsite
    vms: all
    schedule: "30 1 * * 1-5"
`;

test("a full configuration is read into policies with the host's limits under their own", () => {
  const r = checkConfig(GOOD, "strata.yaml");
  assert.deepEqual(r.problems, []);
  const c = r.config!;
  assert.equal(c.timezone, "Europe/Berlin");
  assert.equal(c.catalog, "/var/lib/strata/catalog.db");
  assert.deepEqual(c.repositories.get("main"), {
    name: "main",
    path: "/backup/strata",
    passwordFile: "/etc/strata/main.pass",
  });
  assert.deepEqual(c.repositories.get("offsite"), { name: "offsite", path: "/mnt/offsite/strata" });
  assert.deepEqual(c.limits, {
    jobs: 3,
    jobsPerRepository: 2,
    bandwidth: 400,
    jobBandwidth: 150,
    workerThreads: 2,
    nice: 12,
    ioWeight: 50,
    ioRead: 300,
    ioWrite: 200,
  });
  const web = c.policies.get("web")!;
  assert.equal(web.repository, "main");
  assert.deepEqual(web.vms, {
    all: false,
    names: ["web1"],
    globs: ["web-*"],
    tags: ["production"],
    exclude: ["*-test"],
  });
  assert.equal(web.schedule.kind, "every");
  assert.equal(web.jitterMs, 120_000);
  assert.deepEqual([web.mode, web.quiesce], ["snapshot", "try"]);
  // strata forget's own policy type.
  assert.deepEqual(web.retention, { last: 4, daily: 7, weekly: 4, monthly: 6 });
  assert.equal(web.verify?.readData, true);
  assert.equal(web.verify?.schedule.text, "0 4 * * *");
  // The kernel's I/O limits are the daemon process's, not a policy's.
  assert.deepEqual(web.limits, { jobBandwidth: 100, workerThreads: 2, nice: 15 });
  const all = c.policies.get("everything")!;
  assert.equal(all.vms.all, true);
  assert.equal(all.schedule.kind, "cron");
  assert.equal(all.jitterMs, 0);
  assert.equal(all.retention, undefined);
  assert.deepEqual(all.limits, { jobBandwidth: 150, workerThreads: 2, nice: 12 });
});

test("disk limits set on a policy are refused on their line: they hold for the daemon's whole process", () => {
  const ps = problems(`repositories:
  r: { path: /b }
limits: { io-read: 0 }
policies:
  p:
    repository: r
    vms: all
    schedule: every 1h
    limits:
      nice: 3
      io-weight: 20
      io-read: 10
`);
  hasProblem(ps, 3, /limits\.io-read: io-read must be more than 0 MiB\/s/);
  hasProblem(
    ps,
    11,
    /policies\.p\.limits\.io-weight: io-weight holds for the daemon's whole process: set it in the top-level limits/,
  );
  hasProblem(ps, 12, /io-read holds for the daemon's whole process/);
  assert.equal(ps.length, 3, JSON.stringify(ps));
});

test("a minimal configuration gets the default limits", () => {
  const r = checkConfig(
    "repositories:\n  r: { path: /b }\npolicies:\n  p: { repository: r, vms: all, schedule: every 1h }\n",
    "x",
  );
  assert.deepEqual(r.problems, []);
  assert.deepEqual(r.config!.limits, { jobs: 2, jobsPerRepository: 1, nice: 10 });
});

test("every problem is reported with its own line: settings, values, references, unknown keys", () => {
  const ps = problems(`repositories:
  main:
    path: backup/strata
    pasword-file: /etc/strata/pass
limits:
  jobs: 0
  nice: 25
  io-weight: fast
policies:
  web:
    repository: mian
    vms: some
    schedule: "61 * * * *"
    jitter: soon
  db:
    repository: main
    vms:
      names: [db1]
      globs: ["db/*"]
    schedule: every 15m
    jitter: 20m
    retention: { keep-daily: 0 }
    mode: fast
    verify: { schedule: every 10s }
  nosched:
    repository: main
    vms: { exclude: ["x*"] }
`);
  hasProblem(ps, 3, /repositories\.main\.path: path must be an absolute path/, 11);
  hasProblem(ps, 4, /unknown setting "pasword-file"/, 5);
  hasProblem(ps, 6, /limits\.jobs: jobs must be at least 1/, 9);
  hasProblem(ps, 7, /limits\.nice: nice must be at most 19/);
  hasProblem(ps, 8, /io-weight must be a whole number/);
  hasProblem(ps, 11, /unknown repository "mian" \(this file has main\)/, 17);
  hasProblem(ps, 12, /vms must be "all" or a mapping/);
  hasProblem(ps, 13, /Invalid value for minute: 61/);
  hasProblem(ps, 14, /jitter must be a duration/);
  hasProblem(ps, 19, /globs\.0: a glob must be/);
  hasProblem(ps, 21, /jitter 20m must be shorter than the schedule's interval/);
  hasProblem(ps, 22, /keeps nothing/);
  hasProblem(ps, 23, /mode must be snapshot, pause or offline/);
  hasProblem(ps, 24, /verify\.schedule: schedule "every 10s" is shorter than the shortest/);
  hasProblem(ps, 26, /policies\.nosched\.schedule: "schedule" is required/);
  hasProblem(ps, 27, /selects no VM/);
  assert.equal(ps.length, 16, ps.map((p) => `${p.line}: ${p.message}`).join("\n"));
  // In the order of the file.
  assert.deepEqual(
    ps.map((p) => p.line),
    [...ps.map((p) => p.line)].sort((a, b) => a - b),
  );
});

test("top-level problems: missing sections, unknown keys, a bad time zone, bad names", () => {
  const ps = problems(`timezone: Mars/Olympus
polices:
  web: {}
repositories:
  "bad name": { path: /b }
`);
  hasProblem(ps, 1, /unknown time zone "Mars\/Olympus"/);
  hasProblem(ps, 2, /unknown setting "polices"/);
  hasProblem(ps, 5, /repository name "bad name" must be a plain name/, 3);
  hasProblem(ps, 1, /^policies: "policies" is required/);
  const empty = problems("repositories: {}\npolicies: {}\n");
  hasProblem(empty, 1, /no repositories/);
  hasProblem(empty, 2, /no policies/);
  const notMap = problems("- a\n- b\n");
  hasProblem(notMap, 1, /the file must be a mapping/);
});

test("YAML syntax errors are reported with their lines, every one", () => {
  const ps = problems(`repositories:
  main: { path: /b }
  main: { path: /c }
policies:
  web: [1, 2
`);
  hasProblem(ps, 3, /Map keys must be unique/);
  assert.ok(ps.length >= 2, "the unclosed list is reported too");
  assert.ok(ps.some((p) => p.line >= 5 && /sequence/i.test(p.message)));
});

test("VM selection: names, globs, tags and exclusions", () => {
  const vms = [
    { name: "web1" },
    { name: "web-a" },
    { name: "web-test" },
    { name: "db1", tags: ["production"] },
    { name: "db2", tags: ["staging"] },
  ];
  const names = (sel: Partial<Parameters<typeof selectVms>[0]>) =>
    selectVms({ all: false, names: [], globs: [], tags: [], exclude: [], ...sel }, vms).map((v) => v.name);
  assert.deepEqual(names({ all: true }), ["web1", "web-a", "web-test", "db1", "db2"]);
  assert.deepEqual(names({ names: ["db2", "nope"] }), ["db2"]);
  assert.deepEqual(names({ globs: ["web-*"], exclude: ["*-test"] }), ["web-a"]);
  assert.deepEqual(names({ tags: ["production"], globs: ["web?"] }), ["web1", "db1"]);
  assert.deepEqual(names({ globs: ["db[!1]"] }), ["db2"]);
  assert.deepEqual(names({ all: true, exclude: ["web*"] }), ["db1", "db2"]);
  assert.ok(globRegExp("a.b").test("a.b") && !globRegExp("a.b").test("axb"), "a dot is a dot");
});

test("api and vms: listeners and VMs named by their sources are read; a cert without its key is refused", () => {
  const base = `repositories:
  main: { path: /backup }
policies:
  p: { repository: main, vms: all, schedule: every 1h }
`;
  const c = checkConfig(
    `${base}api:
  https: { listen: "127.0.0.1:8443" }
vms:
  lab1: { sources: ["file:/images/lab1.img"], tags: [lab] }
`,
    "strata.yaml",
  ).config!;
  assert.deepEqual(c.api, {
    socket: "/run/strata/strata.sock",
    https: { host: "127.0.0.1", port: 8443 },
    restoreTargets: ["/var/lib/strata/restores"],
    restoreDevices: [],
  });
  assert.deepEqual(c.vms.get("lab1"), { name: "lab1", sources: ["file:/images/lab1.img"], tags: ["lab"] });
  const ps = problems(`${base}api:
  socket: run/strata.sock
  https: { listen: 70000, cert: /etc/strata/api.crt }
vms:
  lab1: { sources: [] }
`);
  hasProblem(ps, 6, /api\.socket: socket must be an absolute path/);
  hasProblem(ps, 7, /api\.https\.listen: listen must be a port .* not "70000"/);
  hasProblem(ps, 7, /api\.https: give both cert and key/);
  hasProblem(ps, 9, /vms\.lab1\.sources: sources must name at least one source/);
});

test("notifications: sinks, events, retries and timeouts are read; each problem is on its line", () => {
  const ok = checkConfig(
    `${GOOD}notifications:
  retries: 5
  timeout: 20s
  events: [failure, rpo-missed]
  webhooks:
    - url: https://hooks.example.com/strata?token=x
      headers: { X-Token: abc }
    - url: http://10.0.0.9:8080/in
      events: [recovered]
  email:
    host: smtp.example.com
    user: strata
    password-file: /etc/strata/smtp.pass
    from: strata@backup1.example.com
    to: [ops@example.com]
`,
    "strata.yaml",
  );
  assert.deepEqual(ok.problems, []);
  assert.deepEqual(ok.config?.notifications, {
    webhooks: [
      {
        url: "https://hooks.example.com/strata?token=x",
        headers: { "X-Token": "abc" },
        events: ["failure", "rpo-missed"],
      },
      { url: "http://10.0.0.9:8080/in", headers: {}, events: ["recovered"] },
    ],
    email: {
      host: "smtp.example.com",
      port: 587,
      tls: false,
      user: "strata",
      passwordFile: "/etc/strata/smtp.pass",
      from: "strata@backup1.example.com",
      to: ["ops@example.com"],
      events: ["failure", "rpo-missed"],
    },
    retries: 5,
    timeoutMs: 20_000,
    rpoCheckMs: 60_000,
  });
  const lines = GOOD.split("\n").length - 1;
  const ps = problems(`${GOOD}notifications:
  retries: 50
  timeout: 2h
  webhooks:
    - url: ftp://example.com/x
      headers: { "Bad Header": "x" }
      events: [fire]
  email:
    host: smtp.example.com
    user: strata
    from: not-an-address
    to: []
`);
  hasProblem(ps, lines + 2, /notifications\.retries: retries must be at most 10/);
  hasProblem(ps, lines + 3, /notifications\.timeout: timeout must be from 1s to 5m/);
  hasProblem(ps, lines + 5, /url must be an http:\/\/ or https:\/\/ URL/);
  hasProblem(ps, lines + 6, /header names \(tokens such as X-Token\)/);
  hasProblem(ps, lines + 7, /an event must be one of failure, recovered, rpo-missed, rpo-met/);
  hasProblem(ps, lines + 11, /from must be an e-mail address/);
  hasProblem(ps, lines + 12, /to must name at least one address/);
  hasProblem(ps, lines + 9, /give both user and password-file, or neither/);
  hasProblem(problems(`${GOOD}notifications: { retries: 1 }\n`), lines + 1, /nothing would be sent/);
});

test("S3 repositories: url, credentials file and read cache are read; immutability per policy", () => {
  const r = checkConfig(
    `repositories:
  main: { path: /backup/strata }
  off:
    url: s3:https://s3.example.com:7480/backups/host1
    credentials-file: /etc/strata/s3.cred
    password-file: /etc/strata/off.pass
    cache-dir: /var/cache/strata
    cache-size: 2G
  off2: { url: "s3:http://10.0.0.5:80/bucket2/", cache-size: 0 }
policies:
  web:
    repository: off
    vms: all
    schedule: every 1h
    immutable: { for: 30d, mode: governance }
  db:
    repository: off2
    vms: all
    schedule: every 1h
    immutable: { for: 90s }
  local:
    repository: main
    vms: all
    schedule: every 1h
`,
    "strata.yaml",
  );
  assert.deepEqual(r.problems, []);
  const c = r.config!;
  assert.deepEqual(c.repositories.get("off"), {
    name: "off",
    path: "s3:https://s3.example.com:7480/backups/host1",
    passwordFile: "/etc/strata/off.pass",
    s3: { credentialsFile: "/etc/strata/s3.cred", cacheDir: "/var/cache/strata", cacheBytes: 2 * 1024 ** 3 },
  });
  // The URL as the store names itself: the catalog's restore points of it are found by it.
  assert.deepEqual(c.repositories.get("off2"), {
    name: "off2",
    path: "s3:http://10.0.0.5/bucket2",
    s3: { cacheBytes: 0 },
  });
  assert.deepEqual(c.repositories.get("main"), { name: "main", path: "/backup/strata" });
  assert.deepEqual(c.policies.get("web")!.immutable, { mode: "GOVERNANCE", seconds: 30 * 86_400 });
  assert.deepEqual(
    c.policies.get("db")!.immutable,
    { mode: "COMPLIANCE", seconds: 90 },
    "compliance by default",
  );
  assert.equal(c.policies.get("local")!.immutable, undefined);
});

test("S3 repository and immutability problems are reported on their lines", () => {
  const ps = problems(`repositories:
  both: { path: /backup/a, url: "s3:https://h/bucket" }
  neither: { password-file: /etc/strata/p }
  badurl:
    url: s3:ftp://h/bucket
  nobucket: { url: "s3:https://h/" }
  secret: { url: "s3:https://key:secret@h/bucket" }
  local:
    path: /backup/b
    credentials-file: /etc/strata/s3.cred
    cache-size: 1G
  off:
    url: s3:https://h/bucket
    credentials-file: s3.cred
    cache-size: lots
policies:
  a:
    repository: local
    vms: all
    schedule: every 1h
    immutable: { for: 30d }
  b:
    repository: off
    vms: all
    schedule: every 1h
    immutable: { for: 1500ms, mode: forever }
  c:
    repository: off
    vms: all
    schedule: every 1h
    immutable: 30d
`);
  hasProblem(ps, 2, /repositories\.both\.url: give path \(a directory\) or url \(an S3 bucket\), not both/);
  hasProblem(ps, 3, /repositories\.neither: give path \(a directory\) or url/);
  hasProblem(
    ps,
    5,
    /repositories\.badurl\.url: bad S3 repository "s3:ftp:\/\/h\/bucket": the scheme must be http or https/,
  );
  hasProblem(ps, 6, /nobucket\.url: .*no bucket/);
  hasProblem(ps, 7, /secret\.url: .*credentials do not belong in the URL/);
  hasProblem(
    ps,
    10,
    /repositories\.local\.credentials-file: credentials-file is for an S3 repository \(url\), not a directory/,
    5,
  );
  hasProblem(ps, 11, /repositories\.local\.cache-size: cache-size is for an S3 repository/);
  hasProblem(ps, 14, /off\.credentials-file: credentials-file must be an absolute path/);
  hasProblem(ps, 15, /off\.cache-size: cache-size must be a size such as 512M or 2G, not "lots"/);
  hasProblem(
    ps,
    21,
    /policies\.a\.immutable: repository local is a directory: only an S3 repository \(url, a bucket with Object Lock\) keeps restore points immutable/,
    5,
  );
  hasProblem(ps, 26, /immutable\.for: immutable for must be whole seconds, at least 1s/);
  hasProblem(ps, 26, /immutable\.mode: immutable mode must be compliance or governance/);
  hasProblem(ps, 31, /policies\.c\.immutable: immutable must be a mapping of for \(a duration\) and mode/);
  assert.equal(ps.length, 13, ps.map((p) => `${p.line}: ${p.path}: ${p.message}`).join("\n"));
});

test("cdp: journal-dir, window and fold are read; their problems are refused on their lines", () => {
  const base = `repositories:
  main: { path: /backup/strata }
vms:
  img1: { sources: ["file:/var/lib/images/img1.img"] }
  live1: { sources: ["qmp:/run/live1.qmp,qga=/run/live1.qga"] }
policies:
  live:
    repository: main
    vms: { names: [live1] }
    schedule: "0 3 * * *"
    cdp:
`;
  const ok = checkConfig(
    `${base}      journal-dir: /var/lib/strata/journal\n      window: 24h\n      fold: 15m\n`,
    "s.yaml",
  );
  assert.deepEqual(ok.problems, []);
  assert.deepEqual(ok.config?.policies.get("live")?.cdp, {
    journalDir: "/var/lib/strata/journal",
    windowMs: 86_400_000,
    foldMs: 900_000,
  });
  const bare = checkConfig(`${base}      journal-dir: /srv/j\n`, "s.yaml");
  assert.deepEqual(bare.config?.policies.get("live")?.cdp, { journalDir: "/srv/j" });
  hasProblem(
    problems(`${base}      journal-dir: var/journal\n`),
    12,
    /cdp\.journal-dir: journal-dir must be an absolute path/,
  );
  hasProblem(
    problems(`${base}      window: 24h\n      fold: 15m\n`),
    12,
    /cdp\.journal-dir: "journal-dir" is required/,
  );
  hasProblem(
    problems(`${base}      journal-dir: /j\n      window: 24h\n`),
    13,
    /cdp\.window: cdp window needs fold/,
  );
  hasProblem(
    problems(`${base}      journal-dir: /j\n      window: 5m\n      fold: 15m\n`),
    13,
    /window must be at least as long as fold/,
  );
  hasProblem(
    problems(`${base}      journal-dir: /j\n      fold: 10ms\n`),
    13,
    /cdp fold must be at least 1s/,
  );
  hasProblem(
    problems(`${base}      journal-dir: /j\n      window: soon\n      fold: 1m\n`),
    13,
    /cdp window must be a duration/,
  );
  hasProblem(problems(`${base}      journal-dir: /j\n      keep: 3\n`), 13, /unknown setting "keep"/);
  // A VM the file names by an image file is no running QEMU VM: refused on the policy's cdp.
  const img = base.replace("names: [live1]", "names: [live1, img1]");
  hasProblem(
    problems(`${img}      journal-dir: /j\n`),
    11,
    /VM img1 is named by file:\/var\/lib\/images\/img1\.img: cdp needs a running QEMU VM/,
  );
  const all = base.replace("vms: { names: [live1] }", "vms: all");
  hasProblem(problems(`${all}      journal-dir: /j\n`), 11, /VM img1 .*cdp needs a running QEMU VM/);
  assert.deepEqual(
    checkConfig(
      `${all.replace("vms: all", 'vms: { all: true, exclude: ["img*"] }')}      journal-dir: /j\n`,
      "s.yaml",
    ).problems,
    [],
  );
});

test('verify read-data: true, false, or "1/T" for a rotating T-th of the chunks per run; anything else on its line', () => {
  const policy = (readData: string) => `repositories:
  main: { path: /backup/strata }
policies:
  p:
    repository: main
    vms: all
    schedule: every 1h
    verify: { schedule: "0 4 * * *", read-data: ${readData} }
`;
  const ok = checkConfig(policy("1/7"), "strata.yaml");
  assert.deepEqual(ok.problems, []);
  const v = ok.config!.policies.get("p")!.verify!;
  assert.equal(v.readData, false);
  assert.equal(v.readDataParts, 7);
  assert.equal(
    checkConfig(policy("true"), "strata.yaml").config!.policies.get("p")!.verify!.readDataParts,
    undefined,
  );
  for (const bad of ["2/7", "1/1", "1/10000", "half", "0.5"])
    hasProblem(problems(policy(bad)), 8, /read-data must be true, false, or "1\/T"/);
});

test("a repository's options for the strata children the daemon starts name its S3 credentials and cache", () => {
  assert.deepEqual(repoArgs({ name: "local", path: "/backup/strata", passwordFile: "/etc/strata/p" }), [
    "--repo",
    "/backup/strata",
    "--password-file",
    "/etc/strata/p",
  ]);
  assert.deepEqual(
    repoArgs({
      name: "offsite",
      path: "s3:https://rgw.example:7480/strata",
      s3: { credentialsFile: "/etc/strata/s3.cred", cacheDir: "/var/cache/strata", cacheBytes: 0 },
    }),
    [
      "--repo",
      "s3:https://rgw.example:7480/strata",
      "--s3-credentials",
      "/etc/strata/s3.cred",
      "--s3-cache-dir",
      "/var/cache/strata",
      "--s3-cache-size",
      "0",
    ],
  );
});
