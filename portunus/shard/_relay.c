/* Native relay for plain TCP connections (issue 17, first step).
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
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#define FLUSH_EVERY (64 * 1024)
#define MAX_EVENTS 256
#define BURST 64            /* chunks a direction moves per poll before yielding */
#define PIPE_SIZE (1024 * 1024)
#define CHUNK PIPE_SIZE
#define POOL_LIMIT 256
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)

typedef struct Conn Conn;

typedef struct {
    Conn *conn;
    int side; /* 0: client fd, 1: upstream fd */
} End;

typedef struct {
    char *held;          /* copy phase: bytes the destination has not taken */
    size_t held_off, held_len;
    int pr, pw;          /* splice phase: pipe, -1 until needed */
    size_t pending;      /* bytes in the pipe */
    long long copy_left; /* bytes still to copy before splicing */
    long long unflushed; /* bytes not yet reported */
    unsigned ready : 1, writing : 1, eof : 1, done : 1, hup : 1, again : 1;
} Dir;

struct Conn {
    int fd[2];
    End end[2];
    Dir dir[2]; /* dir[i] reads fd[i] and writes fd[1 - i]; 0 = bytes in, 1 = bytes out */
    PyObject *token;
    Py_ssize_t handle;
    int closed;
    Conn *next_dead;
};

typedef struct {
    PyObject_HEAD
    int ep;
    char *buf;
    size_t bufsize;
    long long splice_after;
    int *pool; /* r, w pairs */
    int pool_n;
    long pipe_failures;
    Conn **slots;
    Py_ssize_t nslots, cap, live;
    Py_ssize_t *free_ids;
    Py_ssize_t nfree;
    Conn **again;
    Py_ssize_t nagain, again_cap;
    Conn *dead;
    int in_poll;
    PyObject *reports; /* the list poll() is filling; NULL outside poll() */
    int report_failed;
} Relay;

/* ----------------------------------------------------------------- reports */

