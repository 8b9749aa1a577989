# cython: language_level=3
"""The copy engine: the chunked copy loop of the mirror job.

The engine has `nworkers` copy slots, each with one buffer.  A slot loops:
pick the next dirty extent from the bitmap (clearing its bits *before* the
data is read, so that a write landing during the copy dirties it again), read
it from the source, write it to the target.  Two ways to drive the slots, both
without the GIL for their whole life:
  - run_worker(slot): one thread per slot, blocking preadv/pwritev;
  - run_driver(first, count): one thread drives several slots on an io_uring,
    all their reads and writes in flight at once, submitted together.
Nothing here calls Python per chunk unless a tracepoint listener asked for it.

Invariants kept here (docs/design.md):
  1. clear before copy: `_pick` resets the bits under the bitmap lock and only
     then is the source read;
  3. one copy of a chunk in flight: each slot records the extent it copies
     in `inflight_*[slot]`; `_pick` never hands out a chunk that overlaps one,
     nor one claimed by a write that goes to both sides (fm_engine_claim);
  4. the source is opened read-only by the caller; the target is written only
     in [0, size): the last, unaligned piece of a file whose size is not a
     multiple of the O_DIRECT alignment goes through a buffered descriptor.
A failed copy marks its range dirty again before anything else can see it
(a failed range is never left clean) and holds the engine until the job
decides what the error policy says.

A failed flush loses writes: Linux drops the dirty pages of a failed fsync
and a later fsync succeeds, so data the target acknowledged may never reach
the disk.  The engine therefore records every range written to the target
since the last successful flush (`unflushed`: set by a copy once it is
written, by zeroing, and by a write that went to both sides when it lets go
of its claim) and, when a flush fails, dirties all of it again, together
with the copies and claims still in flight, before flush() returns.

The engine owns its descriptors: it duplicates those it is given (close-on-
exec) and closes them in close() or when it is freed, so the objects that
opened them (a job's endpoints, an export) may close theirs at any time.

Locking: `mu` protects the engine's fields; the bitmap's own lock is taken
inside `mu` (never the other way round).  Writers marking chunks take only
the bitmap lock, then `mu` briefly to wake a worker.  No lock is held while
I/O is in progress or while Python (a tracepoint) runs.
"""

import os

cimport cython

from libc.errno cimport ETIMEDOUT, ENXIO, EOPNOTSUPP, EAGAIN, EINTR, ENOMEM, EBADF, errno
from posix.fcntl cimport fcntl, F_DUPFD_CLOEXEC
from posix.unistd cimport close as c_close
from libc.stdint cimport int64_t, uint64_t
from posix.time cimport timespec
from fastmirror._core.fm_assert cimport FM_DEBUG, fm_assert, fm_assert_locked
from fastmirror._core.hbitmap cimport HBitmap
from fastmirror._core.blockio cimport (preadv_full, pwritev_full, flush_fd, zero_range,
                             buffer_is_zero, alloc_buffer, free_buffer, monotonic_ns)
from posix.uio cimport iovec
from fastmirror._core.sync cimport (pthread_mutex_t, pthread_cond_t, pthread_condattr_t,
                               pthread_mutex_init, pthread_mutex_destroy,
                               pthread_mutex_lock, pthread_mutex_unlock,
                               pthread_condattr_init, pthread_condattr_setclock,
                               pthread_condattr_destroy, pthread_cond_init,
                               pthread_cond_destroy, pthread_cond_wait,
                               pthread_cond_timedwait, pthread_cond_signal,
                               pthread_cond_broadcast, CLOCK_MONOTONIC)
from fastmirror._core.nbdclient cimport (NbdClient, fm_nbd, fm_nbd_write, fm_nbd_zero,
                                       fm_nbd_flush, fm_nbd_take_lost)
from fastmirror._core.ring cimport (fm_ring, fm_ring_init, fm_ring_exit, fm_ring_prep,
                               fm_ring_submit, fm_ring_reap, fm_ring_unqueue,
                               fm_ring_use, FM_RING_READ, FM_RING_WRITE,
                               FM_CALLS_PLAIN, FM_CALLS_VECTORED, FM_CALLS_FIXED)

cdef enum:
    MAX_WORKERS = 64         # copy slots
    MAX_FAILURES = 64
    ZERO_BLOCK = 4096        # zero detection looks at blocks of this size (or the alignment)
    MIN_ZERO_RUN = 4096      # shorter zero runs inside data are written as data
    # The same for an NBD target: a zero run is a request of its own, a
    # round trip, between the data runs around it; below 64 KiB writing
    # the zeros with the data costs less than that round trip on a network.
    NBD_MIN_ZERO_RUN = 65536
    SUBMIT_RETRIES = 1000    # io_uring short of memory: 1 ms apart, then the copies fail

# What wait_event() returns.
cdef enum:
    C_EV_TIMEOUT = 0   # the timeout passed, or kick() was called
    C_EV_CLEAN = 1     # no dirty chunk and no copy in progress
    C_EV_ERROR = 2     # at least one failure waits in take_failures()
    C_EV_STOPPED = 3   # stop() was called and every worker has returned

# What a slot driven by run_driver() is waiting for.
cdef enum:
    S_IDLE = 0
    S_READING = 1
    S_WRITING = 2

# How the io_uring drivers issue reads and writes: CopyEngine.ring_calls.
# Registered buffers by default: copying 1 GiB file to file (ext4, O_DIRECT,
# interleaved rounds) they took about a tenth less CPU per GiB than
# READ/WRITE, at a throughput the same within noise; READV/WRITEV saved
# nothing.  Where the kernel refuses them, READ/WRITE: no iovec to keep.
RING_CALLS = ("auto", "fixed", "vectored", "plain")
cdef enum:
    R_AUTO = 0       # registered buffers where the kernel takes them, else plain
    R_FIXED = 1      # the same, asked for by name (the benchmarks)
    R_VECTORED = 2   # IORING_OP_READV/WRITEV
    R_PLAIN = 3      # IORING_OP_READ/WRITE

# Failure operations, as the job reports them.
cdef enum:
    C_OP_READ = 0
    C_OP_WRITE = 1

EV_TIMEOUT = C_EV_TIMEOUT
EV_CLEAN = C_EV_CLEAN
EV_ERROR = C_EV_ERROR
EV_STOPPED = C_EV_STOPPED
OP_READ = C_OP_READ
OP_WRITE = C_OP_WRITE

cdef struct Failure:
    int op            # OP_READ or OP_WRITE
    int err           # positive errno
    int64_t offset    # bytes
    int64_t length    # bytes


cdef extern from "<unistd.h>" nogil:
    int usleep(unsigned usec)

cdef extern from *:
    """
    static inline void fm_atomic_add(int64_t *p, int64_t v) {
        __atomic_fetch_add(p, v, __ATOMIC_RELAXED);
    }
    """
    void fm_atomic_add(int64_t *p, int64_t v) nogil
    int64_t __atomic_load_n(int64_t *p, int order) nogil
    int __ATOMIC_RELAXED


cdef inline void deadline_after(timespec *ts, int64_t ns) noexcept nogil:
    cdef int64_t t = monotonic_ns() + ns
    ts.tv_sec = t // 1000000000
    ts.tv_nsec = t % 1000000000


