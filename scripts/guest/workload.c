/*
 * strata-workload: writes sequence-numbered, checksummed 4 KiB records to a block device (or a
 * regular file) at a steady rate, so that a backup or a restore of that disk can be checked for
 * a gap-free prefix of writes. Built static by scripts/build-test-guest.sh; runs in the test guest
 * and on the host (tests run it against plain files).
 *
 * Record layout (frozen; mirrored by test/helpers/records.ts). All integers little-endian.
 *
 *   offset size field
 *   0      8    magic        ASCII "STRATAW1"
 *   8      4    version      1
 *   12     4    record_size  4096
 *   16     8    run_id       random per process start; every run begins at slot 0
 *   24     8    seq          1, 2, 3, ... (seq s lives in slot (s - 1) % slots)
 *   32     8    slot         index of this record inside the region
 *   40     8    slots        number of 4 KiB slots in the region (the ring size)
 *   48     8    region_off   byte offset of the region on the device
 *   56     8    time_ns      guest CLOCK_MONOTONIC just before this record's write
 *   64     8    prev_lat_ns  how long the previous record's write took (0 for seq 1)
 *   72     4020 fill         pseudo-random bytes (splitmix64 of run_id ^ seq), not compressible
 *   4092   4    crc32        CRC-32 (IEEE 802.3, as zlib) of bytes 0..4091
 *
 * Writes are sequential, one at a time, each with O_DIRECT|O_DSYNC: when write() returns for seq s,
 * seqs 1..s are on stable storage. A crash-consistent copy of the disk taken at any instant thus
 * holds every record of a prefix 1..N of the current run (the last `slots` of them once the ring
 * has wrapped), and slot 0 always belongs to the newest run.
 *
 * Usage: strata-workload [options] TARGET [TARGET...]
 *   With several targets, every record is written to each target in turn (first to last) before
 *   the next seq: a copy of all targets cut at one instant has last seqs that differ by at most
 *   one, the earlier targets ahead. The region size is the smallest that fits every target.
 *   -r RATE     records per second (default 50; 0 = as fast as possible)
 *   -o OFFSET   region start in bytes (default 0; multiple of 4096; K/M/G suffixes allowed)
 *   -s SIZE     region size in bytes (default: the rest of the device; required for an empty file)
 *   -n COUNT    stop after COUNT records (default: run until SIGTERM/SIGINT)
 *   -p EVERY    print a latency summary every EVERY records (default 250)
 *   -l FILE     also append the summaries to FILE
 *
 * Summary lines (stdout, and FILE): "STRATA-WORKLOAD stats seq=S n=N p50_us=A p99_us=B max_us=C"
 * over the records written since the previous summary; a final one with "final" after the word
 * stats is printed on exit. The first line printed is "STRATA-WORKLOAD start run=<hex> slots=N".
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/fs.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define REC 4096
#define MAGIC "STRATAW1"

static volatile sig_atomic_t stop_requested = 0;
static void on_signal(int sig) {
  (void)sig;
  stop_requested = 1;
}

static uint32_t crc_table[256];
static void crc_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}
static uint32_t crc32_ieee(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  while (n--) c = crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

static uint64_t splitmix64(uint64_t *x) {
  uint64_t z = (*x += 0x9E3779B97F4A7C15ull);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

static void put_u32(uint8_t *p, uint32_t v) {
  for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i));
}
static void put_u64(uint8_t *p, uint64_t v) {
  for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
  uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
  return x < y ? -1 : x > y;
}

static FILE *log_file = NULL;

/* Prints the summary of lat[0..n) (nanoseconds) and sorts it in place. */
static void report(const char *tag, uint64_t seq, uint64_t *lat, size_t n) {
  uint64_t p50 = 0, p99 = 0, max = 0;
  if (n > 0) {
    qsort(lat, n, sizeof lat[0], cmp_u64);
    p50 = lat[(n - 1) / 2];
    p99 = lat[(n * 99 + 99) / 100 - 1];
    max = lat[n - 1];
  }
  char line[200];
  snprintf(line, sizeof line, "STRATA-WORKLOAD stats%s seq=%llu n=%zu p50_us=%llu p99_us=%llu max_us=%llu\n", tag,
           (unsigned long long)seq, n, (unsigned long long)(p50 / 1000), (unsigned long long)(p99 / 1000),
           (unsigned long long)(max / 1000));
  fputs(line, stdout);
  fflush(stdout);
  if (log_file) {
    fputs(line, log_file);
    fflush(log_file);
  }
}

/* A number, with an optional binary suffix K, M or G (sizes). */
static uint64_t parse_u64(const char *s, const char *what) {
  char *end;
  errno = 0;
  unsigned long long v = strtoull(s, &end, 0);
  if (*end == 'K' || *end == 'k') v <<= 10, end++;
  else if (*end == 'M' || *end == 'm') v <<= 20, end++;
  else if (*end == 'G' || *end == 'g') v <<= 30, end++;
  if (errno || *end || end == s) {
    fprintf(stderr, "strata-workload: bad %s: %s\n", what, s);
    exit(2);
  }
  return v;
}

