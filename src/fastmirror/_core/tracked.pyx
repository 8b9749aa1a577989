# cython: language_level=3
"""The tracked write path in C: gate, claim, write, mark (see tracked.pxd).

A request through TrackedDisk never takes the GIL: the Python handle
(job/source.py, TrackedSource) releases it around one c_* call, and a C caller (the
NBD export) calls the c_* methods directly.

Locking: `mu` guards the gate, the descriptors and the counters; it is never
held during I/O, nor while the engine's lock is taken (claims and marks are
made after leaving it), so the lock order is mu, then nothing.  The
descriptors a request took at the gate stay open until it leaves: pivot()
runs with the gate closed (no request inside), stop_mirroring() and close()
wait for the requests that use what they close.
"""

cimport cython

from libc.errno cimport EBADF, EINVAL, EOPNOTSUPP
from libc.stdint cimport int64_t
from libc.stdlib cimport calloc, malloc, free
from posix.uio cimport iovec
from posix.unistd cimport close as c_close
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from fastmirror._core.engine cimport fm_claim, fm_engine_claim, fm_engine_unclaim, fm_engine_mark
from fastmirror._core.actlog cimport fm_al_begin, fm_al_end
from fastmirror._core.blockio cimport pread_full, pwrite_full, pwritev_full, flush_fd, zero_range
from fastmirror._core.sync cimport (pthread_mutex_init, pthread_mutex_destroy,
                               pthread_mutex_lock, pthread_mutex_unlock,
                               pthread_cond_init, pthread_cond_destroy, pthread_cond_wait,
                               pthread_cond_broadcast)

# What a request does to each side.
cdef enum:
    OP_WRITE = 0
    OP_ZEROES = 1       # write zeros (allocated on files)
    OP_DISCARD = 2      # a hole on files; zeros on block devices

cdef enum:
    ZERO_BUF = 1 << 20  # zeros written per call where no zeroing call exists
    AL_SPAN = 8         # with an activity log: extents per piece of a large request
    RESPLIT = -1000000  # _request_one: a log came since the split, split again

cdef extern from *:
    """
    static inline void fm_tracked_count(int64_t *p) {
        __atomic_fetch_add(p, 1, __ATOMIC_RELAXED);
    }
    """
    void fm_tracked_count(int64_t *p) nogil


cdef int _iov_slice(const iovec *iov, int iovcnt, int64_t skip, int64_t length,
                    iovec *out) noexcept nogil:
    """The iovecs of bytes [skip, skip+length) of iov into out (room for
    iovcnt entries); their count."""
    cdef int i, n = 0
    cdef int64_t vlen, take
    for i in range(iovcnt):
        if length <= 0:
            break
        vlen = <int64_t>iov[i].iov_len
        if skip >= vlen:
            skip -= vlen
            continue
        take = vlen - skip
        if take > length:
            take = length
        out[n].iov_base = <char *>iov[i].iov_base + skip
        out[n].iov_len = <size_t>take
        n += 1
        length -= take
        skip = 0
    return n

# Trace events (the hook tests use to see claims and marks as they happen).
cdef enum:
    C_CLAIM_WAIT = 0        # before waiting for the claim
    C_CLAIM_HELD = 1        # claimed: the write to both sides starts
    C_CLAIM_RELEASE = 2     # about to release
    C_MARK = 3              # about to mark: the write has landed

CLAIM_WAIT = C_CLAIM_WAIT
CLAIM_HELD = C_CLAIM_HELD
CLAIM_RELEASE = C_CLAIM_RELEASE
MARK = C_MARK


cdef int _zero(int fd, bint is_block, int64_t offset, int64_t length, bint discard) noexcept nogil:
    """Make [offset, offset+length) read as zeros; 0 or -errno.  Where the
    file system or device has no zeroing call, write_zeroes writes zeros and
    discard fails with -EOPNOTSUPP (a discard may not cost a full write)."""
    cdef int r = zero_range(fd, offset, length, is_block, discard)
    cdef int64_t n, w, done = 0
    cdef void *zeros
    if r != -EOPNOTSUPP:
        return r
    if discard:
        return -EOPNOTSUPP
    n = length if length < ZERO_BUF else ZERO_BUF
    zeros = calloc(<size_t>(n if n > 0 else 1), 1)
    if zeros == NULL:
        return -12     # ENOMEM
    while done < length:
        w = pwrite_full(fd, zeros, n if length - done > n else length - done, offset + done)
        if w < 0:
            free(zeros)
            return <int>w
        done += w
    free(zeros)
    return 0


