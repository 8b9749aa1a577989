/* An NBD client in C, without the GIL: the target side of a mirror whose
 * target is an NBD export (nbd://host/name, nbd+unix:///name?socket=PATH).
 *
 * The protocol is the NetworkBlockDevice project's doc/proto.md: fixed
 * newstyle handshake, NBD_OPT_STRUCTURED_REPLY, NBD_OPT_GO with
 * NBD_INFO_BLOCK_SIZE asked for and honoured (requests split to the
 * maximum payload, aligned to the minimum block; an unaligned end is
 * read, patched and written whole).
 *
 * Many requests in flight on one connection, from any number of threads:
 * a caller registers its request in the connection's table under `mu`,
 * sends header and payload under `send_mu`, and sleeps on its own
 * condition until the connection's one reader thread has seen the reply
 * carrying its cookie.  Several connections when the server advertises
 * multi-conn: each call takes the next connection round robin.
 *
 * A connection that fails (the server hung up, a send or receive failed,
 * a reply made no sense) is dead: every request on it fails with its errno
 * and later ones fail at once, until fm_nbd_reconnect().  `lost` records
 * that it happened: acknowledged writes that were not flushed may be gone
 * with the server, so the caller must write them again.
 *
 * Every function returns 0 (or a count) or -errno; none takes the GIL.
 * The functions are static: each module that includes this header has its
 * own copy of the code, and they share the struct through a pointer.
 */
#ifndef FM_NBDCLIENT_H
#define FM_NBDCLIENT_H

#include <endian.h>
#include <errno.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define FM_NBD_MAX_CONNS 16
#define FM_NBD_SLOTS 256          /* requests in flight per connection */
#define FM_NBD_BATCH 32           /* pieces of one call in flight at once */
#define FM_NBD_MAX_NAME 4096
#define FM_NBD_WIRE_MAX (32u << 20)   /* payloads never above this (proto.md) */
#define FM_NBD_ZERO_MAX (1u << 30)    /* effect length of one WRITE_ZEROES */

/* Wire numbers (proto.md).  The export (_server.pyx) has the same names. */
#define FM_NBDMAGIC 0x4e42444d41474943ULL
#define FM_IHAVEOPT 0x49484156454F5054ULL
#define FM_REPLY_MAGIC 0x3e889045565a9ULL
#define FM_REQUEST_MAGIC 0x25609513U
#define FM_SIMPLE_MAGIC 0x67446698U
#define FM_STRUCTURED_MAGIC 0x668e33efU
#define FM_FLAG_FIXED_NEWSTYLE 1
#define FM_FLAG_NO_ZEROES 2
#define FM_OPT_ABORT 2
#define FM_OPT_GO 7
#define FM_OPT_STRUCTURED_REPLY 8
#define FM_REP_ACK 1
#define FM_REP_INFO 3
#define FM_REP_ERR_UNSUP 0x80000001U
#define FM_REP_ERR_POLICY 0x80000002U
#define FM_REP_ERR_UNKNOWN 0x80000006U
#define FM_REP_ERR_SHUTDOWN 0x80000007U
#define FM_REP_ERR_BLOCK_SIZE_REQD 0x80000008U
#define FM_INFO_EXPORT 0
#define FM_INFO_BLOCK_SIZE 3

#define FM_TF_HAS_FLAGS (1 << 0)
#define FM_TF_READ_ONLY (1 << 1)
#define FM_TF_SEND_FLUSH (1 << 2)
#define FM_TF_SEND_FUA (1 << 3)
#define FM_TF_SEND_TRIM (1 << 5)
#define FM_TF_SEND_WRITE_ZEROES (1 << 6)
#define FM_TF_CAN_MULTI_CONN (1 << 8)
#define FM_TF_SEND_FAST_ZERO (1 << 11)

#define FM_CMD_READ 0
#define FM_CMD_WRITE 1
#define FM_CMD_DISC 2
#define FM_CMD_FLUSH 3
#define FM_CMD_TRIM 4
#define FM_CMD_WRITE_ZEROES 6
#define FM_CMDF_NO_HOLE (1 << 1)
#define FM_CMDF_FAST_ZERO (1 << 4)

#define FM_RF_DONE 1
#define FM_CHUNK_NONE 0
#define FM_CHUNK_OFFSET_DATA 1
#define FM_CHUNK_OFFSET_HOLE 2

/* A request's header on the wire (big-endian). */
struct fm_nbd_request {
    uint32_t magic;
    uint16_t flags;
    uint16_t type;
    uint64_t cookie;
    uint64_t off;
    uint32_t len;
} __attribute__((packed));

struct fm_nbd_req {
    uint64_t cookie;
    char *buf;              /* READ: where the data goes; NULL otherwise */
    uint64_t off;
    uint32_t len;
    int err;                /* 0 or -errno; the first error of the reply */
    int done;
    pthread_cond_t cv;      /* its owner sleeps here until done */
};

struct fm_nbd;

struct fm_nbd_conn {
    struct fm_nbd *owner;
    int sock;                              /* -1: never connected */
    pthread_mutex_t mu;                    /* table, nused, dead, reading */
    pthread_mutex_t send_mu;               /* one request on the wire at a time */
    pthread_cond_t room_cv;                /* a caller waits for a free slot */
    struct fm_nbd_req *table[FM_NBD_SLOTS];
    int nused;
    uint64_t gen;
    int dead;                              /* positive errno once it failed */
    struct fm_nbd_req *reading;            /* the reader is filling it: kill leaves it */
    pthread_t reader;
    int reader_running;
    uint64_t requests;                     /* sent, for the status */
};

