# cython: language_level=3
"""One NBD connection, served in C without the GIL, up to MAX_INFLIGHT of its
requests at once (a pool of worker threads per connection).

serve_connection(fd, disk, name, read_only) runs the fixed newstyle
handshake and then the transmission phase on a connected socket until the
client disconnects, sends something malformed, or the socket is shut down
(Export.close()).  Every request goes through the TrackedDisk's C API
(tracked.pxd): the gate, the job's claims and marks, and after a pivot the
target, exactly as for job.source.  The GIL is taken once, on the way out.

The protocol is the NetworkBlockDevice project's proto.md; numbers below
are its names.  A malformed handshake or request ends this connection only:
nothing of it reaches the disk.
"""

from libc.errno cimport (errno, EINTR, EINVAL, ENOSPC, EPERM, ENOMEM, EOPNOTSUPP, EOVERFLOW,
                         ENXIO, EBADF)
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy, memset, memcmp
from posix.types cimport off_t
from posix.uio cimport iovec
from fastmirror._core.tracked cimport (TrackedDisk, fm_route, fm_route_pread, fm_dio_ok,
                                       FM_DIO_ALIGN)
from fastmirror._core.engine cimport fm_engine_mark
from fastmirror._core.blockio cimport pread_full, pwrite_full
from fastmirror._core.ring cimport (fm_ring, fm_ring_init, fm_ring_exit, fm_ring_prep,
                                   fm_ring_supports, fm_ring_unqueue, FM_RING_READ,
                                   FM_RING_WRITE, FM_CALLS_PLAIN)
from fastmirror._core.sync cimport (pthread_mutex_t, pthread_cond_t, pthread_mutex_init,
                                    pthread_mutex_destroy, pthread_mutex_lock,
                                    pthread_mutex_unlock, pthread_cond_init,
                                    pthread_cond_destroy, pthread_cond_wait,
                                    pthread_cond_signal, pthread_cond_broadcast)

cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)

cdef extern from "<sys/socket.h>" nogil:
    struct msghdr:
        void *msg_name
        unsigned int msg_namelen
        iovec *msg_iov
        size_t msg_iovlen
        void *msg_control
        size_t msg_controllen
        int msg_flags
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t sendmsg(int fd, const msghdr *m, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_MORE
    int MSG_WAITALL
    int MSG_DONTWAIT

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **p, size_t alignment, size_t size)

cdef extern from *:
    """
    #include "ring.h"
    /* A connection's ring is filled by its reader and reaped by its
       completer: each thread touches only its own queue of the ring (the
       fm_ring_submit/fm_ring_reap pair shares a counter, so not those). */
    #if FM_HAVE_URING
    static int fm_nbd_ring_enter(fm_ring *r) {
        while (r->to_submit) {
            int n = (int)syscall(__NR_io_uring_enter, r->fd, r->to_submit, 0, 0, NULL, 0);
            if (n < 0) {
                if (errno == EINTR) continue;
                return -errno;
            }
            if (n == 0) return -EAGAIN;
            r->to_submit -= (unsigned)n;
        }
        return 0;
    }
    static int fm_nbd_ring_wait(fm_ring *r) {
        if (__atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE) != *r->cq_head) return 0;
        int n = (int)syscall(__NR_io_uring_enter, r->fd, 0, 1, IORING_ENTER_GETEVENTS, NULL, 0);
        return n < 0 && errno != EINTR ? -errno : 0;
    }
    static int fm_nbd_ring_reap(fm_ring *r, uint64_t *user_data, int *res) {
        unsigned head = *r->cq_head;
        if (head == __atomic_load_n(r->cq_tail, __ATOMIC_ACQUIRE)) return 0;
        struct io_uring_cqe *cqe = &((struct io_uring_cqe *)r->cqes)[head & *r->cq_mask];
        *user_data = cqe->user_data;
        *res = cqe->res;
        __atomic_store_n(r->cq_head, head + 1, __ATOMIC_RELEASE);
        return 1;
    }
    static int fm_nbd_ring_nop(fm_ring *r, uint64_t user_data) {
        unsigned tail = *r->sq_tail;
        unsigned head = __atomic_load_n(r->sq_head, __ATOMIC_ACQUIRE);
        if (tail - head >= r->sq_entries) return -EBUSY;
        unsigned idx = tail & *r->sq_mask;
        struct io_uring_sqe *sqe = &((struct io_uring_sqe *)r->sqes)[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->opcode = IORING_OP_NOP;
        sqe->user_data = user_data;
        r->sq_array[idx] = idx;
        __atomic_store_n(r->sq_tail, tail + 1, __ATOMIC_RELEASE);
        r->to_submit++;
        return 0;
    }
    #else
    static int fm_nbd_ring_enter(fm_ring *r) { (void)r; return -ENOSYS; }
    static int fm_nbd_ring_wait(fm_ring *r) { (void)r; return -ENOSYS; }
    static int fm_nbd_ring_reap(fm_ring *r, uint64_t *u, int *res) {
        (void)r; (void)u; (void)res; return 0;
    }
    static int fm_nbd_ring_nop(fm_ring *r, uint64_t u) { (void)r; (void)u; return -ENOSYS; }
    #endif
    static inline void fm_nbd_count(int64_t *p) {
        __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
    }
    """
    int fm_nbd_ring_enter(fm_ring *r) nogil
    int fm_nbd_ring_wait(fm_ring *r) nogil
    int fm_nbd_ring_reap(fm_ring *r, uint64_t *user_data, int *res) nogil
    int fm_nbd_ring_nop(fm_ring *r, uint64_t user_data) nogil
    void fm_nbd_count(int64_t *p) nogil

cdef extern from "<pthread.h>" nogil:
    ctypedef unsigned long pthread_t
    int pthread_create(pthread_t *t, const void *attr, void *(*start)(void *) noexcept nogil,
                       void *arg)
    int pthread_join(pthread_t t, void **ret)
    pthread_t pthread_self()
    int pthread_equal(pthread_t a, pthread_t b)
    int pthread_mutex_trylock(pthread_mutex_t *m)

cdef extern from "<poll.h>" nogil:
    struct pollfd:
        int fd
        short events
        short revents
    int poll(pollfd *fds, unsigned long n, int timeout)
    short POLLIN
    short POLLOUT

cdef extern from "<errno.h>" nogil:
    int EAGAIN
    int EWOULDBLOCK

cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned usec)
    off_t lseek(int fd, off_t offset, int whence)
    int SEEK_DATA
    int SEEK_HOLE

