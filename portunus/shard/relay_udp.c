/* Native UDP forwarding for plain UDP ports: recvmmsg/sendmmsg batches, one
 * connected upstream socket per client flow, the flow table, idle reaping and
 * fall-through on ICMP errors.  See _relay.c for the relay as a whole.
 *
 * A port's listening socket (the shard's, never closed here) and every flow's
 * upstream socket are readers on the shard's own loop (loop.add_reader with a
 * method of the relay as the callback): a datagram costs the loop's one
 * epoll_wait and a C call, not a second epoll_wait and a Python dispatch as
 * the relay's nested epoll set would (the difference is most of a UDP round
 * trip's forwarding cost).  A datagram from
 * a client without a flow asks Python once (token.admit_flow(): draining, the
 * rule's flow cap across shards, the open-flow metrics) and, if admitted, gets a
 * connected upstream socket to the first candidate that takes it.  Until the
 * target first answers, the flow keeps its latest datagram: an ICMP "port
 * unreachable" (ECONNREFUSED on the socket) moves the flow to the next candidate
 * and resends it there, as the Python path does.  Replies leave through the
 * listening socket with sendmmsg, addressed to the client.  A socket that sees
 * one datagram per wake-up (a ping-pong) is read with recvmsg and written with
 * send/sendto instead, which cost less for a single datagram (see rx()).
 *
 * Counts are summed per port and handed to Python by poll() at most
 * UDP_REPORT_MS late, at once when a flow closed (its cap slot is released
 * there).  A flow idle for the port's idle time is closed by the relay's tick.
 *
 * On a threaded relay (_relay.c) the sockets are in the relay's epoll set
 * instead and the relay thread reads them; it cannot call admit_flow(), so a
 * datagram from a new client opens an "admitting" flow that queues the client's
 * first datagrams (ADMIT_QUEUE) and wakes Python: poll() asks admit_flow() for
 * every waiting flow at once, then connects the admitted ones and sends what
 * they queued, or forgets the refused ones.
 */
#include "relay.h"

/* Datagrams a new client's flow keeps while Python admits it: one recvmmsg batch, as
 * the port's socket is not read again until Python decided (the kernel buffers). */
#define ADMIT_QUEUE UDP_BATCH

typedef struct {
    unsigned char batch, calm; /* see rx() */
    unsigned short reads;
} RxMode;

struct UFlow {
    UPort *port;
    RxMode rx;
    int fd; /* connected upstream socket, -1 while none */
    Py_ssize_t id; /* the loop reader's key (Relay.udp_on_flow) */
    struct sockaddr_storage addr;
    socklen_t alen;
    unsigned hash;
    UFlow *hnext;       /* hash chain */
    UFlow *prev, *next; /* by last activity, oldest first */
    long long seen_ms;
    Cands *cands;
    int pos, cur_target, confirmed;
    char *last; /* unconfirmed flow: its latest datagram, resent after a refusal */
    size_t last_len;
    int dead;           /* closed; freed after the poll() that closed it */
    UFlow *next_dead;
    End end;            /* threaded relay: the upstream socket's epoll key */
    int admitting;      /* threaded relay: waiting for admit_flow() (not in the LRU) */
    int nq;
    char *q[ADMIT_QUEUE];
    size_t qlen[ADMIT_QUEUE];
    UFlow *next_admit;
};

struct UPort {
    int lfd;
    RxMode rx;
    Py_ssize_t handle;
    PyObject *token;
    Cands *cands;
    int ntargets;
    long long idle_ms;
    UFlow **buckets;
    size_t nbuckets, nflows;
    UFlow *oldest, *newest;
    long long closed, bytes_in, bytes_out, dgrams_in, dgrams_out, dropped, connect_failures;
    long long *ok, *fail;
    int *last_err;
    int sock_errno, recv_errno;
    int dirty, urgent;
    long long next_report_ms;
    int in_ep;          /* its sockets are in the relay's epoll set (threaded relay) */
    int gone;           /* udp_close()d: an event already fetched must not touch it */
    End end;
    UFlow *admit_head;  /* flows waiting for admit_flow(), newest first */
    int held;           /* out of the epoll set's interest until Python admitted them */
};

/* Activity stamps: a few ms of resolution is plenty for idle times and costs no TSC read. */
static inline long long coarse_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* ------------------------------------------------------------ flow table */

static unsigned addr_hash(const struct sockaddr_storage *a, socklen_t len) {
    const unsigned char *p = (const unsigned char *)a;
    unsigned h = 2166136261u;
    for (socklen_t i = 0; i < len; i++) h = (h ^ p[i]) * 16777619u;
    return h;
}

/* The bytes that name a client: family, port and address (not the padding). */
static socklen_t addr_key(struct sockaddr_storage *a, socklen_t len) {
    if (a->ss_family == AF_INET) {
        struct sockaddr_in *s = (struct sockaddr_in *)a;
        memset(s->sin_zero, 0, sizeof s->sin_zero);
        return sizeof *s;
    }
    if (a->ss_family == AF_INET6) return sizeof(struct sockaddr_in6);
    return len;
}

static UFlow *flow_find(UPort *p, const struct sockaddr_storage *a, socklen_t len, unsigned h) {
    for (UFlow *f = p->buckets[h & (p->nbuckets - 1)]; f != NULL; f = f->hnext)
        if (f->hash == h && f->alen == len && memcmp(&f->addr, a, len) == 0) return f;
    return NULL;
}

