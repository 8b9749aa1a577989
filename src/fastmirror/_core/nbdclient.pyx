# cython: language_level=3
"""A client of an NBD export, in C without the GIL (nbdclient.h).

NbdClient connects (TCP with TCP_NODELAY, or a unix socket), runs the
fixed newstyle handshake with structured replies and NBD_OPT_GO asking for
NBD_INFO_BLOCK_SIZE, and then serves reads, writes, zeroing and flushes
from any number of threads at once, many requests in flight per
connection, over several connections when the server allows multi-conn.
The copy engine calls the C functions directly (nbdclient.pxd); the
methods here are for the job (checks before the copy, verify, reconnect)
and the tests.
"""

import os

from libc.stdint cimport uint64_t
from libc.stdlib cimport calloc, free
from libc.string cimport strlen

cdef extern from "nbdclient.h" nogil:
    void fm_nbd_init(fm_nbd *n)
    void fm_nbd_destroy(fm_nbd *n)
    void fm_nbd_close(fm_nbd *n)
    int fm_nbd_open(fm_nbd *n, int want, char *err, size_t errlen)
    int fm_nbd_reconnect(fm_nbd *n, char *err, size_t errlen)
    unsigned fm_nbd_dead_mask(fm_nbd *n)
    int fm_nbd_where(fm_nbd *n, const char *path, const char *host, const char *port,
                     const char *name, int timeout_ms)
    uint64_t fm_nbd_requests(fm_nbd *n)

MAX_CONNECTIONS = FM_NBD_MAX_CONNS


cdef _nbd_error(int r, str what, bytes msg=b""):
    text = msg.decode("utf-8", "replace") if msg else os.strerror(-r)
    return OSError(-r, "%s: %s" % (what, text) if what else text)


