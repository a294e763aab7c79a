// Notifications from the daemon in-process over a real repository, to a real local HTTP server
// (the webhook) and a real SMTP server (npm smtp-server, with AUTH): a failed backup is told
// (the webhook's first try answered 500 and retried), the next success as recovered, a VM past
// its RPO as rpo-missed once, and within it again as rpo-met; each sink gets only its events.
// Failing sinks never break a job: a webhook always answering 503 gets exactly retries+1 tries,
// one answering 400 a single try, one that never answers is cut at the timeout, an SMTP port
// nobody listens on is given up after its tries; the backup succeeds all the same.
import assert from "node:assert/strict";
import { writeFileSync } from "node:fs";
import { createServer, type IncomingMessage, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { type TestContext, test } from "node:test";
import { SMTPServer } from "smtp-server";
import type { Notice } from "../../src/server/notify.js";
import { Notifier } from "../../src/server/notify.js";
import type { JobRunner } from "../../src/server/runner.js";
import { FakeClock } from "../../src/util/clock.js";
import { daemonOf, HOURLY_ALL, setup } from "./helpers.js";

const HOUR = 3_600_000;

interface Hook {
  url: string;
  received: Notice[];
  tries: number;
}

/** A webhook receiver answering the statuses of `answers` in turn (the last one after that); 0 never answers. */
async function webhook(t: TestContext, answers: number[]): Promise<Hook> {
  const hook: Hook = { url: "", received: [], tries: 0 };
  const server: Server = createServer((req: IncomingMessage, res) => {
    let body = "";
    req.setEncoding("utf8");
    req.on("data", (d: string) => {
      body += d;
    });
    req.on("end", () => {
      const status = answers[Math.min(hook.tries, answers.length - 1)]!;
      hook.tries++;
      assert.equal(req.method, "POST");
      assert.equal(req.headers["content-type"], "application/json");
      if (status === 0) return; // hang
      if (status === 200) hook.received.push(JSON.parse(body) as Notice);
      res.writeHead(status).end();
    });
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => {
    server.closeAllConnections();
    server.close();
  });
  hook.url = `http://127.0.0.1:${(server.address() as AddressInfo).port}/hook?token=secret`;
  return hook;
}

interface Mail {
  from: string;
  to: string[];
  user: string;
  text: string;
}

/** A real SMTP server on a free port, with AUTH PLAIN/LOGIN over plain TCP (no STARTTLS). */
async function smtp(t: TestContext): Promise<{ port: number; mails: Mail[] }> {
  const mails: Mail[] = [];
  const server = new SMTPServer({
    disabledCommands: ["STARTTLS"],
    allowInsecureAuth: true,
    onAuth(auth, _session, cb) {
      if (auth.username === "strata" && auth.password === "s3cret pass") cb(null, { user: "strata" });
      else cb(new Error("bad credentials"));
    },
    onData(stream, session, cb) {
      let text = "";
      stream.setEncoding("utf8");
      stream.on("data", (d: string) => {
        text += d;
      });
      stream.on("end", () => {
        mails.push({
          from: session.envelope.mailFrom ? session.envelope.mailFrom.address : "",
          to: session.envelope.rcptTo.map((r) => r.address),
          user: String(session.user),
          text,
        });
        cb();
      });
    },
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", r));
  t.after(() => new Promise<void>((r) => server.close(() => r())));
  return { port: (server.server.address() as AddressInfo).port, mails };
}

/** A runner that fails while `fail.on` is set, else runs the real one. */
function flaky(inner: JobRunner, fail: { on: boolean }): JobRunner {
  return {
    run: async (ctx) => {
      if (fail.on) throw new Error("the disk went away");
      return inner.run(ctx);
    },
  };
}

test("failure, recovered, rpo-missed and rpo-met reach a webhook (retried) and SMTP, each sink its events", async (t) => {
  const hook = await webhook(t, [500, 200]);
  const mail = await smtp(t);
  const clock = new FakeClock(Date.now() - 3 * HOUR);
  const s = await setup(t, {
    vms: ["vm1"],
    clock,
    policies: HOURLY_ALL,
    extra: `notifications:
  retries: 2
  timeout: 5s
  webhooks:
    - url: "http://placeholder.invalid/"
      headers: { X-Token: abc }
  email:
    host: 127.0.0.1
    port: 2525
    user: strata
    password-file: /placeholder/smtp.pass
    from: strata@backup1.example.com
    to: [ops@example.com, oncall@example.com]
    events: [failure, recovered]`,
  });
  assert.ok(s.config.notifications, "the file has notifications");
  // The helper checked a configuration with placeholders; fill in the servers now running.
  const passFile = join(s.dir, "smtp.pass");
  writeFileSync(passFile, "s3cret pass\n");
  s.config.notifications.webhooks[0]!.url = hook.url;
  s.config.notifications.email!.port = mail.port;
  s.config.notifications.email!.passwordFile = passFile;
  const logs: string[] = [];
  const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
  const notifier = new Notifier(s.config.notifications, { log, retryBaseMs: 50 });
  t.after(() => notifier.close());
  const fail = { on: true };
  const d = daemonOf(t, s, { clock, log, notifier, runner: flaky(s.runner, fail) });
  await d.start();
  const job = s.catalog.jobs().find((j) => j.kind === "backup")!;

  // A VM whose job is younger than one RPO is not late yet.
  d.checkRpo();
  await notifier.flush();
  assert.equal(hook.received.length, 0);
  clock.set(Date.now());
  d.checkRpo();
  d.checkRpo();
  await notifier.flush();
  assert.deepEqual(
    hook.received.map((n) => n.event),
    ["rpo-missed"],
    "told once, however often it is looked at",
  );
  assert.equal(hook.tries, 2, "the first try answered 500 and was tried again");
  assert.match(hook.received[0]!.summary, /vm1 \(policy p\) missed its RPO of 3600 s: no restore point/);
  assert.deepEqual(hook.received[0]!.rpo, {
    vm: "vm1",
    policy: "p",
    repository: "main",
    rpoMs: HOUR,
    ageMs: null,
    lastRestorePoint: null,
  });

  d.runNow(job.id);
  await d.idle();
  await notifier.flush();
  const failure = hook.received.at(-1)!;
  assert.equal(failure.event, "failure");
  assert.equal(failure.job?.vm, "vm1");
  assert.equal(failure.run?.outcome, "failed");
  assert.match(failure.run?.error ?? "", /the disk went away/);

  fail.on = false;
  d.runNow(job.id);
  await d.idle();
  await notifier.flush();
  assert.deepEqual(
    hook.received.map((n) => n.event),
    ["rpo-missed", "failure", "recovered", "rpo-met"],
  );
  const met = hook.received.at(-1)!;
  assert.match(met.rpo?.lastRestorePoint ?? "", /^vm1\//);
  // Another success is nothing new.
  d.runNow(job.id);
  await d.idle();
  await notifier.flush();
  assert.equal(hook.received.length, 4);

  // E-mail: only failure and recovered, to both addresses, authenticated.
  assert.equal(mail.mails.length, 2);
  for (const m of mail.mails) {
    assert.equal(m.from, "strata@backup1.example.com");
    assert.deepEqual(m.to, ["ops@example.com", "oncall@example.com"]);
    assert.equal(m.user, "strata");
  }
  assert.match(
    mail.mails[0]!.text,
    /Subject: \[strata [^\]]+\] p\/vm1\/backup: run \d+ failed: the disk went away/,
  );
  assert.match(mail.mails[0]!.text, /X-Strata-Event: failure/);
  assert.match(mail.mails[1]!.text, /X-Strata-Event: recovered/);
  assert.ok(
    logs.some((l) =>
      /notification: webhook http:\/\/127\.0\.0\.1:\d+\/hook failed \(try 1 of 3\): HTTP 500/.test(l),
    ),
    "the failed try is logged, without the URL's query",
  );
  assert.ok(!logs.some((l) => l.includes("token=secret")), "the URL's query is never logged");
});

test("failing notifiers never break a job; retries are bounded; a 4xx is not retried; a hung one is cut at the timeout", async (t) => {
  const down = await webhook(t, [503]);
  const refused = await webhook(t, [400]);
  const hung = await webhook(t, [0]);
  const s = await setup(t, {
    vms: ["vm1"],
    policies: HOURLY_ALL,
    extra: `notifications:
  retries: 2
  timeout: 1s
  events: [failure, recovered]
  webhooks:
    - url: "http://127.0.0.1:1/a"
    - url: "http://127.0.0.1:1/b"
    - url: "http://127.0.0.1:1/c"
  email:
    host: 127.0.0.1
    port: 1
    from: strata@example.com
    to: [ops@example.com]`,
  });
  const n = s.config.notifications!;
  n.webhooks[0]!.url = down.url;
  n.webhooks[1]!.url = refused.url;
  n.webhooks[2]!.url = hung.url;
  const logs: string[] = [];
  const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
  const notifier = new Notifier(n, { log, retryBaseMs: 20 });
  t.after(() => notifier.close());
  const fail = { on: true };
  const d = daemonOf(t, s, { log, notifier, runner: flaky(s.runner, fail) });
  await d.start();
  const job = s.catalog.jobs().find((j) => j.kind === "backup")!;
  d.runNow(job.id);
  await d.idle();
  const t0 = Date.now();
  await notifier.flush();
  const ms = Date.now() - t0;
  fail.on = false;
  d.runNow(job.id);
  await d.idle();
  assert.equal(s.catalog.lastRun(job.id)?.outcome, "success", "the job is not held up by its notifiers");
  await notifier.flush();
  assert.equal(down.tries, 6, "503: 3 tries (retries 2) for the failure, 3 for the recovery");
  assert.equal(refused.tries, 2, "400: one try each");
  assert.equal(hung.tries, 6);
  assert.ok(ms >= 2500 && ms < 20_000, `three tries cut at 1 s each, not ${ms} ms`);
  assert.equal(logs.filter((l) => /e-mail to ops@example\.com failed \(try \d of 3\)/.test(l)).length, 6);
  assert.equal(logs.filter((l) => /given up/.test(l)).length, 8, "each sink gives up on each notice");
  assert.ok(
    logs.some((l) =>
      /webhook http:\/\/127\.0\.0\.1:\d+\/hook failed \(try 3 of 3\): .*aborted|timeout/i.test(l),
    ),
  );
});