static void table_grow(UPort *p) {
    size_t n = p->nbuckets * 2;
    UFlow **b = calloc(n, sizeof(UFlow *));
    if (b == NULL) return; /* longer chains, still correct */
    for (size_t i = 0; i < p->nbuckets; i++) {
        UFlow *f = p->buckets[i];
        while (f != NULL) {
            UFlow *nx = f->hnext;
            f->hnext = b[f->hash & (n - 1)];
            b[f->hash & (n - 1)] = f;
            f = nx;
        }
    }
    free(p->buckets);
    p->buckets = b;
    p->nbuckets = n;
}

static void lru_unlink(UPort *p, UFlow *f) {
    if (f->prev) f->prev->next = f->next;
    else p->oldest = f->next;
    if (f->next) f->next->prev = f->prev;
    else p->newest = f->prev;
    f->prev = f->next = NULL;
}

static void lru_append(UPort *p, UFlow *f) {
    f->prev = p->newest;
    f->next = NULL;
    if (p->newest) p->newest->next = f;
    else p->oldest = f;
    p->newest = f;
}

static inline void touch(UPort *p, UFlow *f, long long now) {
    f->seen_ms = now;
    if (p->newest != f) {
        lru_unlink(p, f);
        lru_append(p, f);
    }
}

static void count_udp_target(UPort *p, int target, int ok, int err) {
    if (target < 0 || target >= p->ntargets) return;
    (ok ? p->ok : p->fail)[target]++;
    if (!ok) p->last_err[target] = err;
    p->dirty = p->urgent = 1; /* health follows at once, as on the Python path */
}

/* loop.add_reader(fd, relay.<method>, key); -1 (errno set, no Python error) on failure. */
static int add_reader(Relay *r, int fd, const char *method, Py_ssize_t key) {
    PyObject *cb = PyObject_GetAttrString((PyObject *)r, method);
    PyObject *res = cb == NULL ? NULL : PyObject_CallMethod(r->uloop, "add_reader", "iOn", fd, cb, key);
    Py_XDECREF(cb);
    if (res == NULL) {
        PyErr_WriteUnraisable((PyObject *)r);
        errno = ENOMEM;
        return -1;
    }
    Py_DECREF(res);
    return 0;
}

static void remove_reader(Relay *r, int fd) {
    PyObject *res = PyObject_CallMethod(r->uloop, "remove_reader", "i", fd);
    if (res == NULL) PyErr_WriteUnraisable((PyObject *)r);
    Py_XDECREF(res);
}

/* A flow's upstream socket starts being read: a loop reader, or in the epoll set. */
static int watch_flow(Relay *r, UFlow *f, int fd) {
    if (!f->port->in_ep) return add_reader(r, fd, "udp_on_flow", f->id);
    f->end.kind = END_UFLOW;
    f->end.flow = f;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &f->end};
    return epoll_ctl(r->ep, EPOLL_CTL_ADD, fd, &ev);
}

static void drop_upstream(Relay *r, UFlow *f) {
    if (f->fd < 0) return;
    if (!f->port->in_ep) remove_reader(r, f->fd); /* close() leaves the epoll set */
    close(f->fd);
    f->fd = -1;
}

static Py_ssize_t flow_slot(Relay *r, UFlow *f) {
    if (r->nufree) {
        Py_ssize_t id = r->ufree[--r->nufree];
        r->uslots[id] = f;
        return id;
    }
    if (r->nuslots == r->ucap) {
        Py_ssize_t cap = r->ucap ? 2 * r->ucap : 256;
        UFlow **s = realloc(r->uslots, (size_t)cap * sizeof(UFlow *));
        if (s == NULL) return -1;
        r->uslots = s;
        Py_ssize_t *fr = realloc(r->ufree, (size_t)cap * sizeof(Py_ssize_t));
        if (fr == NULL) return -1;
        r->ufree = fr;
        r->ucap = cap;
    }
    r->uslots[r->nuslots] = f;
    return r->nuslots++;
}

static void flow_close(Relay *r, UFlow *f) {
    UPort *p = f->port;
    drop_upstream(r, f);
    UFlow **pp = &p->buckets[f->hash & (p->nbuckets - 1)];
    while (*pp != f) pp = &(*pp)->hnext;
    *pp = f->hnext;
    lru_unlink(p, f);
    p->nflows--;
    p->closed++;
    p->dirty = p->urgent = 1;
    cands_unref(f->cands);
    f->cands = NULL;
    free(f->last);
    f->last = NULL;
    f->dead = 1;
    if (f->id >= 0) {
        r->uslots[f->id] = NULL;
        r->ufree[r->nufree++] = f->id;
        f->id = -1;
    }
    if (r->in_poll) { /* a later event of this poll may still name it */
        f->next_dead = r->udead;
        r->udead = f;
    } else {
        relay_free(r, f); /* a threaded relay's thread may have fetched an event for it */
    }
}

RELAY_API void udp_free_dead(Relay *r) {
    while (r->udead != NULL) {
        UFlow *f = r->udead;
        r->udead = f->next_dead;
        free(f);
    }
}

