/* abi_host: a C packet-flow host over libtun2xray (tun2xray.h), on Linux.
 *
 * It does with a Linux TUN what a NEPacketTunnelProvider does with its
 * packetFlow, in C through the library's ABI alone:
 *   - opens the TUN itself (TUNSETIFF), sets MTU and addresses, brings it up;
 *   - reads packets in batches (readPackets) and submits each batch with
 *     Darwin's family numbers (2 / 30), or Linux's (2 / 10) with --linux-af;
 *     when the library says the queue is full it withholds reads until the
 *     resume signal, then resubmits the rest of the batch in order;
 *   - writes back what the outbound callback hands over (writePackets), or
 *     with --poll what a writer thread takes with t2x_poll_outbound;
 *   - with --protect ok|fail, answers protect() for the engine's sockets.
 *
 *   cc -O2 -o abi_host tools/abi_host.c -I DIR -L DIR -ltun2xray -Wl,-rpath,DIR -lpthread
 *   abi_host --tun NAME --config profile.json [--mtu N] [--addr CIDR]... [--poll]
 *            [--linux-af] [--batch N] [--protect ok|fail] [--status-file FILE]
 *
 * SIGTERM/SIGINT: stop, t2x_stop(), close the TUN, print the final status.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/if.h>
#include <linux/if_tun.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "tun2xray.h"

#define MAX_BATCH 256
#define PKT_MAX 65536
#define MAX_ADDRS 8

extern char **environ;

static struct {
    int fd, poll_mode, af6, batch, protect_fail, protect_on;
    const char *status_file;
    int32_t handle;
    volatile sig_atomic_t stopping;
    int sigpipe[2];
    pthread_mutex_t lock;
    pthread_cond_t room;          /* the resume signal arrived */
    int resumed;
    /* counters (under lock) */
    unsigned long rx_packets, rx_batches, rx_held, tx_packets, tx_dropped, tx_mismatch;
    unsigned long protect_calls, protect_not_socket;
} H = { .fd = -1, .af6 = 30, .batch = 64, .sigpipe = { -1, -1 },
        .lock = PTHREAD_MUTEX_INITIALIZER, .room = PTHREAD_COND_INITIALIZER };

static void die(const char *what, const char *why)
{
    fprintf(stderr, "abi_host: %s: %s\n", what, why);
    exit(2);
}

static void run_ip(char *const argv[])
{
    pid_t pid;
    int st;
    if (posix_spawnp(&pid, "ip", NULL, NULL, argv, environ) != 0 || waitpid(pid, &st, 0) < 0 ||
        !WIFEXITED(st) || WEXITSTATUS(st) != 0)
        die("ip", argv[1]);
}

static void open_tun(const char *name, int mtu, char **addrs, int naddrs)
{
    struct ifreq ifr = { 0 };
    char mtu_s[16];
    H.fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (H.fd < 0)
        die("/dev/net/tun", strerror(errno));
    ifr.ifr_flags = IFF_TUN | IFF_NO_PI;
    snprintf(ifr.ifr_name, IFNAMSIZ, "%s", name);
    if (ioctl(H.fd, TUNSETIFF, &ifr) < 0)
        die("TUNSETIFF", strerror(errno));
    snprintf(mtu_s, sizeof mtu_s, "%d", mtu);
    run_ip((char *[]){ "ip", "link", "set", "dev", ifr.ifr_name, "mtu", mtu_s, NULL });
    for (int i = 0; i < naddrs; i++) {
        int v6 = strchr(addrs[i], ':') != NULL;
        run_ip(v6 ? (char *[]){ "ip", "-6", "addr", "add", addrs[i], "dev", ifr.ifr_name, "nodad", NULL }
                  : (char *[]){ "ip", "addr", "add", addrs[i], "dev", ifr.ifr_name, NULL });
    }
    run_ip((char *[]){ "ip", "link", "set", "dev", ifr.ifr_name, "up", NULL });
}

/* ---------------------------------------------------------------- outbound */

static void write_packet(const uint8_t *p, size_t n, int32_t proto)
{
    int want = (p[0] >> 4) == 6 ? H.af6 : 2;
    int ok = write(H.fd, p, n) == (ssize_t)n;
    pthread_mutex_lock(&H.lock);
    H.tx_mismatch += proto != want;
    if (ok)
        H.tx_packets++;
    else
        H.tx_dropped++;
    pthread_mutex_unlock(&H.lock);
}