cdef enum:
    MAX_REQUEST = 32 << 20      # largest READ/WRITE payload
    MAX_INFLIGHT = 16           # requests of one connection served at once (QEMU: 16)
    INFLIGHT_BYTES = 64 << 20   # payload bytes they may hold together
    KEEP_BUFFER = 4 << 20       # a request slot keeps a buffer up to this size
    PENDING_REPLIES = 4 * MAX_INFLIGHT  # simple replies waiting for one sendmsg
    MAX_OPTION = 64 << 10       # largest option payload in the handshake
    MAX_EXTENTS = 1024          # descriptors in one BLOCK_STATUS reply
    READ_EXTENTS = 64           # chunks of one structured READ reply at most
    PREFERRED_BLOCK = 4096

    # handshake
    FLAG_FIXED_NEWSTYLE = 1 << 0
    FLAG_NO_ZEROES = 1 << 1
    OPT_EXPORT_NAME = 1
    OPT_ABORT = 2
    OPT_LIST = 3
    OPT_INFO = 6
    OPT_GO = 7
    OPT_STRUCTURED_REPLY = 8
    OPT_LIST_META_CONTEXT = 9
    OPT_SET_META_CONTEXT = 10
    REP_ACK = 1
    REP_SERVER = 2
    REP_INFO = 3
    REP_META_CONTEXT = 4
    INFO_EXPORT = 0
    INFO_NAME = 1
    INFO_BLOCK_SIZE = 3

    # transmission flags
    TF_HAS_FLAGS = 1 << 0
    TF_READ_ONLY = 1 << 1
    TF_SEND_FLUSH = 1 << 2
    TF_SEND_FUA = 1 << 3
    TF_SEND_TRIM = 1 << 5
    TF_SEND_WRITE_ZEROES = 1 << 6
    TF_SEND_DF = 1 << 7
    TF_CAN_MULTI_CONN = 1 << 8
    TF_SEND_FAST_ZERO = 1 << 11

    # commands and their flags
    CMD_READ = 0
    CMD_WRITE = 1
    CMD_DISC = 2
    CMD_FLUSH = 3
    CMD_TRIM = 4
    CMD_WRITE_ZEROES = 6
    CMD_BLOCK_STATUS = 7
    CMDF_FUA = 1 << 0
    CMDF_NO_HOLE = 1 << 1
    CMDF_DF = 1 << 2
    CMDF_REQ_ONE = 1 << 3
    CMDF_FAST_ZERO = 1 << 4

    # structured replies
    RF_DONE = 1
    CHUNK_NONE = 0
    CHUNK_OFFSET_DATA = 1
    CHUNK_OFFSET_HOLE = 2
    CHUNK_BLOCK_STATUS = 5
    CHUNK_ERROR = 32769
    STATE_HOLE = 1
    STATE_ZERO = 2
    META_ID = 1                 # our one context: base:allocation

    # NBD error numbers (the protocol's, not the host's)
    NBD_EPERM = 1
    NBD_EIO = 5
    NBD_ENOMEM = 12
    NBD_EINVAL = 22
    NBD_ENOSPC = 28
    NBD_EOVERFLOW = 75
    NBD_ENOTSUP = 95
    NBD_ESHUTDOWN = 108

# Why a connection ended (returned to Python for the log and the tests).
cdef enum:
    END_DISCONNECT = 0      # NBD_CMD_DISC or OPT_ABORT
    END_MALFORMED = 1       # bad magic, size, option or request: dropped
    END_IO = 2              # the client hung up, the socket failed or close() shut it

DISCONNECT = END_DISCONNECT
MALFORMED = END_MALFORMED
IO = END_IO

cdef uint64_t NBDMAGIC = 0x4e42444d41474943ULL
cdef uint64_t IHAVEOPT = 0x49484156454F5054ULL
cdef uint64_t REPLY_MAGIC = 0x3e889045565a9ULL
cdef uint32_t REQUEST_MAGIC = 0x25609513U
cdef uint32_t SIMPLE_MAGIC = 0x67446698U
cdef uint32_t STRUCTURED_MAGIC = 0x668e33efU
cdef uint32_t REP_ERR_UNSUP = 0x80000001U
cdef uint32_t REP_ERR_POLICY = 0x80000002U
cdef uint32_t REP_ERR_INVALID = 0x80000003U
cdef uint32_t REP_ERR_UNKNOWN = 0x80000006U


cdef struct req_t:
    char cookie[8]
    uint16_t flags
    uint16_t cmd
    int64_t offset              # -1: out of range
    uint32_t length
    bint bad                    # the range is outside the disk
    bint bad_flags              # a flag this command does not take: NBD_EINVAL
    char *buf                   # payload or reply data, page-aligned, grown on demand
    int64_t buf_len
    int64_t charged             # its share of INFLIGHT_BYTES
    req_t *next                 # in the queue or the free list
    # On the ring (ring_submit): the route taken at the gate, and the
    # descriptor the I/O went to; its result once the I/O ended (ring_end).
    fm_route route
    int fd
    int64_t result


cdef struct conn_t:
    int sock
    void *disk                  # the TrackedDisk (a borrowed reference)
    int64_t size
    const char *name
    uint32_t name_len
    bint read_only
    bint structured
    bint meta                   # base:allocation selected
    uint16_t tflags
    # The pool (transmission): mu guards the queue, the free slots and the
    # counters; send_mu one reply at a time on the socket.  Lock order: a
    # worker takes send_mu while holding no other lock of this connection,
    # and calls the disk (its own lock) holding neither.
    pthread_mutex_t mu
    pthread_mutex_t send_mu
    pthread_cond_t work         # workers wait for requests
    pthread_cond_t room         # the reader waits for a free slot, drain() for none busy
    req_t slots[MAX_INFLIGHT]
    req_t *free_slots
    req_t *queue_head
    req_t *queue_tail
    int queued                  # requests in the queue
    int busy                    # slots taken: read, queued or being served
    int idle                    # workers waiting for work
    int nthreads
    int64_t inflight_bytes
    bint stopping
    bint send_failed            # a reply could not be sent: the connection is over
    bint reader_waiting         # in take_slot() or drain(): signal room
    bint sending                # a worker is sending the pending replies
    int npending
    char pending[PENDING_REPLIES * 16]  # simple replies not sent yet
    pthread_cond_t taken        # the sender took the pending replies
    pthread_t threads[MAX_INFLIGHT]
    # The ring (io_uring, when the kernel allows it): plain reads and writes
    # go there from the reader, and the completer thread ends them.
    fm_ring ring
    bint ring_ok
    pthread_t completer
    # The completer's own: requests whose I/O ended (marked, out of the
    # gate) and whose replies wait, while it sends an earlier one.
    req_t *deferred_head
    req_t *deferred_tail
    bint ring_stopped


cdef int send_all(int sock, const void *p, size_t n, bint more) noexcept nogil:
    """0, or -1 when the socket failed (the connection ends)."""
    cdef const char *c = <const char *>p
    cdef ssize_t w
    cdef int flags = MSG_NOSIGNAL | (MSG_MORE if more else 0)
    while n:
        w = send(sock, c, n, flags)
        if w < 0:
            if errno == EINTR:
                continue
            return -1
        c += w
        n -= <size_t>w
    return 0


