/**
 * The web UI's tests: a real `strata daemon` (child process) serving the built UI over HTTPS
 * on a free port, and Debian's chromium driven headless by playwright-core (no browser
 * download). Every page opened here records console errors and uncaught page errors; the tests
 * assert there are none.
 */
import assert from "node:assert/strict";
import { existsSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from "node:fs";
import { request } from "node:https";
import { createServer } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, type TestContext } from "node:test";
import { type Browser, type BrowserContext, chromium, type Page } from "playwright-core";
import { collect, startStrata, strataOk } from "../helpers/cli.js";

export const CHROMIUM = "/usr/bin/chromium";

export async function launchBrowser(): Promise<Browser> {
  assert.ok(existsSync(CHROMIUM), `${CHROMIUM} is missing: apt-get install chromium (scripts/deps/apt.txt)`);
  return chromium.launch({ executablePath: CHROMIUM, args: ["--disable-gpu", "--disable-dev-shm-usage"] });
}

/** A free TCP port on 127.0.0.1 (asked of the kernel, then released for the daemon). */
export function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = createServer();
    s.once("error", reject);
    s.listen(0, "127.0.0.1", () => {
      const port = (s.address() as { port: number }).port;
      s.close(() => resolve(port));
    });
  });
}

export interface RunningDaemon {
  url: string;
  socket: string;
  catalog: string;
  stateDir: string;
  /** The daemon's self-signed certificate, for Node clients. */
  ca: Buffer;
  stop(): Promise<void>;
  output(): string;
}

/** A temporary folder for a whole test file: call at the module's top level (not in a hook). */
export function fileTempDir(stop: () => Promise<void> | void): string {
  const dir = mkdtempSync(join(tmpdir(), "strata-ui-"));
  after(async () => {
    await stop();
    rmSync(dir, { recursive: true, force: true });
  });
  return dir;
}

/**
 * Writes `yaml` (which must name `catalog`, `state-dir` and the api socket) with an HTTPS
 * listener on a free port added, starts the daemon, and waits for HTTPS to answer.
 */
export async function startDaemon(
  dir: string,
  yaml: string,
  paths: { catalog: string; stateDir: string; socket: string },
  env: Record<string, string> = {},
): Promise<RunningDaemon> {
  const port = await freePort();
  const config = join(dir, "strata.yaml");
  writeFileSync(
    config,
    yaml.replace(/^api: \{ socket: (.*) \}$/m, `api: { socket: $1, https: { listen: "127.0.0.1:${port}" } }`),
  );
  const child = startStrata(["daemon", "--config", config], { env });
  const out = collect(child);
  const stop = async () => {
    if (child.exitCode !== null || child.signalCode !== null) return;
    child.kill("SIGTERM");
    const timer = setTimeout(() => child.kill("SIGKILL"), 10_000);
    await out.result;
    clearTimeout(timer);
  };
  const end = Date.now() + 60_000;
  while (!/HTTPS on 127\.0\.0\.1:\d+/.test(out.stdout)) {
    if (Date.now() > end || child.exitCode !== null) {
      await stop();
      throw new Error(`the daemon did not start HTTPS\nstdout:\n${out.stdout}\nstderr:\n${out.stderr}`);
    }
    await new Promise((r) => setTimeout(r, 100));
  }
  return {
    url: `https://127.0.0.1:${port}`,
    socket: paths.socket,
    catalog: paths.catalog,
    stateDir: paths.stateDir,
    ca: readFileSync(join(paths.stateDir, "api-cert.pem")),
    stop,
    output: () => `stdout:\n${out.stdout}\nstderr:\n${out.stderr}`,
  };
}

/** A token of `role` made by the CLI in the daemon's catalog. */
export async function makeToken(catalog: string, role: string, name = role): Promise<string> {
  const r = await strataOk(["token", "create", "--role", role, "--name", name, "--catalog", catalog]);
  return r.stdout.split("\n")[0]!;
}

export interface HttpAnswer {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: Buffer;
}

/** One HTTPS request to the daemon, raw path as given (no normalisation by a URL parser). */
export function fetchRaw(
  d: RunningDaemon,
  path: string,
  options: { method?: string; token?: string } = {},
): Promise<HttpAnswer> {
  const u = new URL(d.url);
  return new Promise((resolve, reject) => {
    const req = request(
      {
        host: u.hostname,
        port: u.port,
        path,
        method: options.method ?? "GET",
        ca: d.ca,
        servername: "localhost",
        headers: options.token ? { Authorization: `Bearer ${options.token}` } : {},
      },
      (res) => {
        const parts: Buffer[] = [];
        res.on("data", (b: Buffer) => parts.push(b));
        res.on("end", () =>
          resolve({ status: res.statusCode ?? 0, headers: res.headers, body: Buffer.concat(parts) }),
        );
        res.on("error", reject);
      },
    );
    req.on("error", reject);
    req.end();
  });
}

export interface WatchedPage {
  page: Page;
  context: BrowserContext;
  /** Console errors and page errors seen so far. */
  errors: string[];
}

/** A new browser context and page on the daemon, recording every console and page error. */
export async function openPage(t: TestContext, browser: Browser, d: RunningDaemon): Promise<WatchedPage> {
  const context = await browser.newContext({
    ignoreHTTPSErrors: true,
    baseURL: d.url,
    viewport: { width: 1366, height: 900 },
    acceptDownloads: true,
  });
  t.after(() => context.close());
  const page = await context.newPage();
  page.setDefaultTimeout(30_000);
  const errors: string[] = [];
  page.on("console", (m) => {
    if (m.type() === "error") errors.push(`console: ${m.text()}`);
  });
  page.on("pageerror", (e) => errors.push(`page error: ${e.message}`));
  return { page, context, errors };
}

/** Logs in through the login form with `token`; waits for the role to show. */
export async function logIn(w: WatchedPage, token: string, role: string): Promise<void> {
  await w.page.goto("/");
  await w.page.getByLabel("API token").fill(token);
  await w.page.getByRole("button", { name: "Log in" }).click();
  await w.page
    .getByTestId("role")
    .filter({ hasText: `role ${role}` })
    .waitFor();
}

/** Where screenshots go: STRATA_UI_SCREENSHOTS=docs writes the README's docs/ui-*.png. */
export async function screenshot(w: WatchedPage, name: string): Promise<void> {
  const dir = process.env.STRATA_UI_SCREENSHOTS;
  if (!dir) return;
  await w.page.screenshot({ path: join(dir, `ui-${name}.png`), fullPage: false });
}