static void signal_room(void)
{
    pthread_mutex_lock(&H.lock);
    H.resumed = 1;
    pthread_cond_broadcast(&H.room);
    pthread_mutex_unlock(&H.lock);
}

/* the engine thread: writePackets, or (count 0) the resume signal */
static void on_outbound(void *ctx, const uint8_t *const *packets, const size_t *lengths,
                        const int32_t *protocols, size_t count)
{
    (void)ctx;
    if (count == 0) {
        signal_room();
        return;
    }
    for (size_t i = 0; i < count; i++)
        write_packet(packets[i], lengths[i], protocols[i]);
}

static void *poll_writer(void *arg)
{
    static uint8_t buf[PKT_MAX];
    int32_t proto, n;
    (void)arg;
    while (!H.stopping) {
        n = t2x_poll_outbound(H.handle, buf, sizeof buf, &proto, 200);
        if (n > 0)
            write_packet(buf, (size_t)n, proto);
        else if (n < 0 && n != T2X_E_SHORT)
            break;                              /* the handle is gone */
        signal_room();                          /* poll mode: retry held packets now */
    }
    return NULL;
}

static int32_t protect(void *ctx, int32_t fd)
{
    struct stat st;
    (void)ctx;
    pthread_mutex_lock(&H.lock);
    H.protect_calls++;
    if (fstat(fd, &st) != 0 || !S_ISSOCK(st.st_mode))
        H.protect_not_socket++;
    pthread_mutex_unlock(&H.lock);
    return H.protect_fail ? -1 : 0;             /* VpnService.protect(fd) would go here */
}

/* ----------------------------------------------------------------- inbound */

/* Submit n packets in order, withholding reads while the queue is full. */
static void submit_all(const uint8_t **pkts, size_t *lens, int32_t *protos, size_t n)
{
    size_t done = 0;
    while (done < n && !H.stopping) {
        pthread_mutex_lock(&H.lock);
        H.resumed = 0;
        pthread_mutex_unlock(&H.lock);
        int32_t r = t2x_submit_inbound_batch(H.handle, pkts + done, lens + done, protos + done, n - done);
        if (r < 0) {
            fprintf(stderr, "abi_host: submit: %s\n", t2x_last_error());
            return;
        }
        done += (size_t)r;
        if (done == n)
            return;
        pthread_mutex_lock(&H.lock);
        H.rx_held++;
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_nsec += 50 * 1000000L;         /* and retry every 50 ms whatever happens */
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (!H.resumed && !H.stopping)
            if (pthread_cond_timedwait(&H.room, &H.lock, &until) == ETIMEDOUT)
                break;
        pthread_mutex_unlock(&H.lock);
    }
}

static void read_batches(void)
{
    static uint8_t bufs[MAX_BATCH][PKT_MAX];
    const uint8_t *pkts[MAX_BATCH];
    size_t lens[MAX_BATCH];
    int32_t protos[MAX_BATCH];
    size_t n;
    do {
        n = 0;
        while (n < (size_t)H.batch) {
            ssize_t r = read(H.fd, bufs[n], PKT_MAX);
            if (r <= 0)
                break;
            pkts[n] = bufs[n];
            lens[n] = (size_t)r;
            protos[n] = (bufs[n][0] >> 4) == 6 ? H.af6 : 2;
            n++;
        }
        pthread_mutex_lock(&H.lock);
        H.rx_packets += n;
        H.rx_batches += n > 0;
        pthread_mutex_unlock(&H.lock);
        if (n)
            submit_all(pkts, lens, protos, n);
    } while (n == (size_t)H.batch && !H.stopping);
}

/* ------------------------------------------------------------------ status */

static void write_status(FILE *out)
{
    static char reply[1 << 20];
    int32_t n = t2x_message(H.handle, "{\"op\":\"status\"}", reply, sizeof reply);
    if (n < 0 || n >= (int32_t)sizeof reply)
        snprintf(reply, sizeof reply, "null");
    pthread_mutex_lock(&H.lock);
    fprintf(out, "{\"host\":{\"mode\":\"%s\",\"af6\":%d,\"rx_packets\":%lu,\"rx_batches\":%lu,"
            "\"rx_held\":%lu,\"tx_packets\":%lu,\"tx_dropped\":%lu,\"tx_family_mismatch\":%lu,"
            "\"protect_calls\":%lu,\"protect_not_socket\":%lu},\"reply\":%s}\n",
            H.poll_mode ? "poll" : "callback", H.af6, H.rx_packets, H.rx_batches, H.rx_held,
            H.tx_packets, H.tx_dropped, H.tx_mismatch, H.protect_calls, H.protect_not_socket, reply);
    pthread_mutex_unlock(&H.lock);
}

