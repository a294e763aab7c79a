/**
 * The daemon's configuration: one YAML file, `/etc/strata/strata.yaml` (`--config`).
 *
 *   timezone: Europe/Berlin            # optional: cron schedules in this zone (default: TZ)
 *   catalog: /var/lib/strata/catalog.db  # optional
 *   inventory: /etc/strata/vms.yaml    # optional: the VM inventory (vm:NAME)
 *   state-dir: /var/lib/strata/state   # optional: cleanup records, the API's certificate
 *   api:                               # optional
 *     socket: /run/strata/strata.sock  # plain HTTP, owner-only (default)
 *     https:                           # optional: HTTPS on a TCP port, token auth
 *       listen: 0.0.0.0:8443           # or a port number
 *       cert: /etc/strata/api.crt      # optional: else self-signed, made at first start
 *       key: /etc/strata/api.key
 *     restore-targets: [/var/lib/strata/restores, /srv/vms]   # where API-started restores, clones,
 *                                      # instant recovery and migrations may write (default: the first)
 *     restore-devices: ["/dev/vg0/*"]  # block devices they may write onto (default: none)
 *   vms:                               # optional: VMs named by their sources (image files,
 *     lab1:                            # block devices), beside those the adapters find
 *       sources: ["file:/var/lib/images/lab1.img"]
 *       tags: [lab]
 *   repositories:
 *     main:
 *       path: /backup/strata
 *       password-file: /etc/strata/main.pass   # optional: encrypted repositories
 *     off:                             # an S3 bucket (exactly one of path and url)
 *       url: s3:https://s3.example.com:7480/backups/host1
 *       credentials-file: /etc/strata/s3.cred  # optional: [default] aws_access_key_id, ...
 *                                      # (AWS_PROFILE picks another section); else the environment
 *       password-file: /etc/strata/off.pass
 *       cache-dir: /var/cache/strata   # optional: the read cache of packs (default as the CLI's)
 *       cache-size: 2G                 # optional (default 1G; 0: no cache)
 *   limits:                            # the host's, for every job together
 *     jobs: 2                          # jobs running at once on this host
 *     jobs-per-repository: 1
 *     bandwidth: 400                   # MiB/s read by all jobs together
 *     job-bandwidth: 200               # MiB/s read by one job
 *     worker-threads: 2                # hashing/compression threads per job
 *     nice: 10                         # CPU priority of job work, 0-19
 *     io-weight: 50                    # the daemon's disk share: cgroup v2 io.weight (1-10000), else ioprio
 *     io-read: 300                     # MiB/s the daemon reads from each disk: cgroup io.max / blkio
 *     io-write: 300                    # MiB/s it writes to each disk
 *   policies:
 *     web:
 *       repository: main
 *       vms:                           # or: vms: all
 *         names: [web1, web2]
 *         globs: ["web-*"]
 *         tags: [production]
 *         exclude: ["*-test"]
 *       schedule: every 15m            # or a cron expression: "0 2 * * *"
 *       jitter: 2m
 *       mode: snapshot                 # snapshot | pause | offline
 *       quiesce: try                   # require | try | off
 *       retention: { keep-last: 4, keep-daily: 7, keep-weekly: 4 }   # as strata forget
 *       verify:
 *         schedule: "0 4 * * *"
 *         read-data: false             # true: every chunk; "1/7": the next seventh each run
 *         boot:                        # optional: boot verification of each VM's newest restore point
 *           schedule: "0 5 * * 0"      # optional: else verify's schedule
 *           timeout: 5m                # boot start to the guest agent's answer (default 5m)
 *           command: ["/bin/sh", "-c", "test -f /etc/hostname"]   # optional: run through the agent,
 *                                      # must exit 0; a string runs as /bin/sh -c STRING
 *       limits: { job-bandwidth: 100, worker-threads: 1, nice: 15 }
 *       immutable: { for: 30d, mode: compliance }   # optional, an S3 repository with Object Lock only:
 *                                      # each backup's objects under retention (mode default compliance)
 *       cdp:                           # optional: continuous data protection of each (live QEMU) VM:
 *         journal-dir: /var/lib/strata/journal   # the daemon keeps one strata protect per VM running,
 *         window: 24h                  # journaling into journal-dir/VM/START (optional, needs fold)
 *         fold: 15m                    # optional: the journal becomes a restore point this often
 *   notifications:                     # optional: on failure, recovery, RPO missed and met again
 *     events: [failure, recovered, rpo-missed, rpo-met]   # default: all; per sink too
 *     retries: 3                       # tries after the first, with backoff (default 3)
 *     timeout: 10s                     # per try (default 10s)
 *     rpo-check: 1m                    # how often RPOs are looked at (default 1m)
 *     webhooks:                        # HTTP POST of a JSON document
 *       - url: https://hooks.example.com/strata
 *         headers: { Authorization: "Bearer ..." }
 *         events: [failure, recovered]
 *     email:                           # SMTP (STARTTLS when offered; tls: true for port 465)
 *       host: smtp.example.com
 *       port: 587
 *       tls: false
 *       user: strata                   # optional, with password-file
 *       password-file: /etc/strata/smtp.pass
 *       from: strata@backup1.example.com
 *       to: [ops@example.com]
 *
 * {@link checkConfig} reports every problem at once, each with its line and column (YAML syntax
 * first; when the YAML parses, the schema's problems and the references between sections), so
 * that `strata daemon --check` fixes a file in one round.
 */
import { readFileSync } from "node:fs";
import { createRequire } from "node:module";
import type { Document, LineCounter, Node as YamlNode } from "yaml";
import { z } from "zod";
import type { VmSummary } from "../hypervisor/adapter.js";
import { NAME_RE } from "../repo/format.js";
import type { Immutability } from "../repo/repository.js";
import type { KeepPolicy } from "../repo/retention.js";
import { parseS3Url, s3UrlOf } from "../repo/s3-url.js";
import { parseDuration } from "../util/durations.js";
import { ErrorCode, StrataError } from "../util/errors.js";
import { hasDotDot } from "../util/schema.js";
import { parseSize } from "../util/sizes.js";
import { isTimeZone, parseSchedule, type Schedule } from "./schedule.js";

