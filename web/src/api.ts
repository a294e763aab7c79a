/** The daemon's REST API, as the UI calls it: JSON with the logged-in token, and run events. */

export type Role = "admin" | "operator" | "backup" | "read";

export interface Whoami {
  token: { id: string; name: string; expiresAt: number | null } | null;
  role: Role;
  actions: string[];
}

export interface Run {
  id: number;
  jobId: number;
  trigger: string;
  startedAt: number;
  endedAt: number | null;
  outcome: "running" | "success" | "warning" | "failed" | "cancelled" | "interrupted";
  durationMs: number | null;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  progressDone: number;
  progressTotal: number;
  restorePoint: string | null;
  errorCode: string | null;
  error: string | null;
}

export interface RunLog {
  id: number;
  time: number;
  level: string;
  message: string;
}

export interface RestorePoint {
  id: string;
  vm: string;
  time: string;
  mode: string;
  consistency: string;
  parent: string | null;
  disks: number;
  size: number;
  bytesRead: number;
  bytesNew: number;
  bytesStored: number;
  durationMs: number;
  host: string;
  runId: number | null;
}

export interface VmPolicy {
  policy: string;
  repository: string;
  jobId: number;
  schedule: string;
  lastRestorePoint: RestorePoint | null;
  ageMs: number | null;
  rpoMs: number | null;
  rpoMet: boolean;
  lastRun: Run | null;
}

export interface Vm {
  name: string;
  adapter: string | null;
  state: string;
  tags: string[];
  sources: string[];
  protected: boolean;
  policies: VmPolicy[];
  /** Continuous data protection by the daemon, when a policy has cdp. */
  cdp?: Cdp | null;
}

/** The daemon's strata protect of a VM and the window its journal can restore. */
export interface Cdp {
  state: string;
  policy: string;
  journal: string | null;
  pid: number | null;
  starts: number;
  lastExit: string | null;
  from: string | null;
  to: string | null;
  journalBytes: number;
  lagMs: number | null;
  gaps: Array<{ from: string; to: string | null }>;
  marks: Array<{ name: string; time: string }>;
}

export interface Job {
  id: number;
  policy: string;
  vm: string;
  kind: string;
  repository: string;
  schedule: string | null;
  nextDue: string | null;
  queued: boolean;
  running: Run | null;
  runs: Run[];
}

export interface Page<T> {
  total: number;
  offset: number;
  limit: number;
  nextOffset: number | null;
  items: T[];
}

export interface Repository {
  name: string;
  location: string;
  restorePoints: number;
  storedBytes: number;
}

export interface HistorySample {
  day: string;
  logicalBytes: number;
  storedBytes: number;
  ratio: number | null;
  addedBytes: number;
  restorePoints: number;
}

export interface RetentionPreview {
  policy: string;
  repository: string;
  retention: Record<string, number>;
  vms: Array<{ vm: string; keep: Array<{ id: string; reasons: string[] }>; remove: string[] }>;
}

export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
  ) {
    super(message);
  }
}

const TOKEN_KEY = "strata.token";

export function savedToken(): string | null {
  return sessionStorage.getItem(TOKEN_KEY);
}

export function saveToken(token: string | null): void {
  if (token === null) sessionStorage.removeItem(TOKEN_KEY);
  else sessionStorage.setItem(TOKEN_KEY, token);
}

/** Called when the API answers 401: the token went bad (revoked, expired). */
let onUnauthorized: () => void = () => {};
export function setOnUnauthorized(fn: () => void): void {
  onUnauthorized = fn;
}

function headers(token = savedToken()): Record<string, string> {
  return token ? { Authorization: `Bearer ${token}` } : {};
}

async function failure(res: Response): Promise<ApiError> {
  let code = "HTTP";
  let message = `${res.status} ${res.statusText}`;
  try {
    const body = (await res.json()) as { error?: { code?: string; message?: string } };
    if (body.error?.message) message = body.error.message;
    if (body.error?.code) code = body.error.code;
  } catch {
    // not JSON: the status says it
  }
  if (res.status === 401) onUnauthorized();
  return new ApiError(res.status, code, message);
}

