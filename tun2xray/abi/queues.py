"""The C host's packet queues, kept in C: a submit, and in poll mode a
poll, never takes the GIL.

A host thread's `t2x_submit_inbound*` checks each packet's family, copies
it into the handle's queue under a pthread mutex and, for the first packet
since the engine last took the queue, writes one byte to a pipe; it never
enters Python.  The engine's loop
watches the pipe (`loop.add_reader`) and takes the whole queue in one call
(`Queues.drain`).  Before this, every submit (one per client ACK during a
download) entered the embedded Python: the GIL taken from the busy engine
thread and handed back, the packet copied into a bytes object, the bridge's
Python checks and lock, and `call_soon_threadsafe` to wake the loop.

Poll mode the same way: the engine appends each burst to the handle's
outbound queue in C with one call (`Queues.put`), and `t2x_poll_outbound`
copies the next packet out under the mutex, waiting on a condition
variable; before, every poll entered Python for one packet.

The queues' counters are the bridge's rx counters, and in poll mode its tx
counters (tun2xray.bridge's accounting identities hold): C counts, and the
status copies them in.
"""

from __future__ import annotations

from .. import bridge

__all__ = ["COUNTERS", "C_DECLS", "C_SOURCE", "Queues", "poll_output"]

# the order of the C counters array (T2X_RX_* and T2X_TX_* below); the tx
# ones are the bridge's only in poll mode
COUNTERS = ("rx_packets", "rx_bytes", "rx_delivered", "rx_dropped", "rx_family_mismatch",
            "rx_bad_protocol", "rx_engine_down", "rx_wakeups", "rx_queued",
            "tx_packets", "tx_bytes", "tx_dropped", "tx_queue_full", "tx_queued")
RX_COUNTERS = 9

# what Python calls (cdef)
C_DECLS = """\
int _t2x_inbox_new(int32_t handle, size_t max_packets, size_t max_bytes);
int _t2x_inbox_take(int32_t handle, const char **buf, size_t *size, const uint32_t **lens, size_t *count,
                    int32_t *af6, int32_t *resume);
int _t2x_inbox_counters(int32_t handle, uint64_t *out);
int _t2x_inbox_close(int32_t handle);
int _t2x_inbox_free(int32_t handle);
int _t2x_outbox_put(int32_t handle, const char *blob, size_t size, size_t count, int32_t af6);
int _t2x_outbox_resume(int32_t handle);
"""

