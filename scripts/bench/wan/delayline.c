/*
 * delayline: a one-way-delay line between two TUN devices, standing in for a
 * WAN link (these kernels have no sch_netem).
 *
 *   delayline <tun-a> <tun-b> <one-way-delay-us>
 *
 * Creates both TUN devices (IFF_TUN | IFF_NO_PI, not persistent: they vanish
 * when this process exits). Every IP packet read from one device is written to
 * the other after exactly the one-way delay, in order, in both directions,
 * ACKs included. The caller moves the devices into their network namespaces and
 * gives them addresses (scripts/bench/wan/link.ts).
 *
 * It also watches TCP traffic so round trips can be counted: every segment
 * carrying payload (pure ACKs do not count) is logged with its direction, size
 * and CLOCK_MONOTONIC time on entering the line (the clock behind Node's
 * process.hrtime), so a caller can attribute segments to its own operations.
 * A "burst" is a run of payload segments in one direction; the counters keep
 * how many there were. Only segments to or from the filtered TCP port are
 * counted (0 = every TCP segment).
 *
 * Commands on stdin, one per line, each answered by one line on stdout:
 *   filter <port>   count only this TCP port                     -> "ok"
 *   reset           clear counters and the segment log           -> "ok"
 *   stats           "pkts a b data a b bytes a b bursts a b drops n"
 *   dump <path>     write the segment log ("<ns> <a|b> <payload bytes>") -> "ok <n>"
 * EOF on stdin ends the program (so it never outlives its parent).
 * "a" is the direction tun-a -> tun-b, "b" the reverse.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <time.h>
#include <unistd.h>

#define MAX_PKT 65536
#define QUEUE_CAP 65536 /* packets held per direction */
#define LOG_CAP (1 << 21)

typedef struct {
  int64_t due_ns;
  uint32_t len;
  uint8_t *data;
} packet;

typedef struct {
  packet slots[QUEUE_CAP];
  uint32_t head, count;
} queue;

typedef struct {
  int64_t t_ns;
  uint32_t bytes;
  uint8_t dir;
} segment;

static queue q[2]; /* q[d]: packets read from side d, to be written to side 1-d */
static int fds[2];
static int64_t delay_ns;
static unsigned filter_port;
static uint64_t pkts[2], data_pkts[2], bytes[2], bursts[2], drops;
static int last_dir = -1;
static segment *slog;
static uint32_t slog_n;

static int64_t now_ns(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static int tun_open(const char *name) {
  int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
  if (fd < 0) return -1;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
  strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
  if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
    close(fd);
    return -1;
  }
  return fd;
}

/* TCP payload length of an IPv4/IPv6 packet when it matches the filter, else -1. */
static int tcp_payload(const uint8_t *p, uint32_t len) {
  uint32_t ip_hdr, total, l4;
  if (len < 20) return -1;
  if ((p[0] >> 4) == 4) {
    ip_hdr = (p[0] & 0x0f) * 4u;
    total = ((uint32_t)p[2] << 8) | p[3];
    if (p[9] != 6) return -1;
  } else if ((p[0] >> 4) == 6 && len >= 40) {
    ip_hdr = 40; /* no extension headers on this link */
    total = 40 + (((uint32_t)p[4] << 8) | p[5]);
    if (p[6] != 6) return -1;
  } else {
    return -1;
  }
  l4 = ip_hdr;
  if (total > len || l4 + 20 > total) return -1;
  unsigned sport = ((unsigned)p[l4] << 8) | p[l4 + 1];
  unsigned dport = ((unsigned)p[l4 + 2] << 8) | p[l4 + 3];
  if (filter_port != 0 && sport != filter_port && dport != filter_port) return -1;
  uint32_t doff = (p[l4 + 12] >> 4) * 4u;
  if (l4 + doff > total) return -1;
  return (int)(total - l4 - doff);
}

static void account(int dir, const uint8_t *p, uint32_t len, int64_t t) {
  pkts[dir]++;
  bytes[dir] += len;
  int payload = tcp_payload(p, len);
  if (payload <= 0) return;
  data_pkts[dir]++;
  if (dir != last_dir) {
    last_dir = dir;
    bursts[dir]++;
  }
  if (slog_n < LOG_CAP) slog[slog_n++] = (segment){t, (uint32_t)payload, (uint8_t)dir};
}

static void read_side(int dir) {
  static uint8_t buf[MAX_PKT];
  for (;;) {
    ssize_t n = read(fds[dir], buf, sizeof buf);
    if (n <= 0) return; /* EAGAIN (or the device went away) */
    int64_t t = now_ns();
    account(dir, buf, (uint32_t)n, t);
    queue *qq = &q[dir];
    if (qq->count == QUEUE_CAP) {
      drops++;
      continue;
    }
    packet *slot = &qq->slots[(qq->head + qq->count) % QUEUE_CAP];
    slot->data = malloc((size_t)n);
    if (!slot->data) {
      drops++;
      continue;
    }
    memcpy(slot->data, buf, (size_t)n);
    slot->len = (uint32_t)n;
    slot->due_ns = t + delay_ns;
    qq->count++;
  }
}

