/*
 * The benchmark's UDP echo client: paces 120-octet probes at a fixed rate, times each round trip.
 *
 * Every probe is a 112-octet header read from a file (an authenticated STAMP Session-Sender
 * packet, so Reflector's echo answers it; any echo server answers it) followed by an 8-octet
 * sequence number. Reflector copies octets after the first 112 into its reply unchanged and a
 * plain echo returns them as they are, so the number sits at offset 112 in every reply and the
 * same client times every server. Probes go round robin over one socket per source address
 * (Reflector's echo answers each source within its own session and rate limit).
 *
 * "send_sec" is how long sending took: sent / send_sec is the rate achieved (a client starved of
 * CPU catches up in bursts, so it stays near the rate asked for unless it is badly starved).
 * RTT is CLOCK_MONOTONIC just before send() to just after recv(): user space to user space.
 * With -t the reply is parsed as a STAMP Session-Reflector packet and T3 - T2 (the reflector's
 * own receive-to-send time) is reported too. Output: one JSON object on stdout.
 *
 * Usage: udp_client -s HOST:PORT -r RATE -d SECONDS -H HEADERS -b SRC[,SRC...] [-t]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HEADER_LEN 112
#define PROBE_LEN (HEADER_LEN + 8)
#define MAX_SOURCES 64
/* Bounds on one run: a runaway rate or duration must not allocate without end. */
#define MAX_PROBES 10000000ULL
/* Replies still in flight when sending stops are waited for this long. */
#define DRAIN_NS 300000000ULL
/* Below this much time to the next send the client spins instead of sleeping in ppoll. */
#define SPIN_NS 200000ULL
/* Kernel socket buffers big enough for a burst at the highest rate tried. */
#define SOCKET_BUFFER (4 * 1024 * 1024)
/* A send more than this behind its schedule means the client, not the server, fell behind. */
#define LATE_NS 1000000ULL

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

/* Nearest-rank percentile of a sorted array. */
static size_t rank(size_t n, double q) {
    size_t idx = (size_t)(q * (double)n + 0.999999);
    return idx == 0 ? 0 : (idx > n ? n - 1 : idx - 1);
}

static uint64_t be64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 0; i < 8; i++)
        v = (v << 8) | p[i];
    return v;
}

struct state {
    int fds[MAX_SOURCES];
    struct pollfd pfds[MAX_SOURCES];
    int nsrc;
    uint64_t total;
    uint64_t *sent_at;
    unsigned char *got;
    uint64_t *rtt;
    int64_t *proc;
    uint64_t received;
    int stamp;
};

static void on_reply(struct state *s, const unsigned char *buf, ssize_t n, uint64_t t) {
    if (n < PROBE_LEN)
        return;
    uint64_t seq;
    memcpy(&seq, buf + HEADER_LEN, 8);
    if (seq >= s->total || s->got[seq] || s->sent_at[seq] == 0)
        return;
    s->got[seq] = 1;
    s->rtt[s->received] = t - s->sent_at[seq];
    if (s->stamp) {
        /* Session-Reflector packet: T3 (Timestamp) at 16, T2 (Receive Timestamp) at 32. */
        int64_t delta = (int64_t)(be64(buf + 16) - be64(buf + 32));
        s->proc[s->received] = (int64_t)((double)delta * 1e9 / 4294967296.0);
    }
    s->received++;
}

/* Read every reply already queued; wait up to timeout_ns for the first one. */
static void drain(struct state *s, uint64_t timeout_ns) {
    struct timespec ts = {(time_t)(timeout_ns / 1000000000ULL), (long)(timeout_ns % 1000000000ULL)};
    if (ppoll(s->pfds, (nfds_t)s->nsrc, &ts, NULL) <= 0)
        return;
    unsigned char buf[2048];
    for (int i = 0; i < s->nsrc; i++) {
        if (!(s->pfds[i].revents & POLLIN))
            continue;
        for (;;) {
            ssize_t n = recv(s->fds[i], buf, sizeof buf, MSG_DONTWAIT);
            if (n < 0)
                break;
            on_reply(s, buf, n, now_ns());
        }
    }
}

static int open_source(const char *src, const struct sockaddr_in *server) {
    struct sockaddr_in local;
    memset(&local, 0, sizeof local);
    local.sin_family = AF_INET;
    if (inet_pton(AF_INET, src, &local.sin_addr) != 1) {
        fprintf(stderr, "udp_client: not an IPv4 address: %s\n", src);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_DGRAM, 0);
    int size = SOCKET_BUFFER;
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, sizeof size);
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &size, sizeof size);
    if (fd < 0 || bind(fd, (struct sockaddr *)&local, sizeof local) != 0 ||
        connect(fd, (const struct sockaddr *)server, sizeof *server) != 0) {
        perror("udp_client: socket");
        exit(1);
    }
    return fd;
}