export const DEFAULT_CONFIG = "/etc/strata/strata.yaml";

export interface RepositoryConfig {
  name: string;
  /** Where it is: an absolute directory, or the `s3:` URL of an S3 repository (its canonical form). */
  path: string;
  passwordFile?: string;
  /** Set for an S3 repository. */
  s3?: {
    /** Its credentials' file; unset: the daemon's environment. */
    credentialsFile?: string;
    cacheDir?: string;
    /** The read cache's size in bytes; 0: none. */
    cacheBytes?: number;
  };
}

/**
 * The options that name repository `r` to a strata child process the daemon starts (serve,
 * protect): its path, password file, and for S3 its credentials file and read cache.
 */
export function repoArgs(r: RepositoryConfig): string[] {
  return [
    "--repo",
    r.path,
    ...(r.passwordFile === undefined ? [] : ["--password-file", r.passwordFile]),
    ...(r.s3?.credentialsFile === undefined ? [] : ["--s3-credentials", r.s3.credentialsFile]),
    ...(r.s3?.cacheDir === undefined ? [] : ["--s3-cache-dir", r.s3.cacheDir]),
    ...(r.s3?.cacheBytes === undefined ? [] : ["--s3-cache-size", String(r.s3.cacheBytes)]),
  ];
}

/** Which VMs a policy covers: a VM is in when any of all/names/globs/tags takes it and no exclude does. */
export interface VmSelection {
  all: boolean;
  names: string[];
  globs: string[];
  tags: string[];
  exclude: string[];
}

/** Limits of one job; unset ones come from the host's. */
export interface JobLimits {
  /** MiB/s read by one job. */
  jobBandwidth?: number;
  workerThreads?: number;
  nice?: number;
}

export interface HostLimits extends JobLimits {
  /** cgroup io.weight (1-10000) of the daemon's process, else its ioprio (src/util/io-control.ts). */
  ioWeight?: number;
  /** MiB/s the daemon's process reads from (writes to) each disk, enforced by the kernel (cgroup). */
  ioRead?: number;
  ioWrite?: number;
  /** Jobs running at once on this host. */
  jobs: number;
  jobsPerRepository: number;
  /** MiB/s read by all jobs together. */
  bandwidth?: number;
}

export interface VerifyPolicy {
  schedule: Schedule;
  readData: boolean;
  /** `read-data: 1/T`: each run reads the next T-th of the chunks (src/repo/verify.ts), all in T runs. */
  readDataParts?: number;
  /** Boot verification of each VM's newest restore point (src/engine/instant/boot-verify.ts). */
  boot?: BootVerifyPolicy;
}

export interface BootVerifyPolicy {
  schedule: Schedule;
  /** Boot start to the guest agent's answer (and the command's end). */
  timeoutMs: number;
  /** Run in the guest through its agent; must exit 0. */
  command?: string[];
}

export const DEFAULT_BOOT_TIMEOUT_MS = 5 * 60_000;

export interface Policy {
  name: string;
  repository: string;
  vms: VmSelection;
  schedule: Schedule;
  jitterMs: number;
  mode?: "snapshot" | "pause" | "offline";
  quiesce?: "require" | "try" | "off";
  /** Applied after each backup of the policy's VMs (strata forget's rules). */
  retention?: KeepPolicy;
  verify?: VerifyPolicy;
  /** The host's limits with the policy's own over them. */
  limits: JobLimits;
  /** Each backup's restore point is kept under S3 Object Lock so (an S3 repository only). */
  immutable?: Immutability;
  /** Continuous data protection: one `strata protect` per VM, kept running by the daemon. */
  cdp?: CdpPolicy;
}

export interface CdpPolicy {
  /** Each protect journals into journalDir/VM/START (a new directory per start). */
  journalDir: string;
  windowMs?: number;
  foldMs?: number;
}

/** Source schemes of a running QEMU VM, the only ones continuous data protection takes. */
export const CDP_SOURCE_RE = /^(qmp|vm):/;

/** The REST API's listeners. */
export interface ApiConfig {
  /** Plain HTTP on this unix socket (owner-only). */
  socket: string;
  /** HTTPS on a TCP port, when configured. */
  https?: { host: string; port: number; cert?: string; key?: string };
  /** The directories under which API-started restores, clones, instant recovery and migrations may write. */
  restoreTargets: string[];
  /** Globs of the block devices API-started restores may write onto (none by default). */
  restoreDevices: string[];
}

export const DEFAULT_RESTORE_TARGETS: readonly string[] = ["/var/lib/strata/restores"];

/** A VM the file names by its sources, not found through an adapter's inventory. */
export interface StaticVm {
  name: string;
  sources: string[];
  tags: string[];
}

export const DEFAULT_SOCKET = "/run/strata/strata.sock";

/** What notifications are sent about. */
export const NOTICE_KINDS = ["failure", "recovered", "rpo-missed", "rpo-met"] as const;
export type NoticeKind = (typeof NOTICE_KINDS)[number];

export interface WebhookConfig {
  url: string;
  headers: Record<string, string>;
  events: NoticeKind[];
}

export interface EmailConfig {
  host: string;
  port: number;
  /** Implicit TLS (port 465); otherwise STARTTLS when the server offers it. */
  tls: boolean;
  user?: string;
  passwordFile?: string;
  from: string;
  to: string[];
  events: NoticeKind[];
}

export interface NotificationsConfig {
  webhooks: WebhookConfig[];
  email?: EmailConfig;
  /** Tries after the first, with exponential backoff. */
  retries: number;
  /** Per try. */
  timeoutMs: number;
  /** How often the RPOs are looked at. */
  rpoCheckMs: number;
}

export interface DaemonConfig {
  file: string;
  timezone?: string;
  catalog?: string;
  inventory?: string;
  stateDir?: string;
  api: ApiConfig;
  vms: Map<string, StaticVm>;
  repositories: Map<string, RepositoryConfig>;
  limits: HostLimits;
  policies: Map<string, Policy>;
  notifications?: NotificationsConfig;
}