cdef class CopyEngine:
    """Copies dirty chunks of `bitmap` from src_fd to dst_fd.

    The engine works on its own duplicates of the descriptors it is given
    (closed by close() or when it is freed).  The caller owns the worker
    threads: it starts `nworkers` threads running run_worker(slot) and, to
    finish, calls stop() and joins them.  The coordinator (MirrorJob) sleeps
    in wait_event()."""

    cdef readonly HBitmap bitmap
    cdef int src_fd                 # opened read-only (O_DIRECT when possible)
    cdef int dst_fd                 # the target (O_DIRECT when possible)
    cdef int dst_tail_fd            # buffered target descriptor for the unaligned tail
    # An NBD target instead of descriptors (dst_fd is then -1): writes,
    # zeroing and flushes go through the client's C API; nbd_client keeps it.
    cdef fm_nbd *nbd
    cdef readonly object nbd_client
    cdef bint fds_closed            # close() was called: no I/O any more
    cdef int users                  # flush() and zero_target() calls using the descriptors
    # Chunks written to the target since the last successful flush, and
    # those a flush in progress covers (moved there when it starts: a write
    # that lands after the fsync began is not covered by it).  Both are only
    # touched under mu; their own locks are taken inside mu, before the
    # dirty bitmap's.
    cdef HBitmap unflushed
    cdef HBitmap flushing
    cdef bint flush_busy            # one flush at a time
    cdef bint dst_is_block          # zeroing uses BLKZEROOUT instead of fallocate
    cdef public bint detect_zeroes  # all-zero data becomes a zeroed range on the target
    cdef public bint sync_source    # flush() syncs the source first (a state file's job)
    cdef public bint unmap          # zeroed file ranges are punched out (holes)
    cdef int64_t min_zero_run       # shorter zero runs inside data are written as data
    cdef readonly int64_t size      # bytes mirrored: [0, size)
    cdef readonly int64_t align     # O_DIRECT offset/length alignment of both sides
    cdef readonly int64_t max_io    # largest single copy, bytes, a multiple of granularity
    cdef int64_t max_chunks         # max_io in chunks
    cdef int shift                  # log2(granularity)
    cdef int64_t nchunks
    cdef readonly int nworkers
    cdef void *buffers[MAX_WORKERS]  # max_io bytes per slot, inside arena
    cdef char *arena                # all the slots' buffers: one mapping, huge pages
    cdef size_t arena_len

    cdef pthread_mutex_t mu
    cdef pthread_cond_t work_cv     # idle, paused or throttled workers sleep here
    cdef pthread_cond_t event_cv    # the coordinator sleeps here
    cdef pthread_cond_t claim_cv    # blocking writes wait here for overlapping copies
    cdef fm_claim *claims           # writes to both sides in progress (fm_engine_claim)
    cdef int running                # workers inside run_worker()
    cdef int busy                   # workers holding an extent
    cdef bint paused                # the job asked workers to stop picking
    cdef bint held                  # a failure stopped picking until release()
    cdef bint stopping
    cdef bint kicked                # wake the coordinator once
    # Chunk range per copy slot; first == -1: none.
    cdef int64_t inflight_first[MAX_WORKERS]
    cdef int64_t inflight_end[MAX_WORKERS]
    cdef int64_t cursor             # next chunk to look at: copy in one sweep, like QEMU
    cdef int64_t speed_limit        # bytes per second; 0 = unlimited
    cdef int64_t rate_next_ns       # when the next byte may be copied
    cdef Failure failures[MAX_FAILURES]
    cdef int nfailures
    cdef int64_t failures_dropped

    # Counters, read by the job for status and summaries.
    cdef readonly int64_t bytes_copied
    cdef readonly int64_t bytes_zeroed         # holes of the source zeroed on the target
    cdef readonly int64_t bytes_zero_detected  # zero data stored as zeroed ranges
    cdef readonly int64_t bytes_marked         # bytes reported written through mark_dirty
    cdef bint slot_running[MAX_WORKERS]        # run_worker() or run_driver() owns the slot
    cdef int64_t slot_off[MAX_WORKERS]         # the byte range a slot copies
    cdef int64_t slot_len[MAX_WORKERS]
    cdef int slot_state[MAX_WORKERS]           # S_*, for run_driver() slots
    cdef readonly int64_t chunks_copied
    cdef readonly int64_t copies
    cdef readonly int64_t busy_ns    # wall time with at least one copy in progress
    cdef int64_t busy_since

    # How the io_uring drivers issue reads and writes (run_driver, ring_io).
    cdef int ring_want                # R_*
    cdef int ring_count[3]            # rings set up, by FM_CALLS_*
    cdef int fixed_err                # errno of the last refused buffer registration

    # Tracepoints: Python callables, or None when nobody listens.
    cdef object on_iteration        # (sector_num, nb_sectors) before a copy
    cdef object on_iteration_done   # (offset, bytes, ret) after it
    cdef bint trace_on

    def __cinit__(self):
        cdef int i
        cdef pthread_condattr_t attr
        pthread_mutex_init(&self.mu, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.work_cv, &attr)
        pthread_cond_init(&self.event_cv, &attr)
        pthread_cond_init(&self.claim_cv, &attr)
        pthread_condattr_destroy(&attr)
        for i in range(MAX_WORKERS):
            self.buffers[i] = NULL
            self.inflight_first[i] = -1
            self.inflight_end[i] = -1
        self.src_fd = self.dst_fd = self.dst_tail_fd = -1

    def __init__(self, HBitmap bitmap not None, int src_fd, int dst_fd, int dst_tail_fd,
                 int64_t size, int64_t align, int64_t max_io, int nworkers,
                 bint dst_is_block=False, bint detect_zeroes=True, bint unmap=True,
                 NbdClient nbd=None):
        cdef int i
        if self.bitmap is not None:
            raise RuntimeError("CopyEngine is already initialised")
        if size != bitmap.size:
            raise ValueError("bitmap covers %d bytes, engine %d" % (bitmap.size, size))
        if align <= 0 or align & (align - 1) or bitmap.granularity % align:
            raise ValueError("alignment %d must be a power of two dividing granularity %d"
                             % (align, bitmap.granularity))
        if nworkers < 1 or nworkers > MAX_WORKERS:
            raise ValueError("nworkers must be in [1, %d]" % MAX_WORKERS)
        if max_io < bitmap.granularity:
            max_io = bitmap.granularity
        max_io -= max_io % bitmap.granularity
        self.bitmap = bitmap
        self.unflushed = HBitmap(size, bitmap.granularity)
        self.flushing = HBitmap(size, bitmap.granularity)
        # Our own descriptors (__dealloc__ closes them if this raises).
        self.src_fd = _dup_fd(src_fd)
        if nbd is not None:
            # The target is an NBD export: no descriptor of it; the client
            # outlives the engine's I/O (its owner closes it after close()).
            if size > nbd.size:
                raise ValueError("NBD export of %d bytes is smaller than %d" % (nbd.size, size))
            self.nbd_client = nbd
            self.nbd = nbd.c
            self.min_zero_run = NBD_MIN_ZERO_RUN
        else:
            self.dst_fd = _dup_fd(dst_fd)
            if dst_tail_fd == dst_fd:
                self.dst_tail_fd = self.dst_fd
            elif dst_tail_fd >= 0:
                self.dst_tail_fd = _dup_fd(dst_tail_fd)
            self.min_zero_run = MIN_ZERO_RUN
        self.dst_is_block = dst_is_block
        self.detect_zeroes = detect_zeroes
        self.unmap = unmap
        self.size = size
        self.align = align
        self.max_io = max_io
        self.shift = bitmap.granularity.bit_length() - 1
        self.max_chunks = max_io >> self.shift
        self.nchunks = (size + bitmap.granularity - 1) >> self.shift
        self.nworkers = nworkers
        # One mapping for every slot, so that the memory is buf_size rounded
        # up to a huge page, not a huge page per slot; a slot's buffer stays
        # physically contiguous inside its 2 MiB pages, which is what keeps
        # requests whole (see alloc_buffer).  max_io is a multiple of the
        # granularity, hence of the O_DIRECT alignment: every slot is aligned.
        self.arena_len = <size_t>(nworkers * max_io)
        self.arena = <char *>alloc_buffer(self.arena_len)
        if self.arena == NULL:
            raise MemoryError("cannot map %d bytes of I/O buffers" % self.arena_len)
        for i in range(nworkers):
            self.buffers[i] = self.arena + i * max_io

    def __dealloc__(self):
        cdef int i
        self._close_fds()
        for i in range(MAX_WORKERS):
            self.buffers[i] = NULL
        free_buffer(self.arena, self.arena_len)
        self.arena = NULL
        pthread_cond_destroy(&self.work_cv)
        pthread_cond_destroy(&self.event_cv)
        pthread_cond_destroy(&self.claim_cv)
        pthread_mutex_destroy(&self.mu)

    cdef void _close_fds(self) noexcept nogil:
        if self.dst_tail_fd >= 0 and self.dst_tail_fd != self.dst_fd:
            c_close(self.dst_tail_fd)
        if self.dst_fd >= 0:
            c_close(self.dst_fd)
        if self.src_fd >= 0:
            c_close(self.src_fd)
        self.src_fd = self.dst_fd = self.dst_tail_fd = -1

    def close(self):
        """Close the engine's descriptors, once every worker has returned
        (stop() and join first) and no flush or zeroing is in progress.
        Later I/O fails with EBADF; calling it again does nothing."""
        cdef bint busy
        with nogil:
            pthread_mutex_lock(&self.mu)
            busy = self.running > 0
            if not busy:
                self.fds_closed = True
                while self.users > 0:
                    pthread_cond_wait(&self.event_cv, &self.mu)
                self._close_fds()
            pthread_mutex_unlock(&self.mu)
        if busy:
            raise RuntimeError("close() while copy workers run: stop() and join them first")

    cdef int _use(self) noexcept nogil:
        """Before I/O outside the workers: 0, or -EBADF once closed."""
        cdef int r = 0
        pthread_mutex_lock(&self.mu)
        if self.fds_closed:
            r = -EBADF
        else:
            self.users += 1
        pthread_mutex_unlock(&self.mu)
        return r

    cdef void _unuse(self) noexcept nogil:
        """Under mu: the I/O that _use() allowed is over."""
        self.users -= 1
        if self.users == 0:
            pthread_cond_broadcast(&self.event_cv)

    # ------------------------------------------------------------------
    # Marking (any thread)
    # ------------------------------------------------------------------

    cdef void mark_chunks(self, int64_t first, int64_t n) noexcept nogil:
        self.bitmap.c_set(first, n)
        pthread_mutex_lock(&self.mu)
        pthread_cond_signal(&self.work_cv)
        pthread_mutex_unlock(&self.mu)

    cdef void mark_bytes(self, int64_t offset, int64_t length) noexcept nogil:
        """mark_dirty() without the checks: the caller keeps the range
        inside [0, size)."""
        cdef int64_t first, end
        if length <= 0:
            return
        first = offset >> self.shift
        end = (offset + length + (<int64_t>1 << self.shift) - 1) >> self.shift
        self.mark_chunks(first, end - first)
        fm_atomic_add(&self.bytes_marked, length)

    def mark_dirty(self, int64_t offset, int64_t length):
        """Dirty every chunk overlapping [offset, offset+length) and wake a
        worker.  Call it after the write has reached the source."""
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError("range [%d, %d) outside [0, %d)"
                             % (offset, offset + length, self.size))
        with nogil:
            self.mark_bytes(offset, length)

    # ------------------------------------------------------------------
    # Control (the job)
    # ------------------------------------------------------------------

    def set_paused(self, bint paused):
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.paused = paused
            pthread_cond_broadcast(&self.work_cv)
            pthread_cond_broadcast(&self.event_cv)
            pthread_mutex_unlock(&self.mu)

    def release(self):
        """Let workers pick extents again after a failure was handled."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.held = False
            pthread_cond_broadcast(&self.work_cv)
            pthread_mutex_unlock(&self.mu)

    def stop(self):
        """Workers finish the copy in hand and return."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.stopping = True
            pthread_cond_broadcast(&self.work_cv)
            pthread_cond_broadcast(&self.event_cv)
            pthread_cond_broadcast(&self.claim_cv)
            pthread_mutex_unlock(&self.mu)

    def kick(self):
        """Wake the coordinator from wait_event()."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.kicked = True
            pthread_cond_broadcast(&self.event_cv)
            pthread_mutex_unlock(&self.mu)

    # ------------------------------------------------------------------
    # Claims: writes that go to both sides (write-blocking mode)
    # ------------------------------------------------------------------

    cdef void claim_range(self, fm_claim *c, int64_t offset, int64_t length) noexcept nogil:
        """Reserve the chunks of [offset, offset+length) for a write that goes
        to both source and target: wait until no copy and no other claim
        overlaps them, then keep workers off them until unclaim_range(c).
        `c` lives in the caller (its stack) until then: claims are a list,
        so any number may be held at once.

        A claim blocked by another claim sleeps on its own condition and is
        woken by that claim's release alone, so overlapping claims serialize
        and disjoint ones never wake each other; a claim blocked by a copy
        sleeps on claim_cv, which every finished copy broadcasts."""
        cdef fm_claim *k
        cdef int i
        cdef bint busy
        c.first = offset >> self.shift
        c.end = (offset + length + (<int64_t>1 << self.shift) - 1) >> self.shift
        if c.end == c.first:
            c.end = c.first + 1
        c.prev = c.next = c.waiters = c.next_waiter = c.blocker = NULL
        pthread_cond_init(&c.cv, NULL)
        pthread_mutex_lock(&self.mu)
        while True:
            k = self.claims
            while k != NULL and not (k.first < c.end and c.first < k.end):
                k = k.next
            if k != NULL:
                c.blocker = k
                c.next_waiter = k.waiters
                k.waiters = c
                while c.blocker != NULL:
                    pthread_cond_wait(&c.cv, &self.mu)
                continue
            # Copies last until _done() even after stop(): wait for them too.
            busy = False
            for i in range(self.nworkers):
                if self.inflight_first[i] < c.end and c.first < self.inflight_end[i]:
                    busy = True
                    break
            if not busy:
                break
            pthread_cond_wait(&self.claim_cv, &self.mu)
        c.next = self.claims
        if c.next != NULL:
            c.next.prev = c
        self.claims = c
        pthread_mutex_unlock(&self.mu)

    cdef void unclaim_range(self, fm_claim *c) noexcept nogil:
        """Release a claim taken by claim_range() and wake the claims that
        wait for it; they look again (another claim may block them still)."""
        cdef fm_claim *w
        pthread_mutex_lock(&self.mu)
        if c.prev != NULL:
            c.prev.next = c.next
        else:
            self.claims = c.next
        if c.next != NULL:
            c.next.prev = c.prev
        # The claim's write has reached the target (or failed and was marked
        # dirty): a flush that fails from now on must redo it.
        self.unflushed.c_set(c.first, c.end - c.first)
        w = c.waiters
        while w != NULL:
            w.blocker = NULL
            pthread_cond_signal(&w.cv)
            w = w.next_waiter
        c.waiters = NULL
        pthread_cond_signal(&self.work_cv)     # its chunks may be dirty: a worker may copy them
        pthread_mutex_unlock(&self.mu)
        pthread_cond_destroy(&c.cv)

    def set_speed(self, int64_t speed):
        if speed < 0:
            raise ValueError("speed must be >= 0")
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.speed_limit = speed
            self.rate_next_ns = monotonic_ns()
            pthread_cond_broadcast(&self.work_cv)
            pthread_mutex_unlock(&self.mu)

    def set_trace(self, on_iteration, on_iteration_done):
        """Callables for the per-copy tracepoints, or None.  Swapped and read
        inside a critical section on the engine, so that a worker never holds
        a callable that another thread is dropping (free-threaded Python has
        no GIL to make the swap atomic)."""
        with cython.critical_section(self):
            self.on_iteration = on_iteration
            self.on_iteration_done = on_iteration_done
            self.trace_on = on_iteration is not None or on_iteration_done is not None

    def wait_event(self, double timeout, bint want_clean=True):
        """Sleep until something needs the coordinator; returns EV_*."""
        cdef timespec ts
        cdef int r = C_EV_TIMEOUT
        cdef int64_t ns = <int64_t>(timeout * 1e9) if timeout > 0 else 0
        with nogil:
            deadline_after(&ts, ns)
            pthread_mutex_lock(&self.mu)
            while True:
                if self.nfailures > 0:
                    r = C_EV_ERROR
                    break
                if self.stopping and self.running == 0:
                    r = C_EV_STOPPED
                    break
                if want_clean and self.busy == 0 and self.bitmap.c_count() == 0:
                    r = C_EV_CLEAN
                    break
                if self.kicked:
                    self.kicked = False
                    r = C_EV_TIMEOUT
                    break
                if pthread_cond_timedwait(&self.event_cv, &self.mu, &ts) == ETIMEDOUT:
                    r = C_EV_TIMEOUT
                    break
            pthread_mutex_unlock(&self.mu)
        return r

    def take_failures(self):
        """The failures recorded since the last call: list of
        (op, errno, offset, length), oldest first; and how many were dropped
        because the queue was full."""
        cdef int i, n
        cdef int64_t dropped
        cdef Failure taken[MAX_FAILURES]
        with nogil:
            pthread_mutex_lock(&self.mu)
            n = self.nfailures
            for i in range(n):
                taken[i] = self.failures[i]
            dropped = self.failures_dropped
            self.nfailures = 0
            self.failures_dropped = 0
            pthread_mutex_unlock(&self.mu)
        out = [(taken[i].op, taken[i].err, taken[i].offset, taken[i].length) for i in range(n)]
        return out, dropped

    def flush(self):
        """fdatasync the target; 0 or -errno.  fdatasync covers the whole
        inode, so the buffered tail descriptor is flushed too when it is
        another descriptor of the same file; flush it as well to be plain.

        On failure every chunk written to the target since the last
        successful flush is dirty again when this returns (see the module
        docstring), so that the copy redoes it before any retry, and, as
        after a failed copy, the workers pick nothing until release()."""
        cdef int r
        with nogil:
            r = self._use()
            if r == 0:
                pthread_mutex_lock(&self.mu)
                while self.flush_busy:
                    pthread_cond_wait(&self.event_cv, &self.mu)
                self.flush_busy = True
                # What this flush covers: everything written before it starts.
                self._or_into(self.unflushed, self.flushing)
                self.unflushed.c_reset(0, self.nchunks)
                pthread_mutex_unlock(&self.mu)

                # With a state file, a chunk this flush covers is recorded
                # clean: the source data its copy read (possibly from the
                # page cache, after a write through the tracked path) must be
                # durable too, or a power cut could take it from the source
                # and leave the target ahead of it.  Every copy in `flushing`
                # read before this sync starts.
                r = flush_fd(self.src_fd) if self.sync_source else 0
                if r == 0:
                    r = fm_nbd_flush(self.nbd) if self.nbd != NULL else flush_fd(self.dst_fd)
                if r == 0 and self.dst_tail_fd >= 0 and self.dst_tail_fd != self.dst_fd:
                    r = flush_fd(self.dst_tail_fd)

                pthread_mutex_lock(&self.mu)
                if r < 0:
                    self._redirty()
                self.flushing.c_reset(0, self.nchunks)
                self.flush_busy = False
                pthread_cond_broadcast(&self.event_cv)
                self._unuse()
                pthread_mutex_unlock(&self.mu)
        return r

    cdef void _or_into(self, HBitmap src, HBitmap dst) noexcept nogil:
        """Under mu: set in dst every chunk set in src."""
        cdef int64_t c = 0, n = 0
        src.lock()
        while c < self.nchunks:
            c = src.next_dirty_area_locked(c, self.nchunks, 0, &n)
            if c < 0:
                break
            dst.c_set(c, n)
            c += n
        src.unlock()

    cdef void _or_unsettled_into(self, HBitmap dst) noexcept nogil:
        """Under mu: set in dst every chunk written to the target since the
        last successful flush (flushing, unflushed) or being written now
        (copies and claims in flight)."""
        cdef int i
        cdef fm_claim *k = self.claims
        self._or_into(self.flushing, dst)
        self._or_into(self.unflushed, dst)
        for i in range(MAX_WORKERS):
            if self.inflight_first[i] >= 0:
                dst.c_set(self.inflight_first[i],
                          self.inflight_end[i] - self.inflight_first[i])
        while k != NULL:
            dst.c_set(k.first, k.end - k.first)
            k = k.next

    cdef void _redirty(self) noexcept nogil:
        """Under mu, after a failed flush: the pages it dropped may hold any
        write since the last successful flush.  Dirty them all again: what
        was written (flushing, unflushed) and what is being written now
        (copies and claims in flight, whose data may have landed just before
        the failure; they stay dirty after they finish, as for a write that
        lands during a copy)."""
        self._or_unsettled_into(self.bitmap)
        # Dirty now: their copies record them again once written.
        self.unflushed.c_reset(0, self.nchunks)
        # As after a failed copy, nothing is picked until the job has
        # applied its error policy (release()).
        self.held = True

    def reconnect_target(self):
        """An NBD target whose connection failed: connect again (OSError if
        the server is still away).  Writes it acknowledged but had not
        flushed may have died with it, so, as after a failed flush, every
        chunk written since the last successful flush is dirty again first,
        and the workers are held until release().  Returns how many
        connections were made again; nothing for a file target."""
        cdef int lost
        if self.nbd == NULL:
            return 0
        with nogil:
            lost = fm_nbd_take_lost(self.nbd)
            if lost:
                pthread_mutex_lock(&self.mu)
                self._redirty()
                pthread_mutex_unlock(&self.mu)
        return self.nbd_client.reconnect()

    def persistable(self, HBitmap out not None):
        """Set in `out` (same size and granularity) every chunk that a state
        file must keep dirty: dirty now, written to the target but not yet
        covered by a successful flush (unflushed, flushing), or being copied
        or written to both sides (copies and claims in flight).  Its
        complement is what a crash cannot make wrong on the target.  Taken
        under mu, so a chunk moving between these sets is seen in one."""
        if out.size != self.size or out.granularity != self.bitmap.granularity:
            raise ValueError("the bitmap does not match the engine")
        with nogil:
            pthread_mutex_lock(&self.mu)
            self._or_into(self.bitmap, out)
            self._or_unsettled_into(out)
            pthread_mutex_unlock(&self.mu)

    @property
    def unflushed_bytes(self):
        """Bytes written to the target since the last successful flush (an
        upper bound while a flush is in progress), whole chunks."""
        cdef int64_t n
        with nogil:
            pthread_mutex_lock(&self.mu)
            n = self.unflushed.c_count() + self.flushing.c_count()
            pthread_mutex_unlock(&self.mu)
        return min(n << self.shift, self.size)

    def zero_target(self, int64_t offset, int64_t length):
        """Make a target range read as zeros (a hole of the source that the
        bulk copy will not read).  0, or -errno; -EOPNOTSUPP means the caller
        must copy the range instead."""
        cdef int r
        cdef int64_t first, end
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError("range outside the mirrored size")
        first = offset >> self.shift
        end = (offset + length + (<int64_t>1 << self.shift) - 1) >> self.shift
        with nogil:
            r = self._use()
            if r == 0:
                # Recorded before and after: a flush that fails while the
                # range is being zeroed dirties it, and one that starts then
                # and succeeds does not clear it.
                pthread_mutex_lock(&self.mu)
                self.unflushed.c_set(first, end - first)
                pthread_mutex_unlock(&self.mu)
                r = self._zero(offset, length)
                pthread_mutex_lock(&self.mu)
                self.unflushed.c_set(first, end - first)
                self._unuse()
                pthread_mutex_unlock(&self.mu)
        if r == 0:
            fm_atomic_add(&self.bytes_zeroed, length)
        return r

    def snapshot(self):
        """(busy, inflight_bytes, paused, held) read under the engine lock."""
        cdef int i, busy
        cdef bint paused, held
        cdef int64_t inflight = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            for i in range(self.nworkers):
                if self.inflight_first[i] >= 0:
                    inflight += (self.inflight_end[i] - self.inflight_first[i]) << self.shift
            busy = self.busy
            paused = self.paused
            held = self.held
            pthread_mutex_unlock(&self.mu)
        return busy, inflight, paused, held

    def counters(self):
        """A consistent snapshot of the counters, as a dict."""
        cdef int64_t copied, chunks, copies, busy_ns, zeroed, zero_detected, marked
        with nogil:
            pthread_mutex_lock(&self.mu)
            copied = self.bytes_copied
            chunks = self.chunks_copied
            copies = self.copies
            busy_ns = self.busy_ns
            pthread_mutex_unlock(&self.mu)
            zeroed = __atomic_load_n(&self.bytes_zeroed, __ATOMIC_RELAXED)
            zero_detected = __atomic_load_n(&self.bytes_zero_detected, __ATOMIC_RELAXED)
            marked = __atomic_load_n(&self.bytes_marked, __ATOMIC_RELAXED)
        return {"bytes_copied": copied, "chunks_copied": chunks, "copies": copies,
                "busy_ns": busy_ns, "bytes_zeroed": zeroed,
                "bytes_zero_detected": zero_detected, "bytes_marked": marked}

    @property
    def speed(self):
        return self.speed_limit

    # ------------------------------------------------------------------
    # The workers
    # ------------------------------------------------------------------

    def run_worker(self, int slot):
        """Run one copy worker until stop().  Call from a dedicated thread,
        once per slot: a slot owns one buffer."""
        cdef bint taken
        if slot < 0 or slot >= self.nworkers:
            raise ValueError("slot out of range")
        with nogil:
            pthread_mutex_lock(&self.mu)
            taken = self.slot_running[slot] or self.fds_closed
            if not taken:
                self.slot_running[slot] = True
                self.running += 1
            pthread_mutex_unlock(&self.mu)
        if taken:
            raise RuntimeError("a worker already runs in slot %d, or the engine is closed" % slot)
        with nogil:
            self._worker(slot)

    cdef bint _conflicts(self, int64_t chunk, int64_t *end) noexcept nogil:
        """Is chunk inside an extent that another worker is copying?  If so,
        *end is where that extent ends."""
        cdef int i
        cdef fm_claim *k = self.claims
        for i in range(MAX_WORKERS):
            if self.inflight_first[i] <= chunk < self.inflight_end[i]:
                end[0] = self.inflight_end[i]
                return True
        while k != NULL:
            if k.first <= chunk < k.end:
                end[0] = k.end
                return True
            k = k.next
        return False

    cdef bint _pick_in(self, int slot, int64_t lo, int64_t hi) noexcept nogil:
        """Under mu and the bitmap lock: claim the first dirty run in
        [lo, hi) that no other worker is copying."""
        cdef int64_t c, e, lim, cend
        cdef int i
        cdef fm_claim *k = self.claims
        c = self.bitmap.next_dirty_locked(lo, hi)
        while c >= 0:
            if not self._conflicts(c, &cend):
                break
            c = self.bitmap.next_dirty_locked(cend, hi) if cend < hi else -1
        if c < 0:
            return False
        lim = c + self.max_chunks
        if lim > self.nchunks:
            lim = self.nchunks
        for i in range(MAX_WORKERS):
            if c < self.inflight_first[i] < lim:
                lim = self.inflight_first[i]
        while k != NULL:
            if c < k.first < lim:
                lim = k.first
            k = k.next
        e = self.bitmap.next_clean_locked(c, lim)
        if e < 0:
            e = lim
        if FM_DEBUG:
            fm_assert(0 <= c < e <= self.nchunks, "0 <= c < e <= nchunks")
        # Invariant 1: the bits go clean before the source is read.
        self.bitmap.reset_locked(c, e - c)
        self.inflight_first[slot] = c
        self.inflight_end[slot] = e
        self.cursor = e if e < self.nchunks else 0
        return True

    cdef bint _pick(self, int slot) noexcept nogil:
        cdef bint found
        cdef int64_t start = self.cursor
        fm_assert_locked(&self.mu)
        self.bitmap.lock()
        found = self._pick_in(slot, start, self.nchunks)
        if not found and start > 0:
            found = self._pick_in(slot, 0, start)
        self.bitmap.unlock()
        return found

    cdef bint _turn(self) noexcept nogil:
        """Under mu: may a copy start now under the speed limit?  If not,
        sleep until it may (or until woken: set_speed, pause, stop, a mark)
        and return False so that the caller checks everything again.

        The wait comes *before* the pick: a worker sleeping on the limit
        holds no extent, so its chunks are neither shown as in flight nor
        kept from a write that goes to both sides (write-blocking mode)."""
        cdef timespec ts
        if not self._throttled():
            return True
        ts.tv_sec = self.rate_next_ns // 1000000000
        ts.tv_nsec = self.rate_next_ns % 1000000000
        pthread_cond_timedwait(&self.work_cv, &self.mu, &ts)
        return False

    cdef inline bint _throttled(self) noexcept nogil:
        """Under mu: must the next copy wait for the speed limit?"""
        return self.speed_limit > 0 and monotonic_ns() < self.rate_next_ns

    cdef void _charge(self, int64_t nbytes) noexcept nogil:
        """Under mu: a copy of nbytes starts now; the next may start once
        the limit has paid for this one."""
        cdef int64_t now
        if self.speed_limit <= 0:
            return
        now = monotonic_ns()
        if self.rate_next_ns < now:
            self.rate_next_ns = now
        self.rate_next_ns += nbytes * 1000000000 // self.speed_limit

    cdef void _fail(self, int op, int err, int64_t offset, int64_t length) noexcept nogil:
        """Under mu: queue a failure and hold all workers."""
        cdef Failure *f
        if self.nfailures < MAX_FAILURES:
            f = &self.failures[self.nfailures]
            f.op = op
            f.err = err
            f.offset = offset
            f.length = length
            self.nfailures += 1
        else:
            self.failures_dropped += 1
        self.held = True
        pthread_cond_broadcast(&self.event_cv)

    cdef int _zero(self, int64_t off, int64_t length) noexcept nogil:
        """Make a target range read as zeros without writing them; 0 or
        -errno, -EOPNOTSUPP where the target cannot (then write zeros).
        On an NBD target: WRITE_ZEROES, which may leave a hole when unmap
        is on (NO_HOLE otherwise), never TRIM, which guarantees nothing
        about what reads back."""
        if self.nbd != NULL:
            return fm_nbd_zero(self.nbd, off, length, self.unmap, 0)
        return zero_range(self.dst_fd, off, length, self.dst_is_block, self.unmap)

    cdef int _write_target(self, const char *buf, int64_t off, int64_t length) noexcept nogil:
        """Write a range of the target: the aligned part with O_DIRECT, the
        unaligned tail at the source's end through the buffered descriptor.
        An NBD target takes the whole range (the client splits it to the
        server's maximum and patches an unaligned end)."""
        cdef int64_t r
        cdef int64_t alen = length & ~(self.align - 1)
        cdef iovec v
        if self.nbd != NULL:
            return fm_nbd_write(self.nbd, buf, off, length)
        if alen:
            v.iov_base = <void *>buf
            v.iov_len = <size_t>alen
            r = pwritev_full(self.dst_fd, &v, 1, off)
            if r < 0:
                return <int>r
        if alen < length:
            v.iov_base = <void *>(buf + alen)
            v.iov_len = <size_t>(length - alen)
            r = pwritev_full(self.dst_tail_fd, &v, 1, off + alen)
            if r < 0:
                return <int>r
        return 0

    cdef int _put(self, const char *buf, int64_t off, int64_t length, bint zero) noexcept nogil:
        """Store one run: zeros become a zeroed range where the target can
        do it without writing (and where the run is aligned, or reaches the
        end of the source), data is written."""
        cdef int r
        if zero and ((length & (self.align - 1)) == 0 or off + length == self.size):
            r = self._zero(off, length)
            if r == 0:
                fm_atomic_add(&self.bytes_zero_detected, length)
                return 0
            if r != -EOPNOTSUPP:
                return r
        return self._write_target(buf, off, length)

    cdef int _copy(self, void *buf, int64_t off, int64_t length, int *op) noexcept nogil:
        """Copy [off, off+length) with no lock held; 0 or -errno, *op tells
        which side failed."""
        cdef int r
        op[0] = C_OP_READ
        r = self._read(<char *>buf, off, length, 0)
        if r < 0:
            return r
        op[0] = C_OP_WRITE
        return self._store(<const char *>buf, off, length)

    cdef int _read(self, char *buf, int64_t off, int64_t length, int64_t have) noexcept nogil:
        """Read [off, off+length) of the source into buf, of which the first
        `have` bytes are already there (a short asynchronous read); 0 or
        -errno.  O_DIRECT lengths are multiples of the alignment; at the end
        of the source the kernel returns only what exists."""
        cdef int64_t r
        cdef iovec v
        have &= ~(self.align - 1)       # restart on an O_DIRECT boundary
        v.iov_base = buf + have
        v.iov_len = <size_t>(((length + self.align - 1) & ~(self.align - 1)) - have)
        r = preadv_full(self.src_fd, &v, 1, off + have)
        if r < 0:
            return <int>r
        if have + r < length:
            return -ENXIO   # the source shrank under us
        return 0

    cdef int _store(self, const char *p, int64_t off, int64_t length) noexcept nogil:
        """Write data read from the source to the target, its zero runs as
        zeroed ranges; 0 or -errno."""
        cdef int64_t pos, end, n, blk = ZERO_BLOCK, min_run = self.min_zero_run
        cdef bint z
        cdef int w
        if not self.detect_zeroes:
            return self._write_target(p, off, length)
        if blk < self.align:
            blk = self.align
        # Split the extent into runs of zero blocks and data runs, so that the
        # zeros of a partly sparse chunk stay holes on the target.  Zero runs
        # shorter than min_zero_run inside data are written with it: splitting
        # a write for them would cost more than it saves.
        pos = 0
        while pos < length:
            end = self._run_end(p, pos, length, blk, &z)
            if not z or (end - pos < min_run and not (pos == 0 and end == length)):
                while end < length:
                    n = self._run_end(p, end, length, blk, &z)
                    if z and n - end >= min_run:
                        break
                    end = n
                z = False
            w = self._put(p + pos, off + pos, end - pos, z)
            if w < 0:
                return w
            pos = end
        return 0

    cdef inline int64_t _run_end(self, const char *p, int64_t pos, int64_t length,
                                 int64_t blk, bint *zero) noexcept nogil:
        """End of the run of blocks starting at pos that are all zero, or all
        hold data (*zero tells which)."""
        cdef int64_t n = blk if length - pos > blk else length - pos
        cdef bint z = buffer_is_zero(p + pos, <size_t>n)
        cdef int64_t end = pos + n
        while end < length:
            n = blk if length - end > blk else length - end
            if buffer_is_zero(p + end, <size_t>n) != z:
                break
            end += n
        zero[0] = z
        return end

    cdef void _trace_before(self, int64_t off, int64_t length) noexcept with gil:
        with cython.critical_section(self):
            cb = self.on_iteration        # a new reference: safe after the section
        if cb is not None:
            try:
                cb(off >> 9, (length + 511) >> 9)
            except BaseException:
                _log_callback_error("mirror_one_iteration")

    cdef void _trace_after(self, int64_t off, int64_t length, int ret) noexcept with gil:
        with cython.critical_section(self):
            cb = self.on_iteration_done
        if cb is not None:
            try:
                cb(off, length, ret)
            except BaseException:
                _log_callback_error("mirror_iteration_done")

    cdef void _begin(self, int slot) noexcept nogil:
        """Under mu, after a successful _pick(slot): account for the copy
        that starts and record its byte range."""
        cdef int64_t first = self.inflight_first[slot]
        cdef int64_t off = first << self.shift
        cdef int64_t length = (self.inflight_end[slot] - first) << self.shift
        if off + length > self.size:
            length = self.size - off
        self.slot_off[slot] = off
        self.slot_len[slot] = length
        if self.busy == 0:
            self.busy_since = monotonic_ns()
        self.busy += 1
        if self.bitmap.c_count() > 0:
            pthread_cond_signal(&self.work_cv)       # more work: wake a peer
        self._charge(length)

    cdef void _done(self, int slot, int r, int op) noexcept nogil:
        """Under mu: the copy of `slot` ended with r (0 or -errno)."""
        cdef int64_t first = self.inflight_first[slot]
        cdef int64_t n = self.inflight_end[slot] - first
        cdef int64_t now
        fm_assert_locked(&self.mu)
        if FM_DEBUG:
            fm_assert(self.busy > 0 and first >= 0 and n > 0, "busy > 0, first >= 0, n > 0")
        if r < 0:
            # Never leave a failed range clean: dirty it again while it is
            # still ours, so no other worker can copy it in between.
            self.bitmap.c_set(first, n)
            self._fail(op, -r, self.slot_off[slot], self.slot_len[slot])
        else:
            self.unflushed.c_set(first, n)    # written: the next flush must cover it
            self.bytes_copied += self.slot_len[slot]
            self.chunks_copied += n
            self.copies += 1
        self.inflight_first[slot] = -1
        self.inflight_end[slot] = -1
        pthread_cond_broadcast(&self.claim_cv)
        self.busy -= 1
        if self.busy == 0:
            now = monotonic_ns()
            self.busy_ns += now - self.busy_since
            pthread_cond_broadcast(&self.event_cv)
        if self.bitmap.c_count() > 0:
            pthread_cond_signal(&self.work_cv)

    cdef void _worker(self, int slot) noexcept nogil:
        cdef void *buf = self.buffers[slot]
        cdef int64_t off, length
        cdef int r, op
        pthread_mutex_lock(&self.mu)
        while not self.stopping:
            if not (self.paused or self.held) and not self._turn():
                continue                                 # woken: check again
            if self.paused or self.held or not self._pick(slot):
                pthread_cond_broadcast(&self.event_cv)   # maybe clean now
                pthread_cond_wait(&self.work_cv, &self.mu)
                continue
            self._begin(slot)
            off = self.slot_off[slot]
            length = self.slot_len[slot]
            pthread_mutex_unlock(&self.mu)

            if self.trace_on:
                self._trace_before(off, length)
            r = self._copy(buf, off, length, &op)
            if self.trace_on:
                self._trace_after(off, length, r)

            pthread_mutex_lock(&self.mu)
            self._done(slot, r, op)
        self.running -= 1
        pthread_cond_broadcast(&self.event_cv)
        pthread_mutex_unlock(&self.mu)

    # ------------------------------------------------------------------
    # The io_uring driver: many copies in flight from one thread
    # ------------------------------------------------------------------

    def run_driver(self, int first, int count):
        """Run the copy slots [first, first+count) from this one thread until
        stop(), with every slot's read or write in flight at once on an
        io_uring, as QEMU's mirror keeps its 16 operations in flight from one
        thread.  Submitting them together lets the block layer merge
        neighbouring requests, which blocking reads in threads never allow.
        The ring issues them as ring_calls says: by default into the slots'
        buffers registered with the ring (READ_FIXED/WRITE_FIXED), so that
        the kernel does not look up and pin their pages for every request.

        Raises OSError if io_uring cannot be set up (old kernel, seccomp):
        the caller falls back to run_worker() threads."""
        cdef fm_ring ring
        cdef int r, i
        cdef bint taken = False
        if count < 1 or first < 0 or first + count > self.nworkers:
            raise ValueError("slots out of range")
        if self.nbd != NULL:
            # The ring drives descriptors; an NBD target is written by the
            # client's blocking calls, so its slots run in threads.
            raise OSError(EOPNOTSUPP, "io_uring: the target is an NBD export")
        with nogil:
            r = fm_ring_init(&ring, <unsigned>count)
        if r < 0:
            raise OSError(-r, "io_uring: " + os.strerror(-r))
        with nogil:
            pthread_mutex_lock(&self.mu)
            taken = self.fds_closed
            for i in range(first, first + count):
                taken = taken or self.slot_running[i]
            if not taken:
                for i in range(first, first + count):
                    self.slot_running[i] = True
                    self.slot_state[i] = S_IDLE
                self.running += 1
            pthread_mutex_unlock(&self.mu)
        if taken:
            fm_ring_exit(&ring)
            raise RuntimeError("a worker already runs in slots [%d, %d), or the engine is closed"
                               % (first, first + count))
        try:
            with nogil:
                self._ring_calls(&ring, first, count)
                self._driver(&ring, first, count)
        finally:
            fm_ring_exit(&ring)

    @property
    def ring_calls(self):
        """How io_uring drivers started from now on issue reads and writes,
        one of RING_CALLS: "auto" (the default) registers the slots' buffers
        and issues READ_FIXED/WRITE_FIXED where the kernel takes them, and
        READ/WRITE otherwise; "fixed" is the same by name; "vectored" issues
        READV/WRITEV; "plain" READ/WRITE.  ring_io says what they do."""
        return RING_CALLS[self.ring_want]

    @ring_calls.setter
    def ring_calls(self, value):
        cdef int want
        if value not in RING_CALLS:
            raise ValueError("ring_calls must be one of %s, not %r" % (RING_CALLS, value))
        want = RING_CALLS.index(value)
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.ring_want = want
            pthread_mutex_unlock(&self.mu)

    @property
    def ring_io(self):
        """What the io_uring drivers issue: None before one has started,
        else e.g. "READ_FIXED/WRITE_FIXED" (registered buffers),
        "READ/WRITE (registered buffers refused: Cannot allocate memory)",
        or, when rings differ, "READ_FIXED/WRITE_FIXED on 1 of 2 rings,
        READ/WRITE on 1 (...)".  Registering is refused with ENOMEM when
        the buffers exceed RLIMIT_MEMLOCK (without CAP_IPC_LOCK)."""
        cdef int n[3]
        cdef int err
        with nogil:
            pthread_mutex_lock(&self.mu)
            n = self.ring_count
            err = self.fixed_err
            pthread_mutex_unlock(&self.mu)
        total = n[0] + n[1] + n[2]
        if total == 0:
            return None
        names = {FM_CALLS_FIXED: "READ_FIXED/WRITE_FIXED", FM_CALLS_VECTORED: "READV/WRITEV",
                 FM_CALLS_PLAIN: "READ/WRITE"}
        parts = [(names[c], n[c]) for c in (FM_CALLS_FIXED, FM_CALLS_VECTORED, FM_CALLS_PLAIN)
                 if n[c]]
        if len(parts) == 1:
            out = parts[0][0]
        else:
            out = ", ".join("%s on %d%s" % (name, k, " of %d rings" % total if i == 0 else "")
                            for i, (name, k) in enumerate(parts))
        if err:
            out += " (registered buffers refused: %s)" % os.strerror(err)
        return out

    cdef void _ring_calls(self, fm_ring *ring, int first, int count) noexcept nogil:
        """Set up how this driver's ring issues reads and writes, as
        ring_calls asks, and count it for ring_io.  Registered buffers are
        the slots' own (buf_index = slot - first), max_io bytes each; where
        the kernel refuses them the ring issues READ/WRITE, which works on
        any memory: never a reason to fail the copy."""
        cdef iovec bufs[MAX_WORKERS]
        cdef int i, r = 0, want
        pthread_mutex_lock(&self.mu)
        want = self.ring_want
        pthread_mutex_unlock(&self.mu)
        if want == R_AUTO or want == R_FIXED:
            for i in range(count):
                bufs[i].iov_base = self.buffers[first + i]
                bufs[i].iov_len = <size_t>self.max_io
            r = fm_ring_use(ring, FM_CALLS_FIXED, bufs, <unsigned>count)
        elif want == R_VECTORED:
            fm_ring_use(ring, FM_CALLS_VECTORED, NULL, 0)   # else it stays plain
        pthread_mutex_lock(&self.mu)
        self.ring_count[ring.calls] += 1
        if r < 0:
            self.fixed_err = -r
        pthread_mutex_unlock(&self.mu)

    cdef bint _all_data(self, const char *p, int64_t length) noexcept nogil:
        """Is there no zero block to store as a zeroed range?"""
        cdef int64_t blk = ZERO_BLOCK
        cdef bint z
        if not self.detect_zeroes:
            return True
        if blk < self.align:
            blk = self.align
        return self._run_end(p, 0, length, blk, &z) == length and not z

    cdef void _driver(self, fm_ring *ring, int first, int count) noexcept nogil:
        cdef int s, i, r, res, op, nnew, nfin, nactive = 0, retries = 0
        cdef unsigned k, nback
        cdef uint64_t back[MAX_WORKERS]
        cdef int newly[MAX_WORKERS]
        cdef int fin_slot[MAX_WORKERS]
        cdef int fin_r[MAX_WORKERS]
        cdef int fin_op[MAX_WORKERS]
        cdef uint64_t ud
        cdef int64_t off, length
        cdef char *buf
        cdef bint throttled
        pthread_mutex_lock(&self.mu)
        while True:
            # Fill every idle slot with an extent, as long as the job allows.
            nnew = 0
            throttled = False
            if not (self.stopping or self.paused or self.held):
                for s in range(first, first + count):
                    if self.inflight_first[s] >= 0:
                        continue
                    if self._throttled():
                        throttled = True
                        break
                    if not self._pick(s):
                        break
                    self._begin(s)
                    newly[nnew] = s
                    nnew += 1
            nactive += nnew
            if nactive == 0:
                if self.stopping:
                    break
                if throttled:
                    self._turn()                             # sleeps until the limit allows
                    continue
                pthread_cond_broadcast(&self.event_cv)       # maybe clean now
                pthread_cond_wait(&self.work_cv, &self.mu)
                continue
            pthread_mutex_unlock(&self.mu)

            nfin = 0
            for i in range(nnew):
                s = newly[i]
                off = self.slot_off[s]
                length = self.slot_len[s]
                if self.trace_on:
                    self._trace_before(off, length)
                if length & (self.align - 1):
                    # The unaligned end of the source: the blocking path
                    # knows how to write it through the buffered descriptor.
                    r = self._copy(self.buffers[s], off, length, &op)
                    fin_slot[nfin] = s
                    fin_r[nfin] = r
                    fin_op[nfin] = op
                    nfin += 1
                else:
                    # Each slot has at most one entry queued or in flight and
                    # the ring has an entry per slot, so this cannot fail; if
                    # it ever did, the copy fails and is retried, not lost.
                    r = fm_ring_prep(ring, FM_RING_READ, self.src_fd, self.buffers[s],
                                     <unsigned>length, off, <uint64_t>s)
                    if r < 0:
                        fin_slot[nfin] = s
                        fin_r[nfin] = r
                        fin_op[nfin] = C_OP_READ
                        nfin += 1
                    else:
                        self.slot_state[s] = S_READING

            # Hand over the new reads (and the writes queued last time round)
            # and sleep until one completes, unless a copy already finished.
            r = fm_ring_submit(ring, 0 if nfin else 1)
            if r >= 0:
                retries = 0
            elif (r == -EAGAIN or r == -ENOMEM or r == -EINTR) and retries < SUBMIT_RETRIES:
                retries += 1
                usleep(1000)      # short of memory: the entries stay queued
            else:
                # The kernel will not take them: take the entries back and
                # fail their copies (dirty again, the policy decides).
                nback = fm_ring_unqueue(ring, back, MAX_WORKERS)
                for k in range(nback):
                    s = <int>back[k]
                    fin_slot[nfin] = s
                    fin_r[nfin] = r
                    fin_op[nfin] = C_OP_WRITE if self.slot_state[s] == S_WRITING else C_OP_READ
                    nfin += 1
                    self.slot_state[s] = S_IDLE
                retries = 0

            while fm_ring_reap(ring, &ud, &res):
                s = <int>ud
                if FM_DEBUG:
                    fm_assert(first <= s < first + count and self.slot_state[s], "our slot, busy")
                off = self.slot_off[s]
                length = self.slot_len[s]
                buf = <char *>self.buffers[s]
                r = 0
                if res == -EAGAIN or res == -EINTR:
                    # Not an I/O error: the block layer had no room for one
                    # of the pieces (older kernels), or a signal.  Do the
                    # whole range again the blocking way.
                    res = 0
                if self.slot_state[s] == S_READING:
                    op = C_OP_READ
                    if res < 0:
                        r = res
                    elif res < length:
                        r = self._read(buf, off, length, res)   # a short read
                    if r == 0:
                        op = C_OP_WRITE
                        if self._all_data(buf, length) and fm_ring_prep(
                                ring, FM_RING_WRITE, self.dst_fd, buf, <unsigned>length,
                                off, <uint64_t>s) == 0:
                            self.slot_state[s] = S_WRITING
                            continue
                        # Zero runs to store as zeroed ranges (or no room on
                        # the ring): the blocking path writes it.
                        r = self._store(buf, off, length)
                else:
                    op = C_OP_WRITE
                    if res < 0:
                        r = res
                    elif res < length:                      # a short write
                        res &= ~(<int>self.align - 1)
                        r = self._write_target(buf + res, off + res, length - res)
                self.slot_state[s] = S_IDLE
                fin_slot[nfin] = s
                fin_r[nfin] = r
                fin_op[nfin] = op
                nfin += 1

            if self.trace_on:
                for i in range(nfin):
                    s = fin_slot[i]
                    self._trace_after(self.slot_off[s], self.slot_len[s], fin_r[i])
            pthread_mutex_lock(&self.mu)
            for i in range(nfin):
                self._done(fin_slot[i], fin_r[i], fin_op[i])
            nactive -= nfin
        self.running -= 1
        pthread_cond_broadcast(&self.event_cv)
        pthread_mutex_unlock(&self.mu)

cdef int _dup_fd(int fd) except -1:
    """A close-on-exec duplicate of fd, at or above 3."""
    cdef int r = fcntl(fd, F_DUPFD_CLOEXEC, 3)
    if r < 0:
        raise OSError(errno, "cannot duplicate descriptor %d: %s" % (fd, os.strerror(errno)))
    return r


def _log_callback_error(name):
    import logging
    logging.getLogger("fastmirror").exception("tracepoint %s listener raised", name)


# The C API of _engine.pxd: the tracked write path calls these without the
# GIL.  `engine` is a CopyEngine that the caller keeps alive.

cdef void fm_engine_claim(void *engine, fm_claim *c, int64_t offset,
                          int64_t length) noexcept nogil:
    (<CopyEngine>engine).claim_range(c, offset, length)


cdef void fm_engine_unclaim(void *engine, fm_claim *c) noexcept nogil:
    (<CopyEngine>engine).unclaim_range(c)


cdef void fm_engine_mark(void *engine, int64_t offset, int64_t length) noexcept nogil:
    (<CopyEngine>engine).mark_bytes(offset, length)