cdef int recv_all(int sock, void *p, size_t n) noexcept nogil:
    """0, or -1 on end of stream or a failure."""
    cdef char *c = <char *>p
    cdef ssize_t r
    while n:
        r = recv(sock, c, n, MSG_WAITALL)
        if r < 0 and errno == EINTR:
            continue
        if r <= 0:
            return -1
        c += r
        n -= <size_t>r
    return 0


cdef inline void put16(char *p, uint16_t v) noexcept nogil:
    v = htobe16(v)
    memcpy(p, &v, 2)

cdef inline void put32(char *p, uint32_t v) noexcept nogil:
    v = htobe32(v)
    memcpy(p, &v, 4)

cdef inline void put64(char *p, uint64_t v) noexcept nogil:
    v = htobe64(v)
    memcpy(p, &v, 8)

cdef inline uint16_t get16(const char *p) noexcept nogil:
    cdef uint16_t v
    memcpy(&v, p, 2)
    return be16toh(v)

cdef inline uint32_t get32(const char *p) noexcept nogil:
    cdef uint32_t v
    memcpy(&v, p, 4)
    return be32toh(v)

cdef inline uint64_t get64(const char *p) noexcept nogil:
    cdef uint64_t v
    memcpy(&v, p, 8)
    return be64toh(v)


cdef uint32_t nbd_errno(int64_t r) noexcept nogil:
    """The protocol's error for -errno r."""
    cdef int e = <int>-r
    if e == EPERM or e == EBADF:
        return NBD_EPERM if e == EPERM else NBD_ESHUTDOWN
    if e == ENOSPC:
        return NBD_ENOSPC
    if e == ENOMEM:
        return NBD_ENOMEM
    if e == EINVAL:
        return NBD_EINVAL
    if e == EOVERFLOW:
        return NBD_EOVERFLOW
    if e == EOPNOTSUPP:
        return NBD_ENOTSUP
    return NBD_EIO


# -- handshake -----------------------------------------------------------------

cdef int opt_reply(conn_t *c, uint32_t opt, uint32_t rtype, const void *data,
                   uint32_t n) noexcept nogil:
    cdef char h[20]
    put64(h, REPLY_MAGIC)
    put32(h + 8, opt)
    put32(h + 12, rtype)
    put32(h + 16, n)
    if send_all(c.sock, h, 20, n > 0) < 0:
        return -1
    if n and send_all(c.sock, data, n, False) < 0:
        return -1
    return 0


cdef bint name_matches(conn_t *c, const char *p, uint32_t n) noexcept nogil:
    """"" is the default export, which this server has exactly one of."""
    if n == 0:
        return True
    return n == c.name_len and memcmp(p, c.name, n) == 0


cdef int send_export_info(conn_t *c, uint32_t opt) noexcept nogil:
    cdef char info[14]
    put16(info, INFO_EXPORT)
    put64(info + 2, <uint64_t>c.size)
    put16(info + 10, c.tflags)
    if opt_reply(c, opt, REP_INFO, info, 12) < 0:
        return -1
    # Byte-granular requests are served (buffered descriptors); 4 KiB is
    # what the host page cache and the mirror's chunks like best.
    put16(info, INFO_BLOCK_SIZE)
    put32(info + 2, 1)
    put32(info + 6, PREFERRED_BLOCK)
    put32(info + 10, MAX_REQUEST)
    return opt_reply(c, opt, REP_INFO, info, 14)


cdef int opt_info_go(conn_t *c, uint32_t opt, const char *d, uint32_t n) noexcept nogil:
    """NBD_OPT_INFO / NBD_OPT_GO: 1 to enter transmission, 0 to go on with
    options, -1 to drop the connection."""
    cdef uint32_t nlen, i
    cdef uint16_t nreq, req
    cdef bint want_name = False
    cdef char *reply
    if n < 6:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    nlen = get32(d)
    if nlen > n - 6:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    nreq = get16(d + 4 + nlen)
    if <uint64_t>nlen + 6 + 2 * <uint64_t>nreq != n:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    if not name_matches(c, d + 4, nlen):
        return opt_reply(c, opt, REP_ERR_UNKNOWN, NULL, 0)
    for i in range(nreq):
        req = get16(d + 6 + nlen + 2 * i)
        if req == INFO_NAME:
            want_name = True
    if send_export_info(c, opt) < 0:
        return -1
    if want_name:
        reply = <char *>malloc(2 + c.name_len)
        if reply == NULL:
            return -1
        put16(reply, INFO_NAME)
        memcpy(reply + 2, c.name, c.name_len)
        i = <uint32_t>opt_reply(c, opt, REP_INFO, reply, 2 + c.name_len)
        free(reply)
        if <int>i < 0:
            return -1
    if opt_reply(c, opt, REP_ACK, NULL, 0) < 0:
        return -1
    return 1 if opt == OPT_GO else 0


cdef int opt_meta(conn_t *c, uint32_t opt, const char *d, uint32_t n) noexcept nogil:
    """LIST/SET_META_CONTEXT: the one context this server has is
    base:allocation ("base:" asks for every context of that namespace)."""
    cdef uint32_t nlen, nq, qlen, left, pos
    cdef bint found = False
    cdef char reply[4 + 15]
    if n < 8:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    nlen = get32(d)
    if nlen > n - 8:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    nq = get32(d + 4 + nlen)
    pos = 8 + nlen
    left = nq
    while left:
        left -= 1
        if n - pos < 4:
            return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
        qlen = get32(d + pos)
        pos += 4
        if qlen > n - pos:
            return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
        if (qlen == 15 and memcmp(d + pos, b"base:allocation", 15) == 0) or \
                (qlen == 5 and memcmp(d + pos, b"base:", 5) == 0):
            found = True
        pos += qlen
    if pos != n:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    if opt == OPT_SET_META_CONTEXT and not c.structured:
        return opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
    if not name_matches(c, d + 4, nlen):
        return opt_reply(c, opt, REP_ERR_UNKNOWN, NULL, 0)
    if nq == 0 and opt == OPT_LIST_META_CONTEXT:
        found = True
    if opt == OPT_SET_META_CONTEXT:
        c.meta = found
    if found:
        put32(reply, META_ID if opt == OPT_SET_META_CONTEXT else 0)
        memcpy(reply + 4, b"base:allocation", 15)
        if opt_reply(c, opt, REP_META_CONTEXT, reply, 19) < 0:
            return -1
    return opt_reply(c, opt, REP_ACK, NULL, 0)