/** One problem in the file, where it is. */
export interface ConfigProblem {
  line: number;
  col: number;
  /** Dotted path of the setting ("policies.web.schedule"), "" for the file as a whole. */
  path: string;
  message: string;
}

// ---- the schema (the file's own spelling: kebab-case keys) ----

const absPath = (what: string) =>
  z
    .string({ error: `${what} must be a path` })
    .refine((p) => p.startsWith("/"), `${what} must be an absolute path`)
    .refine((p) => !hasDotDot(p), `${what} must not have a ".." segment`);

const durationText = (what: string) =>
  z
    .union([z.string(), z.number()], { error: `${what} must be a duration such as 30s, 5m or 1h` })
    .transform((v, ctx) => {
      try {
        return parseDuration(String(v));
      } catch {
        ctx.addIssue({
          code: "custom",
          message: `${what} must be a duration such as 30s, 5m or 1h, not "${v}"`,
        });
        return z.NEVER;
      }
    });

const scheduleText = (what: string) =>
  z.string({ error: `${what} must be "every N<unit>" or a cron expression` }).superRefine((v, ctx) => {
    try {
      parseSchedule(v);
    } catch (err) {
      ctx.addIssue({ code: "custom", message: (err as Error).message });
    }
  });

const int = (what: string, min: number, max: number) =>
  z
    .number({ error: `${what} must be a whole number from ${min} to ${max}` })
    .int(`${what} must be a whole number from ${min} to ${max}`)
    .min(min, `${what} must be at least ${min}`)
    .max(max, `${what} must be at most ${max}`);

const mibs = (what: string) =>
  z
    .number({ error: `${what} must be a number of MiB/s` })
    .positive(`${what} must be more than 0 MiB/s`)
    .max(1_000_000, `${what} must be at most 1000000 MiB/s`);

const plainName = (what: string) =>
  z
    .string({ error: `${what} must be a name` })
    .regex(NAME_RE, `${what} must be a plain name (letters, digits, . _ -)`);

const GLOB_RE = /^[A-Za-z0-9._\-*?[\]!]{1,128}$/;
const glob = (what: string) =>
  z
    .string({ error: `${what} must be a glob pattern` })
    .regex(GLOB_RE, `${what} must be a glob of letters, digits, . _ - and * ? [ ]`);

const list = <T extends z.ZodType>(what: string, item: T) =>
  z.array(item, { error: `${what} must be a list` }).max(10_000, `${what} has more than 10000 entries`);

const jobLimitsShape = {
  "job-bandwidth": mibs("job-bandwidth").optional(),
  "worker-threads": int("worker-threads", 1, 256).optional(),
  nice: int("nice", 0, 19).optional(),
};

/** The kernel's I/O limits hold for the daemon's whole process: the host's only. */
const HOST_ONLY_IO = ["io-weight", "io-read", "io-write"] as const;

const hostLimitsSchema = z.strictObject(
  {
    ...jobLimitsShape,
    jobs: int("jobs", 1, 1024).optional(),
    "jobs-per-repository": int("jobs-per-repository", 1, 1024).optional(),
    bandwidth: mibs("bandwidth").optional(),
    "io-weight": int("io-weight", 1, 10000).optional(),
    "io-read": mibs("io-read").optional(),
    "io-write": mibs("io-write").optional(),
  },
  { error: "limits must be a mapping" },
);

const selectionSchema = z.preprocess(
  (v) => (v === "all" ? { all: true } : v),
  z.strictObject(
    {
      all: z.boolean({ error: "all must be true or false" }).optional(),
      names: list("names", plainName("a VM name")).optional(),
      globs: list("globs", glob("a glob")).optional(),
      tags: list("tags", plainName("a tag")).optional(),
      exclude: list("exclude", glob("an exclude pattern")).optional(),
    },
    { error: 'vms must be "all" or a mapping of all, names, globs, tags and exclude' },
  ),
);

const retentionSchema = z.strictObject(
  {
    "keep-last": int("keep-last", 0, 1_000_000).optional(),
    "keep-hourly": int("keep-hourly", 0, 1_000_000).optional(),
    "keep-daily": int("keep-daily", 0, 1_000_000).optional(),
    "keep-weekly": int("keep-weekly", 0, 1_000_000).optional(),
    "keep-monthly": int("keep-monthly", 0, 1_000_000).optional(),
    "keep-yearly": int("keep-yearly", 0, 1_000_000).optional(),
  },
  { error: "retention must be a mapping of keep-last, keep-hourly, ... keep-yearly" },
);

const guestCommand = z
  .union(
    [
      z.string().min(1, "command must not be empty").max(4096, "command is longer than 4096 characters"),
      z
        .array(
          z
            .string({ error: "each word of command must be text" })
            .max(4096, "a word of command is longer than 4096 characters"),
          {
            error: "command must be a list of words (the program first) or one shell command line",
          },
        )
        .min(1, "command must name a program")
        .max(256, "command has more than 256 words")
        .refine(
          (a) => a[0]!.startsWith("/") || /^[A-Za-z]:\\/.test(a[0]!),
          "command's program must be an absolute path in the guest",
        ),
    ],
    { error: "command must be a list of words (the program first) or one shell command line" },
  )
  .transform((c) => (typeof c === "string" ? ["/bin/sh", "-c", c] : c));

const bootSchema = z.strictObject(
  {
    schedule: scheduleText("boot schedule").optional(),
    timeout: durationText("boot timeout")
      .refine((ms) => ms >= 10_000, "boot timeout must be at least 10s")
      .refine((ms) => ms <= 3_600_000, "boot timeout must be at most 1h")
      .optional(),
    command: guestCommand.optional(),
  },
  { error: "boot must be a mapping of schedule, timeout and command" },
);

const READ_DATA_ERROR =
  'read-data must be true, false, or "1/T" (a rotating T-th of the chunks per run, T from 2 to 9999)';

