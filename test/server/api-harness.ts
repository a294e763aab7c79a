/** The daemon's REST API over real HTTP for tests: an in-process daemon, its unix socket and HTTPS. */
import { readFileSync } from "node:fs";
import { request as httpRequest, type IncomingMessage } from "node:http";
import { request as httpsRequest } from "node:https";
import { join } from "node:path";
import type { TestContext } from "node:test";
import { ROLES } from "../../src/catalog/schema.js";
import { createToken } from "../../src/catalog/tokens.js";
import { ImageFileAdapter } from "../../src/hypervisor/images/adapter.js";
import { QemuAdapter } from "../../src/hypervisor/qemu/adapter.js";
import { AdapterRegistry } from "../../src/hypervisor/registry.js";
import { Api } from "../../src/server/api.js";
import { type Listening, listenApi } from "../../src/server/listen.js";
import type { JobRunner } from "../../src/server/runner.js";
import type { Daemon } from "../../src/server/service.js";
import { BIN } from "../helpers/cli.js";
import { daemonOf, type Setup, setup } from "./helpers.js";

export interface Reply {
  status: number;
  headers: Record<string, string | string[] | undefined>;
  body: unknown;
  text: string;
  bytes: Buffer;
}

export interface CallOptions {
  token?: string;
  via?: "unix" | "https";
  /** A JSON body. */
  body?: unknown;
}

export interface Harness {
  s: Setup;
  daemon: Daemon;
  api: Api;
  listening: Listening;
  logs: string[];
  ca: Buffer;
  call(method: string, path: string, options?: CallOptions): Promise<Reply>;
}

export interface HarnessOptions {
  runner?: (inner: JobRunner) => JobRunner;
  /** Before the daemon starts (images of the VMs made otherwise, ...). */
  prepare?: (s: Setup) => Promise<void>;
  mib?: number;
  /** api.restore-targets (default: the test's directory) and api.restore-devices (default: none). */
  restoreTargets?: (s: Setup) => string[];
  restoreDevices?: string[];
}

export async function harness(t: TestContext, o: HarnessOptions = {}): Promise<Harness> {
  const s = await setup(t, {
    vms: ["vm1"],
    policies: `  p:
    repository: main
    vms: all
    schedule: every 1h
    retention: { keep-last: 1 }`,
    ...(o.mib === undefined ? {} : { mib: o.mib }),
  });
  await o.prepare?.(s);
  s.config.api.https = { host: "127.0.0.1", port: 0 };
  s.config.api.restoreTargets = o.restoreTargets?.(s) ?? [s.dir];
  s.config.api.restoreDevices = o.restoreDevices ?? [];
  const logs: string[] = [];
  const log = (level: string, message: string) => logs.push(`${level}: ${message}`);
  const daemon = daemonOf(t, s, { log, ...(o.runner ? { runner: o.runner(s.runner) } : {}) });
  await daemon.start();
  const registry = new AdapterRegistry()
    .register(new ImageFileAdapter())
    .register(new QemuAdapter(join(s.dir, "vms.yaml")));
  const api = new Api({
    daemon,
    log,
    heartbeatMs: 200,
    data: { registry, stateDir: join(s.dir, "state"), strataCommand: [process.execPath, BIN] },
  });
  const listening = await listenApi(api, s.config.api, { stateDir: `${s.dir}/state`, log });
  t.after(() => listening.close());
  const ca = readFileSync(listening.https!.cert);
  const call: Harness["call"] = (method, path, options = {}) =>
    new Promise((resolve, reject) => {
      const headers: Record<string, string> = {};
      if (options.token !== undefined) headers.authorization = `Bearer ${options.token}`;
      const payload = options.body === undefined ? undefined : Buffer.from(JSON.stringify(options.body));
      if (payload) {
        headers["content-type"] = "application/json";
        headers["content-length"] = String(payload.length);
      }
      const done = (res: IncomingMessage) => {
        const chunks: Buffer[] = [];
        res.on("data", (d: Buffer) => chunks.push(d));
        res.on("error", reject);
        res.on("end", () => {
          const bytes = Buffer.concat(chunks);
          const text = bytes.toString("utf8");
          let body: unknown;
          try {
            body = JSON.parse(text);
          } catch {
            body = undefined;
          }
          resolve({ status: res.statusCode!, headers: res.headers, body, text, bytes });
        });
      };
      const req =
        (options.via ?? "https") === "unix"
          ? httpRequest({ socketPath: listening.socket, path, method, headers }, done)
          : httpsRequest(
              {
                host: "127.0.0.1",
                port: listening.https!.port,
                servername: "localhost",
                ca,
                path,
                method,
                headers,
              },
              done,
            );
      req.on("error", reject);
      req.end(payload);
    });
  return { s, daemon, api, listening, logs, ca, call };
}

export const tokens = (h: Harness) =>
  Object.fromEntries(ROLES.map((role) => [role, createToken(h.s.catalog, { role }).token])) as Record<
    (typeof ROLES)[number],
    string
  >;