cdef bint _iov_dio_ok(const iovec *iov, int iovcnt, int64_t offset) noexcept nogil:
    cdef int i
    if offset & (FM_DIO_ALIGN - 1):
        return False
    for i in range(iovcnt):
        if not fm_dio_ok(iov[i].iov_base, <int64_t>iov[i].iov_len, 0):
            return False
    return True


cdef int64_t _apply(int op, int fd, int dfd, bint is_block, const iovec *iov, int iovcnt,
                    int64_t offset, int64_t length) noexcept nogil:
    cdef int64_t n
    if op == OP_WRITE:
        if dfd >= 0 and _iov_dio_ok(iov, iovcnt, offset):
            n = pwritev_full(dfd, iov, iovcnt, offset)
            # A device whose O_DIRECT alignment is above a page refuses with
            # EINVAL before anything is written: the buffered descriptor can.
            if n != -EINVAL:
                return n
        return pwritev_full(fd, iov, iovcnt, offset)
    cdef int r = _zero(fd, is_block, offset, length, op == OP_DISCARD)
    return r if r < 0 else length


cdef int64_t fm_route_pread(const fm_route *r, void *buf, int64_t length,
                            int64_t offset) noexcept nogil:
    """A read through the route's O_DIRECT twin when it fits, else buffered."""
    cdef int64_t n
    if r.dfd >= 0 and fm_dio_ok(buf, length, offset):
        n = pread_full(r.dfd, buf, length, offset)
        if n != -EINVAL:
            return n
    return pread_full(r.fd, buf, length, offset)


def _open_twin(int fd):
    """An O_DIRECT descriptor of the file fd is open on (same access mode),
    or -1 where the filesystem refuses O_DIRECT (EINVAL) or /proc is missing."""
    import fcntl
    import os
    direct = getattr(os, "O_DIRECT", 0)
    if fd < 0 or not direct:
        return -1
    mode = fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE
    try:
        return os.open("/proc/self/fd/%d" % fd, mode | direct | os.O_CLOEXEC)
    except OSError:
        return -1


