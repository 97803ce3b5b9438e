/* Native accept and connect for plain TCP ports: candidates, fall-through,
 * connect timeout, accept back-off.  See _relay.c for the design. */
#include "relay.h"

RELAY_API void count_target(Listener *l, int target, int ok, int err) {
    if (target < 0 || target >= l->ntargets) return;
    (ok ? l->ok : l->fail)[target]++;
    if (!ok) l->last_err[target] = err;
    l->dirty = 1;
}

RELAY_API void connected(Relay *r, Conn *c) {
    c->connecting = 0;
    c->target_failed = 0;
    count_target(c->lst, c->cur_target, 1, 0);
    /* Bytes either side sent meanwhile were flagged by their edges (handle_event). */
    if (c->dir[1].ready) pump(r, c, 1);
    if (!c->closed && c->dir[0].ready) pump(r, c, 0);
}

/* Connect to the next candidate; fall through on an immediate failure. */
RELAY_API void try_next(Relay *r, Conn *c) {
    Listener *l = c->lst;
    Cands *cs = c->cands;
    while (c->pos < cs->n) {
        Cand *cd = &cs->c[c->pos++];
        if (c->cur_target != cd->target) {
            if (c->cur_target >= 0 && c->target_failed) count_target(l, c->cur_target, 0, c->last_err);
            c->cur_target = cd->target;
            c->target_failed = 1;
        }
        int u = socket(cd->family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (u < 0) {
            c->last_err = errno;
            break;
        }
        int one = 1;
        (void)setsockopt(u, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        int rc = connect(u, (struct sockaddr *)&cd->addr, cd->len);
        c->last_err = errno;
        if (rc == 0 || errno == EINPROGRESS) {
            c->fd[1] = u;
            if (watch(r, c, 1) < 0) {
                close(u);
                c->fd[1] = -1;
                break;
            }
            if (rc == 0) {
                connected(r, c);
            } else {
                c->connecting = 1;
                c->deadline_ms = now_ms() + l->timeout_ms;
                arm_timer(r);
            }
            return;
        }
        close(u);
    }
    if (c->cur_target >= 0 && c->target_failed) count_target(l, c->cur_target, 0, c->last_err);
    c->target_failed = 0;
    l->connect_failures++;
    l->dirty = 1;
    conn_close(r, c, 0);
}

RELAY_API void connect_failed_now(Relay *r, Conn *c, int err) {
    c->last_err = err;
    close(c->fd[1]); /* leaves the epoll set */
    c->fd[1] = -1;
    c->connecting = 0;
    try_next(r, c);
}

RELAY_API void on_upstream_connect(Relay *r, Conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd[1], SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) connect_failed_now(r, c, err);
    else connected(r, c);
}

RELAY_API void pause_listener(Relay *r, Listener *l) {
    struct epoll_event ev = {.events = 0, .data.ptr = &l->end};
    if (epoll_ctl(r->ep, EPOLL_CTL_MOD, l->lfd, &ev) == 0) {
        l->paused = 1;
        l->resume_ms = now_ms() + BACKOFF_MS;
        arm_timer(r);
    }
}

RELAY_API void on_accept(Relay *r, Listener *l) {
    for (int i = 0; i < ACCEPT_BATCH; i++) {
        int fd = accept4(l->lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno == EINTR || errno == ECONNABORTED) continue;
            if (errno == EMFILE || errno == ENFILE || errno == ENOBUFS || errno == ENOMEM) {
                /* Out of fds: leave the rest in the kernel queue and back off briefly. */
                l->accept_errno = errno;
                l->dirty = 1;
                pause_listener(r, l);
            }
            return;
        }
        Conn *c = conn_new(r, fd);
        if (c == NULL) {
            close(fd);
            return;
        }
        c->lst = l;
        l->refs++;
        l->opened++;
        l->live++;
        l->dirty = 1;
        c->cands = l->cands;
        l->cands->refs++;
        if (watch(r, c, 0) < 0) {
            conn_close(r, c, errno);
            continue;
        }
        try_next(r, c);
    }
}

RELAY_API void on_tick(Relay *r) {
    uint64_t n;
    if (read(r->tfd, &n, sizeof n) < 0) { /* nothing: spurious */ }
    long long now = now_ms();
    int busy = 0;
    for (Py_ssize_t i = 0; i < r->nslots; i++) {
        Conn *c = r->slots[i];
        if (c == NULL || !c->connecting) continue;
        if (c->deadline_ms <= now) connect_failed_now(r, c, ETIMEDOUT);
        if (r->slots[i] == c && c->connecting) busy = 1;
    }
    for (Py_ssize_t i = 0; i < r->nlsts; i++) {
        Listener *l = r->lsts[i];
        if (l != NULL && l->dirty) busy = 1; /* counts poll() holds back (report_ms) */
        if (l == NULL || !l->paused) continue;
        if (l->resume_ms <= now) {
            struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &l->end};
            if (epoll_ctl(r->ep, EPOLL_CTL_MOD, l->lfd, &ev) == 0) l->paused = 0;
        }
        if (l->paused) busy = 1;
    }
    if (r->nups && udp_tick(r, now)) busy = 1;
    if (!busy) {
        struct itimerspec off = {{0, 0}, {0, 0}};
        timerfd_settime(r->tfd, 0, &off, NULL);
        r->timer_armed = 0;
    }
}