const policySchema = z.strictObject(
  {
    repository: z.string({ error: "repository must name a repository of this file" }),
    vms: selectionSchema,
    schedule: scheduleText("schedule"),
    jitter: durationText("jitter").optional(),
    mode: z
      .enum(["snapshot", "pause", "offline"], { error: "mode must be snapshot, pause or offline" })
      .optional(),
    quiesce: z.enum(["require", "try", "off"], { error: "quiesce must be require, try or off" }).optional(),
    retention: retentionSchema.optional(),
    verify: z
      .strictObject(
        {
          schedule: scheduleText("verify schedule"),
          "read-data": z
            .union([z.boolean(), z.string().regex(/^1\/([2-9]|[1-9]\d{1,3})$/, { error: READ_DATA_ERROR })], {
              error: READ_DATA_ERROR,
            })
            .optional(),
          boot: bootSchema.optional(),
        },
        { error: "verify must be a mapping of schedule, read-data and boot" },
      )
      .optional(),
    limits: z
      .strictObject(
        // Named here so that they are refused with a reason (below), not as unknown settings.
        { ...jobLimitsShape, ...Object.fromEntries(HOST_ONLY_IO.map((k) => [k, z.unknown().optional()])) },
        { error: "limits must be a mapping" },
      )
      .optional(),
    immutable: z
      .strictObject(
        {
          for: durationText("immutable for").refine(
            (ms) => ms >= 1000 && ms % 1000 === 0,
            "immutable for must be whole seconds, at least 1s (e.g. 30d)",
          ),
          mode: z
            .enum(["compliance", "governance"], { error: "immutable mode must be compliance or governance" })
            .optional(),
        },
        { error: "immutable must be a mapping of for (a duration) and mode (compliance or governance)" },
      )
      .optional(),
    cdp: z
      .strictObject(
        {
          "journal-dir": absPath("journal-dir"),
          window: durationText("cdp window").optional(),
          fold: durationText("cdp fold")
            .refine((ms) => ms >= 1000, "cdp fold must be at least 1s")
            .optional(),
        },
        { error: "cdp must be a mapping of journal-dir, window and fold" },
      )
      .optional(),
  },
  { error: "a policy must be a mapping" },
);

const s3Url = z
  .string({ error: "url must be an s3: URL such as s3:https://HOST[:PORT]/BUCKET" })
  .superRefine((v, ctx) => {
    try {
      parseS3Url(v);
    } catch (err) {
      ctx.addIssue({ code: "custom", message: (err as Error).message });
    }
  });

const cacheSize = z
  .union([z.string(), z.number()], { error: "cache-size must be a size such as 512M or 2G" })
  .transform((v, ctx) => {
    try {
      return parseSize(String(v));
    } catch {
      ctx.addIssue({ code: "custom", message: `cache-size must be a size such as 512M or 2G, not "${v}"` });
      return z.NEVER;
    }
  });

/** Settings that only an S3 repository has. */
const S3_ONLY = ["credentials-file", "cache-dir", "cache-size"] as const;

const listenSchema = z
  .union([z.number(), z.string()], { error: 'listen must be a port or "host:port"' })
  .transform((v, ctx) => {
    const m = /^(?:(.*):)?(\d{1,5})$/.exec(String(v));
    const port = m ? Number(m[2]) : Number.NaN;
    if (!m || port < 1 || port > 65535) {
      ctx.addIssue({ code: "custom", message: `listen must be a port (1-65535) or "host:port", not "${v}"` });
      return z.NEVER;
    }
    return { host: (m[1] ?? "0.0.0.0").replace(/^\[|\]$/g, ""), port };
  });

/** A block device glob: an absolute path under /dev whose `*`, `?`, `[...]` stay within one segment. */
const devicePattern = absPath("a restore device pattern")
  .refine((p) => p.startsWith("/dev/"), "a restore device pattern must be under /dev/")
  .refine(
    (p) => /^[A-Za-z0-9._\-*?[\]!/]{1,256}$/.test(p),
    "a restore device pattern must be a path of letters, digits, . _ - / and * ? [ ]",
  );

const apiSchema = z.strictObject(
  {
    socket: absPath("socket").optional(),
    "restore-targets": list("restore-targets", absPath("a restore target"))
      .min(1, "restore-targets must name at least one directory")
      .refine((l) => !l.includes("/"), "restore-targets must not allow / (the whole host)")
      .optional(),
    "restore-devices": list("restore-devices", devicePattern).optional(),
    https: z
      .strictObject(
        { listen: listenSchema, cert: absPath("cert").optional(), key: absPath("key").optional() },
        { error: "https must be a mapping of listen, cert and key" },
      )
      .optional(),
  },
  { error: "api must be a mapping of socket, https, restore-targets and restore-devices" },
);

const staticVmSchema = z.strictObject(
  {
    sources: z
      .array(z.string({ error: "a source must be text such as file:/path/disk.img" }), {
        error: "sources must be a list of source URIs",
      })
      .min(1, "sources must name at least one source")
      .max(64, "sources has more than 64 entries"),
    tags: list("tags", plainName("a tag")).optional(),
  },
  { error: "a VM must be a mapping of sources and tags" },
);

const noticeKinds = list(
  "events",
  z.enum(NOTICE_KINDS, { error: `an event must be one of ${NOTICE_KINDS.join(", ")}` }),
).min(1, "events must name at least one event");

