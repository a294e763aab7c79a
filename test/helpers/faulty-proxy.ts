/**
 * An HTTP proxy in front of an S3 endpoint that fails on purpose, for the retry tests: it answers
 * chosen requests with 503 SlowDown itself, cuts chosen response bodies short (headers promise the
 * whole length), resets connections (before forwarding, or after: the server acted, its answer lost), answers only after `stallMs` (a server that hangs), or flips a byte of an upload's body on the way (the server
 * must refuse it by its Content-MD5). Requests are forwarded with their Host header unchanged, so
 * S3 signatures still hold.
 */
import { createServer, type IncomingMessage, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";

export type ProxyFault = "503" | "truncate" | "reset" | "corrupt-upload" | "stall" | "lose-answer";

export interface FaultyProxy {
  readonly endpoint: string;
  /** Picks the fault for the n-th request (1-based; `bytes` of body, read whole), or none. */
  plan: (n: number, method: string, url: string, bytes: number) => ProxyFault | undefined;
  readonly injected: Record<ProxyFault, number>;
  requests: number;
  /** How long a "stall" holds the answer back (default 3 s). */
  stallMs: number;
  /** Most requests that were open at once. */
  maxInFlight: number;
  /** Uploads (PUT with a body) that came without Content-MD5. */
  uploadsWithoutMd5: number;
  close(): Promise<void>;
}

function body(msg: IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const parts: Buffer[] = [];
    msg.on("data", (d: Buffer) => parts.push(d));
    msg.on("end", () => resolve(Buffer.concat(parts)));
    msg.on("error", reject);
  });
}

export async function startFaultyProxy(target: string): Promise<FaultyProxy> {
  const to = new URL(target);
  const proxy: FaultyProxy = {
    endpoint: "",
    plan: () => undefined,
    injected: { "503": 0, truncate: 0, reset: 0, "corrupt-upload": 0, stall: 0, "lose-answer": 0 },
    requests: 0,
    stallMs: 3000,
    uploadsWithoutMd5: 0,
    maxInFlight: 0,
    close: async () => {
      server.closeAllConnections();
      await new Promise<void>((r) => server.close(() => r()));
    },
  };
  let open = 0;
  const server: Server = createServer(async (req, res) => {
    const n = ++proxy.requests;
    proxy.maxInFlight = Math.max(proxy.maxInFlight, ++open);
    res.once("close", () => open--);
    let input = await body(req);
    if (req.method === "PUT" && input.length > 0 && req.headers["content-md5"] === undefined)
      proxy.uploadsWithoutMd5++;
    const fault = proxy.plan(n, req.method ?? "", req.url ?? "", input.length);
    if (fault === "503") {
      proxy.injected["503"]++;
      const xml = '<?xml version="1.0"?><Error><Code>SlowDown</Code><Message>injected</Message></Error>';
      res.writeHead(503, { "content-type": "application/xml", "content-length": Buffer.byteLength(xml) });
      res.end(xml);
      return;
    }
    if (fault === "stall") {
      proxy.injected.stall++;
      await new Promise((r) => setTimeout(r, proxy.stallMs));
      if (res.destroyed) return;
    }
    if (fault === "reset") {
      proxy.injected.reset++;
      req.socket.destroy();
      return;
    }
    if (fault === "corrupt-upload" && input.length > 0) {
      proxy.injected["corrupt-upload"]++;
      input = Buffer.from(input);
      input[input.length >> 1]! ^= 0xff;
    }
    const up = request(
      { host: to.hostname, port: to.port, method: req.method, path: req.url, headers: req.headers },
      async (upRes) => {
        const out = await body(upRes);
        if (fault === "lose-answer") {
          proxy.injected["lose-answer"]++;
          req.socket.destroy();
          return;
        }
        res.writeHead(upRes.statusCode ?? 502, upRes.headers);
        if (fault === "truncate" && out.length > 1) {
          proxy.injected.truncate++;
          res.write(out.subarray(0, out.length >> 1));
          // Give the half a moment to leave, then drop the connection mid-body.
          setTimeout(() => res.socket?.destroy(), 10);
          return;
        }
        res.end(out);
      },
    );
    up.on("error", () => req.socket.destroy());
    up.end(input);
  });
  await new Promise<void>((r) => server.listen(0, "127.0.0.1", () => r()));
  (proxy as { endpoint: string }).endpoint = `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
  return proxy;
}