static void status_file(void)
{
    char tmp[4096];
    FILE *f;
    if (!H.status_file)
        return;
    snprintf(tmp, sizeof tmp, "%s.tmp", H.status_file);
    if (!(f = fopen(tmp, "w")))
        return;
    write_status(f);
    fclose(f);
    rename(tmp, H.status_file);
}

static void on_signal(int sig)
{
    (void)sig;
    H.stopping = 1;
    if (write(H.sigpipe[1], "x", 1) < 0) { /* the flag is enough */ }
}

static char *read_file(const char *path)
{
    FILE *f = fopen(path, "r");
    char *text = calloc(1, 1 << 20);
    if (!f || !text)
        die(path, strerror(errno));
    fread(text, 1, (1 << 20) - 1, f);
    fclose(f);
    return text;
}

int main(int argc, char **argv)
{
    const char *tun = NULL, *config = NULL;
    char *addrs[MAX_ADDRS];
    int naddrs = 0, mtu = 1500;
    pthread_t writer;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--poll")) H.poll_mode = 1;
        else if (!strcmp(a, "--linux-af")) H.af6 = 10;
        else if (!v) die(a, "needs a value");
        else if (!strcmp(a, "--tun")) tun = argv[++i];
        else if (!strcmp(a, "--config")) config = argv[++i];
        else if (!strcmp(a, "--mtu")) mtu = atoi(argv[++i]);
        else if (!strcmp(a, "--batch")) H.batch = atoi(argv[++i]);
        else if (!strcmp(a, "--status-file")) H.status_file = argv[++i];
        else if (!strcmp(a, "--addr") && naddrs < MAX_ADDRS) addrs[naddrs++] = argv[++i];
        else if (!strcmp(a, "--protect")) {
            H.protect_on = 1;
            H.protect_fail = !strcmp(argv[++i], "fail");
        } else die(a, "unknown flag");
    }
    if (!tun || !config || H.batch < 1 || H.batch > MAX_BATCH || mtu < 576)
        die("usage", "--tun NAME --config FILE [--mtu N] [--addr CIDR]... [--poll] [--linux-af] "
                     "[--batch 1..256] [--protect ok|fail] [--status-file FILE]");
    if (pipe2(H.sigpipe, O_CLOEXEC | O_NONBLOCK) < 0)
        die("pipe", strerror(errno));
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    signal(SIGPIPE, SIG_IGN);
    open_tun(tun, mtu, addrs, naddrs);
    char *profile = read_file(config);
    /* handle 0: protect every handle started from now on, from its first socket */
    if (H.protect_on && t2x_set_protect(0, protect, NULL) != T2X_OK)
        die("t2x_set_protect", t2x_last_error());
    H.handle = t2x_start(profile, H.poll_mode ? NULL : on_outbound, NULL);
    free(profile);
    if (H.handle <= 0)
        die("t2x_start", t2x_last_error());
    if (H.poll_mode && pthread_create(&writer, NULL, poll_writer, NULL) != 0)
        die("pthread_create", strerror(errno));
    fprintf(stderr, "abi_host: %s (mtu %d) -> handle %d, %s mode, AF_INET6 = %d, %s\n", tun, mtu,
            H.handle, H.poll_mode ? "poll" : "callback", H.af6, t2x_version());
    struct timespec last = { 0 }, now;
    while (!H.stopping) {
        struct pollfd fds[2] = { { H.fd, POLLIN, 0 }, { H.sigpipe[0], POLLIN, 0 } };
        if (poll(fds, 2, 500) < 0 && errno != EINTR)
            break;
        if (fds[0].revents & POLLIN)
            read_batches();
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (now.tv_sec * 1000 + now.tv_nsec / 1000000 - (last.tv_sec * 1000 + last.tv_nsec / 1000000) >= 500) {
            last = now;
            status_file();
        }
    }
    H.stopping = 1;
    status_file();
    write_status(stdout);                       /* the final status, before the handle goes */
    int32_t r = t2x_stop(H.handle);
    if (H.poll_mode)
        pthread_join(writer, NULL);
    close(H.fd);
    if (r != T2X_OK)
        die("t2x_stop", t2x_last_error());
    return 0;
}