static void report(Relay *r, Conn *c, int closed, int err) {
    long long din = c->dir[0].unflushed, dout = c->dir[1].unflushed;
    c->dir[0].unflushed = c->dir[1].unflushed = 0;
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

static void conn_close(Relay *r, Conn *c, int err) {
    if (c->closed) return;
    c->closed = 1;
    close(c->fd[0]);
    close(c->fd[1]); /* closing removes both from the epoll set */
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
    r->slots[c->handle] = NULL;
    r->free_ids[r->nfree++] = c->handle;
    r->live--;
    if (r->in_poll) {
        /* An event for it may still be in this batch: free after the batch. */
        c->next_dead = r->dead;
        r->dead = c;
    } else {
        Py_CLEAR(c->token);
        free(c);
    }
}

static void free_dead(Relay *r) {
    while (r->dead) {
        Conn *c = r->dead;
        r->dead = c->next_dead;
        Py_CLEAR(c->token);
        free(c);
    }
}

static void account(Relay *r, Conn *c, int d, ssize_t n) {
    c->dir[d].unflushed += n;
    if (c->dir[d].unflushed >= FLUSH_EVERY) report(r, c, 0, 0);
}

static void dir_finish(Relay *r, Conn *c, int d) {
    c->dir[d].done = 1;
    shutdown(c->fd[1 - d], SHUT_WR);
    if (c->dir[1 - d].done)
        conn_close(r, c, 0);
    else if (c->dir[d].unflushed)
        report(r, c, 0, 0);
}

/* Deliver what a direction holds.  0: drained, 1: destination full, -1: failed (closed). */
static int flush(Relay *r, Conn *c, int d) {
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

static void schedule_again(Relay *r, Conn *c, int d) {
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
static void pump(Relay *r, Conn *c, int d) {
    Dir *x = &c->dir[d];
    int src = c->fd[d], dst = c->fd[1 - d];
    int budget = BURST;
    while (!c->closed && x->ready && !x->writing && !x->done) {
        if (budget-- == 0) {
            schedule_again(r, c, d);
            return;
        }
        if (x->copy_left > 0) {
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
            /* A short TCP read took everything queued; later bytes raise a new edge. */
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

static void on_writable(Relay *r, Conn *c, int d) {
    if (flush(r, c, d) != 0) return;
    if (c->dir[d].eof) {
        dir_finish(r, c, d);
        return;
    }
    c->dir[d].ready = 1; /* its edge may have come while we were not reading */
    pump(r, c, d);
}

/* ------------------------------------------------------------- Python type */

static int Relay_init(Relay *self, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"splice_after", "bufsize", NULL};
    long long splice_after = 16 * 1024;
    Py_ssize_t bufsize = 64 * 1024;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|Ln", kw, &splice_after, &bufsize)) return -1;
    if (bufsize < 1024 || splice_after < 0) {
        PyErr_SetString(PyExc_ValueError, "bufsize >= 1024 and splice_after >= 0");
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
    return 0;
}

static PyObject *Relay_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    Relay *self = (Relay *)type->tp_alloc(type, 0);
    if (self != NULL) self->ep = -1;
    return (PyObject *)self;
}

static void close_all(Relay *r) {
    for (Py_ssize_t i = 0; i < r->nslots; i++)
        if (r->slots[i]) conn_close(r, r->slots[i], 0);
}

static void Relay_dealloc(Relay *self) {
    close_all(self);
    free_dead(self);
    for (int i = 0; i < 2 * self->pool_n; i++) close(self->pool[i]);
    if (self->ep >= 0) close(self->ep);
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
    if (self->nfree == 0 && self->nslots == self->cap) {
        Py_ssize_t cap = self->cap ? 2 * self->cap : 256;
        Conn **s = realloc(self->slots, (size_t)cap * sizeof(Conn *));
        if (s == NULL) return PyErr_NoMemory();
        self->slots = s;
        Py_ssize_t *f = realloc(self->free_ids, (size_t)cap * sizeof(Py_ssize_t));
        if (f == NULL) return PyErr_NoMemory();
        self->free_ids = f;
        self->cap = cap;
    }
    Conn *c = calloc(1, sizeof(Conn));
    if (c == NULL) return PyErr_NoMemory();
    c->fd[0] = cfd;
    c->fd[1] = ufd;
    for (int i = 0; i < 2; i++) {
        c->end[i].conn = c;
        c->end[i].side = i;
        c->dir[i].pr = c->dir[i].pw = -1;
        c->dir[i].copy_left = self->splice_after;
    }
    for (int i = 0; i < 2; i++) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP | EPOLLET, .data.ptr = &c->end[i]};
        if (epoll_ctl(self->ep, EPOLL_CTL_ADD, c->fd[i], &ev) < 0) {
            int e = errno;
            if (i == 1) epoll_ctl(self->ep, EPOLL_CTL_DEL, c->fd[0], NULL);
            free(c);
            errno = e;
            return PyErr_SetFromErrno(PyExc_OSError);
        }
    }
    Py_INCREF(token);
    c->token = token;
    c->handle = self->nfree ? self->free_ids[--self->nfree] : self->nslots++;
    self->slots[c->handle] = c;
    self->live++;
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
    long long din = c->dir[0].unflushed, dout = c->dir[1].unflushed;
    c->dir[0].unflushed = c->dir[1].unflushed = 0;
    conn_close(self, c, 0);
    return Py_BuildValue("(LL)", din, dout);
}

PyDoc_STRVAR(poll_doc, "poll() -> (reports, more)\n\n"
             "Handle what is ready; reports are (token, bytes_in, bytes_out, closed, errno).\n"
             "more: some connection yielded after a burst; call poll() again soon.");

static void handle_event(Relay *r, struct epoll_event *ev) {
    End *e = ev->data.ptr;
    Conn *c = e->conn;
    if (c->closed) return;
    int i = e->side;
    uint32_t m = ev->events;
    if (m & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)) {
        Dir *x = &c->dir[i];
        x->ready = 1;
        if (m & (EPOLLRDHUP | EPOLLHUP | EPOLLERR)) x->hup = 1;
        if (!x->writing) pump(r, c, i);
    }
    if (!c->closed && (m & (EPOLLOUT | EPOLLHUP | EPOLLERR)) && c->dir[1 - i].writing)
        on_writable(r, c, 1 - i);
}

static PyObject *Relay_poll(Relay *self, PyObject *noargs) {
    if (check(self) < 0) return NULL;
    PyObject *reports = PyList_New(0);
    if (reports == NULL) return NULL;
    self->reports = reports;
    self->report_failed = 0;
    self->in_poll = 1;
    /* Directions that yielded after a burst last time go first. */
    Py_ssize_t n_again = self->nagain;
    if (n_again) {
        Conn **todo = malloc((size_t)n_again * sizeof(Conn *));
        if (todo != NULL) {
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
    }
    struct epoll_event evs[MAX_EVENTS];
    int n = epoll_wait(self->ep, evs, MAX_EVENTS, 0);
    for (int i = 0; i < n; i++) handle_event(self, &evs[i]);
    self->in_poll = 0;
    free_dead(self);
    self->reports = NULL;
    if (self->report_failed) {
        Py_DECREF(reports);
        if (!PyErr_Occurred()) PyErr_NoMemory();
        return NULL;
    }
    return Py_BuildValue("(NO)", reports, (self->nagain || n == MAX_EVENTS) ? Py_True : Py_False);
}

static PyObject *Relay_fileno(Relay *self, PyObject *noargs) {
    if (check(self) < 0) return NULL;
    return PyLong_FromLong(self->ep);
}

static PyObject *Relay_close_all(Relay *self, PyObject *noargs) {
    close_all(self);
    Py_RETURN_NONE;
}

static PyObject *Relay_len(Relay *self, void *closure) { return PyLong_FromSsize_t(self->live); }
static PyObject *Relay_pipe_failures(Relay *self, void *closure) { return PyLong_FromLong(self->pipe_failures); }
static PyObject *Relay_pooled_pipes(Relay *self, void *closure) { return PyLong_FromLong(self->pool_n); }

static PyMethodDef Relay_methods[] = {
    {"add", (PyCFunction)Relay_add, METH_VARARGS, add_doc},
    {"close", (PyCFunction)Relay_close, METH_O, close_doc},
    {"poll", (PyCFunction)Relay_poll, METH_NOARGS, poll_doc},
    {"fileno", (PyCFunction)Relay_fileno, METH_NOARGS, "The relay's epoll fd, for the loop's add_reader."},
    {"close_all", (PyCFunction)Relay_close_all, METH_NOARGS, "Close every connection (no reports)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Relay_getset[] = {
    {"live", (getter)Relay_len, NULL, "open connections", NULL},
    {"pipe_failures", (getter)Relay_pipe_failures, NULL, "pipe2() refusals (EMFILE/ENFILE)", NULL},
    {"pooled_pipes", (getter)Relay_pooled_pipes, NULL, "drained pipes kept for reuse", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RelayType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "portunus.shard._relay.Relay",
    .tp_basicsize = sizeof(Relay),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Relays plain TCP connections in native code (see the module source).",
    .tp_new = Relay_new,
    .tp_init = (initproc)Relay_init,
    .tp_dealloc = (destructor)Relay_dealloc,
    .tp_methods = Relay_methods,
    .tp_getset = Relay_getset,
};

static struct PyModuleDef relaymodule = {
    PyModuleDef_HEAD_INIT, "_relay", "Native relay for plain TCP connections.", -1, NULL,
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
