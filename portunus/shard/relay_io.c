/* Moving the bytes of one relayed connection: copy first, then splice;
 * backpressure, half-close, close.  See _relay.c for the design. */
#include "relay.h"

/* ----------------------------------------------------------------- reports */

RELAY_API void report(Relay *r, Conn *c, int closed, int err) {
    long long din = c->dir[0].unflushed, dout = c->dir[1].unflushed;
    c->dir[0].unflushed = c->dir[1].unflushed = 0;
    if (c->lst != NULL) {
        Listener *l = c->lst;
        l->bytes_in += din;
        l->bytes_out += dout;
        if (closed) {
            l->closed++;
            l->live--;
        }
        l->dirty = 1;
        return;
    }
    if (r->in_thread) {
        /* The relay thread cannot build Python objects: the connection carries its
         * report until poll() (it is not freed before: free_dead waits for repq). */
        c->rep_in += din;
        c->rep_out += dout;
        if (closed) {
            c->rep_closed = 1;
            c->rep_err = err;
        }
        if (!c->rep_queued) {
            c->rep_queued = 1;
            c->next_rep = r->repq;
            r->repq = c;
        }
        return;
    }
    if (r->reports == NULL) return; /* close() outside poll(): the caller reads them */
    PyObject *t = Py_BuildValue("(OLLii)", c->token, din, dout, closed, err);
    if (t == NULL || PyList_Append(r->reports, t) < 0) r->report_failed = 1;
    Py_XDECREF(t);
}

/* -------------------------------------------------------------------- pipes */

static int pipe_get(Relay *r, Dir *x) {
    if (r->pool_n) {
        r->pool_n--;
        x->pr = r->pool[2 * r->pool_n];
        x->pw = r->pool[2 * r->pool_n + 1];
        return 0;
    }
    int p[2];
    if (pipe2(p, O_NONBLOCK | O_CLOEXEC) < 0) {
        r->pipe_failures++;
        return -1;
    }
    (void)fcntl(p[1], F_SETPIPE_SZ, PIPE_SIZE); /* over the user's pipe budget: keep the default */
    x->pr = p[0];
    x->pw = p[1];
    return 0;
}

static void pipe_put(Relay *r, Dir *x) {
    if (x->pr < 0) return;
    if (x->pending == 0 && r->pool_n < POOL_LIMIT) {
        r->pool[2 * r->pool_n] = x->pr;
        r->pool[2 * r->pool_n + 1] = x->pw;
        r->pool_n++;
    } else {
        close(x->pr);
        close(x->pw);
    }
    x->pr = x->pw = -1;
}

/* -------------------------------------------------------------- connections */

static void conn_free(Relay *r, Conn *c);

RELAY_API void conn_close(Relay *r, Conn *c, int err) {
    if (c->closed) return;
    c->closed = 1;
    c->connecting = 0;
    if (!r->in_thread) c->told = 2; /* Python closes it itself */
    close(c->fd[0]);
    if (c->fd[1] >= 0) close(c->fd[1]); /* closing removes both from the epoll set */
    for (int d = 0; d < 2; d++) {
        pipe_put(r, &c->dir[d]);
        free(c->dir[d].held);
        c->dir[d].held = NULL;
    }
    report(r, c, 1, err);
    if (c->dir[0].again || c->dir[1].again) {
        for (Py_ssize_t i = 0; i < r->nagain; i++)
            if (r->again[i] == c) r->again[i] = NULL;
    }
    if (!r->threaded) {
        r->slots[c->handle] = NULL;
        r->free_ids[r->nfree++] = c->handle;
    } /* threaded: the handle stays taken until poll() told Python (conn_free) */
    r->live--;
    if (r->in_poll || r->threaded) {
        /* An event for it may still be in this batch, and a threaded relay frees
         * (token, listener) only with the GIL: free after the batch, in Python. */
        c->next_dead = r->dead;
        r->dead = c;
    } else {
        conn_free(r, c);
    }
}

