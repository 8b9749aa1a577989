# The C-level contract of the dirty bitmap.  The copy engine cimports this and
# calls these methods with the GIL released; nothing here touches Python.
#
# Units: the C-level methods speak in *chunks* (index = byte offset >> shift);
# the Python-level methods in _hbitmap.pyx speak in bytes.
#
# Locking: every method whose name ends in _locked expects the caller to hold
# the bitmap's mutex (lock()/unlock()); c_set() and c_reset() take it
# themselves.  The mutex is a plain pthread mutex, never held across Python code.
from libc.stdint cimport int64_t, uint64_t
from fastmirror._core.sync cimport pthread_mutex_t

# Enough levels for 2**63 bytes at 512-byte granularity (2**54 bits: 9 levels
# of 64-way fan-out), plus headroom.
cdef enum:
    HBITMAP_MAX_LEVELS = 12

cdef class HBitmap:
    cdef readonly int64_t size          # bytes covered
    cdef readonly int64_t granularity   # bytes per chunk, a power of two >= 512
    cdef int shift                      # log2(granularity)
    cdef int64_t nchunks                # ceil(size / granularity)
    cdef int nlevels                    # levels[0] is the single top word
    cdef uint64_t *levels[HBITMAP_MAX_LEVELS]
    cdef int64_t level_words[HBITMAP_MAX_LEVELS]
    cdef int64_t count                  # dirty chunks (bits set in the bottom level)
    cdef pthread_mutex_t mutex
    cdef bint mutex_ready               # mutex initialised: __dealloc__ destroys it only then

    cdef void lock(self) noexcept nogil
    cdef void unlock(self) noexcept nogil

    # [first, first + n) in chunks; n may be 0; callers clip to nchunks.
    cdef void set_locked(self, int64_t first, int64_t n) noexcept nogil
    cdef void reset_locked(self, int64_t first, int64_t n) noexcept nogil
    cdef bint get_locked(self, int64_t chunk) noexcept nogil
    # First dirty (clean) chunk in [first, end), or -1.  O(log64 n) words.
    cdef int64_t next_dirty_locked(self, int64_t first, int64_t end) noexcept nogil
    cdef int64_t next_clean_locked(self, int64_t first, int64_t end) noexcept nogil

    # Convenience wrappers that take the mutex themselves.
    cdef void c_set(self, int64_t first, int64_t n) noexcept nogil
    cdef void c_reset(self, int64_t first, int64_t n) noexcept nogil
    cdef int64_t c_count(self) noexcept nogil

    # The first dirty run in [first, end): returns its first chunk (or -1) and
    # stores its length in *n, at most max_n chunks when max_n > 0.
    # O(log64 n) words to find it, plus the words of the run to measure it.
    cdef int64_t next_dirty_area_locked(self, int64_t first, int64_t end,
                                        int64_t max_n, int64_t *n) noexcept nogil

    # next_dirty() and next_clean() from Python: a byte offset or -1.
    cdef object _next_offset(self, offset, end, bint dirty)