struct fm_nbd {
    /* Where: a unix socket path, or host and port. */
    int is_unix;
    char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
    char host[256];
    char port[16];
    char name[FM_NBD_MAX_NAME + 1];
    int timeout_ms;                        /* connect and handshake */
    /* What the server said on the first connection. */
    uint64_t size;
    uint16_t flags;
    int structured;
    uint32_t min_block, pref_block, max_payload;
    int nconns;
    unsigned next;                         /* round robin over the connections */
    int lost;                              /* a connection failed since fm_nbd_take_lost */
    pthread_mutex_t rmw_mu;                /* one read-modify-write at a time */
    struct fm_nbd_conn conns[FM_NBD_MAX_CONNS];
};

static inline void fm_nbd_msg(char *err, size_t errlen, const char *fmt, ...)
{
    va_list ap;
    if (err == NULL || errlen == 0)
        return;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* The protocol's error numbers are Linux's own for the names it has; the
 * mapping is spelled out so that the meaning does not depend on the host. */
static inline int fm_nbd_errno(uint32_t e)
{
    switch (e) {
    case 1: return EPERM;
    case 5: return EIO;
    case 12: return ENOMEM;
    case 22: return EINVAL;
    case 28: return ENOSPC;
    case 75: return EOVERFLOW;
    case 95: return EOPNOTSUPP;
    case 108: return ESHUTDOWN;
    default: return EIO;            /* an error all the same */
    }
}

static inline int fm_nbd_send_all(int sock, struct iovec *iov, int n)
{
    struct msghdr m;
    ssize_t r;
    while (n > 0) {
        memset(&m, 0, sizeof(m));
        m.msg_iov = iov;
        m.msg_iovlen = (size_t)n;
        r = sendmsg(sock, &m, MSG_NOSIGNAL);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? -ETIMEDOUT : -errno;
        }
        while (n > 0 && (size_t)r >= iov->iov_len) {
            r -= (ssize_t)iov->iov_len;
            iov++;
            n--;
        }
        if (n > 0) {
            iov->iov_base = (char *)iov->iov_base + r;
            iov->iov_len -= (size_t)r;
        }
    }
    return 0;
}

static inline int fm_nbd_send(int sock, const void *p, size_t len)
{
    struct iovec v = { (void *)p, len };
    return fm_nbd_send_all(sock, &v, 1);
}

/* 0, or -errno; the server closing the stream is -ESHUTDOWN. */
static inline int fm_nbd_recv(int sock, void *p, size_t len)
{
    ssize_t r;
    char *b = (char *)p;
    while (len > 0) {
        r = recv(sock, b, len, MSG_WAITALL);
        if (r == 0)
            return -ESHUTDOWN;
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return errno == EAGAIN ? -ETIMEDOUT : -errno;
        }
        b += r;
        len -= (size_t)r;
    }
    return 0;
}

static inline int fm_nbd_skip(int sock, uint64_t len)
{
    char scratch[4096];
    int r;
    while (len > 0) {
        size_t n = len > sizeof(scratch) ? sizeof(scratch) : (size_t)len;
        r = fm_nbd_recv(sock, scratch, n);
        if (r < 0)
            return r;
        len -= n;
    }
    return 0;
}

