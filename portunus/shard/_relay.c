/* Native relay for plain TCP connections and plain UDP ports: the Python type
 * (this file), the byte moving (relay_io.c), native accept/connect
 * (relay_connect.c), UDP flows (relay_udp.c, whose sockets are readers on the
 * shard's loop rather than members of the epoll set below), relay.h.
 *
 * A shard hands a connected (client, upstream) pair of non-blocking fds to a
 * Relay, which owns them from then on: both live in the relay's own
 * edge-triggered epoll set, and the shard's uvloop loop watches that one epoll
 * fd (Relay.fileno()) and calls Relay.poll() when it is readable.  poll() moves
 * the bytes without entering the interpreter per event and returns a batch of
 * reports for Python: byte counts (every 64 KiB of a direction and at close)
 * and closes, so the Prometheus counters stay in Python.
 *
 * Each direction copies its first `splice_after` bytes through one shared
 * buffer (recv/send) and then splices through a pipe from a pool: for a short
 * connection two splices and a pipe cost more than two copies.  Bytes the
 * destination does not take are held (copy) or left in the pipe (splice) and
 * the source is not read until they are delivered (backpressure).  EOF on one
 * side is passed on as shutdown(SHUT_WR) once everything before it was
 * delivered; the connection closes when both directions are done or on the
 * first error.
 *
 * Threaded (Relay(threaded=1), the shard's default): a thread of the relay's own
 * blocks in epoll_wait on that set, which then also holds the UDP sockets, and
 * handles every event in C without the GIL; the shard's loop watches an eventfd
 * instead (fileno()) that the thread writes only when Python has something to
 * do: a report is due (the same batching as poll()'s), an add()ed connection
 * closed or moved 64 KiB, a UDP flow waits for admission.  Every method called
 * from Python takes the relay's mutex, which the thread holds while it handles
 * a batch; the thread never takes the GIL, so the two cannot deadlock.  Python
 * references (tokens) are only touched by Python-called methods, and memory an
 * event of a batch the thread fetched may name is freed only after that batch
 * (relay_free).
 */
#include "relay.h"

/* ------------------------------------------------------------- the thread */

/* Free `p` now, or, on a threaded relay, once the thread finished every batch it
 * may have fetched before this call (the fd was closed or deleted from the set
 * first, so later batches cannot name it). */
RELAY_API void relay_free(Relay *r, void *p) {
    if (p == NULL) return;
    if (!r->threaded) {
        free(p);
        return;
    }
    Grave *g = malloc(sizeof *g);
    if (g == NULL) return; /* leak rather than risk a use after free */
    g->p = p;
    g->gen = r->gen;
    g->next = r->graves;
    r->graves = g;
}

static void reap(Relay *r, int all) {
    Grave **pp = &r->graves;
    while (*pp != NULL) {
        Grave *g = *pp;
        if (all || g->gen < r->gen) {
            *pp = g->next;
            free(g->p);
            free(g);
        } else {
            pp = &g->next;
        }
    }
}

/* Entry from Python (the GIL held): take the relay's mutex.  The thread never
 * waits for the GIL, so waiting here with the GIL released cannot deadlock. */
static void py_lock(Relay *r) {
    if (!r->running) return;
    if (r->depth && pthread_equal(r->owner, pthread_self())) {
        r->depth++; /* a finaliser run by a DECREF inside a method calls the relay again */
        return;
    }
    if (pthread_mutex_trylock(&r->mu) != 0) {
        Py_BEGIN_ALLOW_THREADS
        pthread_mutex_lock(&r->mu);
        Py_END_ALLOW_THREADS
    }
    r->owner = pthread_self();
    r->depth = 1;
}

static void py_unlock(Relay *r) {
    if (!r->running || r->depth == 0) return;
    if (--r->depth) return;
    free_dead(r);
    reap(r, 0);
    pthread_mutex_unlock(&r->mu);
}

RELAY_API void wake_python(Relay *r) {
    if (r->signalled) return;
    uint64_t one = 1;
    if (write(r->efd, &one, sizeof one) == sizeof one) r->signalled = 1;
}

static int listener_urgent(Listener *l);
static void take_conn_reports(Relay *self, PyObject *reports);
static void handle_event(Relay *r, struct epoll_event *ev);
static void run_again(Relay *r);

/* After a batch: does Python have something to do now?  Counts not due yet keep
 * the tick running, which calls this again (at most report_ms + TICK_MS late). */
