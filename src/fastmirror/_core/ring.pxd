# Declarations of ring.h: a minimal io_uring spoken through raw system calls.
# Everything returns 0 or a count on success, -errno on failure.
from libc.stdint cimport int64_t, uint64_t
from posix.uio cimport iovec

cdef extern from "ring.h" nogil:
    ctypedef struct fm_ring:
        int fd
        unsigned sq_entries
        int calls
        unsigned nreg
    int FM_RING_READ, FM_RING_WRITE, FM_HAVE_URING
    int FM_CALLS_PLAIN, FM_CALLS_VECTORED, FM_CALLS_FIXED
    int fm_ring_init(fm_ring *r, unsigned entries)
    void fm_ring_exit(fm_ring *r)
    int fm_ring_supports(fm_ring *r, int calls)
    int fm_ring_use(fm_ring *r, int calls, const iovec *bufs, unsigned n)
    int fm_ring_prep(fm_ring *r, int op, int fd, void *buf, unsigned length,
                     int64_t off, uint64_t user_data)
    int fm_ring_submit(fm_ring *r, unsigned wait_nr)
    int fm_ring_reap(fm_ring *r, uint64_t *user_data, int *res)
    unsigned fm_ring_unqueue(fm_ring *r, uint64_t *out, unsigned max)
    int fm_ring_probe()
