/**
 * Notifications: a webhook (HTTP POST of a JSON document) and e-mail over SMTP (nodemailer), on
 * a run that failed, a job's first success after a failure (recovered), a VM whose newest
 * restore point is older than its policy's RPO (rpo-missed) and one that is within it again
 * (rpo-met). The configuration's `notifications` section says where, and which events each sink
 * gets.
 *
 * A notifier never breaks a job: {@link Notifier.send} returns at once, each sink is tried in the
 * background, a try is bounded by the timeout, and a failed one is tried again `retries` times
 * with exponential backoff (1 s, 2 s, 4 s, ... at most 60 s apart); what still fails is logged
 * and dropped. A webhook answering 2xx is done; any other status or a network error is tried
 * again, except 4xx other than 408 and 429 (the request itself is wrong: retrying won't help).
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import { hostname } from "node:os";
import type { Transporter } from "nodemailer";
import type { Run } from "../catalog/catalog.js";
import type { LogLevel } from "../catalog/schema.js";
import { describeError } from "../util/errors.js";
import type { EmailConfig, NoticeKind, NotificationsConfig, WebhookConfig } from "./config.js";

/** What a notification says; the webhook's body is this document. */
export interface Notice {
  event: NoticeKind;
  /** ISO time the daemon noticed it. */
  time: string;
  host: string;
  /** One line for people (the e-mail's subject). */
  summary: string;
  job?: { id: number; policy: string; vm: string; kind: string; repository: string };
  run?: Pick<Run, "id" | "outcome" | "startedAt" | "endedAt" | "errorCode" | "error">;
  rpo?: {
    vm: string;
    policy: string;
    repository: string;
    rpoMs: number | null;
    ageMs: number | null;
    lastRestorePoint: string | null;
  };
}

export interface NotifierOptions {
  log: (level: LogLevel, message: string) => void;
  /** The first retry's delay (default 1000 ms), doubled each time up to 60 s. */
  retryBaseMs?: number;
}

/** nodemailer, loaded when e-mail is configured. */
function nodemailer(): typeof import("nodemailer") {
  return createRequire(import.meta.url)("nodemailer") as typeof import("nodemailer");
}

/** A try's failure that trying again won't mend. */
class Permanent extends Error {}

export class Notifier {
  private readonly pending = new Set<Promise<void>>();
  private mailer: Transporter | undefined;
  private closed = false;

  constructor(
    private readonly config: NotificationsConfig,
    private readonly o: NotifierOptions,
  ) {}

  /** A notice about a VM or a run, with the host and time filled in. */
  static notice(
    event: NoticeKind,
    summary: string,
    rest: Omit<Notice, "event" | "time" | "host" | "summary">,
  ): Notice {
    return { event, time: new Date().toISOString(), host: hostname(), summary, ...rest };
  }

  /** Sends `n` to every sink that wants its event, in the background. */
  send(n: Notice): void {
    if (this.closed) return;
    for (const w of this.config.webhooks)
      if (w.events.includes(n.event)) this.track(`webhook ${redact(w.url)}`, () => this.postWebhook(w, n));
    const e = this.config.email;
    if (e?.events.includes(n.event)) this.track(`e-mail to ${e.to.join(", ")}`, () => this.mail(e, n));
  }

  /** Resolves once every notification sent so far is delivered or given up. */
  async flush(): Promise<void> {
    while (this.pending.size > 0) await Promise.all([...this.pending]);
  }

  /** Stops retrying (what is in flight ends by its timeout) and closes the SMTP connections. */
  async close(): Promise<void> {
    this.closed = true;
    await this.flush();
    this.mailer?.close();
  }

  private track(what: string, attempt: () => Promise<void>): void {
    const p = this.deliver(what, attempt).finally(() => this.pending.delete(p));
    this.pending.add(p);
  }

  private async deliver(what: string, attempt: () => Promise<void>): Promise<void> {
    const tries = this.config.retries + 1;
    const base = this.o.retryBaseMs ?? 1000;
    for (let i = 1; i <= tries; i++) {
      try {
        await attempt();
        if (i > 1) this.o.log("info", `notification: ${what} delivered on try ${i}`);
        return;
      } catch (err) {
        const last = i === tries || err instanceof Permanent || this.closed;
        this.o.log(
          last ? "error" : "warn",
          `notification: ${what} failed (try ${i} of ${tries}): ${describeError(err)}${last ? "; given up" : ""}`,
        );
        if (last) return;
        await new Promise((r) => setTimeout(r, Math.min(base * 2 ** (i - 1), 60_000)));
      }
    }
  }

  private async postWebhook(w: WebhookConfig, n: Notice): Promise<void> {
    const res = await fetch(w.url, {
      method: "POST",
      headers: { ...w.headers, "content-type": "application/json", "user-agent": "strata" },
      body: JSON.stringify(n),
      signal: AbortSignal.timeout(this.config.timeoutMs),
      redirect: "error",
    });
    await res.body?.cancel();
    if (res.ok) return;
    const message = `HTTP ${res.status} ${res.statusText}`;
    if (res.status >= 400 && res.status < 500 && res.status !== 408 && res.status !== 429)
      throw new Permanent(message);
    throw new Error(message);
  }

  private transporter(e: EmailConfig): Transporter {
    if (this.mailer) return this.mailer;
    const pass =
      e.passwordFile === undefined ? undefined : readFileSync(e.passwordFile, "utf8").replace(/\r?\n$/, "");
    this.mailer = nodemailer().createTransport({
      host: e.host,
      port: e.port,
      secure: e.tls,
      ...(e.user === undefined ? {} : { auth: { user: e.user, pass: pass ?? "" } }),
      connectionTimeout: this.config.timeoutMs,
      greetingTimeout: this.config.timeoutMs,
      socketTimeout: this.config.timeoutMs,
    });
    return this.mailer;
  }

  private async mail(e: EmailConfig, n: Notice): Promise<void> {
    await this.transporter(e).sendMail({
      from: e.from,
      to: e.to,
      subject: `[strata ${n.host}] ${n.summary}`,
      text: `${n.summary}\n\n${JSON.stringify(n, null, 2)}\n`,
      headers: { "X-Strata-Event": n.event },
    });
  }
}

/** A URL for logs: without user and password, and without its query (tokens often live there). */
function redact(url: string): string {
  try {
    const u = new URL(url);
    return `${u.protocol}//${u.host}${u.pathname}`;
  } catch {
    return "(bad url)";
  }
}