static void maybe_signal(Relay *r) {
    /* Connections left on the dead list need the GIL (sweep_dead): poll() frees them. */
    if (r->repq != NULL || r->admits || r->dead != NULL) {
        wake_python(r);
        return;
    }
    long long now = now_ms();
    int waiting = 0;
    for (Py_ssize_t i = 0; i < r->nlsts; i++) {
        Listener *l = r->lsts[i];
        if (l == NULL || !l->dirty) continue;
        if (!r->report_ms || now - l->reported_ms >= r->report_ms || listener_urgent(l)) {
            wake_python(r);
            return;
        }
        waiting = 1;
    }
    if (r->nups) {
        int u = udp_due(r, now);
        if (u > 0) {
            wake_python(r);
            return;
        }
        if (u < 0) waiting = 1;
    }
    if (waiting) arm_timer(r);
}

/* After a batch: free the closed connections that hold no Python reference (those
 * the thread accepted, while their listener has another reference), so a busy port
 * does not need Python to free its connections.  The batch that could name them
 * is done, and later batches cannot (their fds were closed). */
static void sweep_dead(Relay *r) {
    Conn **pp = &r->dead;
    while (*pp != NULL) {
        Conn *c = *pp;
        if (c->token != NULL || c->rep_queued || (c->lst != NULL && c->lst->refs <= 1)) {
            pp = &c->next_dead;
            continue;
        }
        *pp = c->next_dead;
        r->slots[c->handle] = NULL;
        r->free_ids[r->nfree++] = c->handle;
        cands_unref(c->cands);
        if (c->lst != NULL) c->lst->refs--; /* not the last: no token to drop */
        free(c);
    }
}

static void *relay_thread(void *arg) {
    Relay *r = arg;
    struct epoll_event evs[MAX_EVENTS];
    pthread_mutex_lock(&r->mu);
    while (!r->stop) {
        /* Bursts left over go first, without blocking. */
        int timeout = r->nagain ? 0 : -1;
        r->gen++;
        reap(r, 0);
        pthread_mutex_unlock(&r->mu);
        int n = epoll_wait(r->ep, evs, MAX_EVENTS, timeout);
        pthread_mutex_lock(&r->mu);
        if (r->stop) break;
        r->in_thread = r->in_poll = 1;
        run_again(r);
        for (int i = 0; i < n; i++) handle_event(r, &evs[i]);
        r->in_poll = 0;
        udp_free_dead(r);
        sweep_dead(r);
        r->in_thread = 0;
        maybe_signal(r);
    }
    pthread_mutex_unlock(&r->mu);
    return NULL;
}

static int start_thread(Relay *r) {
    r->efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    r->wfd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (r->efd < 0 || r->wfd < 0) return -1;
    r->wend.kind = END_WAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &r->wend};
    if (epoll_ctl(r->ep, EPOLL_CTL_ADD, r->wfd, &ev) < 0) return -1;
    if (pthread_mutex_init(&r->mu, NULL) != 0) return -1;
    r->mu_ready = 1;
    /* Signals stay with the interpreter's thread: the relay thread blocks them all. */
    sigset_t all, old;
    sigfillset(&all);
    pthread_sigmask(SIG_BLOCK, &all, &old);
    int rc = pthread_create(&r->thread, NULL, relay_thread, r);
    pthread_sigmask(SIG_SETMASK, &old, NULL);
    if (rc != 0) {
        errno = rc;
        return -1;
    }
    r->running = 1;
    return 0;
}

/* Stop and join the thread (the GIL held, not the mutex); from then on the relay
 * is driven like an unthreaded one until it is freed. */
static void stop_thread(Relay *r) {
    if (!r->running) return;
    Py_BEGIN_ALLOW_THREADS
    pthread_mutex_lock(&r->mu);
    r->stop = 1;
    uint64_t one = 1;
    if (write(r->wfd, &one, sizeof one) < 0) { /* the eventfd is never full */ }
    pthread_mutex_unlock(&r->mu);
    pthread_join(r->thread, NULL);
    Py_END_ALLOW_THREADS
    r->running = 0;
}

/* ------------------------------------------------------------- Python type */