/** One call: JSON in, JSON out; a refusal or error becomes an ApiError with the API's message. */
export async function call<T>(
  method: "GET" | "POST" | "DELETE",
  path: string,
  body?: unknown,
  token?: string,
): Promise<T> {
  const res = await fetch(`/api/v1${path}`, {
    method,
    headers: {
      ...headers(token),
      ...(body === undefined ? {} : { "Content-Type": "application/json" }),
    },
    ...(body === undefined ? {} : { body: JSON.stringify(body) }),
  });
  if (!res.ok) throw await failure(res);
  return (await res.json()) as T;
}

export const get = <T>(path: string) => call<T>("GET", path);
export const post = <T>(path: string, body?: unknown) => call<T>("POST", path, body ?? {});
export const del = <T>(path: string) => call<T>("DELETE", path);

/** The API path of restore point `id` ("vm/time"). */
export function pointPath(id: string): string {
  const i = id.indexOf("/");
  return `/restore-points/${encodeURIComponent(id.slice(0, i))}/${encodeURIComponent(id.slice(i + 1))}`;
}

export interface Layout {
  id: string;
  disks: Array<{
    disk: string;
    size: number;
    scheme: string;
    partitions: Array<{
      number: number;
      size: number;
      typeName?: string;
      label?: string;
      filesystem: string | null;
      volumeGroup?: string;
    }>;
  }>;
  volumeGroups: Array<{
    name: string;
    size: number;
    lvs: Array<{ name: string; size: number; layout: string; filesystem: string | null }>;
  }>;
  warnings: string[];
}

export interface FileEntry {
  name: string;
  path: string;
  kind: "file" | "directory" | "symlink" | "other";
  mode: number;
  uid: number;
  gid: number;
  size: number;
  mtime: number;
  target?: string;
}

export interface FilePage {
  id: string;
  disk: string;
  filesystem: string;
  path: string;
  total: number;
  offset: number;
  limit: number;
  nextOffset: number | null;
  entries: FileEntry[];
}

export interface Instant {
  name: string;
  restorePoint: string;
  phase: string;
  adapter: string;
  vm: { pid: number | null; running: boolean; where: string | null };
  serve: { pid: number | null; running: boolean; socket: string };
  disks: Array<{ name: string; size: number; overlay: string | null; production?: string; format?: string }>;
  dir: string;
  warnings: string[];
}

/**
 * Downloads what `path` answers as a file named `name` (the browser cannot send the token
 * with a plain link, so the answer is fetched and handed over as a blob).
 */
export async function download(path: string, name: string): Promise<void> {
  const res = await fetch(`/api/v1${path}`, { headers: headers() });
  if (!res.ok) throw await failure(res);
  const blob = await res.blob();
  const url = URL.createObjectURL(blob);
  const a = document.createElement("a");
  a.href = url;
  a.download = name;
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

export type RunEvent =
  | { type: "progress"; done: number; total: number; bytesNew?: number }
  | { type: "log"; time: number; level: string; message: string }
  | { type: "end"; run: Run };

/**
 * Follows a run's server-sent events (fetched, since EventSource cannot send the token) until
 * its end or until the returned function is called.
 */
export function followRun(
  id: number,
  onEvent: (e: RunEvent) => void,
  onError: (e: Error) => void,
): () => void {
  const abort = new AbortController();
  (async () => {
    const res = await fetch(`/api/v1/runs/${id}/events`, { headers: headers(), signal: abort.signal });
    if (!res.ok || !res.body) throw await failure(res);
    const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buf += value;
      for (let i = buf.indexOf("\n\n"); i >= 0; i = buf.indexOf("\n\n")) {
        const block = buf.slice(0, i);
        buf = buf.slice(i + 2);
        const data = block
          .split("\n")
          .filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).trimStart())
          .join("\n");
        if (data) onEvent(JSON.parse(data) as RunEvent);
      }
    }
  })().catch((err: Error) => {
    if (!abort.signal.aborted) onError(err);
  });
  return () => abort.abort();
}