/* With the GIL (the token, the listener's token). */
static void conn_free(Relay *r, Conn *c) {
    if (r->threaded) {
        r->slots[c->handle] = NULL;
        r->free_ids[r->nfree++] = c->handle;
    }
    Py_CLEAR(c->token);
    cands_unref(c->cands);
    if (c->lst != NULL) listener_unref(r, c->lst);
    relay_free(r, c);
}

/* With the GIL; a threaded relay only once poll() took the reports (repq), and an
 * add()ed connection the thread closed only once Python had a poll() to act on it. */
RELAY_API void free_dead(Relay *r) {
    if (r->repq != NULL) return;
    Conn **pp = &r->dead;
    while (*pp != NULL) {
        Conn *c = *pp;
        if (r->threaded && c->token != NULL && c->told < 2) {
            pp = &c->next_dead;
            continue;
        }
        *pp = c->next_dead;
        conn_free(r, c);
    }
}

RELAY_API void account(Relay *r, Conn *c, int d, ssize_t n) {
    c->dir[d].unflushed += n;
    if (c->dir[d].unflushed >= FLUSH_EVERY) report(r, c, 0, 0);
}

RELAY_API void dir_finish(Relay *r, Conn *c, int d) {
    c->dir[d].done = 1;
    /* Both directions done: close() sends the FIN itself (fd[1 - d] was read to its
     * EOF, so nothing unread turns it into a reset), one syscall fewer per connection. */
    if (c->dir[1 - d].done) {
        conn_close(r, c, 0);
        return;
    }
    shutdown(c->fd[1 - d], SHUT_WR);
    if (c->dir[d].unflushed)
        report(r, c, 0, 0);
}

/* Deliver what a direction holds.  0: drained, 1: destination full, -1: failed (closed). */
RELAY_API int flush(Relay *r, Conn *c, int d) {
    Dir *x = &c->dir[d];
    int dst = c->fd[1 - d];
    while (x->held_off < x->held_len) {
        ssize_t m = send(dst, x->held + x->held_off, x->held_len - x->held_off, MSG_NOSIGNAL);
        if (m < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { x->writing = 1; return 1; }
            conn_close(r, c, errno);
            return -1;
        }
        x->held_off += (size_t)m;
    }
    if (x->held) {
        free(x->held);
        x->held = NULL;
        x->held_off = x->held_len = 0;
    }
    while (x->pending) {
        ssize_t m = splice(x->pr, NULL, dst, NULL, x->pending, SPLICE_FLAGS);
        if (m < 0) {
            if (errno == EINTR) continue;
            if (errno == EAGAIN) { x->writing = 1; return 1; }
            conn_close(r, c, errno);
            return -1;
        }
        x->pending -= (size_t)m;
    }
    x->writing = 0;
    return 0;
}

RELAY_API void schedule_again(Relay *r, Conn *c, int d) {
    if (c->dir[d].again) return;
    if (r->nagain == r->again_cap) {
        Py_ssize_t cap = r->again_cap ? 2 * r->again_cap : 64;
        Conn **n = realloc(r->again, (size_t)cap * sizeof(Conn *));
        if (n == NULL) return; /* the next edge of this socket restarts it */
        r->again = n;
        r->again_cap = cap;
    }
    c->dir[d].again = 1;
    r->again[r->nagain++] = c;
}