/* Writes every packet that is due; returns the earliest pending due time (or -1). */
static int64_t release(void) {
  int64_t next = -1, t = now_ns();
  for (int dir = 0; dir < 2; dir++) {
    queue *qq = &q[dir];
    while (qq->count > 0) {
      packet *pk = &qq->slots[qq->head];
      if (pk->due_ns > t) {
        if (next < 0 || pk->due_ns < next) next = pk->due_ns;
        break;
      }
      if (write(fds[1 - dir], pk->data, pk->len) < 0 && errno != EAGAIN) drops++;
      free(pk->data);
      qq->head = (qq->head + 1) % QUEUE_CAP;
      qq->count--;
    }
  }
  return next;
}

static void reply(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void reply(const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vprintf(fmt, ap);
  va_end(ap);
  putchar('\n');
  fflush(stdout);
}

static void command(char *line) {
  char path[4096];
  unsigned port;
  if (sscanf(line, "filter %u", &port) == 1) {
    filter_port = port;
    reply("ok");
  } else if (strncmp(line, "reset", 5) == 0) {
    memset(pkts, 0, sizeof pkts);
    memset(data_pkts, 0, sizeof data_pkts);
    memset(bytes, 0, sizeof bytes);
    memset(bursts, 0, sizeof bursts);
    drops = 0;
    slog_n = 0;
    last_dir = -1;
    reply("ok");
  } else if (strncmp(line, "stats", 5) == 0) {
    reply("pkts %llu %llu data %llu %llu bytes %llu %llu bursts %llu %llu drops %llu", (unsigned long long)pkts[0],
          (unsigned long long)pkts[1], (unsigned long long)data_pkts[0], (unsigned long long)data_pkts[1],
          (unsigned long long)bytes[0], (unsigned long long)bytes[1], (unsigned long long)bursts[0],
          (unsigned long long)bursts[1], (unsigned long long)drops);
  } else if (sscanf(line, "dump %4095s", path) == 1) {
    FILE *f = fopen(path, "w");
    if (!f) {
      reply("error %s", strerror(errno));
      return;
    }
    for (uint32_t i = 0; i < slog_n; i++)
      fprintf(f, "%lld %c %u\n", (long long)slog[i].t_ns, slog[i].dir ? 'b' : 'a', slog[i].bytes);
    fclose(f);
    reply("ok %u", slog_n);
  } else {
    reply("error unknown command");
  }
}

/* Reads whatever stdin has; returns 0 on EOF. */
static int read_commands(void) {
  static char buf[8192];
  static size_t used;
  ssize_t n = read(STDIN_FILENO, buf + used, sizeof buf - 1 - used);
  if (n == 0) return 0;
  if (n < 0) return errno == EAGAIN || errno == EINTR;
  used += (size_t)n;
  buf[used] = 0;
  char *start = buf, *nl;
  while ((nl = memchr(start, '\n', used - (size_t)(start - buf)))) {
    *nl = 0;
    command(start);
    start = nl + 1;
  }
  used -= (size_t)(start - buf);
  memmove(buf, start, used);
  if (used == sizeof buf - 1) used = 0; /* an absurdly long line: drop it */
  return 1;
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: %s <tun-a> <tun-b> <one-way-delay-us>\n", argv[0]);
    return 2;
  }
  signal(SIGPIPE, SIG_IGN);
  delay_ns = atoll(argv[3]) * 1000LL;
  slog = calloc(LOG_CAP, sizeof *slog);
  for (int i = 0; i < 2; i++) {
    fds[i] = tun_open(argv[1 + i]);
    if (fds[i] < 0) {
      fprintf(stderr, "delayline: cannot create TUN device %s: %s\n", argv[1 + i], strerror(errno));
      return 1;
    }
  }
  fcntl(STDIN_FILENO, F_SETFL, fcntl(STDIN_FILENO, F_GETFL) | O_NONBLOCK);
  reply("ready");

  struct pollfd pfd[3] = {{fds[0], POLLIN, 0}, {fds[1], POLLIN, 0}, {STDIN_FILENO, POLLIN, 0}};
  for (;;) {
    int64_t next = release();
    struct timespec ts, *timeout = NULL;
    if (next >= 0) {
      int64_t wait = next - now_ns();
      if (wait < 0) wait = 0;
      ts.tv_sec = wait / 1000000000LL;
      ts.tv_nsec = wait % 1000000000LL;
      timeout = &ts;
    }
    if (ppoll(pfd, 3, timeout, NULL) < 0 && errno != EINTR) return 1;
    if (pfd[0].revents & POLLIN) read_side(0);
    if (pfd[1].revents & POLLIN) read_side(1);
    if (pfd[2].revents & (POLLIN | POLLHUP | POLLERR)) {
      if (!read_commands()) return 0;
    }
  }
}
