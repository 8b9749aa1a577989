# The activity log: which extents of a mirrored disk may have writes that
# the persisted dirty bitmap does not show yet (docs/design.md, "The crash
# model").  The tracked write path calls fm_al_begin() before a write reaches
# the disk and fm_al_end() after its chunks were marked; both run without the
# GIL.  `al` is an ActivityLog that the caller keeps alive (it holds a
# reference) for as long as it calls these.
from libc.stdint cimport int64_t, uint64_t, uint32_t
from fastmirror._core.sync cimport pthread_mutex_t, pthread_cond_t

cdef enum:
    AL_MAX_SLOTS = 257          # as DRBD's default al-extents
    AL_RECORD = 4096            # one on-disk record; the sidecar holds two

# One active extent.
cdef struct al_slot:
    int64_t extent              # extent number (offset >> shift); -1: free
    int refs                    # requests between begin and end
    uint64_t stamp              # last use, for the LRU
    uint64_t since              # the add counter when it was added
    uint64_t gen                # the record generation that holds it
    bint covered                # a durable state file has all of it dirty

# 0, or -errno when the record could not be made durable (nothing written).
cdef int fm_al_begin(void *al, int64_t offset, int64_t length) noexcept nogil
cdef void fm_al_end(void *al, int64_t offset, int64_t length) noexcept nogil

cdef class ActivityLog:
    cdef pthread_mutex_t mu
    cdef pthread_cond_t cv          # writers waiting: a slot, a record, a snapshot
    cdef pthread_cond_t req_cv      # the state writer waits for snapshot requests
    cdef bint ready
    cdef int fd                     # the sidecar, written in place
    cdef readonly int nslots
    cdef readonly int shift         # log2(extent size)
    cdef readonly int64_t size      # bytes of the disk
    cdef al_slot slots[AL_MAX_SLOTS]
    cdef uint64_t clock             # LRU stamps
    cdef uint64_t adds              # slots added so far
    cdef uint64_t wanted            # generation of the slot set in memory
    cdef uint64_t durable           # generation last written and synced
    cdef bint writing               # a record write is in progress
    cdef readonly uint64_t seq      # sequence number of the last record
    cdef unsigned char run_id[16]
    cdef int mode                   # M_* in actlog.pyx
    cdef uint64_t poison_gen
    cdef int err                    # sticky -errno of the sidecar
    cdef bint want_snapshot
    cdef int waiting                # writers sleeping on cv
    cdef readonly int64_t records   # records written
    cdef readonly int64_t misses    # begins that had to add an extent
    cdef readonly int64_t snapshot_waits   # evictions that waited for a state file
    cdef unsigned char *buf         # one record, built under mu

    cdef int c_begin(self, int64_t offset, int64_t length) noexcept nogil
    cdef void c_end(self, int64_t offset, int64_t length) noexcept nogil
    cdef int _acquire(self, int64_t first, int64_t last, uint64_t *need) noexcept nogil
    cdef int _victim(self) noexcept nogil
    cdef void _release(self, int64_t first, int64_t last) noexcept nogil
    cdef int _commit(self, uint64_t need) noexcept nogil
    cdef int _find(self, int64_t extent) noexcept nogil
    cdef void _build(self, uint32_t flags) noexcept nogil
    cdef void _set_mode(self, int mode, int only_from) noexcept