/* Move bytes from fd[d] to fd[1 - d] while the source is ready and the destination takes them. */
RELAY_API void pump(Relay *r, Conn *c, int d) {
    Dir *x = &c->dir[d];
    int src = c->fd[d], dst = c->fd[1 - d];
    int budget = BURST;
    while (!c->closed && x->ready && !x->writing && !x->done) {
        if (budget-- == 0) {
            schedule_again(r, c, d);
            return;
        }
        if (!x->spliced) {
            ssize_t n = recv(src, r->buf, r->bufsize, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) { x->ready = 0; return; }
                conn_close(r, c, errno);
                return;
            }
            if (n == 0) {
                x->eof = 1;
                x->ready = 0;
                dir_finish(r, c, d);
                return;
            }
            x->copy_left -= n;
            /* Splice once enough has moved and the reads are bulk-sized: small
             * messages (interactive, ping-pong) are cheaper copied for good. */
            if (x->copy_left <= 0 && n >= BULK_READ) x->spliced = 1;
            size_t off = 0;
            while (off < (size_t)n) {
                ssize_t m = send(dst, r->buf + off, (size_t)n - off, MSG_NOSIGNAL);
                if (m < 0) {
                    if (errno == EINTR) continue;
                    if (errno == EAGAIN) break;
                    account(r, c, d, n);
                    conn_close(r, c, errno);
                    return;
                }
                off += (size_t)m;
            }
            account(r, c, d, n);
            if (c->closed) return;
            if (off < (size_t)n) {
                x->held = malloc((size_t)n - off);
                if (x->held == NULL) { conn_close(r, c, ENOMEM); return; }
                memcpy(x->held, r->buf + off, (size_t)n - off);
                x->held_off = 0;
                x->held_len = (size_t)n - off;
                x->writing = 1;
                return;
            }
            /* A short TCP read took everything queued; later bytes raise a new edge.
             * With the FIN already queued behind them, this was the last read: no
             * recv() just to see the 0. */
            if ((size_t)n < r->bufsize && x->fin) {
                x->eof = 1;
                x->ready = 0;
                dir_finish(r, c, d);
                return;
            }
            if ((size_t)n < r->bufsize && !x->hup) { x->ready = 0; return; }
        } else {
            if (x->pr < 0 && pipe_get(r, x) < 0) {
                conn_close(r, c, errno);
                return;
            }
            ssize_t n = splice(src, NULL, x->pw, NULL, CHUNK, SPLICE_FLAGS);
            if (n < 0) {
                if (errno == EINTR) continue;
                if (errno == EAGAIN) { x->ready = 0; return; }
                conn_close(r, c, errno);
                return;
            }
            if (n == 0) {
                x->eof = 1;
                x->ready = 0;
                dir_finish(r, c, d);
                return;
            }
            x->pending = (size_t)n;
            account(r, c, d, n);
            if (c->closed) return;
            if (flush(r, c, d) != 0) return;
        }
    }
}

RELAY_API void on_writable(Relay *r, Conn *c, int d) {
    if (flush(r, c, d) != 0) return;
    if (c->dir[d].eof) {
        dir_finish(r, c, d);
        return;
    }
    c->dir[d].ready = 1; /* its edge may have come while we were not reading */
    pump(r, c, d);
}

/* --------------------------------------------------- native accept, connect */

RELAY_API int grow_slots(Relay *r) {
    if (r->nfree || r->nslots < r->cap) return 0;
    Py_ssize_t cap = r->cap ? 2 * r->cap : 256;
    Conn **s = realloc(r->slots, (size_t)cap * sizeof(Conn *));
    if (s == NULL) return -1;
    r->slots = s;
    Py_ssize_t *f = realloc(r->free_ids, (size_t)cap * sizeof(Py_ssize_t));
    if (f == NULL) return -1;
    r->free_ids = f;
    r->cap = cap;
    return 0;
}

RELAY_API Conn *conn_new(Relay *r, int cfd) {
    if (grow_slots(r) < 0) return NULL;
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL) return NULL;
    c->fd[0] = cfd;
    c->fd[1] = -1;
    c->cur_target = -1;
    for (int i = 0; i < 2; i++) {
        c->end[i].kind = END_CONN;
        c->end[i].conn = c;
        c->end[i].side = i;
        c->dir[i].pr = c->dir[i].pw = -1;
        c->dir[i].copy_left = r->splice_after;
        c->dir[i].spliced = r->splice_after == 0;
    }
    c->handle = r->nfree ? r->free_ids[--r->nfree] : r->nslots++;
    r->slots[c->handle] = c;
    r->live++;
    return c;
}

RELAY_API int watch(Relay *r, Conn *c, int side) {
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->end[side]};
    return epoll_ctl(r->ep, EPOLL_CTL_ADD, c->fd[side], &ev);
}