static int Relay_init(Relay *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"splice_after", "bufsize", "report_ms", "threaded", NULL};
    long long splice_after = 16 * 1024, report_ms = 0;
    Py_ssize_t bufsize = 64 * 1024;
    int threaded = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|LnLp", kw, &splice_after, &bufsize, &report_ms, &threaded))
        return -1;
    if (bufsize < 1024 || splice_after < 0 || report_ms < 0 || report_ms > REPORT_MS_MAX) {
        PyErr_SetString(PyExc_ValueError, "bufsize >= 1024, splice_after >= 0, 0 <= report_ms <= 100");
        return -1;
    }
    if (self->ep >= 0) {
        PyErr_SetString(PyExc_RuntimeError, "Relay already initialised");
        return -1;
    }
    self->ep = epoll_create1(EPOLL_CLOEXEC);
    if (self->ep < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->buf = malloc((size_t)bufsize);
    self->pool = malloc(2 * POOL_LIMIT * sizeof(int));
    if (self->buf == NULL || self->pool == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    self->bufsize = (size_t)bufsize;
    self->splice_after = splice_after;
    self->report_ms = report_ms;
    self->tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (self->tfd < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->tend.kind = END_TIMER;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &self->tend};
    if (epoll_ctl(self->ep, EPOLL_CTL_ADD, self->tfd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    if (threaded) {
        self->threaded = 1;
        if (start_thread(self) < 0) {
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
    }
    return 0;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self != NULL) self->ep = self->tfd = self->efd = self->wfd = -1;
    return (PyObject *)self;
}

static void close_all(Relay *r) {
    for (Py_ssize_t i = 0; i < r->nslots; i++)
        if (r->slots[i]) conn_close(r, r->slots[i], 0);
}

static void drop_listener(Relay *r, Py_ssize_t h) {
    Listener *l = r->lsts[h];
    r->lsts[h] = NULL;
    if (l->listening) epoll_ctl(r->ep, EPOLL_CTL_DEL, l->lfd, NULL);
    l->listening = 0;
    listener_unref(r, l);
}

static void halt(Relay *self);

static void Relay_dealloc(Relay *self) {
    halt(self);
    close_all(self);
    free_dead(self);
    for (Py_ssize_t i = 0; i < self->nlsts; i++)
        if (self->lsts[i]) drop_listener(self, i);
    free(self->lsts);
    udp_free_all(self);
    if (self->tfd >= 0) close(self->tfd);
    for (int i = 0; i < 2 * self->pool_n; i++) close(self->pool[i]);
    if (self->ep >= 0) close(self->ep);
    if (self->efd >= 0) close(self->efd);
    if (self->wfd >= 0) close(self->wfd);
    free_dead(self);
    reap(self, 1);
    if (self->mu_ready) pthread_mutex_destroy(&self->mu);
    free(self->buf);
    free(self->pool);
    free(self->slots);
    free(self->free_ids);
    free(self->again);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int check(Relay *self) {
    if (self->ep < 0) {
        PyErr_SetString(PyExc_ValueError, "Relay is closed");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(add_doc, "add(client_fd, upstream_fd, token) -> handle\n\n"
             "Take ownership of two connected non-blocking sockets and relay between them.\n"
             "On failure (OSError) the fds are still the caller's.");

static PyObject *Relay_add(Relay *self, PyObject *args) {
    int cfd, ufd;
    PyObject *token;
    if (!PyArg_ParseTuple(args, "iiO", &cfd, &ufd, &token)) return NULL;
    if (check(self) < 0) return NULL;
    if (cfd < 0 || ufd < 0) {
        PyErr_SetString(PyExc_ValueError, "negative fd");
        return NULL;
    }
    Conn *c = conn_new(self, cfd);
    if (c == NULL) return PyErr_NoMemory();
    c->fd[1] = ufd;
    for (int i = 0; i < 2; i++) {
        if (watch(self, c, i) < 0) {
            int e = errno;
            if (i == 1) epoll_ctl(self->ep, EPOLL_CTL_DEL, cfd, NULL);
            self->slots[c->handle] = NULL;
            self->free_ids[self->nfree++] = c->handle;
            self->live--;
            relay_free(self, c); /* the thread may have fetched an event for cfd */
            errno = e;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_INCREF(token);
    c->token = token;
    return PyLong_FromSsize_t(c->handle);
}

PyDoc_STRVAR(close_doc, "close(handle) -> (bytes_in, bytes_out)\n\n"
             "Close a connection now (both fds); returns the bytes not yet reported.");

static PyObject *Relay_close(Relay *self, PyObject *arg) {
    Py_ssize_t h = PyLong_AsSsize_t(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    if (h < 0 || h >= self->nslots || self->slots[h] == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such connection");
        return NULL;
    }
    Conn *c = self->slots[h];
    long long din = c->dir[0].unflushed + c->rep_in, dout = c->dir[1].unflushed + c->rep_out;
    c->dir[0].unflushed = c->dir[1].unflushed = 0;
    /* A report the thread queued for it is taken over here (poll() skips it). */
    c->rep_in = c->rep_out = 0;
    c->rep_closed = 0;
    c->told = 2; /* Python knows it is closed: the handle may go */
    conn_close(self, c, 0);
    return Py_BuildValue("(LL)", din, dout);
}

PyDoc_STRVAR(poll_doc, "poll() -> (reports, listener_reports, more)\n\n"
             "Handle what is ready; reports are (token, bytes_in, bytes_out, closed, errno),\n"
             "listener_reports (token, opened, closed, bytes_in, bytes_out, connect_failures,\n"
             "ok_per_target, failed_per_target, last_errno_per_target, live, accept_errno).\n"
             "more: some connection yielded after a burst; call poll() again soon.");

static void handle_event(Relay *r, struct epoll_event *ev) {
    End *e = ev->data.ptr;
    if (e->kind == END_LISTENER) {
        if (e->lst->listening && !e->lst->paused) on_accept(r, e->lst);
        return;
    }
    if (e->kind == END_TIMER) {
        on_tick(r);
        return;
    }
    if (e->kind == END_UPORT) {
        udp_on_port_event(r, e->port);
        return;
    }
    if (e->kind == END_UFLOW) {
        udp_on_flow_event(r, e->flow);
        return;
    }
    if (e->kind == END_WAKE) {
        uint64_t n;
        if (read(r->wfd, &n, sizeof n) < 0) { /* spurious */ }
        return;
    }
    Conn *c = e->conn;
    if (c->closed) return;
    int i = e->side;
    uint32_t m = ev->events;
    if (c->connecting) {
        /* Until the target answers only remember what the client did. */
        if (i == 0) {
            if (m & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->dir[0].ready = 1;
            if (m & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) c->dir[0].hup = 1;
            if ((m & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP) c->dir[0].fin = 1;
        } else if (m & (EPOLLOUT | EPOLLHUP | EPOLLERR)) {
            if (m & EPOLLIN) c->dir[1].ready = 1; /* the target spoke first */
            if (m & EPOLLRDHUP) c->dir[1].hup = 1;
            if ((m & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP) c->dir[1].fin = 1;
            on_upstream_connect(r, c);
        }
        return;
    }
    if (m & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        Dir *x = &c->dir[i];
        x->ready = 1;
        if (m & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) x->hup = 1;
        if ((m & (EPOLLRDHUP | EPOLLERR)) == EPOLLRDHUP) x->fin = 1;
        if (!x->writing) pump(r, c, i);
    }
    if (!c->closed && (m & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && c->dir[1 - i].writing)
        on_writable(r, c, 1 - i);
}

/* Counts Python must see now: health (failures), fd exhaustion, and whether the port
 * has open connections at all (live to or from 0: rt.conns, drain, forget_listener). */
static int listener_urgent(Listener *l) {
    if (l->connect_failures || l->accept_errno || !l->listening) return 1;
    if ((l->live == 0) != (l->reported_live == 0)) return 1;
    for (int i = 0; i < l->ntargets; i++)
        if (l->fail[i]) return 1;
    return 0;
}

/* (token, opened, closed, bytes_in, bytes_out, connect_failures, ok, fail, live, accept_errno) */
static PyObject *listener_report(Listener *l) {
    PyObject *ok = PyTuple_New(l->ntargets), *fail = PyTuple_New(l->ntargets), *errs = PyTuple_New(l->ntargets);
    if (ok == NULL || fail == NULL || errs == NULL) {
        Py_XDECREF(ok);
        Py_XDECREF(fail);
        Py_XDECREF(errs);
        return NULL;
    }
    for (int i = 0; i < l->ntargets; i++) {
        PyTuple_SET_ITEM(ok, i, PyLong_FromLongLong(l->ok[i]));
        PyTuple_SET_ITEM(fail, i, PyLong_FromLongLong(l->fail[i]));
        PyTuple_SET_ITEM(errs, i, PyLong_FromLong(l->last_err[i]));
        l->ok[i] = l->fail[i] = 0;
    }
    PyObject *t = Py_BuildValue("(OLLLLLNNNLi)", l->token, l->opened, l->closed, l->bytes_in, l->bytes_out,
                                l->connect_failures, ok, fail, errs, l->live, l->accept_errno);
    l->opened = l->closed = l->bytes_in = l->bytes_out = l->connect_failures = 0;
    l->accept_errno = 0;
    l->dirty = 0;
    l->reported_live = l->live;
    return t;
}

/* Directions that yielded after a burst last time go first. */
static void run_again(Relay *self) {
    Py_ssize_t n_again = self->nagain;
    if (!n_again) return;
    Conn **todo = malloc((size_t)n_again * sizeof(Conn *));
    if (todo == NULL) return;
    memcpy(todo, self->again, (size_t)n_again * sizeof(Conn *));
    self->nagain = 0;
    for (Py_ssize_t i = 0; i < n_again; i++) {
        Conn *c = todo[i];
        if (c == NULL || c->closed) continue;
        for (int d = 0; d < 2; d++) {
            if (!c->dir[d].again) continue;
            c->dir[d].again = 0;
            pump(self, c, d);
        }
    }
    free(todo);
}

/* Threaded: the reports the thread left on the add()ed connections. */
static void take_conn_reports(Relay *self, PyObject *reports) {
    Conn *c = self->repq;
    self->repq = NULL;
    while (c != NULL) {
        Conn *next = c->next_rep;
        if (reports != NULL && (c->rep_in || c->rep_out || c->rep_closed)) {
            PyObject *t = Py_BuildValue("(OLLii)", c->token ? c->token : Py_None, c->rep_in, c->rep_out,
                                        c->rep_closed, c->rep_err);
            if (t == NULL || PyList_Append(reports, t) < 0) self->report_failed = 1;
            Py_XDECREF(t);
        }
        if (c->rep_closed && c->told == 0) c->told = 1;
        c->rep_in = c->rep_out = 0;
        c->rep_closed = c->rep_err = 0;
        c->rep_queued = 0;
        c->next_rep = NULL;
        c = next;
    }
}

static PyObject *Relay_poll(Relay *self, PyObject *noargs) {
    if (check(self) < 0) return NULL;
    PyObject *reports = PyList_New(0);
    if (reports == NULL) return NULL;
    self->report_failed = 0;
    int n = 0;
    if (self->running) {
        uint64_t v;
        if (read(self->efd, &v, sizeof v) < 0) { /* not signalled: a call of our own */ }
        self->signalled = 0;
        /* Closes the last poll() handed over have been acted on: their handles may go. */
        for (Conn *c = self->dead; c != NULL; c = c->next_dead)
            if (c->told == 1) c->told = 2;
        if (self->admits && udp_admit_pending(self) < 0) self->report_failed = 1;
        take_conn_reports(self, reports);
    } else {
        self->reports = reports;
        self->in_poll = 1;
        run_again(self);
        struct epoll_event evs[MAX_EVENTS];
        n = epoll_wait(self->ep, evs, MAX_EVENTS, 0);
        for (int i = 0; i < n; i++) handle_event(self, &evs[i]);
        self->in_poll = 0;
        free_dead(self);
        udp_free_dead(self);
        self->reports = NULL;
    }
    if (self->report_failed) {
        Py_DECREF(reports);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    PyObject *lreports = PyList_New(0);
    if (lreports == NULL) {
        Py_DECREF(reports);
        return NULL;
    }
    /* Listeners no longer registered may still have connections (and counts).
     * With report_ms, a busy listener's routine counts (opened, closed, bytes,
     * successful connects) wait up to report_ms so that one Python batch of
     * Prometheus updates covers many polls; the tick (on_tick keeps it running
     * while a listener is dirty) delivers them.  Failures, an accept error, the
     * last connection closing or a stopped listener go out at once. */
    long long now = self->report_ms ? now_ms() : 0;
    int deferred = 0;
    for (Py_ssize_t i = 0; i < self->nlsts; i++) {
        Listener *l = self->lsts[i];
        if (l == NULL || !l->dirty) continue;
        if (self->report_ms && now - l->reported_ms < self->report_ms && !listener_urgent(l)) {
            deferred = 1;
            continue;
        }
        l->reported_ms = now;
        PyObject *t = listener_report(l);
        if (t == NULL || PyList_Append(lreports, t) < 0) {
            Py_XDECREF(t);
            Py_DECREF(reports);
            Py_DECREF(lreports);
            return NULL;
        }
        Py_DECREF(t);
    }
    if (deferred) arm_timer(self);
    if (self->nups && udp_reports(self, lreports, now_ms()) < 0) {
        Py_DECREF(reports);
        Py_DECREF(lreports);
        return NULL;
    }
    int more = !self->running && (self->nagain || n == MAX_EVENTS);
    return Py_BuildValue("(NNO)", reports, lreports, more ? Py_True : Py_False);
}

/* [(ip, port, target_index), ...] -> Cands (new reference count 1) */
RELAY_API Cands *parse_cands(PyObject *seq, int ntargets) {
    PyObject *fast = PySequence_Fast(seq, "candidates must be a sequence");
    if (fast == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(fast);
    Cands *cs = calloc(1, sizeof(Cands) + (size_t)n * sizeof(Cand));
    if (cs == NULL) {
        Py_DECREF(fast);
        PyErr_NoMemory();
        return NULL;
    }
    cs->refs = 1;
    cs->n = (int)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        const char *ip;
        int port, target;
        if (!PyArg_ParseTuple(PySequence_Fast_GET_ITEM(fast, i), "sii", &ip, &port, &target)) goto fail;
        if (port <= 0 || port > 65535 || target < 0 || target >= ntargets) {
            PyErr_SetString(PyExc_ValueError, "candidate port or target index out of range");
            goto fail;
        }
        Cand *cd = &cs->c[i];
        cd->target = target;
        struct sockaddr_in *a4 = (struct sockaddr_in *)&cd->addr;
        struct sockaddr_in6 *a6 = (struct sockaddr_in6 *)&cd->addr;
        if (inet_pton(AF_INET, ip, &a4->sin_addr) == 1) {
            a4->sin_family = cd->family = AF_INET;
            a4->sin_port = htons((uint16_t)port);
            cd->len = sizeof *a4;
        } else if (inet_pton(AF_INET6, ip, &a6->sin6_addr) == 1) {
            a6->sin6_family = cd->family = AF_INET6;
            a6->sin6_port = htons((uint16_t)port);
            cd->len = sizeof *a6;
        } else {
            PyErr_Format(PyExc_ValueError, "not an IP address: %s", ip);
            goto fail;
        }
    }
    Py_DECREF(fast);
    return cs;
fail:
    Py_DECREF(fast);
    free(cs);
    return NULL;
}

static Listener *get_listener(Relay *self, PyObject *arg) {
    Py_ssize_t h = PyLong_AsSsize_t(arg);
    if (h == -1 && PyErr_Occurred()) return NULL;
    if (h < 0 || h >= self->nlsts || self->lsts[h] == NULL) {
        PyErr_SetString(PyExc_KeyError, "no such listener");
        return NULL;
    }
    return self->lsts[h];
}

PyDoc_STRVAR(listen_doc, "listen(listen_fd, token, ntargets, candidates, connect_timeout) -> handle\n\n"
             "Accept on a listening socket (still the caller's) and relay each connection to the\n"
             "first candidate (ip, port, target_index) that accepts, within connect_timeout s each.");

static PyObject *Relay_listen(Relay *self, PyObject *args) {
    int lfd, ntargets;
    PyObject *token, *seq;
    double timeout;
    if (!PyArg_ParseTuple(args, "iOiOd", &lfd, &token, &ntargets, &seq, &timeout)) return NULL;
    if (check(self) < 0) return NULL;
    if (lfd < 0 || ntargets < 1 || ntargets > 4096 || !(timeout > 0)) {
        PyErr_SetString(PyExc_ValueError, "bad listen fd, target count or timeout");
        return NULL;
    }
    Cands *cs = parse_cands(seq, ntargets);
    if (cs == NULL) return NULL;
    Listener *l = calloc(1, sizeof(Listener));
    long long *ok = calloc((size_t)ntargets, sizeof(long long)), *fail = calloc((size_t)ntargets, sizeof(long long));
    int *last_err = calloc((size_t)ntargets, sizeof(int));
    Py_ssize_t h = 0;
    while (h < self->nlsts && self->lsts[h] != NULL) h++;
    if (h == self->nlsts) {
        Listener **n = realloc(self->lsts, (size_t)(self->nlsts + 1) * sizeof(Listener *));
        if (n != NULL) {
            self->lsts = n;
            self->lsts[self->nlsts++] = NULL;
        }
    }
    if (l == NULL || ok == NULL || fail == NULL || last_err == NULL || h == self->nlsts) {
        free(l);
        free(ok);
        free(fail);
        free(last_err);
        cands_unref(cs);
        return PyErr_NoMemory();
    }
    l->lfd = lfd;
    l->handle = h;
    l->cands = cs;
    l->ntargets = ntargets;
    l->ok = ok;
    l->fail = fail;
    l->last_err = last_err;
    l->timeout_ms = (long long)(timeout * 1000);
    l->end.kind = END_LISTENER;
    l->end.lst = l;
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = &l->end};
    if (epoll_ctl(self->ep, EPOLL_CTL_ADD, lfd, &ev) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        free(l);
        free(ok);
        free(fail);
        free(last_err);
        cands_unref(cs);
        return NULL;
    }
    Py_INCREF(token);
    l->token = token;
    l->listening = 1;
    l->refs = 1;
    self->lsts[h] = l;
    return PyLong_FromSsize_t(h);
}

static PyObject *Relay_set_candidates(Relay *self, PyObject *args) {
    PyObject *hobj, *seq;
    if (!PyArg_ParseTuple(args, "OO", &hobj, &seq)) return NULL;
    Listener *l = get_listener(self, hobj);
    if (l == NULL) return NULL;
    Cands *cs = parse_cands(seq, l->ntargets);
    if (cs == NULL) return NULL;
    cands_unref(l->cands); /* connections in progress keep theirs */
    l->cands = cs;
    Py_RETURN_NONE;
}

static PyObject *Relay_unlisten(Relay *self, PyObject *arg) {
    Listener *l = get_listener(self, arg);
    if (l == NULL) return NULL;
    if (l->listening) {
        epoll_ctl(self->ep, EPOLL_CTL_DEL, l->lfd, NULL);
        l->listening = 0;
        l->paused = 0;
    }
    Py_RETURN_NONE;
}

PyDoc_STRVAR(close_listener_doc, "close_listener(handle) -> listener report\n\n"
             "Close every connection the listener accepted; returns its counts not yet reported.");

static PyObject *Relay_close_listener(Relay *self, PyObject *arg) {
    Listener *l = get_listener(self, arg);
    if (l == NULL) return NULL;
    for (Py_ssize_t i = 0; i < self->nslots; i++) {
        Conn *c = self->slots[i];
        if (c != NULL && c->lst == l) conn_close(self, c, 0);
    }
    return listener_report(l);
}

PyDoc_STRVAR(forget_listener_doc, "forget_listener(handle) -> listener report or None\n\n"
             "Drop the listener if its last connection closed (live == 0) and return its last\n"
             "counts; None while it still has connections (the relay thread may have accepted\n"
             "one Python has not heard of yet: its report, then the close's, follow).");

static PyObject *Relay_forget_listener(Relay *self, PyObject *arg) {
    Listener *l = get_listener(self, arg);
    if (l == NULL) return NULL;
    if (l->live) Py_RETURN_NONE;
    PyObject *t = listener_report(l);
    if (t != NULL) drop_listener(self, l->handle);
    return t;
}

static PyObject *Relay_fileno(Relay *self, PyObject *noargs) {
    if (check(self) < 0) return NULL;
    return PyLong_FromLong(self->running ? self->efd : self->ep);
}

static PyObject *Relay_close_all(Relay *self, PyObject *noargs) {
    close_all(self);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(stop_doc, "stop()\n\n"
             "Join the relay thread (shard stop: call close_all() first).  Without the thread\n"
             "nothing is relayed any more; fileno() is the epoll set again.");

/* Join the thread and become an unthreaded relay (the GIL held). */
static void halt(Relay *self) {
    if (!self->running) return;
    stop_thread(self);
    /* What the thread left for Python is dropped with the connections it names. */
    take_conn_reports(self, NULL);
    for (Conn *c = self->dead; c != NULL; c = c->next_dead) c->told = 2;
    free_dead(self); /* still threaded: releases the handles of conns it closed */
    reap(self, 1);
    self->threaded = 0;
}

static PyObject *Relay_stop(Relay *self, PyObject *noargs) {
    halt(self);
    Py_RETURN_NONE;
}

/* Every method Python calls takes the relay's mutex (py_lock) on a threaded relay. */
#define LOCKED(fn)                                                   \
    static PyObject *fn##_locked(Relay *self, PyObject *arg) {      \
        py_lock(self);                                               \
        PyObject *res = fn(self, arg);                               \
        py_unlock(self);                                             \
        return res;                                                  \
    }
LOCKED(Relay_add)
LOCKED(Relay_close)
LOCKED(Relay_poll)
LOCKED(Relay_listen)
LOCKED(Relay_set_candidates)
LOCKED(Relay_unlisten)
LOCKED(Relay_close_listener)
LOCKED(Relay_forget_listener)
LOCKED(Relay_close_all)
LOCKED(Relay_udp_listen)
LOCKED(Relay_udp_on_listener)
LOCKED(Relay_udp_on_flow)
LOCKED(Relay_udp_set_candidates)
LOCKED(Relay_udp_set_idle)
LOCKED(Relay_udp_close)
LOCKED(Relay_udp_close_flows)
LOCKED(Relay_udp_flows)

static PyObject *Relay_len(Relay *self, void *closure) { return PyLong_FromSsize_t(self->live); }
static PyObject *Relay_pipe_failures(Relay *self, void *closure) { return PyLong_FromLong(self->pipe_failures); }
static PyObject *Relay_pooled_pipes(Relay *self, void *closure) { return PyLong_FromLong(self->pool_n); }
static PyObject *Relay_running(Relay *self, void *closure) { return PyBool_FromLong(self->running); }
static PyObject *Relay_threaded(Relay *self, void *closure) { return PyBool_FromLong(self->threaded); }

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add_locked, METH_VARARGS, add_doc},
    {"close", (PyCFunction)Relay_close_locked, METH_O, close_doc},
    {"poll", (PyCFunction)Relay_poll_locked, METH_NOARGS, poll_doc},
    {"listen", (PyCFunction)Relay_listen_locked, METH_VARARGS, listen_doc},
    {"set_candidates", (PyCFunction)Relay_set_candidates_locked, METH_VARARGS, "set_candidates(handle, candidates)"},
    {"unlisten", (PyCFunction)Relay_unlisten_locked, METH_O, "unlisten(handle): stop accepting; connections carry on."},
    {"close_listener", (PyCFunction)Relay_close_listener_locked, METH_O, close_listener_doc},
    {"forget_listener", (PyCFunction)Relay_forget_listener_locked, METH_O, forget_listener_doc},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The relay's epoll fd, for the loop's add_reader."},
    {"udp_listen", (PyCFunction)Relay_udp_listen_locked, METH_VARARGS,
     "udp_listen(listen_fd, token, ntargets, candidates, idle_secs, loop) -> handle\n\n"
     "Forward the datagrams of a UDP socket (still the caller's): one connected upstream\n"
     "socket per client flow to the first candidate (ip, port, target_index) that takes it;\n"
     "token.admit_flow() is asked before a flow opens; flows idle for idle_secs close.\n"
     "The sockets are readers on `loop` (add_reader), the callbacks udp_on_*."},
    {"udp_on_listener", (PyCFunction)Relay_udp_on_listener_locked, METH_O, "loop callback: a UDP port is readable"},
    {"udp_on_flow", (PyCFunction)Relay_udp_on_flow_locked, METH_O, "loop callback: a flow's upstream socket is readable"},
    {"udp_set_candidates", (PyCFunction)Relay_udp_set_candidates_locked, METH_VARARGS,
     "udp_set_candidates(handle, candidates): new flows use these; open ones keep theirs."},
    {"udp_set_idle", (PyCFunction)Relay_udp_set_idle_locked, METH_VARARGS, "udp_set_idle(handle, idle_secs)"},
    {"udp_close", (PyCFunction)Relay_udp_close_locked, METH_O,
     "udp_close(handle) -> report: close every flow, stop reading the socket (not closed)."},
    {"udp_close_flows", (PyCFunction)Relay_udp_close_flows_locked, METH_O,
     "udp_close_flows(handle) -> report: close every flow; the port keeps serving."},
    {"udp_flows", (PyCFunction)Relay_udp_flows_locked, METH_O, "udp_flows(handle) -> [(host, port)], oldest first."},
    {"stop", (PyCFunction)Relay_stop, METH_NOARGS, stop_doc},
    {"close_all", (PyCFunction)Relay_close_all_locked, METH_NOARGS, "Close every connection (no reports)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"live", (getter)Relay_len, NULL, "open connections", NULL},
    {"pipe_failures", (getter)Relay_pipe_failures, NULL, "pipe2() refusals (EMFILE/ENFILE)", NULL},
    {"pooled_pipes", (getter)Relay_pooled_pipes, NULL, "drained pipes kept for reuse", NULL},
    {"running", (getter)Relay_running, NULL, "the relay thread runs (threaded=1, not stopped)", NULL},
    {"threaded", (getter)Relay_threaded, NULL, "made with threaded=1", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "portunus.shard._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relays plain TCP connections and UDP flows in native code (see the module source).",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT, "_relay", "Native relay for plain TCP connections and UDP flows.", -1, NULL,
};

PyMODINIT_FUNC PyInit__relay(void) {
    if (PyType_Ready(&RelayType) < 0) return NULL;
    PyObject *m = PyModule_Create(&relaymodule);
    if (m == NULL) return NULL;
    Py_INCREF(&RelayType);
    if (PyModule_AddObject(m, "Relay", (PyObject *)&RelayType) < 0) {
        Py_DECREF(&RelayType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