@cython.final
cdef class TrackedDisk:
    """A disk of `size` bytes whose writes are tracked for a CopyEngine.

    TrackedDisk(size, engine): writes are marked dirty in `engine` (a
    CopyEngine covering the same size) until stop_tracking() or pivot().
    The descriptors it is given (attach, start_mirroring, pivot) are its own:
    it closes them."""

    def __cinit__(self):
        self.fd = -1
        self.dfd = -1
        self.mirror_fd = -1
        pthread_mutex_init(&self.mu, NULL)
        pthread_cond_init(&self.cv, NULL)
        self.ready = True

    def __init__(self, int64_t size, engine):
        if self.size or self.engine_ref is not None:
            raise RuntimeError("TrackedDisk is already initialised")
        if size < 0:
            raise ValueError("negative disk size %d" % size)
        self.size = size
        if engine is not None:      # None: untracked until track()
            self._check_engine(engine)
            self.engine_ref = engine
            self.engine = <void *>engine

    cdef int _check_engine(self, engine) except -1:
        from fastmirror._core.engine import CopyEngine
        if not isinstance(engine, CopyEngine):
            raise TypeError("engine must be a CopyEngine, not %r" % type(engine).__name__)
        if engine.size != self.size:
            raise ValueError("the engine covers %d bytes, the disk %d" % (engine.size, self.size))
        return 0

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
        if self.dfd >= 0:
            c_close(self.dfd)
        if self.mirror_fd >= 0:
            c_close(self.mirror_fd)
        if self.ready:
            pthread_cond_destroy(&self.cv)
            pthread_mutex_destroy(&self.mu)

    # ------------------------------------------------------------------
    # The C API
    # ------------------------------------------------------------------

    cdef int c_enter(self, fm_route *r) noexcept nogil:
        """Pass the gate (wait while it is closed) and take the route of one
        request; 0, or -EBADF on a closed or unattached disk."""
        pthread_mutex_lock(&self.mu)
        while (self.gate_closed or self.holders) and not self.closed:
            pthread_cond_wait(&self.cv, &self.mu)
        if self.closed or self.fd < 0:
            pthread_mutex_unlock(&self.mu)
            return -EBADF
        r.fd = self.fd
        r.dfd = self.dfd
        r.is_block = self.is_block
        r.mirror_fd = self.mirror_fd
        r.mirror_is_block = self.mirror_is_block
        r.engine = self.engine
        r.al = self.al
        self.writers += 1
        if r.mirror_fd >= 0:
            self.mirror_users += 1
        pthread_mutex_unlock(&self.mu)
        return 0

    cdef void c_leave(self, fm_route *r) noexcept nogil:
        pthread_mutex_lock(&self.mu)
        self.writers -= 1
        if r.mirror_fd >= 0:
            self.mirror_users -= 1
        if self.writers == 0 or (r.mirror_fd >= 0 and self.mirror_users == 0):
            pthread_cond_broadcast(&self.cv)
        pthread_mutex_unlock(&self.mu)

    cdef int64_t _request(self, int op, const iovec *iov, int iovcnt, int64_t offset,
                          int64_t length) noexcept nogil:
        """One write of any kind; with an activity log, a request over
        more than AL_SPAN extents goes in pieces, so that no request needs
        more of the log's slots than a few (a write is not atomic anyway)."""
        cdef int64_t window = self.al_window      # a hint: any split is correct
        cdef int64_t done = 0, piece, n
        cdef iovec *sub
        cdef int subcnt
        if offset < 0 or length < 0 or offset > self.size - length:
            return -EINVAL
        if window <= 0 or length <= window:
            n = self._request_one(op, iov, iovcnt, offset, length)
            if n == RESPLIT:
                return self._request(op, iov, iovcnt, offset, length)
            return n
        sub = NULL
        if op == OP_WRITE:
            sub = <iovec *>malloc(<size_t>iovcnt * sizeof(iovec))
            if sub == NULL:
                return -12     # ENOMEM
        while done < length:
            # Pieces end on window boundaries of the disk.
            piece = window - (offset + done) % window
            if piece > length - done:
                piece = length - done
            subcnt = 0
            if op == OP_WRITE:
                subcnt = _iov_slice(iov, iovcnt, done, piece, sub)
            n = self._request_one(op, sub, subcnt, offset + done, piece)
            if n == RESPLIT:
                n = self._request(op, sub, subcnt, offset + done, piece)
            if n < 0:
                free(sub)
                return n
            done += piece
        free(sub)
        return length

    cdef int64_t _request_one(self, int op, const iovec *iov, int iovcnt, int64_t offset,
                              int64_t length) noexcept nogil:
        """gate -> activity log -> claim -> write -> mark, for every kind
        of write."""
        cdef fm_route route
        cdef fm_claim claim
        cdef bint both
        cdef int64_t n, w
        cdef int logged = 0
        n = self.c_enter(&route)
        if n < 0:
            return n
        if route.al != NULL and length > self.al_window:
            # A log came while this request waited at the gate, after
            # _request had read no window: in one piece over more extents
            # than the log has slots it would wait for room forever.
            # (al_window is set with al, under mu, no request inside.)
            self.c_leave(&route)
            return RESPLIT
        if route.al != NULL:
            # The extent is on disk as active before the write can land
            # (docs/design.md, the crash model); usually it is already.
            logged = fm_al_begin(route.al, offset, length)
            if logged < 0:
                self.c_leave(&route)
                return logged
        if route.engine == NULL:
            fm_tracked_count(&self.untracked)
        # Write-blocking: no copy of these chunks may be in flight while both
        # sides are written, or an older read could land after this write;
        # nor another such write, or the sides could see them in two orders.
        both = route.mirror_fd >= 0 and route.engine != NULL and length > 0
        if both:
            if self.trace_on:
                self._trace(C_CLAIM_WAIT, offset, length)
            fm_engine_claim(route.engine, &claim, offset, length)
            if self.trace_on:
                self._trace(C_CLAIM_HELD, offset, length)
        n = _apply(op, route.fd, route.dfd, route.is_block, iov, iovcnt, offset, length)
        if route.engine != NULL and length > 0:
            # A failed write may have landed in part: mark it too, a range is
            # never left clean that the two sides may disagree on.
            w = -1
            if both and n >= 0:
                w = _apply(op, route.mirror_fd, -1, route.mirror_is_block, iov, iovcnt,
                           offset, length)
            if w < 0:
                # Invariant 2: the write has reached the source; mark it now.
                # (A target that refused it: the background copy retries.)
                if self.trace_on:
                    self._trace(C_MARK, offset, length)
                fm_engine_mark(route.engine, offset, length)
        if both:
            if self.trace_on:
                self._trace(C_CLAIM_RELEASE, offset, length)
            fm_engine_unclaim(route.engine, &claim)
        if logged == 1:
            fm_al_end(route.al, offset, length)     # marked: it may leave the log
        self.c_leave(&route)
        return n

    cdef int64_t c_writev(self, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil:
        cdef int i
        cdef int64_t length = 0
        for i in range(iovcnt):
            length += <int64_t>iov[i].iov_len
        return self._request(OP_WRITE, iov, iovcnt, offset, length)

    cdef int64_t c_write(self, const void *buf, int64_t length, int64_t offset) noexcept nogil:
        cdef iovec v
        v.iov_base = <void *>buf
        v.iov_len = <size_t>length
        return self._request(OP_WRITE, &v, 1, offset, length)

    cdef int c_write_zeroes(self, int64_t offset, int64_t length) noexcept nogil:
        cdef int64_t r = self._request(OP_ZEROES, NULL, 0, offset, length)
        return <int>r if r < 0 else 0

    cdef int c_discard(self, int64_t offset, int64_t length) noexcept nogil:
        cdef int64_t r = self._request(OP_DISCARD, NULL, 0, offset, length)
        return <int>r if r < 0 else 0

    cdef int64_t c_read(self, void *buf, int64_t length, int64_t offset) noexcept nogil:
        """Read [offset, offset+length): bytes read (fewer only at the end of
        the file) or -errno.  Reads pass the gate too: they never race a
        pivot."""
        cdef fm_route route
        cdef int64_t n
        if offset < 0 or length < 0 or offset > self.size - length:
            return -EINVAL
        n = self.c_enter(&route)
        if n < 0:
            return n
        n = fm_route_pread(&route, buf, length, offset)
        self.c_leave(&route)
        return n

    cdef int c_flush(self) noexcept nogil:
        """fdatasync the disk and, in write-blocking mode, the target."""
        cdef fm_route route
        cdef int r = self.c_enter(&route)
        if r < 0:
            return r
        r = flush_fd(route.fd)
        if r == 0 and route.mirror_fd >= 0:
            r = flush_fd(route.mirror_fd)
        self.c_leave(&route)
        return r

    cdef void c_close_gate(self) noexcept nogil:
        pthread_mutex_lock(&self.mu)
        self.gate_closed = True
        while self.writers:
            pthread_cond_wait(&self.cv, &self.mu)
        pthread_mutex_unlock(&self.mu)

    cdef void c_open_gate(self) noexcept nogil:
        pthread_mutex_lock(&self.mu)
        self.gate_closed = False
        pthread_cond_broadcast(&self.cv)
        pthread_mutex_unlock(&self.mu)

    cdef void c_pivot(self, int fd, bint is_block, int dfd) noexcept nogil:
        """With the gate closed (no request holds the descriptors it
        closes): requests go to fd (and its O_DIRECT twin dfd, or -1) from
        now on, untracked."""
        cdef int old, old_mirror, old_direct
        pthread_mutex_lock(&self.mu)
        old = self.fd
        old_mirror = self.mirror_fd
        old_direct = self.dfd
        self.fd = fd
        self.dfd = dfd
        self.is_block = is_block
        self.mirror_fd = -1
        self.engine = NULL
        # The target is the disk now: nothing to record (the job dropped
        # its reference to the log's object; al_ref keeps it alive here).
        self.al = NULL
        self.al_window = 0
        self.pivoted = True
        pthread_mutex_unlock(&self.mu)
        if old >= 0:
            c_close(old)
        if old_mirror >= 0:
            c_close(old_mirror)
        if old_direct >= 0:
            c_close(old_direct)

    cdef void _trace(self, int event, int64_t offset, int64_t length) noexcept with gil:
        with cython.critical_section(self):
            cb = self.on_event          # a new reference: safe after the section
        if cb is not None:
            try:
                cb(event, offset, length)
            except BaseException:
                import logging
                logging.getLogger("fastmirror").exception("tracked disk trace listener raised")

    # ------------------------------------------------------------------
    # Python: each call releases the GIL around one C call
    # ------------------------------------------------------------------

    def pwrite(self, const unsigned char[::1] data, int64_t offset):
        """Bytes written, or -errno."""
        cdef int64_t n = data.shape[0]
        cdef const void *p = &data[0] if n else NULL
        self._check(offset, n)
        with nogil:
            n = self.c_write(p, n, offset)
        return n

    def write_zeroes(self, int64_t offset, int64_t length):
        """0 or -errno."""
        return self._zeroing(offset, length, False)

    def discard(self, int64_t offset, int64_t length):
        """0 or -errno (-EOPNOTSUPP where the disk cannot)."""
        return self._zeroing(offset, length, True)

    cdef int _zeroing(self, int64_t offset, int64_t length, bint discard) except *:
        cdef int r
        self._check(offset, length)
        with nogil:
            r = self.c_discard(offset, length) if discard else \
                self.c_write_zeroes(offset, length)
        return r

    def pread(self, int64_t length, int64_t offset):
        """The bytes read (fewer only at the end of the file), or -errno."""
        cdef int64_t n
        cdef char *p
        self._check(offset, length)
        out = PyBytes_FromStringAndSize(NULL, length)
        p = PyBytes_AS_STRING(out)
        with nogil:
            n = self.c_read(p, length, offset)
        if n < 0:
            return n
        return out if n == length else out[:n]

    def flush(self):
        """0 or -errno."""
        cdef int r
        with nogil:
            r = self.c_flush()
        return r

    cdef int _check(self, int64_t offset, int64_t length) except -1:
        if offset < 0 or length < 0 or offset > self.size - length:
            raise ValueError("range [%d, %d) outside the disk [0, %d)"
                             % (offset, offset + length, self.size))
        return 0

    # -- control (the job) --------------------------------------------------

    def attach(self, int fd, bint is_block):
        """Give the disk its descriptor (the source, opened read-write).
        False, and fd stays the caller's, if it has one already or is
        closed."""
        cdef bint taken = False
        with nogil:
            pthread_mutex_lock(&self.mu)
            if self.fd < 0 and not self.closed:
                self.fd = fd
                self.is_block = is_block
                taken = True
            pthread_mutex_unlock(&self.mu)
        return taken

    def close_gate(self):
        """Hold new requests at the gate and wait for those inside to end
        (written and marked)."""
        with nogil:
            self.c_close_gate()

    def open_gate(self):
        with nogil:
            self.c_open_gate()

    def pivot(self, int fd, bint is_block):
        """From now on requests go to fd (the target, handed over) and are no
        longer tracked.  Call it with the gate closed.  A disk served with
        O_DIRECT (set_direct) serves the target with O_DIRECT too."""
        cdef int dfd = _open_twin(fd) if self.direct else -1
        with nogil:
            self.c_pivot(fd, is_block, dfd)

    def set_direct(self, bint on):
        """Serve requests aligned to FM_DIO_ALIGN (offset, length, buffers)
        with O_DIRECT, through a twin of the disk's descriptor, and the
        others through the page cache; after a pivot the target as well.
        True when O_DIRECT is in effect (False where the filesystem
        refuses it, or where a memory page is not FM_DIO_ALIGN bytes: then
        everything stays buffered)."""
        cdef int fd
        import os
        if on and os.sysconf("SC_PAGE_SIZE") != FM_DIO_ALIGN:
            # Pages larger than FM_DIO_ALIGN (64 KiB on some ARM and POWER
            # machines): an aligned direct write could share a page with a
            # concurrent buffered one, which the page cache may write back
            # stale over it.  Everything stays buffered there.
            on = False
        # First: a pivot from now on opens a twin of the target (or none).
        self.direct = on
        while True:
            with nogil:
                pthread_mutex_lock(&self.mu)
                fd = self.fd if not self.closed else -1
                pthread_mutex_unlock(&self.mu)
            # The twin is opened without the lock: a pivot meanwhile made it
            # the twin of the old source, and it is tried again.
            if self._swap_dfd(_open_twin(fd) if on else -1, fd):
                break
        return self.dfd >= 0

    cdef void _hold(self) noexcept nogil:
        """Under mu: keep new requests at the gate (the job's gate is left
        as it is) and wait until no request is inside."""
        self.holders += 1
        while self.writers:
            pthread_cond_wait(&self.cv, &self.mu)

    cdef void _unhold(self) noexcept nogil:
        """Under mu: the end of _hold(); the requests waiting go on."""
        self.holders -= 1
        pthread_cond_broadcast(&self.cv)

    cdef int _swap_dfd(self, int dfd, int fd) except -1:
        """The twin replaced once no request is inside (one may use the
        old); 0, and dfd closed, if the disk's descriptor is no longer fd
        (a pivot came since dfd was opened)."""
        cdef int old
        cdef int swapped = 1
        with nogil:
            pthread_mutex_lock(&self.mu)
            if self.closed:
                old = dfd
            elif self.fd != fd:
                old = dfd
                swapped = 0
            else:
                self._hold()
                old = self.dfd
                self.dfd = dfd
                self._unhold()
            pthread_mutex_unlock(&self.mu)
            if old >= 0:
                c_close(old)
        return swapped

    def track(self, engine):
        """Start marking writes in `engine` (a CopyEngine of the same size):
        a disk served untracked (the NBD export) becomes a job's source.
        Waits until no request is inside: one that took the untracked route
        could land after the job copied its chunks, and be lost.  After a
        pivot the disk (now the target) can be tracked again."""
        self._check_engine(engine)
        if self.engine != NULL:
            raise RuntimeError("the disk is tracked already")
        old = self.engine_ref
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._hold()
            self.engine = <void *>engine
            self.pivoted = False
            self._unhold()
            pthread_mutex_unlock(&self.mu)
        self.engine_ref = engine
        del old

    def set_activity_log(self, al):
        """Record every write's extent in `al` (an ActivityLog of the same
        size) before it lands, from now on; None to stop.  Waits until no
        request is inside, as track() does: one that passed without the log
        could land after a state file said its chunks were clean."""
        cdef void *p = NULL
        cdef int64_t window = 0
        from fastmirror._core.actlog import ActivityLog
        if al is not None:
            if not isinstance(al, ActivityLog):
                raise TypeError("al must be an ActivityLog, not %r" % type(al).__name__)
            if al.size != self.size:
                raise ValueError("the log covers %d bytes, the disk %d" % (al.size, self.size))
            p = <void *>al
            window = AL_SPAN * al.extent_size
        old = self.al_ref
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._hold()
            self.al = p
            self.al_window = window
            self._unhold()
            pthread_mutex_unlock(&self.mu)
        self.al_ref = al
        del old

    @property
    def untracked_writes(self):
        """Writes (of any kind) that went through while no job tracked the
        disk, since it was made."""
        return self.untracked

    @property
    def activity_log(self):
        return self.al_ref if self.al != NULL else None

    def stop_tracking(self):
        """Writes are no longer marked nor sent to the target."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.engine = NULL
            pthread_mutex_unlock(&self.mu)
        self.stop_mirroring()

    def start_mirroring(self, int fd, bint is_block):
        """Write-blocking mode: from now on a write returns once it reached
        both the disk and fd (a buffered target descriptor, handed over)."""
        cdef int old = -1
        with nogil:
            pthread_mutex_lock(&self.mu)
            if self.closed:
                old = fd
            else:
                # Requests inside took the old descriptor: wait for them.
                while self.mirror_users:
                    pthread_cond_wait(&self.cv, &self.mu)
                old = self.mirror_fd
                self.mirror_fd = fd
                self.mirror_is_block = is_block
            pthread_mutex_unlock(&self.mu)
            if old >= 0:
                c_close(old)

    def stop_mirroring(self):
        cdef int old
        with nogil:
            pthread_mutex_lock(&self.mu)
            old = self.mirror_fd
            self.mirror_fd = -1
            # Requests that took the old descriptor may still use it; new
            # ones do not see it, so this wait is bounded even while
            # requests keep coming.
            while self.mirror_users:
                pthread_cond_wait(&self.cv, &self.mu)
            pthread_mutex_unlock(&self.mu)
            if old >= 0:
                c_close(old)

    def close(self):
        """Refuse new requests (-EBADF), wait for those inside, close the
        descriptors."""
        cdef int old, old_direct
        self.stop_mirroring()
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.closed = True
            pthread_cond_broadcast(&self.cv)       # requests held at the gate: refused
            while self.writers:
                pthread_cond_wait(&self.cv, &self.mu)
            old = self.fd
            old_direct = self.dfd
            self.fd = -1
            self.dfd = -1
            pthread_mutex_unlock(&self.mu)
            if old >= 0:
                c_close(old)
            if old_direct >= 0:
                c_close(old_direct)

    def set_trace(self, on_event):
        """on_event(event, offset, length) around every claim (CLAIM_WAIT,
        CLAIM_HELD, CLAIM_RELEASE) and before every mark (MARK), called with
        the GIL from the writing thread; None to stop.  For tests."""
        with cython.critical_section(self):
            self.on_event = on_event
            self.trace_on = on_event is not None

    @property
    def attached(self):
        return self.fd >= 0

    @property
    def is_closed(self):
        return self.closed

    @property
    def served_direct(self):
        """Aligned requests go through O_DIRECT (set_direct)."""
        return self.dfd >= 0

    @property
    def write_blocking(self):
        return self.mirror_fd >= 0

    @property
    def tracking(self):
        return self.engine != NULL

    @property
    def writers_inside(self):
        """Requests between the gate and their end."""
        return self.writers

    @property
    def gate_is_closed(self):
        return self.gate_closed


cdef class Claim:
    """A claim held from Python, for tests and tools: the chunks of
    [offset, offset+length) of `engine`, held from acquire() to release()
    (or until the object goes away)."""

    cdef fm_claim claim
    cdef object engine_ref
    cdef void *engine
    cdef readonly int64_t offset
    cdef readonly int64_t length
    cdef readonly bint held

    def __init__(self, engine, int64_t offset, int64_t length):
        from fastmirror._core.engine import CopyEngine
        if not isinstance(engine, CopyEngine):
            raise TypeError("engine must be a CopyEngine")
        if offset < 0 or length < 0 or offset > engine.size - length:
            raise ValueError("range outside the mirrored size")
        if self.engine_ref is not None:
            raise RuntimeError("Claim is already initialised")
        self.engine_ref = engine
        self.engine = <void *>engine
        self.offset = offset
        self.length = length

    def acquire(self):
        """Wait (GIL released) until no copy and no other claim overlaps."""
        if self.held:
            raise RuntimeError("claim already held")
        with nogil:
            fm_engine_claim(self.engine, &self.claim, self.offset, self.length)
        self.held = True

    def release(self):
        if not self.held:
            raise RuntimeError("claim not held")
        self.held = False
        with nogil:
            fm_engine_unclaim(self.engine, &self.claim)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def __dealloc__(self):
        if self.held:
            fm_engine_unclaim(self.engine, &self.claim)
