/**
 * The web UI's files, served by the daemon at `/` beside its API: the single-page app that
 * `npm run build` bundles from web/ into dist/web (no second back end; the app talks to the
 * API only, with the token the user logs in with).
 *
 * The files are listed once, when first asked for, by walking the folder: a request is answered
 * only with a file of that list, looked up by its exact URL path, so no path (`..`, encoded
 * slashes, symlinks added later) reaches anything else. A path that names no file and has no
 * extension is a route of the app (/vms/x): it gets index.html. Bundled assets carry a content
 * hash in their names and are cached for a year; index.html is revalidated each time.
 */
import { createHash } from "node:crypto";
import { readdirSync, readFileSync, statSync } from "node:fs";
import type { IncomingMessage, ServerResponse } from "node:http";
import { extname, join } from "node:path";
import { fileURLToPath } from "node:url";

/** dist/web beside the compiled daemon (dist/src/server/static.js). */
export const DEFAULT_WEB_ROOT = fileURLToPath(new URL("../../web/", import.meta.url));

const TYPES: Record<string, string> = {
  ".html": "text/html; charset=utf-8",
  ".js": "text/javascript; charset=utf-8",
  ".css": "text/css; charset=utf-8",
  ".svg": "image/svg+xml",
  ".png": "image/png",
  ".ico": "image/x-icon",
  ".json": "application/json; charset=utf-8",
  ".map": "application/json; charset=utf-8",
  ".txt": "text/plain; charset=utf-8",
  ".woff2": "font/woff2",
};

/** The app reaches only its own origin; no framing, no sniffing. */
const SECURITY_HEADERS = {
  "Content-Security-Policy":
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
  "X-Content-Type-Options": "nosniff",
  "Referrer-Policy": "no-referrer",
  "X-Frame-Options": "DENY",
};

interface WebFile {
  body: Buffer;
  type: string;
  etag: string;
}

/** At most this many files and bytes are taken from the web root (the build makes a handful). */
const MAX_FILES = 500;
const MAX_BYTES = 64 << 20;

export class StaticFiles {
  private files: Map<string, WebFile> | undefined;

  constructor(private readonly root: string = DEFAULT_WEB_ROOT) {}

  private load(): Map<string, WebFile> {
    if (this.files) return this.files;
    const files = new Map<string, WebFile>();
    let bytes = 0;
    const walk = (dir: string, prefix: string) => {
      let names: string[];
      try {
        names = readdirSync(dir);
      } catch {
        return; // no build: only the API answers
      }
      for (const name of names) {
        if (name.startsWith(".")) continue;
        const path = join(dir, name);
        const st = statSync(path);
        if (st.isDirectory()) walk(path, `${prefix}${name}/`);
        else if (st.isFile() && files.size < MAX_FILES && bytes + st.size <= MAX_BYTES) {
          const body = readFileSync(path);
          bytes += body.length;
          files.set(`${prefix}${name}`, {
            body,
            type: TYPES[extname(name).toLowerCase()] ?? "application/octet-stream",
            etag: `"${createHash("sha256").update(body).digest("base64url").slice(0, 22)}"`,
          });
        }
      }
    };
    walk(this.root, "/");
    this.files = files;
    return files;
  }

  /** Answers a GET or HEAD of the app; false when `path` is not the app's (the API answers). */
  serve(req: IncomingMessage, res: ServerResponse, path: string): boolean {
    if (req.method !== "GET" && req.method !== "HEAD") return false;
    const files = this.load();
    let file = files.get(path);
    let name = path;
    if (!file && (path === "/" || extname(path) === "")) {
      file = files.get("/index.html");
      name = "/index.html";
    }
    if (!file) return false;
    const immutable = name.startsWith("/assets/");
    const headers: Record<string, string | number> = {
      ...SECURITY_HEADERS,
      "Content-Type": file.type,
      "Cache-Control": immutable ? "public, max-age=31536000, immutable" : "no-cache",
      ETag: file.etag,
    };
    if (req.headers["if-none-match"] === file.etag) {
      res.writeHead(304, headers);
      res.end();
      return true;
    }
    res.writeHead(200, { ...headers, "Content-Length": file.body.length });
    res.end(req.method === "HEAD" ? undefined : file.body);
    return true;
  }
}
