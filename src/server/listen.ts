/**
 * The API's listeners: plain HTTP on a unix socket (mode 0600 in a 0700 folder: only the
 * daemon's user connects), and HTTPS on a TCP port when configured. Without a configured
 * certificate, a self-signed one (EC P-256, ten years, for the host's name, localhost and
 * 127.0.0.1) is made on first start by `openssl req` into the state folder and kept there;
 * its SHA-256 fingerprint is logged so that clients can pin it.
 */
import { X509Certificate } from "node:crypto";
import { chmodSync, existsSync, mkdirSync, readFileSync, renameSync, rmSync, unlinkSync } from "node:fs";
import { createServer as createHttpServer, type Server } from "node:http";
import { createServer as createHttpsServer } from "node:https";
import type { AddressInfo } from "node:net";
import { hostname } from "node:os";
import { dirname, join } from "node:path";
import { ErrorCode, StrataError } from "../util/errors.js";
import { runProgram, socketAccepts } from "../util/process.js";
import type { Api } from "./api.js";
import type { ApiConfig } from "./config.js";
import type { DaemonLog } from "./service.js";

export interface Listening {
  socket: string;
  https?: { host: string; port: number; cert: string; fingerprint: string };
  close(): Promise<void>;
}

/** A self-signed certificate and key in `dir` (made when missing); returns their paths. */
export async function selfSignedCertificate(
  dir: string,
  log: DaemonLog = () => {},
): Promise<{ cert: string; key: string }> {
  const cert = join(dir, "api-cert.pem");
  const key = join(dir, "api-key.pem");
  if (existsSync(cert) && existsSync(key)) return { cert, key };
  mkdirSync(dir, { recursive: true, mode: 0o700 });
  const host = hostname();
  const tmpCert = `${cert}.tmp`;
  const tmpKey = `${key}.tmp`;
  try {
    await runProgram("openssl", [
      "req",
      "-x509",
      "-newkey",
      "ec",
      "-pkeyopt",
      "ec_paramgen_curve:prime256v1",
      "-nodes",
      "-days",
      "3650",
      "-subj",
      `/CN=${host.replace(/[^A-Za-z0-9.-]/g, "-")}`,
      "-addext",
      `subjectAltName=DNS:${host.replace(/[^A-Za-z0-9.-]/g, "-")},DNS:localhost,IP:127.0.0.1,IP:::1`,
      "-keyout",
      tmpKey,
      "-out",
      tmpCert,
    ]);
    chmodSync(tmpKey, 0o600);
    renameSync(tmpKey, key);
    renameSync(tmpCert, cert);
  } catch (err) {
    rmSync(tmpKey, { force: true });
    rmSync(tmpCert, { force: true });
    throw new StrataError(
      ErrorCode.EXTERNAL,
      `cannot make the API's self-signed certificate in ${dir}: ${(err as Error).message} (install openssl, or configure api.https cert and key)`,
      { cause: err },
    );
  }
  log("info", `api: made a self-signed certificate ${cert}`);
  return { cert, key };
}

function listenOn(server: Server, ...args: unknown[]): Promise<void> {
  return new Promise((resolve, reject) => {
    server.once("error", reject);
    (server.listen as (...a: unknown[]) => void)(...args, () => {
      server.off("error", reject);
      resolve();
    });
  });
}

function closeServer(server: Server): Promise<void> {
  return new Promise((resolve) => {
    server.close(() => resolve());
    server.closeAllConnections();
  });
}

/** Starts the API's listeners as configured; `stateDir` holds a self-signed certificate. */
export async function listenApi(
  api: Api,
  config: ApiConfig,
  options: { stateDir: string; log?: DaemonLog },
): Promise<Listening> {
  const log = options.log ?? (() => {});
  const servers: Server[] = [];
  const closeAll = async () => {
    await Promise.all(servers.map(closeServer));
  };
  try {
    // The unix socket: a live one means another daemon; a dead one is left by a crash.
    const socket = config.socket;
    mkdirSync(dirname(socket), { recursive: true, mode: 0o700 });
    if (existsSync(socket)) {
      if (await socketAccepts(socket))
        throw new StrataError(
          ErrorCode.LOCKED,
          `another process answers on the API socket ${socket}: is a daemon running already?`,
        );
      unlinkSync(socket);
    }
    const unix = createHttpServer(api.handler("unix"));
    servers.push(unix);
    const oldMask = process.umask(0o177);
    try {
      await listenOn(unix, socket);
    } finally {
      process.umask(oldMask);
    }
    chmodSync(socket, 0o600);
    log("info", `api: HTTP on unix socket ${socket}`);
    let https: Listening["https"];
    if (config.https) {
      const files =
        config.https.cert !== undefined && config.https.key !== undefined
          ? { cert: config.https.cert, key: config.https.key }
          : await selfSignedCertificate(options.stateDir, log);
      let cert: Buffer;
      let key: Buffer;
      try {
        cert = readFileSync(files.cert);
        key = readFileSync(files.key);
      } catch (err) {
        throw new StrataError(
          ErrorCode.USAGE,
          `cannot read the API's certificate or key: ${(err as Error).message}`,
          { cause: err },
        );
      }
      const fingerprint = new X509Certificate(cert).fingerprint256;
      const server = createHttpsServer({ cert, key }, api.handler("https"));
      servers.push(server);
      await listenOn(server, config.https.port, config.https.host);
      const port = (server.address() as AddressInfo).port;
      https = { host: config.https.host, port, cert: files.cert, fingerprint };
      log("info", `api: HTTPS on ${config.https.host}:${port}, certificate SHA-256 ${fingerprint}`);
    }
    return {
      socket,
      ...(https === undefined ? {} : { https }),
      close: async () => {
        await closeAll();
        rmSync(socket, { force: true });
      },
    };
  } catch (err) {
    await closeAll();
    if (err instanceof StrataError) throw err;
    throw new StrataError(ErrorCode.IO_ERROR, `the API cannot listen: ${(err as Error).message}`, {
      cause: err,
    });
  }
}