/* Connect to the next candidate; 1 with a socket, 0 when the flow was closed. */
static int flow_connect_next(Relay *r, UFlow *f) {
    UPort *p = f->port;
    Cands *cs = f->cands;
    while (f->pos < cs->n) {
        Cand *cd = &cs->c[f->pos++];
        int u = socket(cd->family, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (u < 0) {
            p->sock_errno = errno;
            break;
        }
        if (connect(u, (struct sockaddr *)&cd->addr, cd->len) < 0) {
            count_udp_target(p, cd->target, 0, errno);
            close(u);
            continue;
        }
        if (watch_flow(r, f, u) < 0) {
            p->sock_errno = errno;
            close(u);
            break;
        }
        f->fd = u;
        f->cur_target = cd->target;
        f->confirmed = 0;
        return 1;
    }
    p->connect_failures++;
    p->dirty = 1;
    flow_close(r, f);
    return 0;
}

static void remember(UFlow *f, const char *data, size_t n) {
    char *b = realloc(f->last, n ? n : 1);
    if (b == NULL) return; /* the resend is best effort */
    memcpy(b, data, n);
    f->last = b;
    f->last_len = n;
}

/* ICMP unreachable on the upstream socket: UDP's "connect failed".  Count the
 * target's failure unless the next candidate is the same target, move on and
 * resend the unconfirmed datagram there.  0 when that closed the flow. */
static int flow_refused(Relay *r, UFlow *f) {
    UPort *p = f->port;
    int target = f->cur_target;
    drop_upstream(r, f);
    Cands *cs = f->cands;
    int next = f->pos < cs->n ? cs->c[f->pos].target : -1;
    if (target >= 0 && next != target) count_udp_target(p, target, 0, ECONNREFUSED);
    char *last = f->last;
    size_t len = f->last_len;
    f->last = NULL;
    f->last_len = 0;
    if (!flow_connect_next(r, f)) {
        free(last);
        return 0;
    }
    if (last == NULL) return 1;
    if (send(f->fd, last, len, 0) < 0) {
        p->dropped++; /* a fresh socket has no ICMP error queued: EAGAIN and the like */
    } else {
        p->bytes_in += (long long)len;
        p->dgrams_in++;
    }
    p->dirty = 1;
    f->last = last; /* still unconfirmed: kept for the next refusal */
    f->last_len = len;
    return 1;
}

/* A datagram from a client without a flow: Python admits (cap, draining). */
static UFlow *flow_admitting(Relay *r, UPort *p, struct sockaddr_storage *a, socklen_t len, unsigned h);

static UFlow *flow_open(Relay *r, UPort *p, struct sockaddr_storage *a, socklen_t len, unsigned h,
                        long long now) {
    if (r->in_thread) return flow_admitting(r, p, a, len, h);
    PyObject *res = PyObject_CallMethod(p->token, "admit_flow", NULL);
    if (res == NULL) {
        PyErr_WriteUnraisable(p->token);
        return NULL;
    }
    int ok = PyObject_IsTrue(res);
    Py_DECREF(res);
    if (ok <= 0) {
        if (ok < 0) PyErr_WriteUnraisable(p->token);
        return NULL;
    }
    UFlow *f = calloc(1, sizeof(UFlow));
    if (f != NULL && p->nflows >= p->nbuckets) table_grow(p);
    if (f != NULL) f->id = -1;
    if (f != NULL && !p->in_ep && (f->id = flow_slot(r, f)) < 0) {
        free(f);
        f = NULL;
    }
    if (f == NULL) {
        /* Admitted but not opened: report it closed so Python releases it. */
        p->closed++;
        p->dirty = p->urgent = 1;
        return NULL;
    }
    f->port = p;
    f->fd = -1;
    memcpy(&f->addr, a, len);
    f->alen = len;
    f->hash = h;
    f->hnext = p->buckets[h & (p->nbuckets - 1)];
    p->buckets[h & (p->nbuckets - 1)] = f;
    f->seen_ms = now;
    lru_append(p, f);
    p->nflows++;
    f->cands = p->cands;
    p->cands->refs++;
    f->cur_target = -1;
    arm_timer(r); /* idle reaping and the report cadence */
    return flow_connect_next(r, f) ? f : NULL;
}

/* ------------------------------------------- admission (threaded relay) */

/* While new clients wait for Python the port's socket is not read: what they send
 * next waits in the kernel, not in a queue that would have to drop it. */
static void port_hold(Relay *r, UPort *p, int hold) {
    if (p->held == hold || !p->in_ep) return;
    struct epoll_event ev = {.events = hold ? 0 : EPOLLIN, .data.ptr = &p->end};
    if (epoll_ctl(r->ep, EPOLL_CTL_MOD, p->lfd, &ev) == 0) p->held = hold;
}

/* The relay thread met a new client: a flow in the table (so its next datagrams
 * join the queue) but not yet counted, connected or reaped; Python decides. */
static UFlow *flow_admitting(Relay *r, UPort *p, struct sockaddr_storage *a, socklen_t len, unsigned h) {
    UFlow *f = calloc(1, sizeof(UFlow));
    if (f == NULL) return NULL;
    f->port = p;
    f->fd = -1;
    f->id = -1;
    f->cur_target = -1;
    f->admitting = 1;
    memcpy(&f->addr, a, len);
    f->alen = len;
    f->hash = h;
    f->hnext = p->buckets[h & (p->nbuckets - 1)];
    p->buckets[h & (p->nbuckets - 1)] = f;
    f->next_admit = p->admit_head;
    p->admit_head = f;
    r->admits++;
    return f;
}

static void admit_enqueue(UPort *p, UFlow *f, const char *data, size_t n) {
    char *b = f->nq < ADMIT_QUEUE ? malloc(n ? n : 1) : NULL;
    if (b == NULL) {
        p->dropped++;
        p->dirty = 1;
        return;
    }
    memcpy(b, data, n);
    f->q[f->nq] = b;
    f->qlen[f->nq++] = n;
}

static void unhash(UPort *p, UFlow *f) {
    UFlow **pp = &p->buckets[f->hash & (p->nbuckets - 1)];
    while (*pp != NULL && *pp != f) pp = &(*pp)->hnext;
    if (*pp == f) *pp = f->hnext;
}

static void admit_clear(UFlow *f) {
    for (int i = 0; i < f->nq; i++) free(f->q[i]);
    f->nq = 0;
}

/* A refused (or never decided) flow: it never had a socket, so no event names it. */
static void admit_forget(Relay *r, UPort *p, UFlow *f) {
    unhash(p, f);
    admit_clear(f);
    free(f);
}

static void admit_drop_all(Relay *r, UPort *p) {
    UFlow *f = p->admit_head;
    p->admit_head = NULL;
    port_hold(r, p, 0);
    while (f != NULL) {
        UFlow *next = f->next_admit;
        r->admits--;
        admit_forget(r, p, f);
        f = next;
    }
}

/* An admitted flow: counted, connected, and its queued datagrams sent. */
static void admit_open(Relay *r, UPort *p, UFlow *f) {
    f->admitting = 0;
    if (p->nflows >= p->nbuckets) table_grow(p);
    f->seen_ms = coarse_ms();
    lru_append(p, f);
    p->nflows++;
    f->cands = p->cands;
    p->cands->refs++;
    arm_timer(r);
    if (!flow_connect_next(r, f)) { /* closed (and counted closed: Python releases it) */
        for (int i = 0; i < f->nq; i++) free(f->q[i]);
        p->dropped += f->nq;
        f->nq = 0;
        return;
    }
    for (int i = 0; i < f->nq; i++) {
        if (f->fd >= 0 && send(f->fd, f->q[i], f->qlen[i], 0) >= 0) {
            p->bytes_in += (long long)f->qlen[i];
            p->dgrams_in++;
            if (!f->confirmed) remember(f, f->q[i], f->qlen[i]);
        } else {
            p->dropped++;
        }
        free(f->q[i]);
    }
    f->nq = 0;
    p->dirty = 1;
}

/* poll() on a threaded relay (the GIL and the mutex held): decide every waiting flow. */
RELAY_API int udp_admit_pending(Relay *r) {
    for (Py_ssize_t i = 0; i < r->nups; i++) {
        UPort *p = r->ups[i];
        if (p == NULL || p->admit_head == NULL) continue;
        /* Oldest first: the order the clients came in. */
        UFlow *rev = NULL, *f = p->admit_head;
        p->admit_head = NULL;
        while (f != NULL) {
            UFlow *next = f->next_admit;
            f->next_admit = rev;
            rev = f;
            f = next;
        }
        while (rev != NULL) {
            f = rev;
            rev = f->next_admit;
            r->admits--;
            int ok = 0;
            /* One question per queued datagram, as if each had come alone: a refusal
             * drops (and counts) that datagram and the next one asks again. */
            do {
                if (r->ups[i] != p || p->gone) break;
                PyObject *res = PyObject_CallMethod(p->token, "admit_flow", NULL);
                if (res == NULL) {
                    PyErr_WriteUnraisable(p->token);
                } else {
                    ok = PyObject_IsTrue(res);
                    Py_DECREF(res);
                    if (ok < 0) {
                        PyErr_WriteUnraisable(p->token);
                        ok = 0;
                    }
                }
                if (ok || f->nq <= 1) break;
                free(f->q[0]);
                memmove(f->q, f->q + 1, (size_t)(f->nq - 1) * sizeof f->q[0]);
                memmove(f->qlen, f->qlen + 1, (size_t)(f->nq - 1) * sizeof f->qlen[0]);
                f->nq--;
            } while (1);
            if (ok && r->ups[i] == p && !p->gone) admit_open(r, p, f);
            else if (r->ups[i] == p && !p->gone) admit_forget(r, p, f);
            else { admit_clear(f); free(f); } /* the port went away during admit_flow() */
        }
        if (r->ups[i] == p && !p->gone) port_hold(r, p, 0);
    }
    r->admits = 0;
    udp_free_dead(r);
    return 0;
}

/* ----------------------------------------------------------- hot paths */

static int ensure_buffers(Relay *r) {
    if (r->ubuf != NULL) return 0;
    /* Pages are touched only as large datagrams arrive. */
    r->ubuf = malloc((size_t)UDP_BATCH * UDP_BUF);
    r->umsg = calloc(UDP_BATCH, sizeof(struct mmsghdr));
    r->uiov = calloc(UDP_BATCH, sizeof(struct iovec));
    r->uname = calloc(UDP_BATCH, sizeof(struct sockaddr_storage));
    if (r->ubuf == NULL || r->umsg == NULL || r->uiov == NULL || r->uname == NULL) {
        free(r->ubuf);
        free(r->umsg);
        free(r->uiov);
        free(r->uname);
        r->ubuf = NULL;
        r->umsg = NULL;
        r->uiov = NULL;
        r->uname = NULL;
        return -1;
    }
    for (int i = 0; i < UDP_BATCH; i++) {
        r->uiov[i].iov_base = r->ubuf + (size_t)i * UDP_BUF;
        r->uiov[i].iov_len = UDP_BUF;
        struct msghdr *h = &r->umsg[i].msg_hdr;
        h->msg_iov = &r->uiov[i];
        h->msg_iovlen = 1;
        h->msg_name = &r->uname[i];
        h->msg_namelen = sizeof r->uname[i];
    }
    r->uused = 0;
    return 0;
}

/* Give back the full length to the headers the last batch used (and shortened). */
static void prep_recv(Relay *r) {
    for (int i = 0; i < r->uused; i++) {
        r->uiov[i].iov_len = UDP_BUF;
        r->umsg[i].msg_hdr.msg_namelen = sizeof r->uname[i];
    }
    r->uused = 0;
}

/* Read what a socket has: one datagram with recvmsg while it comes one at a time
 * (recvmmsg pays a second, failing receive for it: ~0.2 µs, a few per cent of a
 * round trip), up to UDP_BATCH with recvmmsg once a probe (every 16th read) finds
 * more than one waiting, back to single reads after 8 batches of one.  Returns the
 * count (umsg[i].msg_len filled), or -1 with errno. */
static int rx(Relay *r, int fd, RxMode *m) {
    prep_recv(r);
    if (!m->batch && (++m->reads & 15) != 0) {
        ssize_t n = recvmsg(fd, &r->umsg[0].msg_hdr, MSG_DONTWAIT);
        if (n < 0) return -1;
        r->umsg[0].msg_len = (unsigned)n;
        r->uused = 1;
        return 1;
    }
    int n = recvmmsg(fd, r->umsg, UDP_BATCH, MSG_DONTWAIT, NULL);
    if (n < 0) return -1;
    r->uused = n;
    if (n > 1) {
        m->batch = 1;
        m->calm = 0;
    } else if (m->batch && ++m->calm >= 8) {
        m->batch = 0;
    }
    return n;
}

/* Send umsg[from, to) (already received, iov_len = their lengths) on a flow's
 * socket; a refusal moves the flow on and the rest go to its next socket. */
static void send_run(Relay *r, UFlow *f, int from, int to) {
    UPort *p = f->port;
    struct mmsghdr out[UDP_BATCH];
    int k = from;
    while (k < to) {
        if (f->fd < 0) {
            p->dropped += to - k;
            p->dirty = 1;
            return;
        }
        int m = to - k, sent;
        if (m == 1) { /* a lone datagram: send() costs less than a sendmmsg of one */
            sent = send(f->fd, r->uiov[k].iov_base, r->uiov[k].iov_len, 0) < 0 ? -1 : 1;
        } else {
            for (int i = 0; i < m; i++) {
                memset(&out[i], 0, sizeof out[i]);
                out[i].msg_hdr.msg_iov = &r->uiov[k + i];
                out[i].msg_hdr.msg_iovlen = 1;
            }
            sent = sendmmsg(f->fd, out, (unsigned)m, 0);
        }
        if (sent > 0) {
            for (int i = 0; i < sent; i++) p->bytes_in += (long long)r->uiov[k + i].iov_len;
            p->dgrams_in += sent;
            p->dirty = 1;
            if (!f->confirmed) remember(f, r->uiov[k + sent - 1].iov_base, r->uiov[k + sent - 1].iov_len);
            k += sent;
            continue;
        }
        if (errno == EINTR) continue;
        if (errno == ECONNREFUSED) {
            /* An ICMP error from an earlier datagram surfaced on this send. */
            remember(f, r->uiov[k].iov_base, r->uiov[k].iov_len);
            k++;
            if (!flow_refused(r, f)) { /* the flow is gone: the rest is dropped */
                p->dropped += to - k;
                p->dirty = 1;
                return;
            }
            continue;
        }
        p->dropped++; /* EAGAIN (buffer full) or another error: UDP drops it */
        p->dirty = 1;
        k++;
    }
}

static void on_udp_listener(Relay *r, UPort *p) {
    if (ensure_buffers(r) < 0) return;
    prep_recv(r);
    int n = rx(r, p->lfd, &p->rx);
    if (n <= 0) return; /* EAGAIN, or a queued error consumed */
    long long now = coarse_ms();
    UFlow *flows[UDP_BATCH];
    for (int i = 0; i < n; i++) {
        r->uiov[i].iov_len = r->umsg[i].msg_len;
        socklen_t len = addr_key(&r->uname[i], r->umsg[i].msg_hdr.msg_namelen);
        unsigned h = addr_hash(&r->uname[i], len);
        UFlow *f = flow_find(p, &r->uname[i], len, h);
        if (f == NULL) f = flow_open(r, p, &r->uname[i], len, h, now);
        else if (!f->admitting) touch(p, f, now);
        flows[i] = f;
    }
    /* Consecutive datagrams of one flow leave in one sendmmsg. */
    int i = 0;
    while (i < n) {
        UFlow *f = flows[i];
        int j = i + 1;
        while (j < n && flows[j] == f) j++;
        if (f != NULL && f->admitting) {
            for (int k = i; k < j; k++) admit_enqueue(p, f, r->uiov[k].iov_base, r->uiov[k].iov_len);
        } else if (f != NULL) {
            if (f->dead) { /* closed by a refusal earlier in this batch */
                p->dropped += j - i;
                p->dirty = 1;
            } else {
                send_run(r, f, i, j);
            }
        }
        i = j;
    }
}

static void on_udp_upstream(Relay *r, UFlow *f) {
    UPort *p = f->port;
    if (f->dead || f->fd < 0 || ensure_buffers(r) < 0) return;
    prep_recv(r);
    int n = rx(r, f->fd, &f->rx);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
        if (errno == ECONNREFUSED) {
            flow_refused(r, f);
            return;
        }
        p->recv_errno = errno;
        p->dirty = 1;
        flow_close(r, f);
        return;
    }
    if (n == 0) return;
    if (!f->confirmed) {
        f->confirmed = 1;
        free(f->last);
        f->last = NULL;
        f->last_len = 0;
        count_udp_target(p, f->cur_target, 1, 0);
    }
    struct mmsghdr out[UDP_BATCH];
    for (int i = 0; i < n; i++) {
        r->uiov[i].iov_len = r->umsg[i].msg_len;
        memset(&out[i], 0, sizeof out[i]);
        out[i].msg_hdr.msg_iov = &r->uiov[i];
        out[i].msg_hdr.msg_iovlen = 1;
        out[i].msg_hdr.msg_name = &f->addr;
        out[i].msg_hdr.msg_namelen = f->alen;
    }
    int k = 0;
    while (k < n) {
        int sent = n - k == 1 ? (sendto(p->lfd, r->uiov[k].iov_base, r->uiov[k].iov_len, 0,
                                        (struct sockaddr *)&f->addr, f->alen) < 0 ? -1 : 1)
                              : sendmmsg(p->lfd, &out[k], (unsigned)(n - k), 0);
        if (sent > 0) {
            for (int i = 0; i < sent; i++) p->bytes_out += (long long)r->uiov[k + i].iov_len;
            p->dgrams_out += sent;
            k += sent;
            continue;
        }
        if (errno == EINTR) continue;
        p->dropped++; /* EAGAIN (buffer full) or the client went away: drop */
        k++;
    }
    p->dirty = 1;
    touch(p, f, coarse_ms());
}

