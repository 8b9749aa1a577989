# cython: language_level=3
"""The activity log: the extents of a mirrored disk that writes may touch
without the persisted dirty bitmap showing it yet, as DRBD's activity log.

A job with a state file (job/state.py) persists its dirty bitmap every
second or so, atomically.  Between two state files, a write that lands on
the source and then crashes the process (kill -9, a power cut) would be
lost to a resumed job, whose bitmap says the chunk is clean.  So before a
tracked write reaches the disk, its extent (extent_size bytes, 4 MiB by
default) must be recorded as *active* in a small sidecar file (PATH.al) that
is synced before the write goes on; a resumed job dirties every active
extent as well as what its bitmap says.

Most writes cost nothing here: the extents in the log stay there (an LRU of
`nslots` slots), so a write to an extent already active only takes the
mutex, finds the slot and counts itself in: no system call, no GIL.  A write
to a new extent adds it and waits for a record of the new set to be written
and synced (one pwrite + fdatasync, shared by every writer waiting at the
time: a group commit).

An extent may leave the log only when no write to it is in progress and a
durable state file has every chunk of it dirty (`covered`): the state writer
dirties every active extent in the bitmap it persists, and once that file
is synced calls covered().  Writes that happened to the extent before it
left were marked before (refs was 0), so the next state file has their
bits.  When every slot without writes in progress is uncovered, an adding
writer asks the state writer for a state file (wait_request()) and sleeps
until it is done.

On-disk record (AL_RECORD bytes, little-endian hosts): magic "FMAL", version,
CRC-32 of bytes 12.. at offset 8, the run id of the state file it belongs
to, a sequence number, flags (ALL_DIRTY), the extent shift, the count and the
extent numbers.  Records alternate between two places in the file by
sequence number, so a torn write leaves the previous record whole; the
reader takes the valid record with the highest sequence number.

After the job ends without a pivot the source is no longer tracked, so the
log is poisoned: the first write after that first records ALL_DIRTY (a
resumed job then copies everything); after a pivot the log is off.

Locking: `mu` guards everything here; it is never held during I/O and no
other lock is taken under it.  The tracked disk calls in with none of its
own locks held.
"""

cimport cython

from libc.stdint cimport int64_t, uint64_t, uint32_t
from libc.stdlib cimport free
from libc.string cimport memset, memcpy
from posix.fcntl cimport fcntl, F_DUPFD_CLOEXEC
from posix.unistd cimport close as c_close
from posix.time cimport timespec
from fastmirror._core.blockio cimport pwrite_full, flush_fd, monotonic_ns
from fastmirror._core.sync cimport (pthread_mutex_init, pthread_mutex_destroy,
                                    pthread_mutex_lock, pthread_mutex_unlock,
                                    pthread_condattr_t, pthread_condattr_init,
                                    pthread_condattr_setclock, pthread_condattr_destroy,
                                    pthread_cond_init, pthread_cond_destroy, pthread_cond_wait,
                                    pthread_cond_timedwait, pthread_cond_signal,
                                    pthread_cond_broadcast, CLOCK_MONOTONIC)

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **p, size_t align, size_t size)

cdef extern from *:
    """
    /* CRC-32 (IEEE 802.3, as zlib.crc32), one table built on first use. */
    static uint32_t fm_crc_table[256];
    static int fm_crc_ready = 0;
    static void fm_crc_init(void) {
        for (uint32_t n = 0; n < 256; n++) {
            uint32_t c = n;
            for (int k = 0; k < 8; k++)
                c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            fm_crc_table[n] = c;
        }
        fm_crc_ready = 1;
    }
    static uint32_t fm_crc32(const unsigned char *p, size_t n) {
        uint32_t c = 0xFFFFFFFFu;
        while (n--)
            c = fm_crc_table[(c ^ *p++) & 0xFF] ^ (c >> 8);
        return c ^ 0xFFFFFFFFu;
    }
    """
    void fm_crc_init() nogil
    uint32_t fm_crc32(const unsigned char *p, size_t n) nogil

fm_crc_init()      # at import, with the GIL: the table is read-only afterwards

cdef enum:
    M_ACTIVE = 0            # writes add their extents
    M_POISON_PENDING = 1    # tracking ended: the next write records ALL_DIRTY
    M_POISONED = 2          # ALL_DIRTY recorded (or being recorded)
    M_OFF = 3               # after a pivot: nothing is recorded

    F_ALL_DIRTY = 1
    C_AL_VERSION = 1

    OFF_CRC = 8
    OFF_RUN = 16
    OFF_SEQ = 32
    OFF_FLAGS = 40
    OFF_SHIFT = 44
    OFF_COUNT = 48
    OFF_EXTENTS = 56