const EMAIL_RE = /^[^\s@<>,;"]{1,64}@[A-Za-z0-9.-]{1,253}$/;
const email = (what: string) =>
  z
    .string({ error: `${what} must be an e-mail address` })
    .regex(EMAIL_RE, `${what} must be an e-mail address such as ops@example.com`);

const notificationsSchema = z.strictObject(
  {
    events: noticeKinds.optional(),
    retries: int("retries", 0, 10).optional(),
    timeout: durationText("timeout").optional(),
    "rpo-check": durationText("rpo-check").optional(),
    webhooks: list(
      "webhooks",
      z.strictObject(
        {
          url: z.string({ error: "url must be an http:// or https:// URL" }).refine((u) => {
            try {
              const x = new URL(u);
              return (x.protocol === "http:" || x.protocol === "https:") && x.hostname !== "";
            } catch {
              return false;
            }
          }, "url must be an http:// or https:// URL"),
          headers: z
            .record(
              z
                .string()
                .regex(
                  /^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,128}$/,
                  "a header name must be a token such as X-Token",
                ),
              z
                .string({ error: "a header value must be text" })
                .max(4096, "a header value must be at most 4096 characters")
                .refine((v) => !/[\r\n\0]/.test(v), "a header value must be one line"),
              {
                error:
                  "headers must be a mapping of header names (tokens such as X-Token) to one-line values",
              },
            )
            .optional(),
          events: noticeKinds.optional(),
        },
        { error: "a webhook must be a mapping of url, headers and events" },
      ),
    ).optional(),
    email: z
      .strictObject(
        {
          host: z.string({ error: "host must be a host name" }).min(1, "host must be a host name"),
          port: int("port", 1, 65535).optional(),
          tls: z.boolean({ error: "tls must be true or false" }).optional(),
          user: z.string({ error: "user must be text" }).optional(),
          "password-file": absPath("password-file").optional(),
          from: email("from"),
          to: list("to", email("an address in to")).min(1, "to must name at least one address"),
          events: noticeKinds.optional(),
        },
        { error: "email must be a mapping of host, port, tls, user, password-file, from, to and events" },
      )
      .optional(),
  },
  { error: "notifications must be a mapping of events, retries, timeout, rpo-check, webhooks and email" },
);

const fileSchema = z.strictObject(
  {
    timezone: z.string({ error: "timezone must be an IANA zone name" }).optional(),
    catalog: absPath("catalog").optional(),
    inventory: absPath("inventory").optional(),
    "state-dir": absPath("state-dir").optional(),
    api: apiSchema.optional(),
    vms: z.record(z.string(), staticVmSchema, { error: "vms must be a mapping of VM names" }).optional(),
    repositories: z.record(
      z.string(),
      z.strictObject(
        {
          path: absPath("path").optional(),
          url: s3Url.optional(),
          "password-file": absPath("password-file").optional(),
          "credentials-file": absPath("credentials-file").optional(),
          "cache-dir": absPath("cache-dir").optional(),
          "cache-size": cacheSize.optional(),
        },
        {
          error:
            "a repository must be a mapping of path (or url, credentials-file, cache-dir and cache-size) and password-file",
        },
      ),
      { error: "repositories must be a mapping of names to repositories" },
    ),
    limits: hostLimitsSchema.optional(),
    policies: z.record(z.string(), policySchema, {
      error: "policies must be a mapping of names to policies",
    }),
    notifications: notificationsSchema.optional(),
  },
  { error: "the file must be a mapping (repositories, policies, limits, ...)" },
);

type FileConfig = z.infer<typeof fileSchema>;

// ---- positions ----

/** yaml, loaded on first use (see src/hypervisor/qemu/inventory.ts for why). */
function yaml(): typeof import("yaml") {
  return createRequire(import.meta.url)("yaml") as typeof import("yaml");
}

type Path = ReadonlyArray<PropertyKey>;

/**
 * The node a path leads to, as deep as the document has it: `missing` is the first key that the
 * document lacks (its problem is shown at the mapping that should hold it).
 */
function locate(
  doc: Document,
  path: Path,
): { node: YamlNode | null; missing?: PropertyKey; keyNode?: YamlNode } {
  const Y = yaml();
  let node = doc.contents as YamlNode | null;
  let keyNode: YamlNode | undefined;
  for (const key of path) {
    if (Y.isMap(node)) {
      const pair = node.items.find((p) => Y.isScalar(p.key) && String(p.key.value) === String(key));
      if (!pair) return { node, missing: key };
      keyNode = pair.key as YamlNode;
      node = (pair.value as YamlNode | null) ?? keyNode;
    } else if (Y.isSeq(node) && typeof key === "number") {
      const item = node.items[key] as YamlNode | undefined;
      if (!item) return { node, missing: key };
      keyNode = undefined;
      node = item;
    } else {
      return { node, missing: key };
    }
  }
  return keyNode === undefined ? { node } : { node, keyNode };
}

function positionOf(lc: LineCounter, node: YamlNode | null | undefined): { line: number; col: number } {
  const offset = node?.range?.[0] ?? 0;
  return lc.linePos(offset);
}

const dotted = (path: Path) => path.map(String).join(".");

const EXPECTED: Record<string, string> = {
  object: "a mapping",
  array: "a list",
  string: "text",
  number: "a number",
  boolean: "true or false",
};

/** The problems zod found, each placed on the line that has it. */
function schemaProblems(
  doc: Document,
  lc: LineCounter,
  issues: readonly z.core.$ZodIssue[],
): ConfigProblem[] {
  const out: ConfigProblem[] = [];
  for (const issue of issues) {
    if (issue.code === "unrecognized_keys") {
      for (const key of issue.keys) {
        const where = locate(doc, [...issue.path, key]);
        out.push({
          ...positionOf(lc, where.keyNode ?? where.node),
          path: dotted([...issue.path, key]),
          message: `unknown setting "${key}"`,
        });
      }
      continue;
    }
    const where = locate(doc, issue.path);
    let message = issue.message;
    if (where.missing !== undefined && where.missing === issue.path.at(-1)) {
      message = `"${String(where.missing)}" is required`;
    } else if (issue.code === "invalid_type" && message.startsWith("Invalid input")) {
      message = `must be ${EXPECTED[issue.expected] ?? issue.expected}`;
    }
    out.push({ ...positionOf(lc, where.node), path: dotted(issue.path), message });
  }
  return out;
}

// ---- checking ----