cdef class NbdClient:
    """A connection (or several) to one NBD export.

    NbdClient(name="", host=None, port=10809, socket=None, connections=1,
    timeout=10.0, where=None): a unix socket path or a host; `connections`
    is how many to open when the server advertises multi-conn (one
    otherwise); `timeout` bounds connecting and the handshake (a server that
    does not answer is refused), not the requests.  Raises OSError with the
    server's reason (ENOENT: no such export; ETIMEDOUT; ECONNREFUSED...)."""

    def __cinit__(self):
        self.c = <fm_nbd *>calloc(1, sizeof(fm_nbd))
        if self.c == NULL:
            raise MemoryError()
        fm_nbd_init(self.c)

    def __init__(self, str name="", host=None, port=10809, socket=None, int connections=1,
                 double timeout=10.0, where=None):
        cdef char err[512]
        cdef int r, want = connections
        cdef bytes bname, bpath = None, bhost = None, bport = None
        if (host is None) == (socket is None):
            raise ValueError("an NBD client needs a host or a unix socket, not both")
        if connections < 1 or connections > FM_NBD_MAX_CONNS:
            raise ValueError("connections must be in [1, %d]" % FM_NBD_MAX_CONNS)
        bname = name.encode()
        if socket is not None:
            bpath = os.fsencode(socket)
        else:
            bhost = str(host).encode("idna")
            bport = str(int(port)).encode()
        for b in (bname, bpath, bhost):
            if b is not None and b"\0" in b:
                raise ValueError("NUL in an NBD name, host or socket path")
        r = fm_nbd_where(self.c, <const char *>NULL if bpath is None else <const char *>bpath,
                         <const char *>NULL if bhost is None else <const char *>bhost,
                         <const char *>NULL if bport is None else <const char *>bport,
                         <const char *>bname, max(1, <int>(timeout * 1000)))
        if r < 0:
            raise ValueError("NBD export name, host or socket path too long")
        self.export_name = name
        self.where = where or (("nbd+unix:///%s?socket=%s" % (name, socket)) if socket
                               else "nbd://%s:%s/%s" % (host, port, name))
        err[0] = 0
        with nogil:
            r = fm_nbd_open(self.c, want, err, sizeof(err))
        if r < 0:
            with nogil:
                fm_nbd_close(self.c)
            raise _nbd_error(r, self.where, err[:strlen(err)])

    def __dealloc__(self):
        if self.c != NULL:
            with nogil:
                fm_nbd_destroy(self.c)
            free(self.c)
            self.c = NULL

    # -- what the server said ----------------------------------------------

    @property
    def size(self):
        return self.c.size

    @property
    def read_only(self):
        return bool(self.c.flags & FM_TF_READ_ONLY)

    @property
    def multi_conn(self):
        return bool(self.c.flags & FM_TF_CAN_MULTI_CONN)

    @property
    def can_flush(self):
        return bool(self.c.flags & FM_TF_SEND_FLUSH)

    @property
    def can_zero(self):
        return bool(self.c.flags & FM_TF_SEND_WRITE_ZEROES)

    @property
    def can_fast_zero(self):
        return bool(self.c.flags & FM_TF_SEND_FAST_ZERO)

    @property
    def can_trim(self):
        return bool(self.c.flags & FM_TF_SEND_TRIM)

    @property
    def structured(self):
        return bool(self.c.structured)

    @property
    def block_sizes(self):
        """(minimum, preferred, maximum payload) in effect, bytes."""
        return (self.c.min_block, self.c.pref_block, self.c.max_payload)

    @property
    def connections(self):
        return self.c.nconns

    @property
    def requests(self):
        """Requests sent so far, over all connections."""
        cdef uint64_t n
        with nogil:
            n = fm_nbd_requests(self.c)
        return n

    @property
    def dead_connections(self):
        """How many connections failed and were not reconnected."""
        cdef unsigned m
        with nogil:
            m = fm_nbd_dead_mask(self.c)
        return bin(m).count("1")

    # -- I/O -----------------------------------------------------------------

    def _check(self):
        if self.c.nconns == 0:
            raise ValueError("I/O on a closed NBD client")

    def pread(self, uint64_t length, uint64_t offset):
        """length bytes at offset (aligned to the minimum block)."""
        cdef int r
        cdef bytearray out = bytearray(length)
        cdef char *p = out
        self._check()
        with nogil:
            r = fm_nbd_read(self.c, p, offset, length)
        if r < 0:
            raise _nbd_error(r, "%s: read at %d" % (self.where, offset))
        return bytes(out)

    def pwrite(self, const unsigned char[::1] data, uint64_t offset):
        cdef int r
        cdef uint64_t n = data.shape[0]
        self._check()
        if n == 0:
            return 0
        with nogil:
            r = fm_nbd_write(self.c, <const char *>&data[0], offset, n)
        if r < 0:
            raise _nbd_error(r, "%s: write at %d" % (self.where, offset))
        return n

    def write_zeroes(self, uint64_t offset, uint64_t length, bint unmap=False,
                     bint fast=False):
        cdef int r
        self._check()
        with nogil:
            r = fm_nbd_zero(self.c, offset, length, unmap, fast)
        if r < 0:
            raise _nbd_error(r, "%s: write zeroes at %d" % (self.where, offset))

    def flush(self):
        cdef int r
        self._check()
        with nogil:
            r = fm_nbd_flush(self.c)
        if r < 0:
            raise _nbd_error(r, "%s: flush" % self.where)

    def reconnect(self):
        """Connect again the connections that failed (the server went away
        and came back): their handshake must show the same export.  Raises
        OSError when it cannot; returns how many were reconnected."""
        cdef int r
        cdef char err[512]
        cdef unsigned m
        self._check()
        err[0] = 0
        with nogil:
            m = fm_nbd_dead_mask(self.c)
            r = fm_nbd_reconnect(self.c, err, sizeof(err)) if m else 0
        if r < 0:
            raise _nbd_error(r, self.where, err[:strlen(err)])
        return bin(m).count("1")

    def take_lost(self):
        """Did a connection fail since the last call?"""
        cdef int r
        with nogil:
            r = fm_nbd_take_lost(self.c)
        return bool(r)

    def close(self):
        """Disconnect (NBD_CMD_DISC).  No request may be in progress: the
        engine using the client is stopped first.  Safe to call again."""
        with nogil:
            fm_nbd_close(self.c)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __repr__(self):
        return "<NbdClient %s size=%d connections=%d>" % (
            self.where, self.c.size, self.c.nconns)