AL_MAGIC = b"FMAL"
AL_VERSION = C_AL_VERSION
ALL_DIRTY = F_ALL_DIRTY
RECORD_SIZE = AL_RECORD
MAX_SLOTS = AL_MAX_SLOTS


@cython.final
cdef class ActivityLog:
    """ActivityLog(fd, size, extent_size, nslots, run_id, seq): the log of a
    disk of `size` bytes, written to the sidecar file open at `fd` (it is
    duplicated; the caller keeps its own).  `run_id` (16 bytes) ties the
    records to one state file; the first record written has sequence number
    seq + 1, and is written (empty) before the constructor returns."""

    def __cinit__(self):
        cdef pthread_condattr_t attr
        self.fd = -1
        pthread_mutex_init(&self.mu, NULL)
        pthread_cond_init(&self.cv, NULL)
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(&self.req_cv, &attr)
        pthread_condattr_destroy(&attr)
        self.ready = True

    def __init__(self, int fd, int64_t size, int64_t extent_size, int nslots,
                 bytes run_id not None, uint64_t seq):
        cdef int i, r
        cdef void *p = NULL
        if self.fd >= 0:
            raise RuntimeError("ActivityLog is already initialised")
        if extent_size < 4096 or extent_size & (extent_size - 1):
            raise ValueError("extent size %d is not a power of two >= 4096" % extent_size)
        if nslots < 2 or nslots > AL_MAX_SLOTS:
            raise ValueError("nslots must be within [2, %d], got %d" % (AL_MAX_SLOTS, nslots))
        if len(run_id) != 16:
            raise ValueError("run_id must be 16 bytes")
        if size < 0:
            raise ValueError("negative size")
        if posix_memalign(&p, 4096, AL_RECORD) != 0:
            raise MemoryError()
        self.buf = <unsigned char *>p
        self.size = size
        self.nslots = nslots
        self.shift = 0
        while (<int64_t>1 << self.shift) < extent_size:
            self.shift += 1
        memcpy(self.run_id, <const char *>run_id, 16)
        for i in range(AL_MAX_SLOTS):
            self.slots[i].extent = -1
            self.slots[i].refs = 0
            self.slots[i].covered = False
        self.seq = seq
        self.fd = fcntl(fd, F_DUPFD_CLOEXEC, 0)
        if self.fd < 0:
            import os
            raise OSError(9, os.strerror(9), "activity log")      # EBADF
        with nogil:
            pthread_mutex_lock(&self.mu)
            self.wanted += 1
            r = self._commit(self.wanted)
            pthread_mutex_unlock(&self.mu)
        if r < 0:
            import os
            raise OSError(-r, os.strerror(-r), "activity log")

    def __dealloc__(self):
        if self.fd >= 0:
            c_close(self.fd)
            self.fd = -1
        if self.buf != NULL:
            free(self.buf)
            self.buf = NULL
        if self.ready:
            pthread_cond_destroy(&self.req_cv)
            pthread_cond_destroy(&self.cv)
            pthread_mutex_destroy(&self.mu)

    # ------------------------------------------------------------------
    # The write path (nogil)
    # ------------------------------------------------------------------

    cdef int c_begin(self, int64_t offset, int64_t length) noexcept nogil:
        """Before a write of [offset, offset+length) reaches the disk: 1 when
        its extents were counted in (call c_end() after the marking), 0 when
        nothing needs ending, -errno when the log could not be written (the
        write must not happen)."""
        cdef int64_t first, last
        cdef uint64_t need = 0
        cdef int r
        if length <= 0:
            return 0
        first = offset >> self.shift
        last = (offset + length - 1) >> self.shift
        pthread_mutex_lock(&self.mu)
        while True:
            if self.mode == M_OFF:
                pthread_mutex_unlock(&self.mu)
                return 0
            if self.mode != M_ACTIVE:
                if self.mode == M_POISON_PENDING:
                    self.mode = M_POISONED
                    self.wanted += 1
                    self.poison_gen = self.wanted
                r = self._commit(self.poison_gen)
                pthread_mutex_unlock(&self.mu)
                return r
            r = self._acquire(first, last, &need)
            if r == 1:
                continue            # the mode changed while waiting
            if r < 0:
                pthread_mutex_unlock(&self.mu)
                return r
            break
        if self.durable < need:
            r = self._commit(need)
            if r < 0:
                self._release(first, last)
                pthread_mutex_unlock(&self.mu)
                return r
        pthread_mutex_unlock(&self.mu)
        return 1

    cdef void c_end(self, int64_t offset, int64_t length) noexcept nogil:
        """After the write's chunks were marked dirty (c_begin returned 1)."""
        if length <= 0:
            return
        pthread_mutex_lock(&self.mu)
        self._release(offset >> self.shift, (offset + length - 1) >> self.shift)
        pthread_mutex_unlock(&self.mu)

    cdef int _find(self, int64_t extent) noexcept nogil:
        cdef int i
        for i in range(self.nslots):
            if self.slots[i].extent == extent:
                return i
        return -1

    cdef int _victim(self) noexcept nogil:
        """Under mu: a free slot, else the least recently used one that no
        write holds and that a durable state file covers; -1 if none."""
        cdef int i, best = -1
        for i in range(self.nslots):
            if self.slots[i].extent < 0:
                return i
            if self.slots[i].refs == 0 and self.slots[i].covered and (
                    best < 0 or self.slots[i].stamp < self.slots[best].stamp):
                best = i
        return best

    cdef int _acquire(self, int64_t first, int64_t last, uint64_t *need) noexcept nogil:
        """Under mu: count a request in on extents [first, last], adding the
        missing ones; *need is the record generation that must be durable
        before the write.  All or none: a request that must wait lets go of
        what it took, so requests never hold slots while waiting for others
        (no deadlock however many writers there are).  0, 1 when the mode
        changed meanwhile, or -errno."""
        cdef int64_t e
        cdef int i
        cdef bint uncovered
        while True:
            if self.err < 0:
                return self.err
            if self.mode != M_ACTIVE:
                return 1
            need[0] = 0
            e = first
            while e <= last:
                i = self._find(e)
                if i < 0:
                    i = self._victim()
                    if i < 0:
                        break
                    self.slots[i].extent = e
                    self.slots[i].refs = 0
                    self.adds += 1
                    self.slots[i].since = self.adds
                    self.slots[i].covered = False
                    self.wanted += 1
                    self.slots[i].gen = self.wanted
                    self.misses += 1
                self.slots[i].refs += 1
                self.clock += 1
                self.slots[i].stamp = self.clock
                if self.slots[i].gen > need[0]:
                    need[0] = self.slots[i].gen
                e += 1
            if e > last:
                return 0
            if e > first:
                self._release(first, e - 1)
            # Full: ask for a state file if that would free a slot (one with
            # no write in progress that is not covered yet), then wait.
            uncovered = False
            for i in range(self.nslots):
                if self.slots[i].refs == 0 and not self.slots[i].covered:
                    uncovered = True
                    break
            if uncovered:
                self.want_snapshot = True
                self.snapshot_waits += 1
                pthread_cond_signal(&self.req_cv)
            self.waiting += 1
            pthread_cond_wait(&self.cv, &self.mu)
            self.waiting -= 1

    cdef void _release(self, int64_t first, int64_t last) noexcept nogil:
        cdef int64_t e
        cdef int i
        cdef bint wake = False
        for e in range(first, last + 1):
            i = self._find(e)
            if i >= 0 and self.slots[i].refs > 0:
                self.slots[i].refs -= 1
                if self.slots[i].refs == 0:
                    wake = True
        if wake and self.waiting:
            pthread_cond_broadcast(&self.cv)

    cdef void _build(self, uint32_t flags) noexcept nogil:
        """Under mu: the record of the slot set now into buf."""
        cdef uint32_t v
        cdef uint32_t count = 0
        cdef int i
        cdef uint64_t e
        memset(self.buf, 0, AL_RECORD)
        memcpy(self.buf, b"FMAL", 4)
        v = C_AL_VERSION
        memcpy(self.buf + 4, &v, 4)
        memcpy(self.buf + OFF_RUN, self.run_id, 16)
        self.seq += 1
        memcpy(self.buf + OFF_SEQ, &self.seq, 8)
        memcpy(self.buf + OFF_FLAGS, &flags, 4)
        v = <uint32_t>self.shift
        memcpy(self.buf + OFF_SHIFT, &v, 4)
        for i in range(self.nslots):
            if self.slots[i].extent >= 0:
                e = <uint64_t>self.slots[i].extent
                memcpy(self.buf + OFF_EXTENTS + 8 * count, &e, 8)
                count += 1
        memcpy(self.buf + OFF_COUNT, &count, 4)
        v = fm_crc32(self.buf + 12, AL_RECORD - 12)
        memcpy(self.buf + OFF_CRC, &v, 4)

    cdef int _commit(self, uint64_t need) noexcept nogil:
        """Under mu: return once a record of generation >= need is durable.
        One writer writes for everybody waiting (group commit); mu is let go
        during the write.  0 or -errno (sticky: a log that failed to sync
        may have lost what it wrote)."""
        cdef uint64_t gen
        cdef int64_t n
        cdef int r
        while self.durable < need:
            if self.err < 0:
                return self.err
            if self.writing:
                self.waiting += 1
                pthread_cond_wait(&self.cv, &self.mu)
                self.waiting -= 1
                continue
            self.writing = True
            gen = self.wanted
            self._build(F_ALL_DIRTY if self.mode == M_POISONED else 0)
            n = <int64_t>(self.seq & 1) * AL_RECORD
            pthread_mutex_unlock(&self.mu)
            r = <int>pwrite_full(self.fd, self.buf, AL_RECORD, n)
            if r >= 0:
                r = flush_fd(self.fd)
            pthread_mutex_lock(&self.mu)
            self.writing = False
            if r < 0:
                self.err = r
            else:
                self.durable = gen
                self.records += 1
            pthread_cond_broadcast(&self.cv)
        return 0

    # ------------------------------------------------------------------
    # The state writer's side
    # ------------------------------------------------------------------

    def capture(self):
        """(mark, extents): the extents in the log now (each to be dirtied
        whole in the state file about to be written) and a mark to pass to
        covered() once that file is durable."""
        cdef uint64_t mark
        cdef int i
        cdef int64_t ext[AL_MAX_SLOTS]
        cdef int n = 0
        with nogil:
            pthread_mutex_lock(&self.mu)
            mark = self.adds
            for i in range(self.nslots):
                if self.slots[i].extent >= 0:
                    ext[n] = self.slots[i].extent
                    n += 1
            pthread_mutex_unlock(&self.mu)
        return mark, [ext[i] for i in range(n)]

    def covered(self, uint64_t mark):
        """A state file with every extent captured at `mark` dirty is
        durable: those extents may leave the log."""
        cdef int i
        with nogil:
            pthread_mutex_lock(&self.mu)
            for i in range(self.nslots):
                if self.slots[i].extent >= 0 and self.slots[i].since <= mark:
                    self.slots[i].covered = True
            if self.waiting:
                pthread_cond_broadcast(&self.cv)
            pthread_mutex_unlock(&self.mu)

    def wait_request(self, double timeout):
        """Sleep (GIL released) until a writer needs a state file to free a
        slot, or timeout seconds; True when one asked."""
        cdef timespec ts
        cdef int64_t t = monotonic_ns() + <int64_t>(timeout * 1e9)
        cdef bint asked
        ts.tv_sec = t // 1000000000
        ts.tv_nsec = t % 1000000000
        with nogil:
            pthread_mutex_lock(&self.mu)
            if not self.want_snapshot:
                pthread_cond_timedwait(&self.req_cv, &self.mu, &ts)
            asked = self.want_snapshot
            self.want_snapshot = False
            pthread_mutex_unlock(&self.mu)
        return asked

    def wake(self):
        """End a wait_request() now (the state writer is stopping)."""
        with nogil:
            pthread_mutex_lock(&self.mu)
            pthread_cond_broadcast(&self.req_cv)
            pthread_mutex_unlock(&self.mu)

    def poison(self):
        """Tracking ended without a pivot: the next write records ALL_DIRTY
        first (durable before it goes on), and the log costs nothing after."""
        self._set_mode(M_POISON_PENDING, M_ACTIVE)

    def stop(self):
        """After a pivot: the disk is the target, nothing is recorded."""
        self._set_mode(M_OFF, -1)

    cdef void _set_mode(self, int mode, int only_from) noexcept:
        with nogil:
            pthread_mutex_lock(&self.mu)
            if only_from < 0 or self.mode == only_from:
                self.mode = mode
            pthread_cond_broadcast(&self.cv)
            pthread_mutex_unlock(&self.mu)

    # ------------------------------------------------------------------
    # Python-level begin/end, for tests and tools
    # ------------------------------------------------------------------

    def begin(self, int64_t offset, int64_t length):
        """c_begin() from Python (GIL released): 1, 0 or -errno."""
        cdef int r
        if offset < 0 or length < 0 or offset > self.size - length:
            raise ValueError("range outside the disk")
        with nogil:
            r = self.c_begin(offset, length)
        return r

    def end(self, int64_t offset, int64_t length):
        if offset < 0 or length < 0 or offset > self.size - length:
            raise ValueError("range outside the disk")
        with nogil:
            self.c_end(offset, length)

    @property
    def extent_size(self):
        return <int64_t>1 << self.shift

    @property
    def active(self):
        """Extents in the log now."""
        return len(self.capture()[1])

    @property
    def mode(self):
        return ("active", "poison-pending", "poisoned", "off")[self.mode]

    @property
    def error(self):
        """-errno of a failed record write (sticky), else 0."""
        return self.err


cdef int fm_al_begin(void *al, int64_t offset, int64_t length) noexcept nogil:
    return (<ActivityLog>al).c_begin(offset, length)


cdef void fm_al_end(void *al, int64_t offset, int64_t length) noexcept nogil:
    (<ActivityLog>al).c_end(offset, length)