static inline void fm_nbd_timeouts(int sock, int ms)
{
    struct timeval tv;
    tv.tv_sec = ms / 1000;
    tv.tv_usec = (ms % 1000) * 1000;
    setsockopt(sock, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
    setsockopt(sock, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
}

/* A host that vanishes without a reset (power cut, a cable) must fail
 * the requests in flight, under the job's error policy, instead of leaving
 * them waiting for as long as TCP retransmits (a quarter of an hour):
 * unacknowledged data fails after FM_NBD_TCP_USER_TIMEOUT ms, an idle
 * connection is probed from 30 s on. */
#define FM_NBD_TCP_USER_TIMEOUT 60000
static inline void fm_nbd_keepalive(int s)
{
    int one = 1, idle = 30, intvl = 10, cnt = 3;
    unsigned int user = FM_NBD_TCP_USER_TIMEOUT;
    setsockopt(s, SOL_SOCKET, SO_KEEPALIVE, &one, sizeof(one));
    setsockopt(s, IPPROTO_TCP, TCP_KEEPIDLE, &idle, sizeof(idle));
    setsockopt(s, IPPROTO_TCP, TCP_KEEPINTVL, &intvl, sizeof(intvl));
    setsockopt(s, IPPROTO_TCP, TCP_KEEPCNT, &cnt, sizeof(cnt));
    setsockopt(s, IPPROTO_TCP, TCP_USER_TIMEOUT, &user, sizeof(user));
}

/* A connected socket, or -errno with a message. */
static inline int fm_nbd_dial(struct fm_nbd *n, char *err, size_t errlen)
{
    int s, r, one = 1, e = ECONNREFUSED;
    if (n->is_unix) {
        struct sockaddr_un sa;
        s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (s < 0)
            return -errno;
        memset(&sa, 0, sizeof(sa));
        sa.sun_family = AF_UNIX;
        memcpy(sa.sun_path, n->path, sizeof(sa.sun_path));
        fm_nbd_timeouts(s, n->timeout_ms);
        if (connect(s, (struct sockaddr *)&sa, sizeof(sa)) < 0) {
            e = errno;
            close(s);
            fm_nbd_msg(err, errlen, "cannot connect to %s: %s", n->path, strerror(e));
            return -e;
        }
        return s;
    } else {
        struct addrinfo hints, *res, *ai;
        memset(&hints, 0, sizeof(hints));
        hints.ai_socktype = SOCK_STREAM;
        hints.ai_family = AF_UNSPEC;
        r = getaddrinfo(n->host, n->port, &hints, &res);
        if (r != 0) {
            fm_nbd_msg(err, errlen, "cannot resolve %s: %s", n->host, gai_strerror(r));
            return r == EAI_SYSTEM ? -errno : -EHOSTUNREACH;
        }
        for (ai = res; ai != NULL; ai = ai->ai_next) {
            s = socket(ai->ai_family, ai->ai_socktype | SOCK_CLOEXEC, ai->ai_protocol);
            if (s < 0) {
                e = errno;
                continue;
            }
            fm_nbd_timeouts(s, n->timeout_ms);    /* connect() obeys SO_SNDTIMEO */
            if (connect(s, ai->ai_addr, ai->ai_addrlen) == 0) {
                /* Small requests (flush, zeroes) and the header of a write
                 * must not wait for Nagle's timer. */
                setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
                fm_nbd_keepalive(s);
                freeaddrinfo(res);
                return s;
            }
            e = errno == EINPROGRESS || errno == EAGAIN ? ETIMEDOUT : errno;
            close(s);
        }
        freeaddrinfo(res);
        fm_nbd_msg(err, errlen, "cannot connect to %s port %s: %s", n->host, n->port,
                   strerror(e));
        return -e;
    }
}

/* Send one option with its data; read replies with fm_nbd_opt_reply. */
static inline int fm_nbd_opt(int s, uint32_t opt, const void *data, uint32_t len)
{
    struct { uint64_t magic; uint32_t opt; uint32_t len; } __attribute__((packed)) h;
    struct iovec v[2];
    h.magic = htobe64(FM_IHAVEOPT);
    h.opt = htobe32(opt);
    h.len = htobe32(len);
    v[0].iov_base = &h;
    v[0].iov_len = sizeof(h);
    v[1].iov_base = (void *)data;
    v[1].iov_len = len;
    return fm_nbd_send_all(s, v, len ? 2 : 1);
}

/* One option reply: its type, and up to cap bytes of its data in buf
 * (*len: the data's whole length; the rest is skipped). */
static inline int fm_nbd_opt_reply(int s, uint32_t opt, uint32_t *type, void *buf, uint32_t cap,
                            uint32_t *len)
{
    struct { uint64_t magic; uint32_t opt; uint32_t type; uint32_t len; }
        __attribute__((packed)) h;
    int r = fm_nbd_recv(s, &h, sizeof(h));
    uint32_t n;
    if (r < 0)
        return r;
    if (be64toh(h.magic) != FM_REPLY_MAGIC || be32toh(h.opt) != opt)
        return -EPROTO;
    *type = be32toh(h.type);
    *len = be32toh(h.len);
    if (*len > (64u << 20))
        return -EPROTO;
    n = *len < cap ? *len : cap;
    r = fm_nbd_recv(s, buf, n);
    if (r == 0 && *len > n)
        r = fm_nbd_skip(s, *len - n);
    return r;
}

/* The fixed newstyle handshake on a connected socket, up to transmission:
 * fills size, flags, block sizes and structured (of `n` when first is set,
 * else checks that they match).  0 or -errno with a message. */
static inline int fm_nbd_handshake(struct fm_nbd *n, int s, int first, char *err, size_t errlen)
{
    struct { uint64_t magic; uint64_t opt; uint16_t flags; } __attribute__((packed)) g;
    uint32_t cflags, type, len, namelen = (uint32_t)strlen(n->name);
    char buf[1024];
    char *go;
    uint64_t size = 0;
    uint16_t flags = 0, infotype;
    uint32_t bmin = 1, bpref = 4096, bmax = FM_NBD_WIRE_MAX;
    int r, structured = 0, have_export = 0;

    r = fm_nbd_recv(s, &g, sizeof(g));
    if (r < 0)
        goto io;
    if (be64toh(g.magic) != FM_NBDMAGIC) {
        fm_nbd_msg(err, errlen, "not an NBD server (no NBDMAGIC greeting)");
        return -EPROTO;
    }
    if (be64toh(g.opt) != FM_IHAVEOPT || !(be16toh(g.flags) & FM_FLAG_FIXED_NEWSTYLE)) {
        fm_nbd_msg(err, errlen, "the NBD server does not speak the fixed newstyle handshake");
        return -EPROTO;
    }
    cflags = FM_FLAG_FIXED_NEWSTYLE | (be16toh(g.flags) & FM_FLAG_NO_ZEROES);
    cflags = htobe32(cflags);
    if ((r = fm_nbd_send(s, &cflags, 4)) < 0)
        goto io;

    /* Structured replies: READ replies may then describe holes without
     * sending their zeros, and errors carry their offset. */
    if ((r = fm_nbd_opt(s, FM_OPT_STRUCTURED_REPLY, NULL, 0)) < 0)
        goto io;
    if ((r = fm_nbd_opt_reply(s, FM_OPT_STRUCTURED_REPLY, &type, buf, sizeof(buf), &len)) < 0)
        goto io;
    structured = type == FM_REP_ACK;

    /* NBD_OPT_GO: name, and one information request, NBD_INFO_BLOCK_SIZE:
     * we promise to honour the sizes the server gives. */
    go = (char *)malloc(namelen + 8);
    if (go == NULL)
        return -ENOMEM;
    {
        uint32_t nl = htobe32(namelen);
        uint16_t ninfo = htobe16(1), info = htobe16(FM_INFO_BLOCK_SIZE);
        memcpy(go, &nl, 4);
        memcpy(go + 4, n->name, namelen);
        memcpy(go + 4 + namelen, &ninfo, 2);
        memcpy(go + 6 + namelen, &info, 2);
    }
    r = fm_nbd_opt(s, FM_OPT_GO, go, namelen + 8);
    free(go);
    if (r < 0)
        goto io;
    for (;;) {
        if ((r = fm_nbd_opt_reply(s, FM_OPT_GO, &type, buf, sizeof(buf) - 1, &len)) < 0)
            goto io;
        if (type == FM_REP_ACK)
            break;
        if (type & 0x80000000U) {
            const char *why = "refused";
            buf[len < sizeof(buf) - 1 ? len : sizeof(buf) - 1] = 0;
            r = -EINVAL;
            if (type == FM_REP_ERR_UNKNOWN) {
                why = "no such export";
                r = -ENOENT;
            } else if (type == FM_REP_ERR_POLICY) {
                why = "refused by the server's policy";
                r = -EACCES;
            } else if (type == FM_REP_ERR_SHUTDOWN) {
                why = "the server is shutting down";
                r = -ESHUTDOWN;
            } else if (type == FM_REP_ERR_UNSUP) {
                why = "the server does not support NBD_OPT_GO";
                r = -EOPNOTSUPP;
            }
            fm_nbd_msg(err, errlen, "export '%s': %s%s%s", n->name, why, len ? ": " : "",
                       len ? buf : "");
            return r;
        }
        if (type != FM_REP_INFO || len < 2)
            continue;                      /* other replies: not ours to use */
        memcpy(&infotype, buf, 2);
        infotype = be16toh(infotype);
        if (infotype == FM_INFO_EXPORT && len >= 12) {
            memcpy(&size, buf + 2, 8);
            memcpy(&flags, buf + 10, 2);
            size = be64toh(size);
            flags = be16toh(flags);
            have_export = 1;
        } else if (infotype == FM_INFO_BLOCK_SIZE && len >= 14) {
            memcpy(&bmin, buf + 2, 4);
            memcpy(&bpref, buf + 6, 4);
            memcpy(&bmax, buf + 10, 4);
            bmin = be32toh(bmin);
            bpref = be32toh(bpref);
            bmax = be32toh(bmax);
        }
    }
    if (!have_export) {
        fm_nbd_msg(err, errlen, "the NBD server did not say the export's size");
        return -EPROTO;
    }
    if (bmin == 0 || (bmin & (bmin - 1)) || bmin > 65536 || bpref < bmin || bmax < bmin) {
        fm_nbd_msg(err, errlen, "the NBD server gave impossible block sizes (%u, %u, %u)",
                   bmin, bpref, bmax);
        return -EPROTO;
    }
    if (bpref & (bpref - 1))
        bpref = bmin;
    if (first) {
        n->size = size;
        n->flags = flags;
        n->structured = structured;
        n->min_block = bmin;
        n->pref_block = bpref;
        n->max_payload = bmax > FM_NBD_WIRE_MAX ? FM_NBD_WIRE_MAX : bmax;
    } else if (size != n->size || (flags & FM_TF_READ_ONLY) != (n->flags & FM_TF_READ_ONLY)
               || structured != n->structured || bmin != n->min_block) {
        fm_nbd_msg(err, errlen, "export '%s' changed: %llu bytes%s, was %llu%s", n->name,
                   (unsigned long long)size, flags & FM_TF_READ_ONLY ? " read-only" : "",
                   (unsigned long long)n->size,
                   n->flags & FM_TF_READ_ONLY ? " read-only" : "");
        return -ESTALE;
    } else if ((flags ^ n->flags) & (FM_TF_CAN_MULTI_CONN | FM_TF_SEND_FLUSH)) {
        /* fm_nbd_flush relies on both: one FLUSH for every connection, or
         * none at all.  Otherwise a flush could miss acknowledged writes. */
        fm_nbd_msg(err, errlen, "export '%s' changed: it %s multi-conn and %s FLUSH now",
                   n->name, flags & FM_TF_CAN_MULTI_CONN ? "allows" : "does not allow",
                   flags & FM_TF_SEND_FLUSH ? "takes" : "does not take");
        return -ESTALE;
    }
    return 0;
io:
    if (r == -ETIMEDOUT)
        fm_nbd_msg(err, errlen, "the NBD server did not answer the handshake within %d ms",
                   n->timeout_ms);
    else if (r == -EPROTO)
        fm_nbd_msg(err, errlen, "the NBD server's handshake makes no sense");
    else
        fm_nbd_msg(err, errlen, "NBD handshake: %s", strerror(-r));
    return r;
}

/* Under c->mu: the request leaves the table with result r; its owner wakes. */
static inline void fm_nbd_complete(struct fm_nbd_conn *c, struct fm_nbd_req *q, int r)
{
    c->table[q->cookie % FM_NBD_SLOTS] = NULL;
    c->nused--;
    if (q->err == 0)
        q->err = r;
    q->done = 1;
    pthread_cond_signal(&q->cv);
    pthread_cond_signal(&c->room_cv);
}

/* The connection failed: fail every request on it (except the one the
 * reader is filling: the reader ends it) and make its socket useless, so
 * that the reader returns.  Idempotent. */
static inline void fm_nbd_kill(struct fm_nbd_conn *c, int err)
{
    int i;
    pthread_mutex_lock(&c->mu);
    if (!c->dead) {
        c->dead = err > 0 ? err : EIO;
        __atomic_store_n(&c->owner->lost, 1, __ATOMIC_RELAXED);
    }
    for (i = 0; i < FM_NBD_SLOTS; i++)
        if (c->table[i] != NULL && c->table[i] != c->reading)
            fm_nbd_complete(c, c->table[i], -c->dead);
    pthread_cond_broadcast(&c->room_cv);
    if (c->sock >= 0)
        shutdown(c->sock, SHUT_RDWR);
    pthread_mutex_unlock(&c->mu);
}

/* Under c->mu: the request a reply names, or NULL. */
static inline struct fm_nbd_req *fm_nbd_lookup(struct fm_nbd_conn *c, uint64_t cookie)
{
    struct fm_nbd_req *q = c->table[cookie % FM_NBD_SLOTS];
    return q != NULL && q->cookie == cookie ? q : NULL;
}

static inline void *fm_nbd_reader(void *arg)
{
    struct fm_nbd_conn *c = (struct fm_nbd_conn *)arg;
    struct fm_nbd_req *q;
    uint32_t magic;
    int r, s = c->sock;
    for (;;) {
        if ((r = fm_nbd_recv(s, &magic, 4)) < 0)
            break;
        magic = be32toh(magic);
        if (magic == FM_SIMPLE_MAGIC) {
            struct { uint32_t error; uint64_t cookie; } __attribute__((packed)) h;
            uint32_t e;
            if ((r = fm_nbd_recv(s, &h, sizeof(h))) < 0)
                break;
            e = be32toh(h.error);
            pthread_mutex_lock(&c->mu);
            q = fm_nbd_lookup(c, be64toh(h.cookie));
            if (q == NULL || (q->buf != NULL && c->owner->structured && e == 0)) {
                pthread_mutex_unlock(&c->mu);
                r = -EPROTO;
                break;
            }
            if (q->buf != NULL && e == 0) {
                c->reading = q;
                pthread_mutex_unlock(&c->mu);
                r = fm_nbd_recv(s, q->buf, q->len);
                pthread_mutex_lock(&c->mu);
                c->reading = NULL;
                if (r < 0) {
                    fm_nbd_complete(c, q, r);
                    pthread_mutex_unlock(&c->mu);
                    break;
                }
            }
            fm_nbd_complete(c, q, e ? -fm_nbd_errno(e) : 0);
            pthread_mutex_unlock(&c->mu);
        } else if (magic == FM_STRUCTURED_MAGIC && c->owner->structured) {
            struct { uint16_t flags; uint16_t type; uint64_t cookie; uint32_t len; }
                __attribute__((packed)) h;
            uint16_t type, flags;
            uint32_t len;
            int res = 0;
            if ((r = fm_nbd_recv(s, &h, sizeof(h))) < 0)
                break;
            type = be16toh(h.type);
            flags = be16toh(h.flags);
            len = be32toh(h.len);
            pthread_mutex_lock(&c->mu);
            q = fm_nbd_lookup(c, be64toh(h.cookie));
            if (q != NULL)
                c->reading = q;
            pthread_mutex_unlock(&c->mu);
            if (q == NULL) {
                r = -EPROTO;
                break;
            }
            r = 0;
            if (type == FM_CHUNK_NONE) {
                if (len != 0)
                    r = -EPROTO;
            } else if (type == FM_CHUNK_OFFSET_DATA || type == FM_CHUNK_OFFSET_HOLE) {
                uint64_t off;
                uint32_t n = 0;
                if (q->buf == NULL || len < (type == FM_CHUNK_OFFSET_DATA ? 8u : 12u)) {
                    r = -EPROTO;
                } else if ((r = fm_nbd_recv(s, &off, 8)) == 0) {
                    off = be64toh(off);
                    if (type == FM_CHUNK_OFFSET_DATA) {
                        n = len - 8;
                    } else if ((r = fm_nbd_recv(s, &n, 4)) == 0) {
                        n = be32toh(n);
                        if (len != 12)
                            r = -EPROTO;
                    }
                    if (r == 0 && (off < q->off || off - q->off > q->len
                                   || n > q->len - (off - q->off)))
                        r = -EPROTO;       /* outside the request: never written */
                    if (r == 0 && type == FM_CHUNK_OFFSET_DATA)
                        r = fm_nbd_recv(s, q->buf + (off - q->off), n);
                    else if (r == 0)
                        memset(q->buf + (off - q->off), 0, n);
                }
            } else if (type & 0x8000) {
                /* An error chunk: 32-bit error, 16-bit message length,
                 * message (and for ERROR_OFFSET the offset): skipped. */
                uint32_t e;
                if (len < 6)
                    r = -EPROTO;
                else if ((r = fm_nbd_recv(s, &e, 4)) == 0 && (r = fm_nbd_skip(s, len - 4)) == 0)
                    res = -fm_nbd_errno(be32toh(e));
            } else {
                r = fm_nbd_skip(s, len);    /* a chunk type we did not ask for */
            }
            pthread_mutex_lock(&c->mu);
            c->reading = NULL;
            if (res < 0 && q->err == 0)
                q->err = res;
            if (r < 0 || (flags & FM_RF_DONE))
                fm_nbd_complete(c, q, r);
            pthread_mutex_unlock(&c->mu);
            if (r < 0)
                break;
        } else {
            r = -EPROTO;
            break;
        }
    }
    fm_nbd_kill(c, -r);
    return NULL;
}

/* Register q, send its request; the reply ends it (fm_nbd_wait).  0, or
 * -errno when the connection is dead (q is then not registered). */
static inline int fm_nbd_submit(struct fm_nbd_conn *c, struct fm_nbd_req *q, uint16_t type,
                         uint16_t flags, const void *payload)
{
    struct fm_nbd_request h;
    struct iovec v[2];
    int i, r;
    q->done = 0;
    q->err = 0;
    pthread_mutex_lock(&c->mu);
    while (!c->dead && c->nused == FM_NBD_SLOTS)
        pthread_cond_wait(&c->room_cv, &c->mu);
    if (c->dead) {
        r = -c->dead;
        pthread_mutex_unlock(&c->mu);
        return r;
    }
    for (i = (int)(c->gen % FM_NBD_SLOTS); c->table[i] != NULL; i = (i + 1) % FM_NBD_SLOTS)
        ;
    c->gen += FM_NBD_SLOTS + 1;     /* cookies never repeat soon; cookie % SLOTS = slot */
    q->cookie = (c->gen / FM_NBD_SLOTS) * FM_NBD_SLOTS + (uint64_t)i;
    c->table[i] = q;
    c->nused++;
    pthread_mutex_unlock(&c->mu);

    h.magic = htobe32(FM_REQUEST_MAGIC);
    h.flags = htobe16(flags);
    h.type = htobe16(type);
    h.cookie = htobe64(q->cookie);
    h.off = htobe64(q->off);
    h.len = htobe32(q->len);
    v[0].iov_base = &h;
    v[0].iov_len = sizeof(h);
    v[1].iov_base = (void *)payload;
    v[1].iov_len = q->len;
    pthread_mutex_lock(&c->send_mu);
    r = fm_nbd_send_all(c->sock, v, payload != NULL ? 2 : 1);
    c->requests++;
    pthread_mutex_unlock(&c->send_mu);
    if (r < 0)
        fm_nbd_kill(c, -r);         /* fails q too: its wait returns the error */
    return 0;
}

static inline int fm_nbd_wait(struct fm_nbd_conn *c, struct fm_nbd_req *q)
{
    pthread_mutex_lock(&c->mu);
    while (!q->done)
        pthread_cond_wait(&q->cv, &c->mu);
    pthread_mutex_unlock(&c->mu);
    return q->err;
}

static inline struct fm_nbd_conn *fm_nbd_pick(struct fm_nbd *n)
{
    unsigned k = __atomic_fetch_add(&n->next, 1, __ATOMIC_RELAXED);
    return &n->conns[k % (unsigned)n->nconns];
}

/* [off, off+len) as requests of at most `piece` bytes, FM_NBD_BATCH of
 * them in flight, on one connection; the first error wins. */
static inline int fm_nbd_cmd(struct fm_nbd_conn *c, uint16_t type, uint16_t flags, char *buf,
                      uint64_t off, uint64_t len, uint64_t piece)
{
    struct fm_nbd_req reqs[FM_NBD_BATCH];
    uint64_t pos = 0;
    int i, k, r, err = 0;
    do {
        for (k = 0; k < FM_NBD_BATCH && (pos < len || (len == 0 && k == 0)); k++) {
            struct fm_nbd_req *q = &reqs[k];
            uint64_t l = len - pos < piece ? len - pos : piece;
            q->buf = type == FM_CMD_READ ? buf + pos : NULL;
            q->off = off + pos;
            q->len = (uint32_t)l;
            pthread_cond_init(&q->cv, NULL);
            r = fm_nbd_submit(c, q, type, flags, type == FM_CMD_WRITE ? buf + pos : NULL);
            if (r < 0) {
                pthread_cond_destroy(&q->cv);
                err = r;
                break;
            }
            pos += l;
            if (len == 0) {
                k++;
                break;
            }
        }
        for (i = 0; i < k; i++) {
            r = fm_nbd_wait(c, &reqs[i]);
            if (r < 0 && err == 0)
                err = r;
            pthread_cond_destroy(&reqs[i].cv);
        }
    } while (err == 0 && pos < len);
    return err;
}

/* The largest READ/WRITE payload: the server's maximum, a multiple of the
 * preferred block where it can be (else of the minimum). */
static inline uint64_t fm_nbd_piece(struct fm_nbd *n)
{
    uint64_t p = n->max_payload;
    if (p >= n->pref_block)
        return p - p % n->pref_block;
    return p - p % n->min_block;
}

static inline int fm_nbd_check(struct fm_nbd *n, uint64_t off, uint64_t len)
{
    if (off > n->size || len > n->size - off)
        return -EINVAL;
    return 0;
}

static inline int fm_nbd_read(struct fm_nbd *n, char *buf, uint64_t off, uint64_t len)
{
    int r = fm_nbd_check(n, off, len);
    if (r < 0)
        return r;
    if (len == 0)
        return 0;
    if ((off | len) & (n->min_block - 1))
        return -EINVAL;
    return fm_nbd_cmd(fm_nbd_pick(n), FM_CMD_READ, 0, buf, off, len, fm_nbd_piece(n));
}

/* Write [off, off+len): off on a minimum block; an unaligned end (the end
 * of a source whose size is not a multiple of the export's minimum block)
 * is read, patched and written as one whole block, which must lie inside
 * the export. */
static inline int fm_nbd_write(struct fm_nbd *n, const char *buf, uint64_t off, uint64_t len)
{
    uint64_t bs = n->min_block, alen = len & ~(bs - 1);
    char *blk;
    int r = fm_nbd_check(n, off, len);
    if (r < 0)
        return r;
    if (off & (bs - 1))
        return -EINVAL;
    if (alen > 0) {
        r = fm_nbd_cmd(fm_nbd_pick(n), FM_CMD_WRITE, 0, (char *)buf, off, alen,
                       fm_nbd_piece(n));
        if (r < 0)
            return r;
    }
    if (alen == len)
        return 0;
    if (off + alen + bs > n->size)
        return -EINVAL;
    blk = (char *)malloc(bs);
    if (blk == NULL)
        return -ENOMEM;
    pthread_mutex_lock(&n->rmw_mu);
    r = fm_nbd_read(n, blk, off + alen, bs);
    if (r == 0) {
        memcpy(blk, buf + alen, len - alen);
        r = fm_nbd_cmd(fm_nbd_pick(n), FM_CMD_WRITE, 0, blk, off + alen, bs, bs);
    }
    pthread_mutex_unlock(&n->rmw_mu);
    free(blk);
    return r;
}

/* Make [off, off+len) read as zeros without sending them: WRITE_ZEROES,
 * NO_HOLE unless unmap (a hole is allowed then), FAST_ZERO when asked
 * (the server then refuses with -EOPNOTSUPP rather than write zeros
 * slowly).  The copy does not ask: it must make those bytes read zeros
 * either way, and the only other way, sending zeros as WRITE, is never
 * cheaper for the server than zeroing them itself, and costs the wire.  -EOPNOTSUPP when the server has no WRITE_ZEROES or the range
 * is not aligned: the caller writes zeros as data. */
static inline int fm_nbd_zero(struct fm_nbd *n, uint64_t off, uint64_t len, int unmap, int fast)
{
    uint16_t f = (unmap ? 0 : FM_CMDF_NO_HOLE) | (fast ? FM_CMDF_FAST_ZERO : 0);
    uint64_t piece = FM_NBD_ZERO_MAX - FM_NBD_ZERO_MAX % n->pref_block;
    int r = fm_nbd_check(n, off, len);
    if (r < 0)
        return r;
    if (!(n->flags & FM_TF_SEND_WRITE_ZEROES) || (fast && !(n->flags & FM_TF_SEND_FAST_ZERO))
            || ((off | len) & (n->min_block - 1)))
        return -EOPNOTSUPP;
    if (len == 0)
        return 0;
    r = fm_nbd_cmd(fm_nbd_pick(n), FM_CMD_WRITE_ZEROES, f, NULL, off, len, piece);
    if (r == -EOVERFLOW || r == -EINVAL)
        /* Too large an effect length for this server (proto.md allows
         * it to say so): again within the maximum payload. */
        r = fm_nbd_cmd(fm_nbd_pick(n), FM_CMD_WRITE_ZEROES, f, NULL, off, len,
                       fm_nbd_piece(n));
    return r;
}

/* Make every write acknowledged so far durable.  With multi-conn one
 * FLUSH covers the writes completed on every connection; without it there
 * is one connection.  No FLUSH at all when the server does not take it
 * (its writes are durable when acknowledged). */
static inline int fm_nbd_flush(struct fm_nbd *n)
{
    struct fm_nbd_req reqs[FM_NBD_MAX_CONNS];
    int i, k = 0, r, err = 0;
    int count = (n->flags & FM_TF_CAN_MULTI_CONN) ? 1 : n->nconns;
    if (!(n->flags & FM_TF_SEND_FLUSH))
        return 0;
    for (i = 0; i < count; i++) {
        reqs[k].buf = NULL;
        reqs[k].off = 0;
        reqs[k].len = 0;
        pthread_cond_init(&reqs[k].cv, NULL);
        r = fm_nbd_submit(&n->conns[i], &reqs[k], FM_CMD_FLUSH, 0, NULL);
        if (r < 0) {
            pthread_cond_destroy(&reqs[k].cv);
            err = r;
            break;
        }
        k++;
    }
    for (i = 0; i < k; i++) {
        r = fm_nbd_wait(&n->conns[i], &reqs[i]);
        if (r < 0 && err == 0)
            err = r;
        pthread_cond_destroy(&reqs[i].cv);
    }
    return err;
}

/* Where to connect: a unix socket path, or host and port; the export's
 * name.  -ENAMETOOLONG when a string does not fit. */
static inline int fm_nbd_where(struct fm_nbd *n, const char *path, const char *host,
                        const char *port, const char *name, int timeout_ms)
{
    if (strlen(name) > FM_NBD_MAX_NAME)
        return -ENAMETOOLONG;
    strcpy(n->name, name);
    n->timeout_ms = timeout_ms;
    if (path != NULL) {
        if (strlen(path) >= sizeof(n->path))
            return -ENAMETOOLONG;
        n->is_unix = 1;
        strcpy(n->path, path);
        return 0;
    }
    if (strlen(host) >= sizeof(n->host) || strlen(port) >= sizeof(n->port))
        return -ENAMETOOLONG;
    n->is_unix = 0;
    strcpy(n->host, host);
    strcpy(n->port, port);
    return 0;
}

static inline uint64_t fm_nbd_requests(struct fm_nbd *n)
{
    uint64_t t = 0;
    int i;
    for (i = 0; i < n->nconns; i++) {
        pthread_mutex_lock(&n->conns[i].send_mu);
        t += n->conns[i].requests;
        pthread_mutex_unlock(&n->conns[i].send_mu);
    }
    return t;
}

static inline void fm_nbd_init(struct fm_nbd *n)
{
    int i;
    memset(n, 0, sizeof(*n));
    pthread_mutex_init(&n->rmw_mu, NULL);
    for (i = 0; i < FM_NBD_MAX_CONNS; i++) {
        struct fm_nbd_conn *c = &n->conns[i];
        c->owner = n;
        c->sock = -1;
        pthread_mutex_init(&c->mu, NULL);
        pthread_mutex_init(&c->send_mu, NULL);
        pthread_cond_init(&c->room_cv, NULL);
    }
}

/* A new socket for connection c, through the handshake, with its reader. */
static inline int fm_nbd_connect_one(struct fm_nbd *n, struct fm_nbd_conn *c, int first, char *err,
                              size_t errlen)
{
    int s = fm_nbd_dial(n, err, errlen), r;
    if (s < 0)
        return s;
    r = fm_nbd_handshake(n, s, first, err, errlen);
    if (r < 0) {
        close(s);
        return r;
    }
    fm_nbd_timeouts(s, 0);      /* a request may take its time: no timeout */
    pthread_mutex_lock(&c->send_mu);
    pthread_mutex_lock(&c->mu);
    c->sock = s;
    c->dead = 0;
    c->reading = NULL;
    pthread_mutex_unlock(&c->mu);
    pthread_mutex_unlock(&c->send_mu);
    r = pthread_create(&c->reader, NULL, fm_nbd_reader, c);
    if (r != 0) {
        pthread_mutex_lock(&c->mu);
        c->dead = r;
        c->sock = -1;
        pthread_mutex_unlock(&c->mu);
        close(s);
        fm_nbd_msg(err, errlen, "cannot start the NBD reply reader: %s", strerror(r));
        return -r;
    }
    c->reader_running = 1;
    return 0;
}

/* Wait for a dead connection's reader and close its socket. */
static inline void fm_nbd_reap(struct fm_nbd_conn *c)
{
    if (c->reader_running) {
        pthread_join(c->reader, NULL);
        c->reader_running = 0;
    }
    if (c->sock >= 0) {
        close(c->sock);
        c->sock = -1;
    }
}

/* Connect: the first connection learns the export; `want` connections in
 * all when the server allows multi-conn, else one. */
static inline int fm_nbd_open(struct fm_nbd *n, int want, char *err, size_t errlen)
{
    int i, r;
    r = fm_nbd_connect_one(n, &n->conns[0], 1, err, errlen);
    if (r < 0)
        return r;
    n->nconns = 1;
    if (!(n->flags & FM_TF_CAN_MULTI_CONN))
        want = 1;
    if (want > FM_NBD_MAX_CONNS)
        want = FM_NBD_MAX_CONNS;
    for (i = 1; i < want; i++) {
        r = fm_nbd_connect_one(n, &n->conns[i], 0, err, errlen);
        if (r < 0)
            return r;          /* the caller closes what opened */
        n->nconns = i + 1;
    }
    return 0;
}

/* Connect again every connection that died; 0 or -errno.  No request may
 * be in flight on a dead connection: it has none (all failed), and new
 * ones fail at once until it is back. */
static inline int fm_nbd_reconnect(struct fm_nbd *n, char *err, size_t errlen)
{
    int i, r, dead;
    for (i = 0; i < n->nconns; i++) {
        struct fm_nbd_conn *c = &n->conns[i];
        pthread_mutex_lock(&c->mu);
        dead = c->dead;
        pthread_mutex_unlock(&c->mu);
        if (!dead)
            continue;
        /* The reader returns once the socket is shut down (kill did it);
         * the socket is closed only after, so no one uses a reused fd. */
        pthread_mutex_lock(&c->send_mu);
        pthread_mutex_lock(&c->mu);
        if (c->sock >= 0)
            shutdown(c->sock, SHUT_RDWR);
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->send_mu);
        if (c->reader_running) {
            pthread_join(c->reader, NULL);
            c->reader_running = 0;
        }
        pthread_mutex_lock(&c->send_mu);
        pthread_mutex_lock(&c->mu);
        if (c->sock >= 0)
            close(c->sock);
        c->sock = -1;
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->send_mu);
        r = fm_nbd_connect_one(n, c, 0, err, errlen);
        if (r < 0)
            return r;
    }
    return 0;
}