static PyObject *port_report(UPort *p);

/* Counts that cannot wait for the next poll() (flows closed, target health). */
static void deliver_urgent(Relay *r, UPort *p) {
    PyObject *t = port_report(p);
    if (t == NULL) {
        PyErr_WriteUnraisable((PyObject *)r);
        return;
    }
    PyObject *args = PyTuple_GetSlice(t, 1, PyTuple_GET_SIZE(t));
    PyObject *meth = args == NULL ? NULL : PyObject_GetAttrString(p->token, "report");
    PyObject *res = meth == NULL ? NULL : PyObject_Call(meth, args, NULL);
    if (res == NULL) PyErr_WriteUnraisable(p->token);
    Py_XDECREF(res);
    Py_XDECREF(meth);
    Py_XDECREF(args);
    Py_DECREF(t);
}

/* The end of a loop callback: free what it closed, hand over what is urgent. */
static void callback_done(Relay *r, UPort *p) {
    r->in_poll = 0;
    udp_free_dead(r);
    if (p != NULL && r->ups[p->handle] == p && p->urgent) deliver_urgent(r, p);
}

RELAY_API PyObject *Relay_udp_on_listener(Relay *self, PyObject *arg) {
    Py_ssize_t h = PyLong_AsSsize_t(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    if (h < 0 || h >= self->nups || self->ups[h] == NULL || self->in_poll) Py_RETURN_NONE;
    UPort *p = self->ups[h];
    self->in_poll = 1;
    on_udp_listener(self, p);
    callback_done(self, p);
    Py_RETURN_NONE;
}

RELAY_API PyObject *Relay_udp_on_flow(Relay *self, PyObject *arg) {
    Py_ssize_t id = PyLong_AsSsize_t(arg);
    if (id == -1 && PyErr_Occurred()) return NULL;
    if (id < 0 || id >= self->nuslots || self->uslots[id] == NULL || self->in_poll) Py_RETURN_NONE;
    UFlow *f = self->uslots[id];
    UPort *p = f->port;
    self->in_poll = 1;
    on_udp_upstream(self, f);
    callback_done(self, p);
    Py_RETURN_NONE;
}

/* The relay thread: a port's socket or a flow's upstream socket is readable. */
RELAY_API void udp_on_port_event(Relay *r, UPort *p) {
    if (p->gone || p->held) return;
    on_udp_listener(r, p);
    if (p->admit_head != NULL) port_hold(r, p, 1);
}

RELAY_API void udp_on_flow_event(Relay *r, UFlow *f) {
    if (!f->dead) on_udp_upstream(r, f);
}

/* The relay thread, after a batch: 1 when a port's counts are due now, -1 when some
 * are held (the tick must run), 0 when nothing is pending. */
RELAY_API int udp_due(Relay *r, long long now) {
    int held = 0;
    for (Py_ssize_t i = 0; i < r->nups; i++) {
        UPort *p = r->ups[i];
        if (p == NULL || !p->dirty) continue;
        if (p->urgent || now >= p->next_report_ms) return 1;
        held = 1;
    }
    return held ? -1 : 0;
}

/* Reap idle flows; 1 while some port still needs the tick (flows or counts). */
RELAY_API int udp_tick(Relay *r, long long now) {
    int busy = 0;
    for (Py_ssize_t i = 0; i < r->nups; i++) {
        UPort *p = r->ups[i];
        if (p == NULL) continue;
        while (p->oldest != NULL && now - p->oldest->seen_ms >= p->idle_ms) flow_close(r, p->oldest);
        if (p->nflows || p->dirty) busy = 1;
    }
    return busy;
}

/* ------------------------------------------------------------- reports */

/* (token, closed, bytes_in, bytes_out, dgrams_in, dgrams_out, dropped, connect_failures,
 *  ok, failed, last_errno, live, socket_errno, recv_errno) */
static PyObject *port_report(UPort *p) {
    PyObject *ok = PyTuple_New(p->ntargets), *fail = PyTuple_New(p->ntargets), *errs = PyTuple_New(p->ntargets);
    if (ok == NULL || fail == NULL || errs == NULL) {
        Py_XDECREF(ok);
        Py_XDECREF(fail);
        Py_XDECREF(errs);
        return NULL;
    }
    for (int i = 0; i < p->ntargets; i++) {
        PyTuple_SET_ITEM(ok, i, PyLong_FromLongLong(p->ok[i]));
        PyTuple_SET_ITEM(fail, i, PyLong_FromLongLong(p->fail[i]));
        PyTuple_SET_ITEM(errs, i, PyLong_FromLong(p->last_err[i]));
        p->ok[i] = p->fail[i] = 0;
    }
    PyObject *t = Py_BuildValue("(OLLLLLLLNNNnii)", p->token, p->closed, p->bytes_in, p->bytes_out, p->dgrams_in,
                                p->dgrams_out, p->dropped, p->connect_failures, ok, fail, errs,
                                (Py_ssize_t)p->nflows, p->sock_errno, p->recv_errno);
    p->closed = p->bytes_in = p->bytes_out = p->dgrams_in = p->dgrams_out = p->dropped = 0;
    p->connect_failures = 0;
    p->sock_errno = p->recv_errno = 0;
    p->dirty = p->urgent = 0;
    return t;
}

RELAY_API int udp_reports(Relay *r, PyObject *out, long long now) {
    for (Py_ssize_t i = 0; i < r->nups; i++) {
        UPort *p = r->ups[i];
        if (p == NULL || !p->dirty || (!p->urgent && now < p->next_report_ms)) continue;
        p->next_report_ms = now + UDP_REPORT_MS;
        PyObject *t = port_report(p);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            return -1;
        }
        Py_DECREF(t);
    }
    return 0;
}