/** Checks the configuration text; `file` names it in messages. Never throws for content. */
export function checkConfig(
  text: string,
  file: string,
): { config: DaemonConfig; problems: [] } | { config?: undefined; problems: ConfigProblem[] } {
  const Y = yaml();
  const lc = new Y.LineCounter();
  const doc = Y.parseDocument(text, { lineCounter: lc, prettyErrors: true, uniqueKeys: true });
  if (doc.errors.length > 0) {
    return {
      problems: doc.errors.map((e) => ({
        ...lc.linePos(e.pos[0]),
        path: "",
        message: e.message.split("\n")[0]!.replace(/ at line \d+, column \d+:?$/, ""),
      })),
    };
  }
  const raw = doc.toJS({ maxAliasCount: 100 }) as unknown;
  const parsed = fileSchema.safeParse(raw ?? {});
  const problems: ConfigProblem[] = parsed.success ? [] : schemaProblems(doc, lc, parsed.error.issues);
  const at = (path: Path, message: string, onKey = false) => {
    const where = locate(doc, path);
    problems.push({
      ...positionOf(lc, onKey ? (where.keyNode ?? where.node) : where.node),
      path: dotted(path),
      message,
    });
  };
  // What the schema could not see: names, references, and settings that depend on each other.
  const r = (raw ?? {}) as Partial<Record<string, unknown>>;
  const repoNames = isRecord(r.repositories) ? Object.keys(r.repositories) : [];
  for (const name of repoNames)
    if (!NAME_RE.test(name))
      at(["repositories", name], `repository name "${name}" must be a plain name`, true);
  if (isRecord(r.vms))
    for (const name of Object.keys(r.vms))
      if (!NAME_RE.test(name)) at(["vms", name], `VM name "${name}" must be a plain name`, true);
  const https = isRecord(r.api) && isRecord(r.api.https) ? r.api.https : undefined;
  if (https && (https.cert === undefined) !== (https.key === undefined))
    at(["api", "https"], "give both cert and key, or neither (a self-signed certificate is made)");
  if (isRecord(r.repositories) && repoNames.length === 0)
    at(["repositories"], "no repositories: name at least one");
  const s3Repos = new Set<string>();
  if (isRecord(r.repositories))
    for (const [name, repo] of Object.entries(r.repositories)) {
      if (!isRecord(repo)) continue;
      if (repo.url !== undefined) s3Repos.add(name);
      if (repo.path !== undefined && repo.url !== undefined)
        at(["repositories", name, "url"], "give path (a directory) or url (an S3 bucket), not both", true);
      else if (repo.path === undefined && repo.url === undefined)
        at(["repositories", name], "give path (a directory) or url (s3:https://HOST[:PORT]/BUCKET[/PREFIX])");
      else if (repo.url === undefined)
        for (const k of S3_ONLY)
          if (k in repo)
            at(["repositories", name, k], `${k} is for an S3 repository (url), not a directory`, true);
    }
  const tz = typeof r.timezone === "string" ? r.timezone : undefined;
  if (tz !== undefined && !isTimeZone(tz))
    at(["timezone"], `unknown time zone "${tz}" (e.g. Europe/Berlin, UTC)`);
  if (isRecord(r.policies)) {
    if (Object.keys(r.policies).length === 0) at(["policies"], "no policies: the daemon would do nothing");
    for (const [name, p] of Object.entries(r.policies)) {
      if (!NAME_RE.test(name)) at(["policies", name], `policy name "${name}" must be a plain name`, true);
      if (!isRecord(p)) continue;
      if (typeof p.repository === "string" && !repoNames.includes(p.repository))
        at(
          ["policies", name, "repository"],
          `unknown repository "${p.repository}"` +
            (repoNames.length > 0 ? ` (this file has ${repoNames.join(", ")})` : ""),
        );
      const sel = p.vms === "all" ? { all: true } : p.vms;
      if (
        isRecord(sel) &&
        !sel.all &&
        !["names", "globs", "tags"].some((k) => Array.isArray(sel[k]) && sel[k].length)
      )
        at(["policies", name, "vms"], "selects no VM: give all, names, globs or tags");
      if (isRecord(p.limits))
        for (const k of HOST_ONLY_IO)
          if (k in p.limits)
            at(
              ["policies", name, "limits", k],
              `${k} holds for the daemon's whole process: set it in the top-level limits`,
              true,
            );
      if (
        p.immutable !== undefined &&
        typeof p.repository === "string" &&
        repoNames.includes(p.repository) &&
        !s3Repos.has(p.repository)
      )
        at(
          ["policies", name, "immutable"],
          `repository ${p.repository} is a directory: only an S3 repository (url, a bucket with Object Lock) keeps restore points immutable`,
          true,
        );
      if (isRecord(p.retention) && Object.values(p.retention).every((v) => v === 0))
        at(
          ["policies", name, "retention"],
          "keeps nothing: give at least one keep-* rule above 0, or leave it out",
        );
      if (isRecord(p.cdp)) {
        const window = safeDuration(p.cdp.window);
        const fold = safeDuration(p.cdp.fold);
        if (window !== undefined && p.cdp.fold === undefined)
          at(
            ["policies", name, "cdp", "window"],
            "cdp window needs fold: journal segments are dropped only once a fold holds what they held",
            true,
          );
        else if (window !== undefined && fold !== undefined && window < fold)
          at(["policies", name, "cdp", "window"], "cdp window must be at least as long as fold", true);
        // VMs this file names by their sources: protect needs a running QEMU VM (qmp: or vm:).
        if (isRecord(r.vms) && isRecord(sel)) {
          const picked = selectVms(
            {
              all: sel.all === true,
              names: Array.isArray(sel.names) ? sel.names.map(String) : [],
              globs: Array.isArray(sel.globs) ? sel.globs.map(String).filter((g) => GLOB_RE.test(g)) : [],
              tags: Array.isArray(sel.tags) ? sel.tags.map(String) : [],
              exclude: Array.isArray(sel.exclude)
                ? sel.exclude.map(String).filter((g) => GLOB_RE.test(g))
                : [],
            },
            Object.entries(r.vms).map(([vm, v]) => ({
              name: vm,
              tags: isRecord(v) && Array.isArray(v.tags) ? v.tags.map(String) : [],
              sources: isRecord(v) && Array.isArray(v.sources) ? v.sources.map(String) : [],
            })),
          );
          for (const vm of picked)
            if (vm.sources.length > 0 && !vm.sources.every((s) => CDP_SOURCE_RE.test(s)))
              at(
                ["policies", name, "cdp"],
                `VM ${vm.name} is named by ${vm.sources.join(", ")}: cdp needs a running QEMU VM (a qmp:SOCKET or vm:NAME source)`,
                true,
              );
        }
      }
      const jitter = safeDuration(p.jitter);
      if (jitter !== undefined && typeof p.schedule === "string") {
        const s = safeSchedule(p.schedule);
        if (s?.kind === "every" && jitter >= s.everyMs)
          at(["policies", name, "jitter"], `jitter ${p.jitter} must be shorter than the schedule's interval`);
        if (jitter > 86_400_000) at(["policies", name, "jitter"], "jitter must be at most 1d");
      }
    }
  }
  const n = isRecord(r.notifications) ? r.notifications : undefined;
  if (n && isRecord(n.email) && (n.email.user === undefined) !== (n.email["password-file"] === undefined))
    at(["notifications", "email"], "give both user and password-file, or neither");
  if (n && n.webhooks === undefined && n.email === undefined)
    at(["notifications"], "no webhooks and no email: nothing would be sent");
  const timeout = n ? safeDuration(n.timeout) : undefined;
  if (timeout !== undefined && (timeout < 1000 || timeout > 300_000))
    at(["notifications", "timeout"], "timeout must be from 1s to 5m");
  const rpoCheck = n ? safeDuration(n["rpo-check"]) : undefined;
  if (rpoCheck !== undefined && (rpoCheck < 1000 || rpoCheck > 86_400_000))
    at(["notifications", "rpo-check"], "rpo-check must be from 1s to 1d");
  if (problems.length > 0 || !parsed.success) {
    problems.sort((a, b) => a.line - b.line || a.col - b.col);
    return { problems };
  }
  return { config: toConfig(parsed.data, file, tz), problems: [] };
}