cdef int handshake(conn_t *c) noexcept nogil:
    """0: transmission starts; 1: the client left (ABORT); -1: dropped."""
    cdef char h[18]
    cdef char zeros[124]
    cdef uint32_t cflags, opt, n
    cdef uint16_t hflags = FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES
    cdef char *d = NULL
    cdef char *list_reply
    cdef int r
    put64(h, NBDMAGIC)
    put64(h + 8, IHAVEOPT)
    put16(h + 16, hflags)
    if send_all(c.sock, h, 18, False) < 0 or recv_all(c.sock, h, 4) < 0:
        return -1
    cflags = get32(h)
    if cflags & ~<uint32_t>hflags:
        return -1               # a flag we did not offer
    while True:
        if recv_all(c.sock, h, 16) < 0 or get64(h) != IHAVEOPT:
            return -1
        opt = get32(h + 8)
        n = get32(h + 12)
        if n > MAX_OPTION:
            return -1
        free(d)
        d = <char *>malloc(n if n else 1)
        if d == NULL or recv_all(c.sock, d, n) < 0:
            free(d)
            return -1
        r = 0
        if opt == OPT_EXPORT_NAME:
            if not name_matches(c, d, n):
                r = -1          # no way to say no to this option but hanging up
            else:
                put64(h, <uint64_t>c.size)
                put16(h + 8, c.tflags)
                if send_all(c.sock, h, 10, not (cflags & FLAG_NO_ZEROES)) < 0:
                    r = -1
                elif not (cflags & FLAG_NO_ZEROES):
                    memset(zeros, 0, 124)
                    r = send_all(c.sock, zeros, 124, False)
                if r == 0:
                    r = 1
        elif opt == OPT_ABORT:
            opt_reply(c, opt, REP_ACK, NULL, 0)
            free(d)
            return 1
        elif opt == OPT_LIST:
            if n:
                r = opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
            else:
                list_reply = <char *>malloc(4 + c.name_len)
                if list_reply == NULL:
                    r = -1
                else:
                    put32(list_reply, c.name_len)
                    memcpy(list_reply + 4, c.name, c.name_len)
                    r = opt_reply(c, opt, REP_SERVER, list_reply, 4 + c.name_len)
                    free(list_reply)
                    if r == 0:
                        r = opt_reply(c, opt, REP_ACK, NULL, 0)
        elif opt == OPT_INFO or opt == OPT_GO:
            r = opt_info_go(c, opt, d, n)
        elif opt == OPT_STRUCTURED_REPLY:
            if n:
                r = opt_reply(c, opt, REP_ERR_INVALID, NULL, 0)
            else:
                c.structured = True
                r = opt_reply(c, opt, REP_ACK, NULL, 0)
        elif opt == OPT_LIST_META_CONTEXT or opt == OPT_SET_META_CONTEXT:
            r = opt_meta(c, opt, d, n)
        else:
            r = opt_reply(c, opt, REP_ERR_UNSUP, NULL, 0)
        if r != 0:
            free(d)
            return 0 if r == 1 else -1


# -- transmission ---------------------------------------------------------------
#
# The connection's thread reads requests (header and WRITE payload) and hands
# each to a worker of the connection's pool, which serves it through the
# TrackedDisk and sends its reply; so up to MAX_INFLIGHT requests of one
# client are at the disk at once (a client pipelines them: fio's iodepth, a
# guest's queue), and replies go out in the order requests end, each under
# send_mu so that no two interleave.  NBD lets replies come in any order;
# a FLUSH covers the writes replied to before it, which had reached the
# disk before their reply.  Workers start on demand, without the GIL, and
# live as long as the connection.

cdef inline bint on_completer(conn_t *c) noexcept nogil:
    return c.ring_ok and pthread_equal(pthread_self(), c.completer) != 0


cdef void comp_wait(conn_t *c, bint for_socket) noexcept nogil:
    """The completer, about to wait for the socket to take more
    (for_socket) or for send_mu or room among the pending replies (1 ms):
    meanwhile it ends the I/O of every request the ring completes (comp_take).
    Ring requests hold the gate until then: a client that does not read its
    replies must not hold up the job's drain, nor every other client's
    writes held at the closed gate."""
    cdef pollfd p[2]
    p[0].fd = c.ring.fd
    p[0].events = POLLIN
    p[0].revents = 0
    p[1].fd = c.sock
    p[1].events = POLLOUT
    p[1].revents = 0
    poll(p, 2 if for_socket else 1, -1 if for_socket else 1)
    comp_take(c)


cdef void lock_send(conn_t *c) noexcept nogil:
    """Take send_mu; the completer waits for it in comp_wait."""
    if not on_completer(c):
        pthread_mutex_lock(&c.send_mu)
        return
    while pthread_mutex_trylock(&c.send_mu) != 0:
        comp_wait(c, False)


cdef int send_iov(conn_t *c, iovec *iov, int n) noexcept nogil:
    """Every byte of iov[0..n) in order, in as few calls as the socket
    takes; 0, or -1 when the socket failed.  iov is consumed.  On the
    completer, never blocked on the socket with ring I/O ended but not
    taken (comp_wait)."""
    cdef msghdr m
    cdef ssize_t w
    cdef bint comp = on_completer(c)
    memset(&m, 0, sizeof(m))
    while n > 0:
        if iov[0].iov_len == 0:
            iov += 1
            n -= 1
            continue
        m.msg_iov = iov
        m.msg_iovlen = n
        w = sendmsg(c.sock, &m, MSG_NOSIGNAL | (MSG_DONTWAIT if comp else 0))
        if w < 0:
            if errno == EINTR:
                continue
            if comp and (errno == EAGAIN or errno == EWOULDBLOCK):
                comp_wait(c, True)
                continue
            return -1
        while n > 0 and <size_t>w >= iov[0].iov_len:
            w -= iov[0].iov_len
            iov += 1
            n -= 1
        if n > 0:
            iov[0].iov_base = <char *>iov[0].iov_base + w
            iov[0].iov_len -= <size_t>w
    return 0


cdef int simple_reply(conn_t *c, const char *cookie, uint32_t err, const void *data,
                      int64_t n) noexcept nogil:
    cdef char h[16]
    cdef iovec v[2]
    put32(h, SIMPLE_MAGIC)
    put32(h + 4, err)
    memcpy(h + 8, cookie, 8)
    v[0].iov_base = h
    v[0].iov_len = 16
    v[1].iov_base = <void *>data
    v[1].iov_len = <size_t>n if n > 0 else 0
    return send_iov(c, v, 2)


cdef int chunk(conn_t *c, const char *cookie, uint16_t flags, uint16_t ctype,
               const void *head, uint32_t head_len, const void *data,
               int64_t n) noexcept nogil:
    """One structured reply chunk: header, head (offset, context...), data."""
    cdef char h[20]
    cdef iovec v[3]
    put32(h, STRUCTURED_MAGIC)
    put16(h + 4, flags)
    put16(h + 6, ctype)
    memcpy(h + 8, cookie, 8)
    put32(h + 16, <uint32_t>(head_len + n))
    v[0].iov_base = h
    v[0].iov_len = 20
    v[1].iov_base = <void *>head
    v[1].iov_len = head_len
    v[2].iov_base = <void *>data
    v[2].iov_len = <size_t>n if n > 0 else 0
    return send_iov(c, v, 3)


cdef int reply_error(conn_t *c, const char *cookie, uint32_t err,
                     bint structured) noexcept nogil:
    cdef char e[6]
    if not structured:
        return simple_reply(c, cookie, err, NULL, 0)
    put32(e, err)
    put16(e + 4, 0)             # no message
    return chunk(c, cookie, RF_DONE, CHUNK_ERROR, e, 6, NULL, 0)