static void port_free(Relay *r, UPort *p) {
    while (p->oldest != NULL) flow_close(r, p->oldest);
    admit_drop_all(r, p);
    if (p->in_ep) epoll_ctl(r->ep, EPOLL_CTL_DEL, p->lfd, NULL); /* the socket stays the shard's */
    else remove_reader(r, p->lfd);
    p->gone = 1;
    r->ups[p->handle] = NULL;
    cands_unref(p->cands);
    Py_XDECREF(p->token);
    free(p->buckets);
    free(p->ok);
    free(p->fail);
    free(p->last_err);
    relay_free(r, p);
}

RELAY_API void udp_free_all(Relay *r) {
    for (Py_ssize_t i = 0; i < r->nups; i++)
        if (r->ups[i]) port_free(r, r->ups[i]);
    free(r->ups);
    r->ups = NULL;
    r->nups = 0;
    udp_free_dead(r);
    free(r->uslots);
    free(r->ufree);
    r->uslots = NULL;
    r->ufree = NULL;
    Py_CLEAR(r->uloop);
    free(r->ubuf);
    free(r->umsg);
    free(r->uiov);
    free(r->uname);
    r->ubuf = NULL;
}

/* ------------------------------------------------------------ Python API */

static UPort *get_port(Relay *r, PyObject *arg) {
    Py_ssize_t h = PyLong_AsSsize_t(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    if (h < 0 || h >= r->nups || r->ups[h] == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such UDP port");
        return NULL;
    }
    return r->ups[h];
}

static int idle_ms_of(double idle, long long *out) {
    if (!(idle >= 0) || idle > 1e9) {
        PyErr_SetString(PyExc_ValueError, "idle seconds out of range");
        return -1;
    }
    *out = (long long)(idle * 1000);
    return 0;
}

RELAY_API PyObject *Relay_udp_listen(Relay *self, PyObject *args) {
    int lfd, ntargets;
    PyObject *token, *seq, *loop;
    double idle;
    if (!PyArg_ParseTuple(args, "iOiOdO", &lfd, &token, &ntargets, &seq, &idle, &loop)) return NULL;
    if (!self->running && self->uloop != NULL && self->uloop != loop) {
        PyErr_SetString(PyExc_ValueError, "one loop per relay");
        return NULL;
    }
    if (self->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "Relay is closed");
        return NULL;
    }
    long long idle_ms;
    if (idle_ms_of(idle, &idle_ms) < 0) return NULL;
    if (lfd < 0 || ntargets < 1 || ntargets > 4096) {
        PyErr_SetString(PyExc_ValueError, "bad listen fd or target count");
        return NULL;
    }
    Cands *cs = parse_cands(seq, ntargets);
    if (cs == NULL) return NULL;
    UPort *p = calloc(1, sizeof(UPort));
    Py_ssize_t h = 0;
    while (h < self->nups && self->ups[h] != NULL) h++;
    if (h == self->nups) {
        UPort **n = realloc(self->ups, (size_t)(self->nups + 1) * sizeof(UPort *));
        if (n != NULL) {
            self->ups = n;
            self->ups[self->nups++] = NULL;
        }
    }
    if (p != NULL) {
        p->nbuckets = 64;
        p->buckets = calloc(p->nbuckets, sizeof(UFlow *));
        p->ok = calloc((size_t)ntargets, sizeof(long long));
        p->fail = calloc((size_t)ntargets, sizeof(long long));
        p->last_err = calloc((size_t)ntargets, sizeof(int));
    }
    if (p == NULL || p->buckets == NULL || p->ok == NULL || p->fail == NULL || p->last_err == NULL ||
        h == self->nups) {
        if (p != NULL) {
            free(p->buckets);
            free(p->ok);
            free(p->fail);
            free(p->last_err);
            free(p);
        }
        cands_unref(cs);
        return PyErr_NoMemory();
    }
    p->lfd = lfd;
    p->handle = h;
    p->cands = cs;
    p->ntargets = ntargets;
    p->idle_ms = idle_ms;
    PyObject *res;
    if (self->running) {
        /* The relay thread reads it (level-triggered, as a loop reader would be). */
        p->in_ep = 1;
        p->end.kind = END_UPORT;
        p->end.port = p;
        struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &p->end};
        if (epoll_ctl(self->ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            res = NULL;
        } else {
            self->ups[h] = p;
            res = Py_None;
            Py_INCREF(res);
        }
    } else {
        if (self->uloop == NULL) {
            Py_INCREF(loop);
            self->uloop = loop;
        }
        self->ups[h] = p; /* before add_reader: the callback may come at once */
        PyObject *cb = PyObject_GetAttrString((PyObject *)self, "udp_on_listener");
        res = cb == NULL ? NULL : PyObject_CallMethod(loop, "add_reader", "iOn", lfd, cb, h);
        Py_XDECREF(cb);
    }
    if (res == NULL) {
        self->ups[h] = NULL;
        free(p->buckets);
        free(p->ok);
        free(p->fail);
        free(p->last_err);
        free(p);
        cands_unref(cs);
        return NULL;
    }
    Py_DECREF(res);
    Py_INCREF(token);
    p->token = token; /* the thread does not touch it; it holds the mutex until here */
    arm_timer(self);
    return PyLong_FromSsize_t(h);
}

