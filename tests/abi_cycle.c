/* abi_cycle PROFILE_JSON WARMUP CYCLES: start and stop a libtun2xray handle
 * WARMUP + CYCLES times, each time with one UDP datagram through it (port
 * 53, the profile's dokodemo rule to a UDP echo server), starting on the
 * main thread and stopping on another host thread every other cycle.
 * Prints {"cycles", "echoes", "fds", "threads", "rss_kb"} after the warm-up
 * and at the end (tests/test_abi.py). */
#include <dirent.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "tun2xray.h"

static int count_dir(const char *path)
{
    DIR *d = opendir(path);
    struct dirent *e;
    int n = 0;
    if (!d)
        return -1;
    while ((e = readdir(d)))
        n += e->d_name[0] != '.';
    closedir(d);
    return n - 1;           /* the DIR's own fd, for /proc/self/fd */
}

static long rss_kb(void)
{
    long pages = 0, resident = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (!f || fscanf(f, "%ld %ld", &pages, &resident) != 2)
        exit(3);
    fclose(f);
    return resident * (sysconf(_SC_PAGESIZE) / 1024);
}

/* IPv4/UDP 198.18.0.1:40000 -> 10.1.2.3:53, "ping", checksums filled in */
static size_t udp_ping(uint8_t *p)
{
    static const uint8_t pkt[] = {
        0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0, 198, 18, 0, 1, 10, 1, 2, 3,
        0x9c, 0x40, 0, 53, 0, 12, 0, 0, 'p', 'i', 'n', 'g' };
    uint32_t s = 0;
    memcpy(p, pkt, sizeof pkt);
    for (int i = 0; i < 20; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    p[10] = (uint8_t)(~s >> 8);
    p[11] = (uint8_t)~s;
    s = 198 * 256 + 18 + 0 * 256 + 1 + 10 * 256 + 1 + 2 * 256 + 3 + 17 + 12;   /* pseudo-header */
    for (int i = 20; i < 32; i += 2)
        s += (uint32_t)(p[i] << 8 | p[i + 1]);
    while (s >> 16)
        s = (s & 0xffff) + (s >> 16);
    p[26] = (uint8_t)(~s >> 8);
    p[27] = (uint8_t)~s;
    return sizeof pkt;
}

static void *stop_thread(void *arg)
{
    return (void *)(intptr_t)t2x_stop((int32_t)(intptr_t)arg);
}

static int cycle(const char *profile, int i)
{
    uint8_t pkt[64], buf[2048];
    int32_t proto, n;
    int echoed = 0;
    int32_t h = t2x_start(profile, NULL, NULL);
    if (h <= 0) {
        fprintf(stderr, "t2x_start: %s\n", t2x_last_error());
        exit(1);
    }
    size_t len = udp_ping(pkt);
    if (t2x_submit_inbound(h, pkt, len, 2) != T2X_OK) {
        fprintf(stderr, "submit: %s\n", t2x_last_error());
        exit(1);
    }
    n = t2x_poll_outbound(h, buf, sizeof buf, &proto, 5000);
    echoed = n == 20 + 8 + 9 && proto == 2 && !memcmp(buf + 28, "echo:ping", 9);
    if (i % 2) {
        pthread_t t;
        void *r;
        pthread_create(&t, NULL, stop_thread, (void *)(intptr_t)h);
        pthread_join(t, &r);
        n = (int32_t)(intptr_t)r;
    } else {
        n = t2x_stop(h);
    }
    if (n != T2X_OK || t2x_stop(h) != T2X_E_HANDLE) {
        fprintf(stderr, "stop: %d %s\n", n, t2x_last_error());
        exit(1);
    }
    return echoed;
}

static void report(int cycles, int echoes)
{
    printf("{\"cycles\":%d,\"echoes\":%d,\"fds\":%d,\"threads\":%d,\"rss_kb\":%ld}\n", cycles, echoes,
           count_dir("/proc/self/fd"), count_dir("/proc/self/task") + 1, rss_kb());
    fflush(stdout);
}

int main(int argc, char **argv)
{
    if (argc != 4)
        return 2;
    int warm = atoi(argv[2]), cycles = atoi(argv[3]), echoes = 0, i = 0;
    for (; i < warm; i++)
        echoes += cycle(argv[1], i);
    report(i, echoes);
    for (; i < warm + cycles; i++)
        echoes += cycle(argv[1], i);
    report(i, echoes);
    return 0;
}