cdef int64_t next_extent(int fd, bint is_block, int64_t offset, int64_t end,
                         bint *hole) noexcept nogil:
    """The end of the run of data or hole starting at offset (at most end);
    -errno if the file cannot tell (then it is all data)."""
    cdef off_t d, h
    if is_block:
        hole[0] = False
        return end
    d = lseek(fd, offset, SEEK_DATA)
    if d < 0:
        if errno == ENXIO:      # no data from here to the end of the file
            hole[0] = True
            return end
        return -errno
    if d > offset:
        hole[0] = True
        return d if d < end else end
    h = lseek(fd, offset, SEEK_HOLE)
    if h < 0:
        return -errno
    hole[0] = False
    return h if h < end else end


cdef int grow(req_t *q, int64_t n) noexcept nogil:
    """q's buffer holds at least n bytes, page-aligned (O_DIRECT takes it)."""
    cdef void *p = NULL
    if n <= q.buf_len:
        return 0
    if posix_memalign(&p, FM_DIO_ALIGN, <size_t>n) != 0:
        return -1
    free(q.buf)
    q.buf = <char *>p
    q.buf_len = n
    return 0


cdef int do_read(conn_t *c, TrackedDisk disk, req_t *q) noexcept nogil:
    """Simple replies, or with DF: the data in one piece.  Structured
    replies: holes (SEEK_DATA/SEEK_HOLE) as OFFSET_HOLE chunks, not sent.
    The reply is sent under send_mu; -1 when the socket failed."""
    cdef fm_route route
    cdef int64_t r, pos, nxt, offset = q.offset, length = q.length, end = offset + length
    cdef int64_t starts[READ_EXTENTS]
    cdef int64_t ends[READ_EXTENTS]
    cdef bint holes[READ_EXTENTS]
    cdef int count = 0, i
    cdef bint hole
    cdef char head[12]
    cdef const char *cookie = q.cookie
    if grow(q, length) < 0:
        return locked_error(c, cookie, NBD_ENOMEM, c.structured)
    if not c.structured or q.flags & CMDF_DF or length == 0:
        r = disk.c_read(q.buf, length, offset)
        if r < 0:
            return locked_error(c, cookie, nbd_errno(r), c.structured)
        if r < length:          # the file shrank under us: reads past it are zeros
            memset(q.buf + r, 0, <size_t>(length - r))
        lock_send(c)
        if not c.structured:
            r = simple_reply(c, cookie, 0, q.buf, length)
        elif length == 0:
            # An OFFSET_DATA chunk carries a byte at least (proto.md).
            r = chunk(c, cookie, RF_DONE, CHUNK_NONE, NULL, 0, NULL, 0)
        else:
            put64(head, <uint64_t>offset)
            r = chunk(c, cookie, RF_DONE, CHUNK_OFFSET_DATA, head, 8, q.buf, length)
        pthread_mutex_unlock(&c.send_mu)
        return <int>r
    # Map and read through one pass of the gate, like c_read: never across
    # a pivot.  The socket is written after leaving it (a slow client must
    # not hold up the job's drain).
    r = disk.c_enter(&route)
    if r < 0:
        return locked_error(c, cookie, nbd_errno(r), True)
    pos = offset
    while pos < end:
        nxt = next_extent(route.fd, route.is_block, pos, end, &hole)
        if nxt <= pos or count == READ_EXTENTS - 1:
            nxt = end           # cannot tell, or too many pieces: data
            hole = False
        if count and holes[count - 1] == hole:
            ends[count - 1] = nxt
        else:
            starts[count] = pos
            ends[count] = nxt
            holes[count] = hole
            count += 1
        pos = nxt
    r = 0
    for i in range(count):
        if not holes[i]:
            r = fm_route_pread(&route, q.buf + (starts[i] - offset), ends[i] - starts[i],
                               starts[i])
            if r < 0:
                break
            if r < ends[i] - starts[i]:
                memset(q.buf + (starts[i] - offset) + r, 0, <size_t>(ends[i] - starts[i] - r))
            r = 0
    disk.c_leave(&route)
    if r < 0:
        return locked_error(c, cookie, nbd_errno(r), True)
    lock_send(c)
    for i in range(count):
        put64(head, <uint64_t>starts[i])
        if holes[i]:
            put32(head + 8, <uint32_t>(ends[i] - starts[i]))
            r = chunk(c, cookie, RF_DONE if i == count - 1 else 0, CHUNK_OFFSET_HOLE,
                      head, 12, NULL, 0)
        else:
            r = chunk(c, cookie, RF_DONE if i == count - 1 else 0, CHUNK_OFFSET_DATA,
                      head, 8, q.buf + (starts[i] - offset), ends[i] - starts[i])
        if r < 0:
            break
    pthread_mutex_unlock(&c.send_mu)
    return <int>r


cdef int do_block_status(conn_t *c, TrackedDisk disk, req_t *q) noexcept nogil:
    cdef fm_route route
    cdef int64_t pos = q.offset, end = q.offset + q.length, nxt
    cdef int count = 0, r
    cdef int maxn = 1 if q.flags & CMDF_REQ_ONE else MAX_EXTENTS
    cdef bint hole
    cdef char head[4]
    cdef char *buf
    if not c.meta:
        return locked_error(c, q.cookie, NBD_EINVAL, True)
    if grow(q, 8 * MAX_EXTENTS) < 0:
        return locked_error(c, q.cookie, NBD_ENOMEM, True)
    buf = q.buf
    # The gate: the answer comes from the descriptor requests use now (the
    # target after a pivot).
    r = disk.c_enter(&route)
    if r < 0:
        return locked_error(c, q.cookie, nbd_errno(r), True)
    while pos < end and count < maxn:
        nxt = next_extent(route.fd, route.is_block, pos, end, &hole)
        if nxt < 0:             # cannot tell: data, which is always right
            nxt = end
            hole = False
        if nxt <= pos:
            nxt = end
        if count and (get32(buf + 8 * (count - 1) + 4) == (STATE_HOLE | STATE_ZERO)) == hole:
            # the same state as the extent before (e.g. SEEK_DATA rounding)
            put32(buf + 8 * (count - 1),
                  get32(buf + 8 * (count - 1)) + <uint32_t>(nxt - pos))
        else:
            put32(buf + 8 * count, <uint32_t>(nxt - pos))
            put32(buf + 8 * count + 4, (STATE_HOLE | STATE_ZERO) if hole else 0)
            count += 1
        pos = nxt
    disk.c_leave(&route)
    put32(head, META_ID)
    lock_send(c)
    r = chunk(c, q.cookie, RF_DONE, CHUNK_BLOCK_STATUS, head, 4, buf, 8 * count)
    pthread_mutex_unlock(&c.send_mu)
    return r


