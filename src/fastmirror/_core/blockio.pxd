# I/O primitives shared by the compiled modules.  Everything here runs
# without the GIL and returns a byte count or 0 on success, -errno on failure.
from libc.stdint cimport int64_t
from posix.uio cimport iovec

# Whole transfers over an iovec array: EINTR retried, short transfers
# continued (inside an iovec too); reads return fewer bytes only at the end of
# the file.  The array is not changed.
cdef int64_t preadv_full(int fd, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil
cdef int64_t pwritev_full(int fd, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil
# The same for one buffer.
cdef int64_t pread_full(int fd, void *buf, int64_t length, int64_t offset) noexcept nogil
cdef int64_t pwrite_full(int fd, const void *buf, int64_t length, int64_t offset) noexcept nogil
cdef int flush_fd(int fd) noexcept nogil
cdef int zero_range(int fd, int64_t offset, int64_t length, bint is_block,
                    bint unmap) noexcept nogil
cdef bint buffer_is_zero(const void *buf, size_t length) noexcept nogil
cdef void *alloc_buffer(size_t length) noexcept nogil
cdef void free_buffer(void *buf, size_t length) noexcept nogil
cdef int64_t monotonic_ns() noexcept nogil