/** Reads the file and checks it (see {@link checkConfig}); an unreadable file is a USAGE error. */
export function checkConfigFile(file: string): ReturnType<typeof checkConfig> {
  let text: string;
  try {
    text = readFileSync(file, "utf8");
  } catch (err) {
    throw new StrataError(
      ErrorCode.USAGE,
      `cannot read the configuration ${file}: ${(err as Error).message}`,
      {
        cause: err,
      },
    );
  }
  return checkConfig(text, file);
}

/** CONFIG_INVALID listing every problem as FILE:LINE:COL. */
export function invalidConfig(file: string, problems: readonly ConfigProblem[]): StrataError {
  return new StrataError(
    ErrorCode.CONFIG_INVALID,
    `${file}: ${problems.length} problem(s):\n${problems.map((p) => `  ${formatProblem(file, p)}`).join("\n")}`,
  );
}

/** Reads and checks the file: the configuration, or CONFIG_INVALID naming every problem. */
export function loadConfig(file: string): DaemonConfig {
  const r = checkConfigFile(file);
  if (r.config) return r.config;
  throw invalidConfig(file, r.problems);
}

export function formatProblem(file: string, p: ConfigProblem): string {
  return `${file}:${p.line}:${p.col}: ${p.path ? `${p.path}: ` : ""}${p.message}`;
}

function isRecord(v: unknown): v is Record<string, unknown> {
  return typeof v === "object" && v !== null && !Array.isArray(v);
}

function safeDuration(v: unknown): number | undefined {
  try {
    return typeof v === "string" || typeof v === "number" ? parseDuration(String(v)) : undefined;
  } catch {
    return undefined;
  }
}

function safeSchedule(v: string): Schedule | undefined {
  try {
    return parseSchedule(v);
  } catch {
    return undefined;
  }
}