C_SOURCE = r"""
enum { T2X_RX_PACKETS, T2X_RX_BYTES, T2X_RX_DELIVERED, T2X_RX_DROPPED, T2X_RX_FAMILY_MISMATCH,
       T2X_RX_BAD_PROTOCOL, T2X_RX_ENGINE_DOWN, T2X_RX_WAKEUPS, T2X_RX_QUEUED,
       T2X_TX_PACKETS, T2X_TX_BYTES, T2X_TX_DROPPED, T2X_TX_QUEUE_FULL, T2X_TX_QUEUED, T2X_RX_N };

typedef struct t2x_inbox t2x_inbox;
struct t2x_inbox {
    t2x_inbox *next;
    int32_t handle;
    int refs;                       /* the table's one + callers inside (under t2x_boxes_lock) */
    pthread_mutex_t lock;
    int wake_r, wake_w;             /* the engine's loop reads wake_r */
    int waiting;                    /* the engine took everything: the next submit wakes it */
    int closed;                     /* stop began or the engine ended: count, do not queue */
    int held;                       /* a submit found the queue full: resume once taken */
    size_t max_packets, max_bytes;
    uint8_t *buf, *spare;           /* the queue: packets back to back; the last taken */
    size_t size, cap, spare_cap;
    uint32_t *lens, *spare_lens;
    size_t count, lcap, spare_lcap;
    int32_t af6;                    /* the AF_INET6 number last submitted (0: none yet) */
    /* poll mode's outbound queue: entries [ohead, ocount), bytes [obytes_head, osize) */
    pthread_cond_t out_cv;          /* a packet, the resume signal, or the close */
    uint8_t *obuf;
    size_t osize, ocap, obytes_head;
    uint32_t *olens;
    int32_t *oprotos;
    size_t ohead, ocount, olcap;
    int oresume;                    /* room again for a held submit: a poll finding nothing says so */
    uint64_t c[T2X_RX_N];
};

/* buffers larger than this are freed once a burst has passed (a full queue
 * must not leave its megabytes behind in a host under a memory limit) */
#define T2X_KEEP_BYTES (256 * 1024)
#define T2X_KEEP_PACKETS 4096

static pthread_mutex_t t2x_boxes_lock = PTHREAD_MUTEX_INITIALIZER;
static t2x_inbox *t2x_boxes;

static t2x_inbox *t2x_box_get(int32_t handle)
{
    t2x_inbox *b;
    pthread_mutex_lock(&t2x_boxes_lock);
    for (b = t2x_boxes; b && b->handle != handle; b = b->next)
        ;
    if (b)
        b->refs++;
    pthread_mutex_unlock(&t2x_boxes_lock);
    return b;
}

static void t2x_box_put(t2x_inbox *b)
{
    pthread_mutex_lock(&t2x_boxes_lock);
    int last = --b->refs == 0;
    pthread_mutex_unlock(&t2x_boxes_lock);
    if (!last)
        return;
    close(b->wake_r);
    close(b->wake_w);
    pthread_cond_destroy(&b->out_cv);
    pthread_mutex_destroy(&b->lock);
    free(b->obuf);
    free(b->olens);
    free(b->oprotos);
    free(b->buf);
    free(b->spare);
    free(b->lens);
    free(b->spare_lens);
    free(b);
}

static int _t2x_inbox_new(int32_t handle, size_t max_packets, size_t max_bytes)
{
    int fds[2];
    t2x_inbox *b = calloc(1, sizeof *b);
    if (!b || pipe(fds) != 0) {
        free(b);
        return -1;
    }
    for (int i = 0; i < 2; i++) {
        fcntl(fds[i], F_SETFL, fcntl(fds[i], F_GETFL) | O_NONBLOCK);
        fcntl(fds[i], F_SETFD, FD_CLOEXEC);
    }
    b->handle = handle;
    b->refs = 1;
    pthread_mutex_init(&b->lock, NULL);
    pthread_cond_init(&b->out_cv, NULL);
    b->wake_r = fds[0];
    b->wake_w = fds[1];
    b->waiting = 1;
    b->max_packets = max_packets;
    b->max_bytes = max_bytes;
    pthread_mutex_lock(&t2x_boxes_lock);
    b->next = t2x_boxes;
    t2x_boxes = b;
    pthread_mutex_unlock(&t2x_boxes_lock);
    return b->wake_r;
}

/* grow the queue to hold one more packet of n bytes (under b->lock) */
static int t2x_box_room(t2x_inbox *b, size_t n)
{
    if (b->size + n > b->cap) {
        size_t cap = b->cap ? b->cap : 16384;
        while (cap < b->size + n)
            cap *= 2;
        uint8_t *p = realloc(b->buf, cap);
        if (!p)
            return 0;
        b->buf = p;
        b->cap = cap;
    }
    if (b->count == b->lcap) {
        size_t lcap = b->lcap ? b->lcap * 2 : 64;
        uint32_t *l = realloc(b->lens, lcap * sizeof *l);
        if (!l)
            return 0;
        b->lens = l;
        b->lcap = lcap;
    }
    return 1;
}

/* The host's packets, on its thread: a prefix is taken (queued, or counted
 * as dropped); the rest stays the host's while the queue is full (held). */
static int32_t t2x_inbox_submit(t2x_inbox *b, const uint8_t *const *packets, const size_t *lengths,
                                const int32_t *protocols, size_t count, int single)
{
    size_t taken = 0, nbytes = 0, queued = 0;
    int drop = -1, wake = 0;
    pthread_mutex_lock(&b->lock);
    for (; taken < count; taken++) {
        const uint8_t *p = packets[taken];
        size_t n = lengths[taken];
        int32_t proto = protocols[taken];
        drop = -1;
        if (proto == 2)
            drop = n && p[0] >> 4 != 4 ? T2X_RX_FAMILY_MISMATCH : -1;
        else if (proto == 10 || proto == 30) {
            b->af6 = proto;
            drop = n && p[0] >> 4 != 6 ? T2X_RX_FAMILY_MISMATCH : -1;
        } else
            drop = T2X_RX_BAD_PROTOCOL;
        if (drop < 0) {
            if (b->closed)
                drop = T2X_RX_ENGINE_DOWN;
            else if (b->count >= b->max_packets || b->size + n > b->max_bytes || !t2x_box_room(b, n)) {
                b->held = 1;
                break;
            } else {
                memcpy(b->buf + b->size, p, n);
                b->size += n;
                b->lens[b->count++] = (uint32_t)n;
                queued++;
            }
        }
        if (drop >= 0) {
            b->c[drop]++;
            b->c[T2X_RX_DROPPED]++;
        }
        nbytes += n;
    }
    b->c[T2X_RX_PACKETS] += taken;
    b->c[T2X_RX_BYTES] += nbytes;
    if (queued && b->waiting) {
        b->waiting = 0;
        wake = 1;
        b->c[T2X_RX_WAKEUPS]++;
    }
    pthread_mutex_unlock(&b->lock);
    if (wake && write(b->wake_w, "", 1) < 0) {
        /* a full pipe: a wake-up is pending already */
    }
    if (!single)
        return (int32_t)taken;
    if (!taken)
        return T2X_QUEUE_FULL;
    if (drop >= 0) {
        _t2x_set_error(drop == T2X_RX_FAMILY_MISMATCH ? "packet dropped: rx_family_mismatch"
                       : drop == T2X_RX_BAD_PROTOCOL ? "packet dropped: rx_bad_protocol"
                       : "packet dropped: rx_engine_down");
        return T2X_E_ARG;
    }
    return T2X_OK;
}

static int32_t t2x_submit(int32_t handle, const uint8_t *const *packets, const size_t *lengths,
                          const int32_t *protocols, size_t count, int single)
{
    t2x_inbox *b = t2x_box_get(handle);
    if (!b) {
        snprintf(t2x_error, sizeof t2x_error, "handle %d: unknown or already stopped", (int)handle);
        return T2X_E_HANDLE;
    }
    int32_t r = t2x_inbox_submit(b, packets, lengths, protocols, count, single);
    t2x_box_put(b);
    return r;
}

/* On the engine's loop: everything queued, as one buffer and its lengths
 * (valid until the next take); *resume: a held submit is waiting for room. */
static int _t2x_inbox_take(int32_t handle, const char **buf, size_t *size, const uint32_t **lens,
                           size_t *count, int32_t *af6, int32_t *resume)
{
    char sink[256];
    t2x_inbox *b = t2x_box_get(handle);
    if (!b)
        return -1;
    while (read(b->wake_r, sink, sizeof sink) == (ssize_t)sizeof sink)
        ;
    pthread_mutex_lock(&b->lock);
    if (b->spare_cap > T2X_KEEP_BYTES) {        /* the last take's: Python is done with it */
        free(b->spare);
        b->spare = NULL;
        b->spare_cap = 0;
    }
    if (b->spare_lcap > T2X_KEEP_PACKETS) {
        free(b->spare_lens);
        b->spare_lens = NULL;
        b->spare_lcap = 0;
    }
    uint8_t *tb = b->buf;
    uint32_t *tl = b->lens;
    size_t tcap = b->cap, tlcap = b->lcap;
    *buf = (const char *)tb;
    *size = b->size;
    *lens = tl;
    *count = b->count;
    *af6 = b->af6;
    *resume = b->held;
    b->c[T2X_RX_DELIVERED] += b->count;
    b->buf = b->spare;
    b->cap = b->spare_cap;
    b->lens = b->spare_lens;
    b->lcap = b->spare_lcap;
    b->spare = tb;
    b->spare_cap = tcap;
    b->spare_lens = tl;
    b->spare_lcap = tlcap;
    b->size = b->count = 0;
    b->held = 0;
    b->waiting = 1;
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return 0;
}

static int _t2x_inbox_counters(int32_t handle, uint64_t *out)
{
    t2x_inbox *b = t2x_box_get(handle);
    if (!b)
        return -1;
    pthread_mutex_lock(&b->lock);
    memcpy(out, b->c, sizeof b->c);
    out[T2X_RX_QUEUED] = b->count;
    out[T2X_TX_QUEUED] = b->ocount - b->ohead;
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return 0;
}

/* stop began, or the engine ended: what is queued is dropped
 * (rx_engine_down), later submits are counted and dropped */
static int _t2x_inbox_close(int32_t handle)
{
    t2x_inbox *b = t2x_box_get(handle);
    if (!b)
        return -1;
    pthread_mutex_lock(&b->lock);
    b->closed = 1;
    b->c[T2X_RX_ENGINE_DOWN] += b->count;
    b->c[T2X_RX_DROPPED] += b->count;
    b->size = b->count = 0;
    pthread_cond_broadcast(&b->out_cv);
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return 0;
}

/* room for one more outbound packet of n bytes (under b->lock): the taken
 * front is dropped from the buffers first */
static int t2x_outbox_room(t2x_inbox *b, size_t n)
{
    if (b->ohead && (b->ocount == b->olcap || b->osize + n > b->ocap)) {
        size_t keep = b->ocount - b->ohead;
        memmove(b->olens, b->olens + b->ohead, keep * sizeof *b->olens);
        memmove(b->oprotos, b->oprotos + b->ohead, keep * sizeof *b->oprotos);
        memmove(b->obuf, b->obuf + b->obytes_head, b->osize - b->obytes_head);
        b->ocount = keep;
        b->osize -= b->obytes_head;
        b->ohead = b->obytes_head = 0;
    }
    if (b->osize + n > b->ocap) {
        size_t cap = b->ocap ? b->ocap : 65536;
        while (cap < b->osize + n)
            cap *= 2;
        uint8_t *p = realloc(b->obuf, cap);
        if (!p)
            return 0;
        b->obuf = p;
        b->ocap = cap;
    }
    if (b->ocount == b->olcap) {
        size_t lcap = b->olcap ? b->olcap * 2 : 256;
        uint32_t *l = realloc(b->olens, lcap * sizeof *l);
        if (l)
            b->olens = l;
        int32_t *f = l ? realloc(b->oprotos, lcap * sizeof *f) : NULL;
        if (!f)
            return 0;
        b->oprotos = f;
        b->olcap = lcap;
    }
    return 1;
}

/* Poll mode, on the engine's loop: a burst (as _t2x_deliver takes it) into
 * the outbound queue; what does not fit is dropped (tx_queue_full) */
static int _t2x_outbox_put(int32_t handle, const char *blob, size_t size, size_t count, int32_t af6)
{
    const uint8_t *p = (const uint8_t *)blob, *end = p + size;
    t2x_inbox *b = t2x_box_get(handle);
    size_t i, queued = 0;
    if (!b)
        return -1;
    pthread_mutex_lock(&b->lock);
    for (i = 0; i < count; i++) {
        size_t left = (size_t)(end - p), n;
        int32_t proto;
        if (left >= 20 && p[0] >> 4 == 4) {
            n = (size_t)p[2] << 8 | p[3];
            proto = 2;
        } else if (left >= 40 && p[0] >> 4 == 6) {
            n = 40 + ((size_t)p[4] << 8 | p[5]);
            proto = af6;
        } else
            break;
        if (n < 20 || n > left)
            break;
        if (b->ocount - b->ohead >= b->max_packets || b->osize - b->obytes_head + n > b->max_bytes ||
                !t2x_outbox_room(b, n)) {
            b->c[T2X_TX_QUEUE_FULL]++;
            b->c[T2X_TX_DROPPED]++;
        } else {
            memcpy(b->obuf + b->osize, p, n);
            b->osize += n;
            b->olens[b->ocount] = (uint32_t)n;
            b->oprotos[b->ocount++] = proto;
            b->c[T2X_TX_PACKETS]++;
            b->c[T2X_TX_BYTES] += n;
            queued++;
        }
        p += n;
    }
    b->c[T2X_TX_DROPPED] += count - i;          /* lengths their headers do not give: never the stack's */
    if (queued)
        pthread_cond_broadcast(&b->out_cv);
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return 0;
}

/* the resume signal in poll mode: a poll that finds no packet returns 0 at once */
static int _t2x_outbox_resume(int32_t handle)
{
    t2x_inbox *b = t2x_box_get(handle);
    if (!b)
        return -1;
    pthread_mutex_lock(&b->lock);
    b->oresume = 1;
    pthread_cond_broadcast(&b->out_cv);
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return 0;
}

/* t2x_poll_outbound, on a host thread */
static int32_t t2x_poll(int32_t handle, uint8_t *buf, size_t capacity, int32_t *protocol, int32_t timeout_ms)
{
    t2x_inbox *b = t2x_box_get(handle);
    if (!b) {
        snprintf(t2x_error, sizeof t2x_error, "handle %d: unknown or already stopped", (int)handle);
        return T2X_E_HANDLE;
    }
    pthread_mutex_lock(&b->lock);
    if (b->ohead == b->ocount && timeout_ms > 0 && !b->closed && !b->oresume) {
        struct timespec until;
        clock_gettime(CLOCK_REALTIME, &until);
        until.tv_sec += timeout_ms / 1000;
        until.tv_nsec += (long)(timeout_ms % 1000) * 1000000L;
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec++;
            until.tv_nsec -= 1000000000L;
        }
        while (b->ohead == b->ocount && !b->closed && !b->oresume)
            if (pthread_cond_timedwait(&b->out_cv, &b->lock, &until) != 0)
                break;
    }
    int32_t r = 0;
    if (b->ohead == b->ocount) {
        b->oresume = 0;                         /* the resume signal is this empty return */
    } else if (b->olens[b->ohead] > capacity) {
        snprintf(t2x_error, sizeof t2x_error, "capacity %zu is smaller than the packet (%u bytes); "
                 "it stays queued", capacity, (unsigned)b->olens[b->ohead]);
        r = T2X_E_SHORT;
    } else {
        r = (int32_t)b->olens[b->ohead];
        memcpy(buf, b->obuf + b->obytes_head, (size_t)r);
        if (protocol)
            *protocol = b->oprotos[b->ohead];
        b->obytes_head += (size_t)r;
        if (++b->ohead == b->ocount) {
            b->ohead = b->ocount = b->osize = b->obytes_head = 0;
            if (b->ocap > T2X_KEEP_BYTES) {     /* empty after a burst: give its memory back */
                free(b->obuf);
                b->obuf = NULL;
                b->ocap = 0;
            }
        }
    }
    pthread_mutex_unlock(&b->lock);
    t2x_box_put(b);
    return r;
}

/* the handle is gone: submits see T2X_E_HANDLE; freed once the last caller left */
static int _t2x_inbox_free(int32_t handle)
{
    t2x_inbox **pp, *b = NULL;
    pthread_mutex_lock(&t2x_boxes_lock);
    for (pp = &t2x_boxes; *pp; pp = &(*pp)->next)
        if ((*pp)->handle == handle) {
            b = *pp;
            *pp = b->next;
            break;
        }
    pthread_mutex_unlock(&t2x_boxes_lock);
    if (!b)
        return -1;
    t2x_box_put(b);
    return 0;
}
"""


