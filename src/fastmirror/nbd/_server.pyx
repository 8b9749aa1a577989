# cython: language_level=3
"""One NBD connection, served in C without the GIL.

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
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memcpy, memset, memcmp
from posix.types cimport off_t
from fastmirror._core.tracked cimport TrackedDisk, fm_route
from fastmirror._core.blockio cimport pread_full

cdef extern from "<endian.h>" nogil:
    uint16_t htobe16(uint16_t)
    uint32_t htobe32(uint32_t)
    uint64_t htobe64(uint64_t)
    uint16_t be16toh(uint16_t)
    uint32_t be32toh(uint32_t)
    uint64_t be64toh(uint64_t)

cdef extern from "<sys/socket.h>" nogil:
    ssize_t send(int fd, const void *buf, size_t n, int flags)
    ssize_t recv(int fd, void *buf, size_t n, int flags)
    int MSG_NOSIGNAL
    int MSG_MORE
    int MSG_WAITALL

cdef extern from "<unistd.h>" nogil:
    off_t lseek(int fd, off_t offset, int whence)
    int SEEK_DATA
    int SEEK_HOLE

cdef enum:
    MAX_REQUEST = 32 << 20      # largest READ/WRITE payload
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
    char *buf                   # request payloads, grown on demand
    int64_t buf_len


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


cdef int grow(conn_t *c, int64_t n) noexcept nogil:
    cdef char *p
    if n <= c.buf_len:
        return 0
    p = <char *>realloc(c.buf, <size_t>n)
    if p == NULL:
        return -1
    c.buf = p
    c.buf_len = n
    return 0


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

cdef int simple_reply(conn_t *c, const char *cookie, uint32_t err, const void *data,
                      int64_t n) noexcept nogil:
    cdef char h[16]
    put32(h, SIMPLE_MAGIC)
    put32(h + 4, err)
    memcpy(h + 8, cookie, 8)
    if send_all(c.sock, h, 16, n > 0) < 0:
        return -1
    if n > 0 and send_all(c.sock, data, <size_t>n, False) < 0:
        return -1
    return 0


cdef int chunk(conn_t *c, const char *cookie, uint16_t flags, uint16_t ctype,
               const void *head, uint32_t head_len, const void *data,
               int64_t n) noexcept nogil:
    """One structured reply chunk: header, head (offset, context...), data."""
    cdef char h[20]
    put32(h, STRUCTURED_MAGIC)
    put16(h + 4, flags)
    put16(h + 6, ctype)
    memcpy(h + 8, cookie, 8)
    put32(h + 16, <uint32_t>(head_len + n))
    if send_all(c.sock, h, 20, head_len + n > 0) < 0:
        return -1
    if head_len and send_all(c.sock, head, head_len, n > 0) < 0:
        return -1
    if n > 0 and send_all(c.sock, data, <size_t>n, False) < 0:
        return -1
    return 0


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


cdef int do_read(conn_t *c, TrackedDisk disk, const char *cookie, uint16_t flags,
                 int64_t offset, int64_t length) noexcept nogil:
    """Simple replies, or with DF: the data in one piece.  Structured
    replies: holes (SEEK_DATA/SEEK_HOLE) as OFFSET_HOLE chunks, not sent."""
    cdef fm_route route
    cdef int64_t r, pos, nxt, end = offset + length
    cdef int64_t starts[READ_EXTENTS]
    cdef int64_t ends[READ_EXTENTS]
    cdef bint holes[READ_EXTENTS]
    cdef int count = 0, i
    cdef bint hole
    cdef char head[12]
    if grow(c, length) < 0:
        return reply_error(c, cookie, NBD_ENOMEM, c.structured)
    if not c.structured or flags & CMDF_DF or length == 0:
        r = disk.c_read(c.buf, length, offset)
        if r < 0:
            return reply_error(c, cookie, nbd_errno(r), c.structured)
        if r < length:          # the file shrank under us: reads past it are zeros
            memset(c.buf + r, 0, <size_t>(length - r))
        if not c.structured:
            return simple_reply(c, cookie, 0, c.buf, length)
        put64(head, <uint64_t>offset)
        return chunk(c, cookie, RF_DONE, CHUNK_OFFSET_DATA, head, 8, c.buf, length)
    # Map and read through one pass of the gate, like c_read: never across
    # a pivot.  The socket is written after leaving it (a slow client must
    # not hold up the job's drain).
    r = disk.c_enter(&route)
    if r < 0:
        return reply_error(c, cookie, nbd_errno(r), True)
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
            r = pread_full(route.fd, c.buf + (starts[i] - offset), ends[i] - starts[i], starts[i])
            if r < 0:
                break
            if r < ends[i] - starts[i]:
                memset(c.buf + (starts[i] - offset) + r, 0, <size_t>(ends[i] - starts[i] - r))
            r = 0
    disk.c_leave(&route)
    if r < 0:
        return reply_error(c, cookie, nbd_errno(r), True)
    for i in range(count):
        put64(head, <uint64_t>starts[i])
        if holes[i]:
            put32(head + 8, <uint32_t>(ends[i] - starts[i]))
            r = chunk(c, cookie, RF_DONE if i == count - 1 else 0, CHUNK_OFFSET_HOLE,
                      head, 12, NULL, 0)
        else:
            r = chunk(c, cookie, RF_DONE if i == count - 1 else 0, CHUNK_OFFSET_DATA,
                      head, 8, c.buf + (starts[i] - offset), ends[i] - starts[i])
        if r < 0:
            return r
    return 0


cdef int do_block_status(conn_t *c, TrackedDisk disk, const char *cookie, uint16_t flags,
                         int64_t offset, int64_t length) noexcept nogil:
    cdef fm_route route
    cdef int64_t pos = offset, end = offset + length, nxt
    cdef int count = 0, r
    cdef int maxn = 1 if flags & CMDF_REQ_ONE else MAX_EXTENTS
    cdef bint hole
    cdef char head[4]
    if not c.meta:
        return reply_error(c, cookie, NBD_EINVAL, True)
    if grow(c, 8 * MAX_EXTENTS) < 0:
        return reply_error(c, cookie, NBD_ENOMEM, True)
    # The gate: the answer comes from the descriptor requests use now (the
    # target after a pivot).
    r = disk.c_enter(&route)
    if r < 0:
        return reply_error(c, cookie, nbd_errno(r), True)
    while pos < end and count < maxn:
        nxt = next_extent(route.fd, route.is_block, pos, end, &hole)
        if nxt < 0:             # cannot tell: data, which is always right
            nxt = end
            hole = False
        if nxt <= pos:
            nxt = end
        if count and (get32(c.buf + 8 * (count - 1) + 4) == (STATE_HOLE | STATE_ZERO)) == hole:
            # the same state as the extent before (e.g. SEEK_DATA rounding)
            put32(c.buf + 8 * (count - 1),
                  get32(c.buf + 8 * (count - 1)) + <uint32_t>(nxt - pos))
        else:
            put32(c.buf + 8 * count, <uint32_t>(nxt - pos))
            put32(c.buf + 8 * count + 4, (STATE_HOLE | STATE_ZERO) if hole else 0)
            count += 1
        pos = nxt
    disk.c_leave(&route)
    put32(head, META_ID)
    return chunk(c, cookie, RF_DONE, CHUNK_BLOCK_STATUS, head, 4, c.buf, 8 * count)


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
    """END_DISCONNECT, END_MALFORMED or END_IO."""
    cdef char h[28]
    cdef uint16_t flags, cmd
    cdef uint32_t length
    cdef int64_t offset, r
    cdef const char *cookie = h + 8
    cdef bint bad, bad_flags
    while True:
        if recv_all(c.sock, h, 28) < 0:
            return END_IO
        if get32(h) != REQUEST_MAGIC:
            return END_MALFORMED
        flags = get16(h + 4)
        cmd = get16(h + 6)
        offset = <int64_t>get64(h + 16)
        length = get32(h + 24)
        if get64(h + 16) > <uint64_t>c.size:
            offset = -1         # out of range, whatever the command
        bad = offset < 0 or <int64_t>length > c.size - offset
        bad_flags = (flags & ~allowed_flags(c, cmd)) != 0

        if cmd == CMD_WRITE:
            if length > MAX_REQUEST:
                return END_MALFORMED    # its payload cannot be skipped safely
            if grow(c, length) < 0 or recv_all(c.sock, c.buf, length) < 0:
                return END_IO
            if c.read_only:
                r = -EPERM
            elif bad or bad_flags:
                r = -EINVAL
            else:
                r = disk.c_write(c.buf, length, offset)
                if r >= 0 and flags & CMDF_FUA:
                    r = disk.c_flush()
            if simple_reply(c, cookie, nbd_errno(r) if r < 0 else 0, NULL, 0) < 0:
                return END_IO
        elif cmd == CMD_READ:
            if bad or bad_flags or length > MAX_REQUEST:
                r = reply_error(c, cookie, NBD_EINVAL, c.structured)
            else:
                r = do_read(c, disk, cookie, flags, offset, length)
            if r < 0:
                return END_IO
        elif cmd == CMD_DISC:
            return END_DISCONNECT
        elif cmd == CMD_FLUSH:
            r = -EINVAL if bad_flags else disk.c_flush()
            if simple_reply(c, cookie, nbd_errno(r) if r < 0 else 0, NULL, 0) < 0:
                return END_IO
        elif cmd == CMD_TRIM or cmd == CMD_WRITE_ZEROES:
            if c.read_only:
                r = -EPERM
            elif bad or bad_flags:
                r = -EINVAL
            elif cmd == CMD_TRIM:
                r = disk.c_discard(offset, length)
                if r == -EOPNOTSUPP:
                    r = 0       # a trim is advisory: nothing dropped is fine
            else:
                r = do_write_zeroes(c, disk, flags, offset, length)
            if r >= 0 and flags & CMDF_FUA:
                r = disk.c_flush()
            if simple_reply(c, cookie, nbd_errno(r) if r < 0 else 0, NULL, 0) < 0:
                return END_IO
        elif cmd == CMD_BLOCK_STATUS:
            if bad or bad_flags or length == 0:
                r = reply_error(c, cookie, NBD_EINVAL, c.structured)
            elif not c.structured:
                r = simple_reply(c, cookie, NBD_EINVAL, NULL, 0)
            else:
                r = do_block_status(c, disk, cookie, flags, offset, length)
            if r < 0:
                return END_IO
        else:
            if reply_error(c, cookie, NBD_EINVAL, c.structured) < 0:
                return END_IO


def serve_connection(int sock, TrackedDisk disk not None, bytes name not None,
                     bint read_only=False):
    """Serve one client on the connected socket `sock` (not closed here)
    until it leaves: END_DISCONNECT, END_MALFORMED or END_IO.  Runs without
    the GIL."""
    cdef conn_t c
    cdef int r
    memset(&c, 0, sizeof(c))
    c.sock = sock
    c.size = disk.size
    c.name = name
    c.name_len = <uint32_t>len(name)
    c.read_only = read_only
    c.tflags = (TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_TRIM
                | TF_SEND_WRITE_ZEROES | TF_SEND_DF | TF_CAN_MULTI_CONN
                | TF_SEND_FAST_ZERO)
    if read_only:
        c.tflags = c.tflags | TF_READ_ONLY
    with nogil:
        r = handshake(&c)
        if r == 0:
            r = transmission(&c, disk)
        elif r == 1:
            r = END_DISCONNECT
        else:
            r = END_MALFORMED
        free(c.buf)
    return r
