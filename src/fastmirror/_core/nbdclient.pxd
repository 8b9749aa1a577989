# The NBD client's C API (nbdclient.h) for the compiled modules: the copy
# engine writes to an NBD target through these, without the GIL.  Every
# function returns 0 or -errno.  A module that cimports this compiles its
# own copy of the (static) functions; the struct is shared by pointer, and
# NbdClient (nbdclient.pyx) owns it.
from libc.stdint cimport uint16_t, uint32_t, uint64_t

cdef extern from "nbdclient.h" nogil:
    struct fm_nbd:
        uint64_t size
        uint16_t flags
        int structured
        uint32_t min_block
        uint32_t pref_block
        uint32_t max_payload
        int nconns
    int FM_TF_READ_ONLY, FM_TF_SEND_FLUSH, FM_TF_SEND_TRIM, FM_TF_SEND_WRITE_ZEROES
    int FM_TF_CAN_MULTI_CONN, FM_TF_SEND_FAST_ZERO, FM_NBD_MAX_CONNS
    int fm_nbd_read(fm_nbd *n, char *buf, uint64_t off, uint64_t length)
    int fm_nbd_write(fm_nbd *n, const char *buf, uint64_t off, uint64_t length)
    int fm_nbd_zero(fm_nbd *n, uint64_t off, uint64_t length, int unmap, int fast)
    int fm_nbd_flush(fm_nbd *n)
    int fm_nbd_take_lost(fm_nbd *n)


cdef class NbdClient:
    cdef fm_nbd *c
    cdef readonly str where          # the URI, for messages
    cdef readonly str export_name