RELAY_API PyObject *Relay_udp_set_candidates(Relay *self, PyObject *args) {
    PyObject *hobj, *seq;
    if (!PyArg_ParseTuple(args, "OO", &hobj, &seq)) return NULL;
    UPort *p = get_port(self, hobj);
    if (p == NULL) return NULL;
    Cands *cs = parse_cands(seq, p->ntargets);
    if (cs == NULL) return NULL;
    cands_unref(p->cands); /* open flows keep theirs */
    p->cands = cs;
    Py_RETURN_NONE;
}

RELAY_API PyObject *Relay_udp_set_idle(Relay *self, PyObject *args) {
    PyObject *hobj;
    double idle;
    if (!PyArg_ParseTuple(args, "Od", &hobj, &idle)) return NULL;
    UPort *p = get_port(self, hobj);
    if (p == NULL) return NULL;
    long long idle_ms;
    if (idle_ms_of(idle, &idle_ms) < 0) return NULL;
    p->idle_ms = idle_ms;
    arm_timer(self);
    Py_RETURN_NONE;
}

RELAY_API PyObject *Relay_udp_close(Relay *self, PyObject *arg) {
    UPort *p = get_port(self, arg);
    if (p == NULL) return NULL;
    while (p->oldest != NULL) flow_close(self, p->oldest);
    PyObject *t = port_report(p);
    if (t != NULL) port_free(self, p);
    return t;
}

