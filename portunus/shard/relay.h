/* Shared by the native relay's C files (see _relay.c for the design). */
#ifndef PORTUNUS_RELAY_H
#define PORTUNUS_RELAY_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define FLUSH_EVERY (64 * 1024)
#define MAX_EVENTS 256
#define BURST 64            /* chunks a direction moves per poll before yielding */
#define PIPE_SIZE (1024 * 1024)
#define CHUNK PIPE_SIZE
#define POOL_LIMIT 256
#define SPLICE_FLAGS (SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
#define BULK_READ (16 * 1024) /* a read at least this large says the direction is bulk */
#define ACCEPT_BATCH 64
#define REPORT_MS_MAX 100  /* report_ms bound: counters reach /metrics at most 100 ms late */
#define TICK_MS 50          /* connect timeouts and accept back-off are checked this often */
#define BACKOFF_MS 100      /* a listener out of fds pauses this long */

#define UDP_BATCH 64      /* datagrams per recvmmsg/sendmmsg */
#define UDP_BUF 65536     /* the largest UDP payload fits */
#define UDP_REPORT_MS 100 /* datagram and byte counts reach Python at most this late */

typedef struct Conn Conn;
typedef struct Listener Listener;
typedef struct UPort UPort;
typedef struct UFlow UFlow;

enum { END_CONN, END_LISTENER, END_TIMER, END_WAKE, END_UPORT, END_UFLOW };

typedef struct {
    int kind;
    int side; /* END_CONN: 0 client fd, 1 upstream fd */
    Conn *conn;
    Listener *lst;
    UPort *port; /* END_UPORT (threaded relay) */
    UFlow *flow; /* END_UFLOW (threaded relay) */
} End;

/* Memory an epoll event fetched by the relay thread may still point at: freed
 * once the thread has finished the batch that could name it (see relay_free). */
typedef struct Grave {
    struct Grave *next;
    unsigned long long gen;
    void *p;
} Grave;

typedef struct {
    struct sockaddr_storage addr;
    socklen_t len;
    int family;
    int target; /* index into the Python side's target list */
} Cand;

typedef struct {
    int refs;
    int n;
    Cand c[];
} Cands;

/* A listening socket served natively: accepts, connects through `cands`,
 * relays.  Counters are summed per poll() and reported for the Prometheus registry. */
struct Listener {
    int lfd;
    Py_ssize_t handle;
    PyObject *token;
    int listening; /* in the epoll set (unlisten() takes it out; its connections carry on) */
    int paused;
    long long resume_ms;
    int refs; /* connections + 1 while registered */
    Cands *cands;
    long long timeout_ms;
    long long opened, closed, bytes_in, bytes_out, connect_failures, live;
    int ntargets;
    long long *ok, *fail;
    int *last_err; /* per target: errno of its last failed attempt (ETIMEDOUT: timeout) */
    int accept_errno;
    int dirty;
    long long reported_ms; /* when poll() last reported it (report_ms throttling) */
    long long reported_live; /* live as Python last saw it */
    End end;
};

typedef struct {
    char *held;          /* copy phase: bytes the destination has not taken */
    size_t held_off, held_len;
    int pr, pw;          /* splice phase: pipe, -1 until needed */
    size_t pending;      /* bytes in the pipe */
    long long copy_left; /* bytes still to copy before splicing */
    long long unflushed; /* bytes not yet reported */
    unsigned ready : 1, writing : 1, eof : 1, done : 1, hup : 1, fin : 1, again : 1, spliced : 1;
    /* fin: the source's FIN (EPOLLRDHUP without an error) is queued behind its data */
} Dir;

struct Conn {
    int fd[2];
    End end[2];
    Dir dir[2]; /* dir[i] reads fd[i] and writes fd[1 - i]; 0 = bytes in, 1 = bytes out */
    PyObject *token;   /* add()ed connections: reported one by one */
    Listener *lst;     /* accepted natively: counted on the listener */
    Py_ssize_t handle;
    int closed;
    int connecting;
    Cands *cands;
    int pos, cur_target, target_failed, last_err;
    long long deadline_ms;
    Conn *next_dead;
    /* threaded relay: what the thread owes Python for an add()ed connection */
    long long rep_in, rep_out;
    int rep_closed, rep_err, rep_queued;
    /* threaded relay, add()ed connection closed by the thread: 1 once poll() handed its
     * close to Python, 2 from the next poll() on (Python has acted on it): only then is
     * its handle free for reuse, so a close(handle) racing the report cannot hit another
     * connection.  Closed by Python: 2 at once. */
    int told;
    Conn *next_rep;
};