class Queues:
    """The engine's side of one handle's C queues: its loop reads the
    inbound one; in poll mode it is also the bridge's on_outbound."""

    __slots__ = ("_out", "ffi", "fd", "handle", "lib", "poll_mode", "tunnel")

    def __init__(self, ffi, lib, tunnel, poll_mode: bool):
        self.ffi = ffi
        self.lib = lib
        self.handle = tunnel.handle
        self.tunnel = tunnel
        self.poll_mode = poll_mode
        cap = tunnel._qcap or bridge.INBOUND_BYTES
        self.fd = lib._t2x_inbox_new(self.handle, bridge.INBOUND_PACKETS, cap)
        if self.fd < 0:
            raise bridge.BridgeError(f"handle {self.handle}: no packet queue (out of memory or fds)")
        # take()'s out-parameters, allocated once
        self._out = (ffi.new("const char **"), ffi.new("size_t *"), ffi.new("const uint32_t **"),
                     ffi.new("size_t *"), ffi.new("int32_t *"), ffi.new("int32_t *"))
        tunnel.queues = self

    def attach(self) -> None:
        """On the engine's loop: watch the wake-up pipe."""
        self.tunnel.loop.add_reader(self.fd, self.drain)

    def drain(self) -> None:
        """Everything the host queued, to the engine in one feed per chunk."""
        buf, size, lens, count, af6, resume = self._out
        if self.lib._t2x_inbox_take(self.handle, buf, size, lens, count, af6, resume) < 0:
            return
        t = self.tunnel
        n = count[0]
        if af6[0]:
            t._af6 = af6[0]
        if n:
            blob = self.ffi.buffer(buf[0], size[0])[:]
            pkts = []
            append = pkts.append
            o = 0
            for ln in self.ffi.unpack(lens[0], n):
                append(blob[o:o + ln])
                o += ln
            t.feed(pkts)
        if resume[0]:
            t._resume()

    def sync(self, stats: dict) -> None:
        """The C counters into the bridge's device stats (before a status)."""
        out = self.ffi.new("uint64_t[]", len(COUNTERS))
        if self.lib._t2x_inbox_counters(self.handle, out) == 0:
            stats.update(zip(COUNTERS if self.poll_mode else COUNTERS[:RX_COUNTERS], out))

    def down(self) -> None:
        """Stop began or the engine ended: drop what is queued, take no
        more; waiting polls return."""
        self.lib._t2x_inbox_close(self.handle)

    def free(self) -> None:
        self.lib._t2x_inbox_free(self.handle)


def poll_output(lib, handle_cell: list):
    """The bridge's on_outbound(packets, af6) in poll mode: each burst into
    the handle's C queue in one call (the resume signal: an empty one).
    handle_cell[0] is the handle once bridge.start has returned it."""
    put = lib._t2x_outbox_put
    resume = lib._t2x_outbox_resume
    join = b"".join

    def on_outbound(packets, af6):
        handle = handle_cell[0]
        if not packets:
            resume(handle)
            return
        blob = join(packets)
        put(handle, blob, len(blob), len(packets), af6)
    return on_outbound