static void print_summary(struct state *s, uint64_t late, double send_sec) {
    uint64_t n = s->received;
    printf("{\"sent\":%llu,\"received\":%llu,\"late_sends\":%llu,\"send_sec\":%.6f",
           (unsigned long long)s->total, (unsigned long long)n, (unsigned long long)late,
           send_sec);
    if (n > 0) {
        qsort(s->rtt, n, sizeof *s->rtt, cmp_u64);
        printf(",\"rtt_ns\":{\"min\":%llu,\"p50\":%llu,\"p99\":%llu,\"p999\":%llu,\"max\":%llu}",
               (unsigned long long)s->rtt[0], (unsigned long long)s->rtt[rank(n, 0.5)],
               (unsigned long long)s->rtt[rank(n, 0.99)],
               (unsigned long long)s->rtt[rank(n, 0.999)], (unsigned long long)s->rtt[n - 1]);
    }
    if (n > 0 && s->stamp) {
        qsort(s->proc, n, sizeof *s->proc, cmp_i64);
        printf(",\"proc_ns\":{\"p50\":%lld,\"p99\":%lld}", (long long)s->proc[rank(n, 0.5)],
               (long long)s->proc[rank(n, 0.99)]);
    }
    printf("}\n");
}

int main(int argc, char **argv) {
    const char *server_arg = NULL, *headers_path = NULL, *sources = "127.0.0.1";
    double rate = 1000, seconds = 1;
    struct state s;
    memset(&s, 0, sizeof s);
    int opt;
    while ((opt = getopt(argc, argv, "s:r:d:H:b:t")) != -1) {
        switch (opt) {
        case 's': server_arg = optarg; break;
        case 'r': rate = atof(optarg); break;
        case 'd': seconds = atof(optarg); break;
        case 'H': headers_path = optarg; break;
        case 'b': sources = optarg; break;
        case 't': s.stamp = 1; break;
        default: return 2;
        }
    }
    if (!server_arg || !headers_path || rate <= 0 || seconds <= 0) {
        fprintf(stderr, "usage: udp_client -s HOST:PORT -r RATE -d SECONDS -H HEADERS"
                        " -b SRC[,SRC...] [-t]\n");
        return 2;
    }
    char host[64];
    const char *colon = strrchr(server_arg, ':');
    if (!colon || (size_t)(colon - server_arg) >= sizeof host)
        return 2;
    memcpy(host, server_arg, (size_t)(colon - server_arg));
    host[colon - server_arg] = 0;
    struct sockaddr_in server;
    memset(&server, 0, sizeof server);
    server.sin_family = AF_INET;
    server.sin_port = htons((unsigned short)atoi(colon + 1));
    if (inet_pton(AF_INET, host, &server.sin_addr) != 1)
        return 2;

    char list[1024];
    snprintf(list, sizeof list, "%s", sources);
    for (char *tok = strtok(list, ","); tok && s.nsrc < MAX_SOURCES; tok = strtok(NULL, ",")) {
        s.fds[s.nsrc] = open_source(tok, &server);
        s.pfds[s.nsrc].fd = s.fds[s.nsrc];
        s.pfds[s.nsrc].events = POLLIN;
        s.nsrc++;
    }
    unsigned char headers[MAX_SOURCES][HEADER_LEN];
    FILE *fh = fopen(headers_path, "rb");
    if (!fh || fread(headers, HEADER_LEN, (size_t)s.nsrc, fh) != (size_t)s.nsrc) {
        fprintf(stderr, "udp_client: %s must hold %d headers of %d octets\n", headers_path,
                s.nsrc, HEADER_LEN);
        return 2;
    }
    fclose(fh);

    s.total = (uint64_t)(rate * seconds);
    if (s.total == 0 || s.total > MAX_PROBES)
        return 2;
    s.sent_at = calloc(s.total, sizeof *s.sent_at);
    s.got = calloc(s.total, 1);
    s.rtt = calloc(s.total, sizeof *s.rtt);
    s.proc = calloc(s.total, sizeof *s.proc);
    if (!s.sent_at || !s.got || !s.rtt || !s.proc)
        return 1;

    /* The default 50 us timer slack would make every short sleep overshoot its send time. */
    prctl(PR_SET_TIMERSLACK, 1UL, 0, 0, 0);
    uint64_t interval = (uint64_t)(1e9 / rate);
    uint64_t start = now_ns() + 10000000ULL, late = 0;
    unsigned char probe[PROBE_LEN];
    for (uint64_t i = 0; i < s.total;) {
        uint64_t now = now_ns();
        while (i < s.total && start + i * interval <= now) {
            int src = (int)(i % (uint64_t)s.nsrc);
            memcpy(probe, headers[src], HEADER_LEN);
            memcpy(probe + HEADER_LEN, &i, 8);
            uint64_t t = now_ns();
            if (t - (start + i * interval) > LATE_NS)
                late++;
            s.sent_at[i] = t;
            if (send(s.fds[src], probe, PROBE_LEN, 0) < 0 && errno != ECONNREFUSED)
                s.sent_at[i] = 0;
            i++;
        }
        uint64_t next = start + i * interval, t = now_ns();
        uint64_t wait = next > t + SPIN_NS ? next - t - SPIN_NS / 2 : 0;
        drain(&s, i < s.total ? wait : 0);
    }
    double send_sec = (double)(now_ns() - start) / 1e9;
    uint64_t end = now_ns() + DRAIN_NS;
    while (s.received < s.total && now_ns() < end)
        drain(&s, 10000000ULL);
    print_summary(&s, late, send_sec);
    return 0;
}