typedef struct {
    PyObject_HEAD
    int ep;
    char *buf;
    size_t bufsize;
    long long splice_after;
    long long report_ms; /* a busy listener's counts reach Python at most this often (0: every poll) */
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
    Listener **lsts;
    Py_ssize_t nlsts;
    int tfd;
    int timer_armed;
    End tend;
    UPort **ups;        /* UDP ports (relay_udp.c) */
    Py_ssize_t nups;
    char *ubuf;         /* UDP_BATCH datagram buffers of UDP_BUF bytes, made on first use */
    struct mmsghdr *umsg;
    struct iovec *uiov;
    struct sockaddr_storage *uname;
    int uused;          /* headers the last recvmmsg filled (their lengths to restore) */
    UFlow *udead;       /* flows closed during this poll() */
    PyObject *uloop;    /* the shard's loop: UDP sockets are its readers */
    UFlow **uslots;     /* flow id -> flow (the loop readers' keys) */
    Py_ssize_t nuslots, ucap, *ufree, nufree;
    /* The relay thread (threaded=1): it blocks in epoll_wait on `ep`, handles every
     * event under `mu` and never takes the GIL; Python's calls take `mu` too. */
    int threaded;
    int running;         /* the thread was started and not joined */
    pthread_t thread;
    pthread_mutex_t mu;
    int mu_ready;
    pthread_t owner;     /* the Python thread holding mu (reentrant for it) */
    int depth;
    int in_thread;       /* the thread is handling a batch */
    int stop;
    int efd;             /* eventfd: the thread -> Python (fileno()), "poll() me" */
    int wfd;             /* eventfd in `ep`: Python -> the thread, "stop" */
    End wend;
    int signalled;       /* efd written, not yet read by poll() */
    unsigned long long gen; /* batches the thread has started waiting for */
    Grave *graves;
    Conn *repq;          /* add()ed connections with a report for Python, newest first */
    int admits;          /* UDP flows waiting for Python's admission */
} Relay;


#define RELAY_API __attribute__((visibility("hidden")))

static inline long long now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static inline void cands_unref(Cands *cs) {
    if (cs != NULL && --cs->refs == 0) free(cs);
}

RELAY_API void relay_free(Relay *r, void *p);

/* Only with the GIL held: the token. */
static inline void listener_unref(Relay *r, Listener *l) {
    if (--l->refs) return;
    cands_unref(l->cands);
    Py_XDECREF(l->token);
    free(l->ok);
    free(l->fail);
    free(l->last_err);
    relay_free(r, l); /* its End may be in a batch the relay thread fetched */
}

static inline void arm_timer(Relay *r) {
    if (r->timer_armed) return;
    struct itimerspec it = {{0, TICK_MS * 1000000L}, {0, TICK_MS * 1000000L}};
    if (timerfd_settime(r->tfd, 0, &it, NULL) == 0) r->timer_armed = 1;
}

RELAY_API void report(Relay *r, Conn *c, int closed, int err);
RELAY_API void conn_close(Relay *r, Conn *c, int err);
RELAY_API void free_dead(Relay *r);
RELAY_API void account(Relay *r, Conn *c, int d, ssize_t n);
RELAY_API void dir_finish(Relay *r, Conn *c, int d);
RELAY_API int flush(Relay *r, Conn *c, int d);
RELAY_API void schedule_again(Relay *r, Conn *c, int d);
RELAY_API void pump(Relay *r, Conn *c, int d);
RELAY_API void on_writable(Relay *r, Conn *c, int d);
RELAY_API int grow_slots(Relay *r);
RELAY_API Conn *conn_new(Relay *r, int cfd);
RELAY_API int watch(Relay *r, Conn *c, int side);
RELAY_API void count_target(Listener *l, int target, int ok, int err);
RELAY_API void connected(Relay *r, Conn *c);
RELAY_API void try_next(Relay *r, Conn *c);
RELAY_API void connect_failed_now(Relay *r, Conn *c, int err);
RELAY_API void on_upstream_connect(Relay *r, Conn *c);
RELAY_API void pause_listener(Relay *r, Listener *l);
RELAY_API void on_accept(Relay *r, Listener *l);
RELAY_API void on_tick(Relay *r);
/* relay_udp.c */
RELAY_API PyObject *Relay_udp_on_listener(Relay *self, PyObject *arg);
RELAY_API PyObject *Relay_udp_on_flow(Relay *self, PyObject *arg);
RELAY_API int udp_tick(Relay *r, long long now);
RELAY_API int udp_reports(Relay *r, PyObject *out, long long now);
RELAY_API void udp_free_all(Relay *r);
RELAY_API void udp_free_dead(Relay *r);
RELAY_API PyObject *Relay_udp_listen(Relay *self, PyObject *args);
RELAY_API PyObject *Relay_udp_set_candidates(Relay *self, PyObject *args);
RELAY_API PyObject *Relay_udp_set_idle(Relay *self, PyObject *args);
RELAY_API PyObject *Relay_udp_close(Relay *self, PyObject *arg);
RELAY_API PyObject *Relay_udp_close_flows(Relay *self, PyObject *arg);
RELAY_API PyObject *Relay_udp_flows(Relay *self, PyObject *arg);
RELAY_API Cands *parse_cands(PyObject *seq, int ntargets);
RELAY_API void udp_on_port_event(Relay *r, UPort *p);
RELAY_API void udp_on_flow_event(Relay *r, UFlow *f);
RELAY_API int udp_due(Relay *r, long long now);
RELAY_API int udp_admit_pending(Relay *r);
/* _relay.c: the thread */
RELAY_API void wake_python(Relay *r);

#endif