/* Which connections are dead: a bit each. */
static inline unsigned fm_nbd_dead_mask(struct fm_nbd *n)
{
    unsigned m = 0;
    int i;
    for (i = 0; i < n->nconns; i++) {
        pthread_mutex_lock(&n->conns[i].mu);
        if (n->conns[i].dead)
            m |= 1u << i;
        pthread_mutex_unlock(&n->conns[i].mu);
    }
    return m;
}

/* Did a connection fail since the last call?  (Then writes the server
 * acknowledged but did not flush may be lost.) */
static inline int fm_nbd_take_lost(struct fm_nbd *n)
{
    return __atomic_exchange_n(&n->lost, 0, __ATOMIC_RELAXED);
}

/* Say goodbye (NBD_CMD_DISC) on live connections and close all.  No
 * request may be in progress. */
static inline void fm_nbd_close(struct fm_nbd *n)
{
    int i;
    for (i = 0; i < n->nconns; i++) {
        struct fm_nbd_conn *c = &n->conns[i];
        struct fm_nbd_request h;
        pthread_mutex_lock(&c->send_mu);
        pthread_mutex_lock(&c->mu);
        if (c->sock >= 0 && !c->dead) {
            memset(&h, 0, sizeof(h));
            h.magic = htobe32(FM_REQUEST_MAGIC);
            h.type = htobe16(FM_CMD_DISC);
            fm_nbd_send(c->sock, &h, sizeof(h));
        }
        if (c->sock >= 0)
            shutdown(c->sock, SHUT_RDWR);
        if (!c->dead)
            c->dead = ESHUTDOWN;
        pthread_mutex_unlock(&c->mu);
        pthread_mutex_unlock(&c->send_mu);
        fm_nbd_reap(c);
    }
    n->nconns = 0;
    n->lost = 0;
}

static inline void fm_nbd_destroy(struct fm_nbd *n)
{
    int i;
    fm_nbd_close(n);
    for (i = 0; i < FM_NBD_MAX_CONNS; i++) {
        pthread_mutex_destroy(&n->conns[i].mu);
        pthread_mutex_destroy(&n->conns[i].send_mu);
        pthread_cond_destroy(&n->conns[i].room_cv);
    }
    pthread_mutex_destroy(&n->rmw_mu);
}

#endif