cdef int do_write_zeroes(conn_t *c, TrackedDisk disk, uint16_t flags, int64_t offset,
                         int64_t length) noexcept nogil:
    """0 or -errno.  A hole is the fast way to zeros on files (and BLKZEROOUT
    on devices); NO_HOLE asks for allocated zeros instead."""
    cdef int r
    if flags & CMDF_FAST_ZERO:
        # Only a call that zeroes without writing a buffer is fast.
        if flags & CMDF_NO_HOLE:
            return -EOPNOTSUPP
        return disk.c_discard(offset, length)
    if not (flags & CMDF_NO_HOLE):
        r = disk.c_discard(offset, length)
        if r != -EOPNOTSUPP:
            return r
    return disk.c_write_zeroes(offset, length)


cdef int locked_error(conn_t *c, const char *cookie, uint32_t err,
                      bint structured) noexcept nogil:
    cdef int r
    lock_send(c)
    r = reply_error(c, cookie, err, structured)
    pthread_mutex_unlock(&c.send_mu)
    return r


cdef int locked_simple(conn_t *c, const char *cookie, int64_t r) noexcept nogil:
    """The simple reply of a request without data (r < 0 is its error),
    combined with those of other workers: it joins the pending replies, and
    the worker that finds no one sending sends them all in one call, again
    until none is left.  So a burst of writes ending together costs one
    sendmsg and no wait for the socket's lock.  0, or -1 when the socket
    failed (then the reply may not have gone out)."""
    cdef char *h
    cdef char out[PENDING_REPLIES * 16]
    cdef iovec v
    cdef int n, failed
    pthread_mutex_lock(&c.mu)
    # The sender may be slow (a client that reads its replies late) while
    # slots are reused: never more pending than the buffer holds.
    while c.npending == PENDING_REPLIES * 16 and not c.send_failed:
        if on_completer(c):
            pthread_mutex_unlock(&c.mu)
            comp_wait(c, False)
            pthread_mutex_lock(&c.mu)
        else:
            pthread_cond_wait(&c.taken, &c.mu)
    h = c.pending + c.npending
    put32(h, SIMPLE_MAGIC)
    put32(h + 4, nbd_errno(r) if r < 0 else 0)
    memcpy(h + 8, cookie, 8)
    c.npending += 16
    if c.sending:
        failed = c.send_failed
        pthread_mutex_unlock(&c.mu)
        return -1 if failed else 0
    c.sending = True
    while c.npending and not c.send_failed:
        n = c.npending
        memcpy(out, c.pending, <size_t>n)
        c.npending = 0
        pthread_cond_broadcast(&c.taken)
        pthread_mutex_unlock(&c.mu)
        lock_send(c)
        v.iov_base = out
        v.iov_len = <size_t>n
        failed = send_iov(c, &v, 1)
        pthread_mutex_unlock(&c.send_mu)
        pthread_mutex_lock(&c.mu)
        if failed < 0:
            c.send_failed = True
            pthread_cond_broadcast(&c.taken)
    c.sending = False
    failed = c.send_failed
    pthread_mutex_unlock(&c.mu)
    return -1 if failed else 0


cdef int serve_request(conn_t *c, TrackedDisk disk, req_t *q) noexcept nogil:
    """Serve one request and send its reply: 0, or -1 when the socket failed."""
    cdef int64_t r
    cdef uint16_t cmd = q.cmd
    if cmd == CMD_WRITE:
        if c.read_only:
            r = -EPERM
        elif q.bad or q.bad_flags:
            r = -EINVAL
        else:
            r = disk.c_write(q.buf, q.length, q.offset)
            if r >= 0 and q.flags & CMDF_FUA:
                r = disk.c_flush()
        return locked_simple(c, q.cookie, r)
    if cmd == CMD_READ:
        if q.bad or q.bad_flags or q.length > MAX_REQUEST:
            return locked_error(c, q.cookie, NBD_EINVAL, c.structured)
        return do_read(c, disk, q)
    if cmd == CMD_FLUSH:
        return locked_simple(c, q.cookie, -EINVAL if q.bad_flags else disk.c_flush())
    if cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES:
        if c.read_only:
            r = -EPERM
        elif q.bad or q.bad_flags:
            r = -EINVAL
        elif cmd == CMD_TRIM:
            r = disk.c_discard(q.offset, q.length)
            if r == -EOPNOTSUPP:
                r = 0           # a trim is advisory: nothing dropped is fine
        else:
            r = do_write_zeroes(c, disk, q.flags, q.offset, q.length)
        if r >= 0 and q.flags & CMDF_FUA:
            r = disk.c_flush()
        return locked_simple(c, q.cookie, r)
    if cmd == CMD_BLOCK_STATUS:
        if q.bad or q.bad_flags or q.length == 0:
            return locked_error(c, q.cookie, NBD_EINVAL, c.structured)
        if not c.structured:
            return locked_simple(c, q.cookie, -EINVAL)
        return do_block_status(c, disk, q)
    return locked_error(c, q.cookie, NBD_EINVAL, c.structured)


cdef void finish(conn_t *c, req_t *q, int sent) noexcept nogil:
    """A request is done: its slot (and budget) back to the reader."""
    pthread_mutex_lock(&c.mu)
    release(c, q, sent)
    pthread_mutex_unlock(&c.mu)


cdef void release(conn_t *c, req_t *q, int sent) noexcept nogil:
    """finish() with c.mu held."""
    if q.buf_len > KEEP_BUFFER:
        free(q.buf)
        q.buf = NULL
        q.buf_len = 0
    if sent < 0:
        c.send_failed = True
    c.inflight_bytes -= q.charged
    q.charged = 0
    q.next = c.free_slots
    c.free_slots = q
    c.busy -= 1
    if c.reader_waiting:
        pthread_cond_signal(&c.room)


cdef void *worker_main(void *arg) noexcept nogil:
    """A worker: serve queued requests until the connection ends."""
    cdef conn_t *c = <conn_t *>arg
    cdef req_t *q
    cdef int sent
    pthread_mutex_lock(&c.mu)
    while True:
        while c.queue_head == NULL and not c.stopping:
            c.idle += 1
            pthread_cond_wait(&c.work, &c.mu)
            c.idle -= 1
        q = c.queue_head
        if q == NULL:
            break               # stopping, nothing left
        c.queue_head = q.next
        if c.queue_head == NULL:
            c.queue_tail = NULL
        c.queued -= 1
        pthread_mutex_unlock(&c.mu)
        # The TrackedDisk outlives every worker: serve_connection holds it
        # and joins them before it returns.
        sent = serve_request(c, <TrackedDisk>c.disk, q)
        pthread_mutex_lock(&c.mu)
        release(c, q, sent)
    pthread_mutex_unlock(&c.mu)
    return NULL


