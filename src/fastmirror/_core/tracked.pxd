# The tracked write path: how a writer reaches a disk while a job mirrors it,
# as a C API that runs without the GIL (cimport it, as the NBD export will).
#
# Every request passes the gate (the job closes it to quiesce writers for the
# final drain and the pivot), then, in write-blocking mode, claims its chunks
# from the engine (no copy of them in flight, no overlapping claim), writes,
# and marks what it wrote dirty after it landed (invariant 2).  After the
# pivot the disk is the target and nothing is tracked.
#
# Every c_* method returns bytes done (read, write) or 0, or -errno; -EBADF
# when the disk is closed (or was never attached to a descriptor).
from libc.stdint cimport int64_t
from posix.uio cimport iovec
from fastmirror._core.sync cimport pthread_mutex_t, pthread_cond_t

# O_DIRECT on the disk (set_direct): requests whose offset, length and
# buffers are multiples of this go through the O_DIRECT twin of the disk's
# descriptor, others through the buffered one.  A whole page: a direct
# write never shares a page with a concurrent buffered write it does not
# overlap, so the page cache cannot write stale bytes over it.
cdef enum:
    FM_DIO_ALIGN = 4096

# What one request uses, taken at the gate: a pivot or a change of copy mode
# during the request does not change what it writes to.
cdef struct fm_route:
    int fd                  # the disk: the source, the target after the pivot
    int dfd                 # fd's O_DIRECT twin, -1 when not served direct
    bint is_block
    int mirror_fd           # write-blocking: the target as well; -1 otherwise
    bint mirror_is_block
    void *engine            # claims and marks go here; NULL: untracked
    void *al                # the activity log (actlog.pxd); NULL: none

cdef class TrackedDisk:
    cdef readonly int64_t size
    cdef pthread_mutex_t mu
    cdef pthread_cond_t cv          # the gate, close_gate(), stop_mirroring(), close()
    cdef bint ready                 # mu and cv initialised
    cdef int fd                     # -1 until attach()
    cdef int dfd                    # O_DIRECT twin of fd (set_direct), or -1
    cdef bint direct                # set_direct(True): a twin for every fd, pivots too
    cdef bint is_block
    cdef int mirror_fd
    cdef bint mirror_is_block
    cdef object engine_ref          # keeps the CopyEngine alive as long as this disk
    cdef void *engine               # NULL once tracking stopped (stop_tracking, pivot)
    cdef int writers                # requests between the gate and their end
    cdef int mirror_users           # of those, requests that took mirror_fd
    cdef bint gate_closed
    # set_direct, track and set_activity_log waiting for the requests inside
    # (_hold): new requests wait too, and the job's gate is left as it is.
    cdef int holders
    cdef bint closed
    cdef readonly bint pivoted
    cdef bint trace_on
    cdef object on_event            # test hook: (event, offset, length)
    cdef object al_ref              # keeps the ActivityLog alive
    cdef void *al                   # NULL: no activity log
    cdef int64_t al_window          # with a log: bytes per piece of a large request
    cdef int64_t untracked          # writes that went through with no engine

    cdef int c_enter(self, fm_route *r) noexcept nogil
    cdef void c_leave(self, fm_route *r) noexcept nogil
    cdef int64_t c_writev(self, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil
    cdef int64_t c_write(self, const void *buf, int64_t length, int64_t offset) noexcept nogil
    cdef int c_write_zeroes(self, int64_t offset, int64_t length) noexcept nogil
    cdef int c_discard(self, int64_t offset, int64_t length) noexcept nogil
    cdef int64_t c_read(self, void *buf, int64_t length, int64_t offset) noexcept nogil
    cdef int c_flush(self) noexcept nogil
    # The job's side: hold new requests and wait for those inside to end;
    # let them in again; switch to the target (fd handed over), untracked,
    # with the gate closed.
    cdef void c_close_gate(self) noexcept nogil
    cdef void c_open_gate(self) noexcept nogil
    cdef void c_pivot(self, int fd, bint is_block, int dfd) noexcept nogil

    cdef void _hold(self) noexcept nogil
    cdef void _unhold(self) noexcept nogil
    cdef int _swap_dfd(self, int dfd, int fd) except -1
    cdef int64_t _request(self, int op, const iovec *iov, int iovcnt, int64_t offset,
                          int64_t length) noexcept nogil
    cdef int64_t _request_one(self, int op, const iovec *iov, int iovcnt, int64_t offset,
                              int64_t length) noexcept nogil
    cdef void _trace(self, int event, int64_t offset, int64_t length) noexcept with gil
    cdef int _check(self, int64_t offset, int64_t length) except -1
    cdef int _check_engine(self, engine) except -1
    cdef int _zeroing(self, int64_t offset, int64_t length, bint discard) except *


# Whether [offset, offset+length) from buf can go through O_DIRECT.
cdef inline bint fm_dio_ok(const void *buf, int64_t length, int64_t offset) noexcept nogil:
    return ((<size_t>buf | <size_t>length | <size_t>offset) & (FM_DIO_ALIGN - 1)) == 0

cdef int64_t fm_route_pread(const fm_route *r, void *buf, int64_t length,
                            int64_t offset) noexcept nogil