function toConfig(f: FileConfig, file: string, timezone: string | undefined): DaemonConfig {
  const tz = timezone === undefined ? {} : { timezone };
  const jobLimits = (
    l: { [K in keyof typeof jobLimitsShape]?: number | undefined } | undefined,
  ): JobLimits => ({
    ...(l?.["job-bandwidth"] === undefined ? {} : { jobBandwidth: l["job-bandwidth"] }),
    ...(l?.["worker-threads"] === undefined ? {} : { workerThreads: l["worker-threads"] }),
    ...(l?.nice === undefined ? {} : { nice: l.nice }),
  });
  const host: HostLimits = {
    nice: 10,
    ...jobLimits(f.limits),
    jobs: f.limits?.jobs ?? 2,
    jobsPerRepository: f.limits?.["jobs-per-repository"] ?? 1,
    ...(f.limits?.bandwidth === undefined ? {} : { bandwidth: f.limits.bandwidth }),
    ...(f.limits?.["io-weight"] === undefined ? {} : { ioWeight: f.limits["io-weight"] }),
    ...(f.limits?.["io-read"] === undefined ? {} : { ioRead: f.limits["io-read"] }),
    ...(f.limits?.["io-write"] === undefined ? {} : { ioWrite: f.limits["io-write"] }),
  };
  const repositories = new Map<string, RepositoryConfig>();
  for (const [name, r] of Object.entries(f.repositories))
    repositories.set(name, {
      name,
      // checkConfig saw exactly one of them. An S3 URL as the store names itself (and so the catalog).
      path: r.url === undefined ? r.path! : s3UrlOf(parseS3Url(r.url)),
      ...(r["password-file"] === undefined ? {} : { passwordFile: r["password-file"] }),
      ...(r.url === undefined
        ? {}
        : {
            s3: {
              ...(r["credentials-file"] === undefined ? {} : { credentialsFile: r["credentials-file"] }),
              ...(r["cache-dir"] === undefined ? {} : { cacheDir: r["cache-dir"] }),
              ...(r["cache-size"] === undefined ? {} : { cacheBytes: r["cache-size"] }),
            },
          }),
    });
  const policies = new Map<string, Policy>();
  for (const [name, p] of Object.entries(f.policies)) {
    const {
      jobs: _j,
      jobsPerRepository: _r,
      bandwidth: _b,
      ioWeight: _w,
      ioRead: _ir,
      ioWrite: _iw,
      ...hostJob
    } = host;
    const retention: KeepPolicy | undefined = p.retention && {
      ...(p.retention["keep-last"] === undefined ? {} : { last: p.retention["keep-last"] }),
      ...(p.retention["keep-hourly"] === undefined ? {} : { hourly: p.retention["keep-hourly"] }),
      ...(p.retention["keep-daily"] === undefined ? {} : { daily: p.retention["keep-daily"] }),
      ...(p.retention["keep-weekly"] === undefined ? {} : { weekly: p.retention["keep-weekly"] }),
      ...(p.retention["keep-monthly"] === undefined ? {} : { monthly: p.retention["keep-monthly"] }),
      ...(p.retention["keep-yearly"] === undefined ? {} : { yearly: p.retention["keep-yearly"] }),
    };
    policies.set(name, {
      name,
      repository: p.repository,
      vms: {
        all: p.vms.all === true,
        names: p.vms.names ?? [],
        globs: p.vms.globs ?? [],
        tags: p.vms.tags ?? [],
        exclude: p.vms.exclude ?? [],
      },
      schedule: parseSchedule(p.schedule, tz),
      jitterMs: p.jitter ?? 0,
      ...(p.mode === undefined ? {} : { mode: p.mode }),
      ...(p.quiesce === undefined ? {} : { quiesce: p.quiesce }),
      ...(retention === undefined ? {} : { retention }),
      ...(p.verify === undefined
        ? {}
        : {
            verify: {
              schedule: parseSchedule(p.verify.schedule, tz),
              readData: p.verify["read-data"] === true,
              ...(typeof p.verify["read-data"] === "string"
                ? { readDataParts: Number(p.verify["read-data"].slice(2)) }
                : {}),
              ...(p.verify.boot === undefined
                ? {}
                : {
                    boot: {
                      schedule: parseSchedule(p.verify.boot.schedule ?? p.verify.schedule, tz),
                      timeoutMs: p.verify.boot.timeout ?? DEFAULT_BOOT_TIMEOUT_MS,
                      ...(p.verify.boot.command === undefined ? {} : { command: p.verify.boot.command }),
                    },
                  }),
            },
          }),
      limits: { ...hostJob, ...jobLimits(p.limits) },
      ...(p.immutable === undefined
        ? {}
        : {
            immutable: {
              mode: p.immutable.mode === "governance" ? "GOVERNANCE" : "COMPLIANCE",
              seconds: p.immutable.for / 1000,
            },
          }),
      ...(p.cdp === undefined
        ? {}
        : {
            cdp: {
              journalDir: p.cdp["journal-dir"],
              ...(p.cdp.window === undefined ? {} : { windowMs: p.cdp.window }),
              ...(p.cdp.fold === undefined ? {} : { foldMs: p.cdp.fold }),
            },
          }),
    });
  }
  const https = f.api?.https;
  const api: ApiConfig = {
    socket: f.api?.socket ?? DEFAULT_SOCKET,
    restoreTargets: f.api?.["restore-targets"] ?? [...DEFAULT_RESTORE_TARGETS],
    restoreDevices: f.api?.["restore-devices"] ?? [],
    ...(https === undefined
      ? {}
      : {
          https: {
            ...https.listen,
            ...(https.cert === undefined ? {} : { cert: https.cert }),
            ...(https.key === undefined ? {} : { key: https.key }),
          },
        }),
  };
  const vms = new Map<string, StaticVm>();
  for (const [name, v] of Object.entries(f.vms ?? {}))
    vms.set(name, { name, sources: v.sources, tags: v.tags ?? [] });
  const n = f.notifications;
  const events = n?.events ?? [...NOTICE_KINDS];
  const notifications: NotificationsConfig | undefined = n && {
    webhooks: (n.webhooks ?? []).map((w) => ({
      url: w.url,
      headers: w.headers ?? {},
      events: w.events ?? events,
    })),
    ...(n.email === undefined
      ? {}
      : {
          email: {
            host: n.email.host,
            port: n.email.port ?? (n.email.tls ? 465 : 587),
            tls: n.email.tls === true,
            ...(n.email.user === undefined ? {} : { user: n.email.user }),
            ...(n.email["password-file"] === undefined ? {} : { passwordFile: n.email["password-file"] }),
            from: n.email.from,
            to: n.email.to,
            events: n.email.events ?? events,
          },
        }),
    retries: n.retries ?? 3,
    timeoutMs: n.timeout ?? 10_000,
    rpoCheckMs: n["rpo-check"] ?? 60_000,
  };
  return {
    file,
    ...tz,
    ...(notifications === undefined ? {} : { notifications }),
    ...(f.catalog === undefined ? {} : { catalog: f.catalog }),
    ...(f.inventory === undefined ? {} : { inventory: f.inventory }),
    ...(f["state-dir"] === undefined ? {} : { stateDir: f["state-dir"] }),
    api,
    vms,
    repositories,
    limits: host,
    policies,
  };
}

// ---- which VMs a policy covers ----

/** A glob (`*`, `?`, `[...]`, `[!...]`) as an anchored regular expression. */
export function globRegExp(glob: string): RegExp {
  let re = "";
  for (let i = 0; i < glob.length; i++) {
    const c = glob[i]!;
    if (c === "*") re += ".*";
    else if (c === "?") re += ".";
    else if (c === "[") {
      const end = glob.indexOf("]", i + 2);
      if (end < 0) re += "\\[";
      else {
        let body = glob.slice(i + 1, end);
        if (body.startsWith("!")) body = `^${body.slice(1)}`;
        re += `[${body.replace(/\\/g, "\\\\")}]`;
        i = end;
      }
    } else re += c.replace(/[.*+?^${}()|[\]\\/-]/g, "\\$&");
  }
  return new RegExp(`^${re}$`);
}

/** The VMs of `vms` that `sel` covers, in the order given. */
export function selectVms<T extends Pick<VmSummary, "name" | "tags">>(
  sel: VmSelection,
  vms: readonly T[],
): T[] {
  const globs = sel.globs.map(globRegExp);
  const excludes = sel.exclude.map(globRegExp);
  return vms.filter((vm) => {
    const taken =
      sel.all ||
      sel.names.includes(vm.name) ||
      globs.some((g) => g.test(vm.name)) ||
      sel.tags.some((t) => vm.tags?.includes(t) === true);
    return taken && !excludes.some((g) => g.test(vm.name));
  });
}