cdef req_t *take_slot(conn_t *c, int64_t charge) noexcept nogil:
    """A free request slot, once the requests in flight leave room for
    `charge` more payload bytes (one request alone always fits)."""
    cdef req_t *q
    pthread_mutex_lock(&c.mu)
    while c.free_slots == NULL or (c.busy and c.inflight_bytes + charge > INFLIGHT_BYTES):
        c.reader_waiting = True
        pthread_cond_wait(&c.room, &c.mu)
        c.reader_waiting = False
    q = c.free_slots
    c.free_slots = q.next
    q.next = NULL
    q.charged = charge
    c.inflight_bytes += charge
    c.busy += 1
    pthread_mutex_unlock(&c.mu)
    return q


cdef void submit(conn_t *c, TrackedDisk disk, req_t *q) noexcept nogil:
    """Queue q for a worker; start one more when every worker is taken.  A
    pool that cannot start its first thread serves q here instead."""
    cdef bint spawn
    pthread_mutex_lock(&c.mu)
    if c.queue_tail == NULL:
        c.queue_head = q
    else:
        c.queue_tail.next = q
    c.queue_tail = q
    c.queued += 1
    if c.idle:
        pthread_cond_signal(&c.work)
    spawn = c.queued > c.idle and c.nthreads < MAX_INFLIGHT
    if spawn:
        if pthread_create(&c.threads[c.nthreads], NULL, worker_main, c) == 0:
            c.nthreads += 1
        elif c.nthreads == 0:
            # No worker at all (out of threads): serve it on this thread.
            c.queue_head = c.queue_tail = NULL
            c.queued = 0
            pthread_mutex_unlock(&c.mu)
            finish(c, q, serve_request(c, disk, q))
            return
    pthread_mutex_unlock(&c.mu)


# -- the ring: plain reads and writes without a thread each ------------------------
#
# A WRITE (without FUA) or a READ of data only, on a disk not in
# write-blocking mode and without a trace listener, is the whole of what a
# guest or fio sends in a run: the reader passes the gate for it, queues it
# on the connection's io_uring and goes on reading; the completer thread
# reaps it, marks a write's range dirty in the job's engine (as the tracked
# path does once a write landed), leaves the gate and sends the reply.  So a
# connection keeps MAX_INFLIGHT requests at the disk with two threads and
# one system call to submit each, as QEMU's server does.  Everything else
# (claims, flushes, zeroing, holes, block status, errors) goes to the pool.

cdef enum:
    RING_STOP = MAX_INFLIGHT    # the user_data of the completer's last entry


cdef bint ring_submit(conn_t *c, TrackedDisk disk, req_t *q) noexcept nogil:
    """Queue q on the ring; False when it is not for the ring (the pool
    serves it)."""
    cdef bint write = q.cmd == CMD_WRITE
    cdef int64_t nxt
    cdef uint64_t index = <uint64_t>(q - &c.slots[0])
    cdef uint64_t unused
    if not c.ring_ok or disk.trace_on or q.bad or q.bad_flags or q.length == 0:
        return False
    if write:
        if c.read_only or q.flags & CMDF_FUA:
            return False
    elif q.cmd != CMD_READ or q.length > MAX_REQUEST or grow(q, q.length) < 0:
        return False
    if disk.c_enter(&q.route) < 0:
        return False            # the pool answers the error
    if q.route.mirror_fd >= 0 or (write and q.route.al != NULL):
        # Write-blocking: claims, both sides.  An activity log: its extent
        # must be on disk before the write lands (tracked.pyx's path).
        disk.c_leave(&q.route)
        return False
    if not write and c.structured and not (q.flags & CMDF_DF) and not q.route.is_block:
        # All data when the first hole at or after the offset starts past
        # the end: one SEEK_HOLE (next_extent's SEEK_DATA first would be a
        # second system call on the reader's path, for every read).
        nxt = lseek(q.route.fd, q.offset, SEEK_HOLE)
        if 0 <= nxt < q.offset + q.length:
            disk.c_leave(&q.route)  # holes: OFFSET_HOLE chunks from the pool
            return False
    if write and q.route.engine == NULL:
        # As tracked.pyx counts it: a job that resumes a state file on this
        # disk later must know that a write went through untracked.
        fm_nbd_count(&disk.untracked)
    q.fd = q.route.dfd if q.route.dfd >= 0 and fm_dio_ok(q.buf, q.length, q.offset) \
        else q.route.fd
    if fm_ring_prep(&c.ring, FM_RING_WRITE if write else FM_RING_READ, q.fd, q.buf,
                    q.length, q.offset, index) < 0:
        disk.c_leave(&q.route)
        return False
    if fm_nbd_ring_enter(&c.ring) < 0:
        # Not taken: take it back, the pool serves it.
        fm_ring_unqueue(&c.ring, &unused, 1)
        disk.c_leave(&q.route)
        return False
    return True


cdef int64_t ring_end(conn_t *c, TrackedDisk disk, req_t *q, int64_t r) noexcept nogil:
    """End the I/O of a request the ring served (r: its result): the rest
    of a short transfer, the mark of a write, the gate left.  Its result."""
    cdef int64_t n
    cdef bint write = q.cmd == CMD_WRITE
    if r == -EINVAL and q.fd == q.route.dfd and q.fd != q.route.fd:
        # O_DIRECT refused this one (alignment above a page): buffered.
        q.fd = q.route.fd
        r = 0
    if 0 <= r < q.length:
        # A short transfer, or the buffered retry: the rest in this thread.
        if write:
            n = pwrite_full(q.fd, q.buf + r, q.length - r, q.offset + r)
        else:
            n = pread_full(q.fd, q.buf + r, q.length - r, q.offset + r)
            if 0 <= n < q.length - r:      # the end of a file that shrank: zeros
                memset(q.buf + r + n, 0, <size_t>(q.length - r - n))
                n = q.length - r
        r = n if n < 0 else r + n
    if write and q.route.engine != NULL:
        # Marked once it landed (or failed, maybe in part): invariant 2.
        fm_engine_mark(q.route.engine, q.offset, q.length)
    disk.c_leave(&q.route)
    return r


cdef int ring_reply(conn_t *c, req_t *q) noexcept nogil:
    """Send the reply of a request ring_end ended."""
    cdef int sent
    cdef int64_t r = q.result
    cdef char head[8]
    if q.cmd == CMD_WRITE:
        return locked_simple(c, q.cookie, r if r < 0 else 0)
    if r < 0:
        return locked_error(c, q.cookie, nbd_errno(r), c.structured)
    lock_send(c)
    if not c.structured:
        sent = simple_reply(c, q.cookie, 0, q.buf, q.length)
    else:
        put64(head, <uint64_t>q.offset)
        sent = chunk(c, q.cookie, RF_DONE, CHUNK_OFFSET_DATA, head, 8, q.buf, q.length)
    pthread_mutex_unlock(&c.send_mu)
    return sent