int main(int argc, char **argv) {
  uint64_t rate = 50, offset = 0, size = 0, count = 0, every = 250;
  const char *log_path = NULL;
  int opt;
  while ((opt = getopt(argc, argv, "r:o:s:n:p:l:")) != -1) {
    switch (opt) {
      case 'r': rate = parse_u64(optarg, "rate"); break;
      case 'o': offset = parse_u64(optarg, "offset"); break;
      case 's': size = parse_u64(optarg, "size"); break;
      case 'n': count = parse_u64(optarg, "count"); break;
      case 'p': every = parse_u64(optarg, "report interval"); break;
      case 'l': log_path = optarg; break;
      default:
        fprintf(stderr, "usage: strata-workload [-r rate] [-o offset] [-s size] [-n count] [-p every] [-l file] TARGET\n");
        return 2;
    }
  }
  if (optind >= argc || argc - optind > 8) {
    fprintf(stderr, "strata-workload: one to eight TARGETs expected\n");
    return 2;
  }
  int ntargets = argc - optind;
  int fds[8];
  if (offset % REC || size % REC) {
    fprintf(stderr, "strata-workload: offset and size must be multiples of %d\n", REC);
    return 2;
  }
  if (every == 0) every = 250;

  const uint64_t size_opt = size;
  uint64_t want = 0;
  for (int ti = 0; ti < ntargets; ti++) {
  size = size_opt;
  const char *target = argv[optind + ti];
  int fd = open(target, O_RDWR | O_DIRECT | O_DSYNC | O_CREAT, 0644);
  if (fd < 0 && errno == EINVAL) fd = open(target, O_RDWR | O_DSYNC | O_CREAT, 0644); /* no O_DIRECT here */
  if (fd < 0) {
    fprintf(stderr, "strata-workload: open %s: %s\n", target, strerror(errno));
    return 1;
  }
  struct stat st;
  if (fstat(fd, &st) < 0) {
    perror("strata-workload: fstat");
    return 1;
  }
  uint64_t dev_size = (uint64_t)st.st_size;
  if (S_ISBLK(st.st_mode) && ioctl(fd, BLKGETSIZE64, &dev_size) < 0) {
    perror("strata-workload: BLKGETSIZE64");
    return 1;
  }
  if (size == 0) size = dev_size > offset ? (dev_size - offset) / REC * REC : 0;
  if (size == 0 || (S_ISBLK(st.st_mode) && offset + size > dev_size)) {
    fprintf(stderr, "strata-workload: region offset=%llu size=%llu does not fit %s (%llu bytes)\n",
            (unsigned long long)offset, (unsigned long long)size, target, (unsigned long long)dev_size);
    return 1;
  }
  /* A regular file is extended (sparsely) to hold the whole region, as a device would. */
  if (S_ISREG(st.st_mode) && dev_size < offset + size && ftruncate(fd, (off_t)(offset + size)) < 0) {
    perror("strata-workload: ftruncate");
    return 1;
  }
  fds[ti] = fd;
  if (ti == 0 || size < want) want = size;
  }
  size = want;
  uint64_t slots = size / REC;

  if (log_path) {
    log_file = fopen(log_path, "a");
    if (!log_file) fprintf(stderr, "strata-workload: cannot open %s: %s\n", log_path, strerror(errno));
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_signal;
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);

  crc_init();
  uint64_t run_id;
  {
    int r = open("/dev/urandom", O_RDONLY);
    if (r < 0 || read(r, &run_id, sizeof run_id) != sizeof run_id) run_id = now_ns() ^ ((uint64_t)getpid() << 32);
    if (r >= 0) close(r);
  }
  printf("STRATA-WORKLOAD start run=%016llx slots=%llu rate=%llu\n", (unsigned long long)run_id,
         (unsigned long long)slots, (unsigned long long)rate);
  fflush(stdout);

  uint8_t *buf;
  if (posix_memalign((void **)&buf, REC, REC)) {
    fprintf(stderr, "strata-workload: out of memory\n");
    return 1;
  }
  uint64_t *lat = calloc(every, sizeof *lat);
  size_t nlat = 0;
  uint64_t prev_lat = 0, seq = 0;
  uint64_t interval = rate ? 1000000000ull / rate : 0;
  uint64_t next = now_ns();
  int rc = 0;

  while (!stop_requested && (count == 0 || seq < count)) {
    if (interval) {
      struct timespec ts = {(time_t)(next / 1000000000ull), (long)(next % 1000000000ull)};
      while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR && !stop_requested) {
      }
      if (stop_requested) break;
      next += interval;
      uint64_t t = now_ns();
      if (next + 1000000000ull < t) next = t; /* fell far behind: do not burst to catch up */
    }
    uint64_t s = seq + 1;
    uint64_t slot = (s - 1) % slots;
    memcpy(buf, MAGIC, 8);
    put_u32(buf + 8, 1);
    put_u32(buf + 12, REC);
    put_u64(buf + 16, run_id);
    put_u64(buf + 24, s);
    put_u64(buf + 32, slot);
    put_u64(buf + 40, slots);
    put_u64(buf + 48, offset);
    uint64_t t0 = now_ns();
    put_u64(buf + 56, t0);
    put_u64(buf + 64, prev_lat);
    uint64_t x = run_id ^ s;
    for (size_t i = 72; i < REC - 4; i += 4) put_u32(buf + i, (uint32_t)splitmix64(&x));
    put_u32(buf + REC - 4, crc32_ieee(buf, REC - 4));

    ssize_t w = REC;
    for (int ti = 0; ti < ntargets && w == REC; ti++) w = pwrite(fds[ti], buf, REC, (off_t)(offset + slot * REC));
    if (w != REC) {
      fprintf(stderr, "strata-workload: write seq %llu: %s\n", (unsigned long long)s,
              w < 0 ? strerror(errno) : "short write");
      rc = 1;
      break;
    }
    prev_lat = now_ns() - t0;
    seq = s;
    lat[nlat++] = prev_lat;
    if (nlat == every) {
      report("", seq, lat, nlat);
      nlat = 0;
    }
  }
  report(" final", seq, lat, nlat);
  for (int ti = 0; ti < ntargets; ti++) close(fds[ti]);
  return rc;
}