RELAY_API PyObject *Relay_udp_close_flows(Relay *self, PyObject *arg) {
    UPort *p = get_port(self, arg);
    if (p == NULL) return NULL;
    while (p->oldest != NULL) flow_close(self, p->oldest);
    admit_drop_all(self, p); /* not admitted yet: a draining rule would refuse them */
    return port_report(p);
}

RELAY_API PyObject *Relay_udp_flows(Relay *self, PyObject *arg) {
    UPort *p = get_port(self, arg);
    if (p == NULL) return NULL;
    PyObject *out = PyList_New(0);
    if (out == NULL) return NULL;
    for (UFlow *f = p->oldest; f != NULL; f = f->next) {
        char host[INET6_ADDRSTRLEN] = "";
        int port = 0;
        if (f->addr.ss_family == AF_INET) {
            struct sockaddr_in *a = (struct sockaddr_in *)&f->addr;
            inet_ntop(AF_INET, &a->sin_addr, host, sizeof host);
            port = ntohs(a->sin_port);
        } else if (f->addr.ss_family == AF_INET6) {
            struct sockaddr_in6 *a = (struct sockaddr_in6 *)&f->addr;
            inet_ntop(AF_INET6, &a->sin6_addr, host, sizeof host);
            port = ntohs(a->sin6_port);
        }
        PyObject *t = Py_BuildValue("(si)", host, port);
        if (t == NULL || PyList_Append(out, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(out);
            return NULL;
        }
        Py_DECREF(t);
    }
    return out;
}