cdef void comp_take(conn_t *c) noexcept nogil:
    """The completer: end the I/O of every request the ring completed; their
    replies wait in c.deferred, in that order."""
    cdef uint64_t index
    cdef int res
    cdef req_t *q
    while fm_nbd_ring_reap(&c.ring, &index, &res):
        if index >= RING_STOP:
            c.ring_stopped = True
            continue
        q = &c.slots[index]
        q.result = ring_end(c, <TrackedDisk>c.disk, q, res)
        q.next = NULL
        if c.deferred_tail == NULL:
            c.deferred_head = q
        else:
            c.deferred_tail.next = q
        c.deferred_tail = q


cdef void *completer_main(void *arg) noexcept nogil:
    """Reap the ring until RING_STOP: every request's I/O is ended as soon
    as it is reaped, then the replies go out (comp_take may end more while
    one of them waits for the socket)."""
    cdef conn_t *c = <conn_t *>arg
    cdef req_t *q
    while True:
        q = c.deferred_head
        if q == NULL:
            if c.ring_stopped:
                return NULL
            if fm_nbd_ring_wait(&c.ring) < 0:
                # Not seen with a working ring; requests are in flight, so wait
                # and look again rather than leave them unanswered.
                usleep(1000)
            comp_take(c)
            continue
        c.deferred_head = q.next
        if c.deferred_head == NULL:
            c.deferred_tail = NULL
        finish(c, q, ring_reply(c, q))


cdef void drain(conn_t *c) noexcept nogil:
    """Wait for every request taken to be served and answered, then end the
    workers and the completer."""
    cdef int i
    cdef uint64_t unused
    pthread_mutex_lock(&c.mu)
    while c.busy:
        c.reader_waiting = True
        pthread_cond_wait(&c.room, &c.mu)
        c.reader_waiting = False
    c.stopping = True
    pthread_cond_broadcast(&c.work)
    pthread_mutex_unlock(&c.mu)
    for i in range(c.nthreads):
        pthread_join(c.threads[i], NULL)
    c.nthreads = 0
    if c.ring_ok:
        # Nothing is on the ring now: its last entry ends the completer.
        while fm_nbd_ring_nop(&c.ring, RING_STOP) < 0 or fm_nbd_ring_enter(&c.ring) < 0:
            fm_ring_unqueue(&c.ring, &unused, 1)
            usleep(1000)        # the kernel is short of memory: try again
        pthread_join(c.completer, NULL)
        c.ring_ok = False


cdef uint16_t allowed_flags(conn_t *c, uint16_t cmd) noexcept nogil:
    """The flags a request of `cmd` may carry; any other is NBD_EINVAL and
    nothing is done (a flag not understood must not be ignored).  FUA on
    any command, as QEMU's server allows."""
    if cmd == CMD_READ:
        return CMDF_FUA | (CMDF_DF if c.structured else 0)
    if cmd == CMD_WRITE_ZEROES:
        return CMDF_FUA | CMDF_NO_HOLE | CMDF_FAST_ZERO
    if cmd == CMD_BLOCK_STATUS:
        return CMDF_FUA | CMDF_REQ_ONE
    return CMDF_FUA


cdef int transmission(conn_t *c, TrackedDisk disk) noexcept nogil:
    """END_DISCONNECT, END_MALFORMED or END_IO, once every request read
    before the end was served and answered (NBD_CMD_DISC asks for that)."""
    cdef char h[28]
    cdef uint16_t flags, cmd
    cdef uint32_t length
    cdef int64_t offset
    cdef int end
    cdef bint failed
    cdef req_t *q
    while True:
        pthread_mutex_lock(&c.mu)
        failed = c.send_failed
        pthread_mutex_unlock(&c.mu)
        if failed:
            end = END_IO
            break
        if recv_all(c.sock, h, 28) < 0:
            end = END_IO
            break
        if get32(h) != REQUEST_MAGIC:
            end = END_MALFORMED
            break
        flags = get16(h + 4)
        cmd = get16(h + 6)
        offset = <int64_t>get64(h + 16)
        length = get32(h + 24)
        if cmd == CMD_DISC:
            end = END_DISCONNECT
            break
        if cmd == CMD_WRITE and length > MAX_REQUEST:
            end = END_MALFORMED    # its payload cannot be skipped safely
            break
        if get64(h + 16) > <uint64_t>c.size:
            offset = -1         # out of range, whatever the command
        q = take_slot(c, length if (cmd == CMD_WRITE or cmd == CMD_READ)
                      and length <= MAX_REQUEST else 0)
        memcpy(q.cookie, h + 8, 8)
        q.flags = flags
        q.cmd = cmd
        q.offset = offset
        q.length = length
        q.bad = offset < 0 or <int64_t>length > c.size - offset
        q.bad_flags = (flags & ~allowed_flags(c, cmd)) != 0
        if cmd == CMD_WRITE:
            if grow(q, length) < 0 or recv_all(c.sock, q.buf, length) < 0:
                finish(c, q, 0)
                end = END_IO
                break
        if not ring_submit(c, disk, q):
            submit(c, disk, q)
    drain(c)
    return end


def serve_connection(int sock, TrackedDisk disk not None, bytes name not None,
                     bint read_only=False):
    """Serve one client on the connected socket `sock` (not closed here)
    until it leaves: END_DISCONNECT, END_MALFORMED or END_IO.  Runs without
    the GIL."""
    cdef conn_t c
    cdef int r, i
    memset(&c, 0, sizeof(c))
    c.sock = sock
    c.disk = <void *>disk
    c.size = disk.size
    c.name = name
    c.name_len = <uint32_t>len(name)
    c.read_only = read_only
    c.tflags = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES | TF_SEND_DF | TF_CAN_MULTI_CONN
                | TF_SEND_FAST_ZERO)
    if read_only:
        c.tflags = c.tflags | TF_READ_ONLY
    for i in range(MAX_INFLIGHT):
        c.slots[i].next = c.free_slots
        c.free_slots = &c.slots[i]
    pthread_mutex_init(&c.mu, NULL)
    pthread_mutex_init(&c.send_mu, NULL)
    pthread_cond_init(&c.work, NULL)
    pthread_cond_init(&c.room, NULL)
    pthread_cond_init(&c.taken, NULL)
    with nogil:
        r = handshake(&c)
        if r == 0:
            if fm_ring_init(&c.ring, 2 * MAX_INFLIGHT) == 0:
                if fm_ring_supports(&c.ring, FM_CALLS_PLAIN) == 0 and pthread_create(
                        &c.completer, NULL, completer_main, &c) == 0:
                    c.ring_ok = True
                else:
                    fm_ring_exit(&c.ring)
            r = transmission(&c, disk)
            fm_ring_exit(&c.ring)     # nothing when it failed or ended (fd -1)
        elif r == 1:
            r = END_DISCONNECT
        else:
            r = END_MALFORMED
        for i in range(MAX_INFLIGHT):
            free(c.slots[i].buf)
    pthread_cond_destroy(&c.taken)
    pthread_cond_destroy(&c.room)
    pthread_cond_destroy(&c.work)
    pthread_mutex_destroy(&c.send_mu)
    pthread_mutex_destroy(&c.mu)
    return r
