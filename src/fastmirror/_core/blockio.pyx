# cython: language_level=3
"""I/O primitives: O_DIRECT opening, alignment and size discovery, aligned
buffers, full-length preadv/pwritev, flush, zeroing and hole discovery.

The C-level functions (declared in _io.pxd) run without the GIL and return
-errno on failure; the Python-level functions raise OSError carrying errno and
path.  Nothing in this module ever writes to a file it opened read-only.

Alignment is discovered the way the kernel documents it (statx(2), open(2)
"O_DIRECT"): statx with STATX_DIOALIGN gives the memory and file-offset
alignment O_DIRECT needs; block devices answer BLKSSZGET (logical sector size)
and BLKGETSIZE64; failing both, 4096 is safe on every Linux filesystem.
statx is called through the raw system call so that the same wheel works on
glibc and musl, whatever their headers declare.
"""

import os
import stat as _stat

from libc.errno cimport errno, EINTR, EINVAL, EOPNOTSUPP, ENOTTY, EIO
from libc.stdint cimport int64_t, uint64_t, uint32_t, uint16_t
from libc.string cimport memcmp
from posix.time cimport timespec
from posix.uio cimport iovec, preadv, pwritev
from cpython.mem cimport PyMem_Malloc, PyMem_Free
from fastmirror._core.sync cimport clock_gettime, CLOCK_MONOTONIC
from fastmirror._core.ring cimport fm_ring_probe

cdef extern from *:
    """
    #include <sys/types.h>
    #include <sys/stat.h>
    #include <sys/ioctl.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    #include <fcntl.h>
    #include <unistd.h>
    #include <string.h>
    #include <stdint.h>
    #include <linux/fs.h>

    #ifndef FALLOC_FL_KEEP_SIZE
    #define FALLOC_FL_KEEP_SIZE 0x01
    #endif
    #ifndef FALLOC_FL_PUNCH_HOLE
    #define FALLOC_FL_PUNCH_HOLE 0x02
    #endif
    #ifndef FALLOC_FL_ZERO_RANGE
    #define FALLOC_FL_ZERO_RANGE 0x10
    #endif
    #ifndef MADV_DONTFORK
    #define MADV_DONTFORK 10
    #endif

    /* The kernel's struct statx (include/uapi/linux/stat.h), spelled out so
       that building does not depend on the C library's headers. 256 bytes. */
    struct fm_statx_ts { int64_t tv_sec; uint32_t tv_nsec; int32_t reserved; };
    struct fm_statx {
        uint32_t stx_mask; uint32_t stx_blksize; uint64_t stx_attributes;
        uint32_t stx_nlink; uint32_t stx_uid; uint32_t stx_gid;
        uint16_t stx_mode; uint16_t spare0;
        uint64_t stx_ino; uint64_t stx_size; uint64_t stx_blocks;
        uint64_t stx_attributes_mask;
        struct fm_statx_ts stx_atime, stx_btime, stx_ctime, stx_mtime;
        uint32_t stx_rdev_major, stx_rdev_minor, stx_dev_major, stx_dev_minor;
        uint64_t stx_mnt_id;
        uint32_t stx_dio_mem_align; uint32_t stx_dio_offset_align;
        uint64_t spare3[12];
    };
    #define FM_STATX_DIOALIGN 0x00002000U
    #define FM_AT_EMPTY_PATH 0x1000

    static int fm_statx_fd(int fd, struct fm_statx *out) {
    #ifdef SYS_statx
        memset(out, 0, sizeof(*out));
        if (syscall(SYS_statx, fd, "", FM_AT_EMPTY_PATH, FM_STATX_DIOALIGN, out) < 0)
            return -errno;
        return 0;
    #else
        return -ENOSYS;
    #endif
    }

    static int fm_blk_sector_size(int fd, int *out) {
        return ioctl(fd, BLKSSZGET, out) < 0 ? -errno : 0;
    }
    static int fm_blk_size(int fd, uint64_t *out) {
        return ioctl(fd, BLKGETSIZE64, out) < 0 ? -errno : 0;
    }
    static int fm_blk_zeroout(int fd, uint64_t offset, uint64_t length) {
        uint64_t range[2] = { offset, length };
        return ioctl(fd, BLKZEROOUT, range) < 0 ? -errno : 0;
    }
    static int fm_fallocate(int fd, int mode, int64_t offset, int64_t length) {
        return fallocate(fd, mode, offset, length) < 0 ? -errno : 0;
    }
    #ifndef MADV_HUGEPAGE
    #define MADV_HUGEPAGE 14
    #endif
    #define FM_HUGE (2UL << 20)
    #define FM_SMALL (256UL << 10)   /* below this, plain pages: no 2 MiB per buffer */
    static size_t fm_buffer_len(size_t length) {
        if (length < FM_SMALL)
            return (length + 4095) & ~(size_t)4095;
        return (length + FM_HUGE - 1) & ~(FM_HUGE - 1);
    }
    static void *fm_map_buffer(size_t length) {
        /* I/O buffers are private anonymous memory, 2 MiB aligned, asking
           for transparent huge pages.  Why huge pages: the block layer
           splits a request at the device's segment limit (virtio-blk: 254
           segments), and each 4 KiB page is a segment, so a 2 MiB read of
           ordinary memory reached the disk as four ~512 KiB requests, and
           neighbouring requests could not merge; a 2 MiB page is one
           segment.  MADV_DONTFORK keeps a fork() in another thread from
           marking the pages copy-on-write under an O_DIRECT transfer in
           flight (the child does not get the mapping at all).  Where THP
           is off, this is ordinary memory and everything still works. */
        size_t len = fm_buffer_len(length);
        size_t span;
        if (len == 0) len = 4096;
        if (length < FM_SMALL) {
            void *q = mmap(NULL, len, PROT_READ | PROT_WRITE,
                           MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
            if (q == MAP_FAILED) return NULL;
            madvise(q, len, MADV_DONTFORK);
            return q;
        }
        span = len + FM_HUGE;
        char *p = mmap(NULL, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return NULL;
        char *a = (char *)(((uintptr_t)p + FM_HUGE - 1) & ~(uintptr_t)(FM_HUGE - 1));
        if (a > p) munmap(p, a - p);
        if (p + span > a + len) munmap(a + len, (p + span) - (a + len));
        madvise(a, len, MADV_HUGEPAGE);
        madvise(a, len, MADV_DONTFORK);
        /* Fault the pages in now, not in the first copies. */
        memset(a, 0, len);
        return a;
    }
    static void fm_unmap_buffer(void *buf, size_t length) {
        size_t len = fm_buffer_len(length);
        if (buf != NULL) munmap(buf, len ? len : 4096);
    }
    static int64_t fm_lseek(int fd, int64_t off, int whence) {
        off_t r = lseek(fd, (off_t)off, whence);
        return r < 0 ? -errno : (int64_t)r;
    }
    """
    struct fm_statx:
        uint32_t stx_mask
        uint32_t stx_blksize
        uint16_t stx_mode
        uint64_t stx_size
        uint32_t stx_dio_mem_align
        uint32_t stx_dio_offset_align
    unsigned int FM_STATX_DIOALIGN
    int FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE
    int SEEK_DATA, SEEK_HOLE
    int fm_statx_fd(int fd, fm_statx *out) nogil
    int fm_blk_sector_size(int fd, int *out) nogil
    int fm_blk_size(int fd, uint64_t *out) nogil
    int fm_blk_zeroout(int fd, uint64_t offset, uint64_t length) nogil
    int fm_fallocate(int fd, int mode, int64_t offset, int64_t length) nogil
    void *fm_map_buffer(size_t length) nogil
    void fm_unmap_buffer(void *buf, size_t length) nogil
    int64_t fm_lseek(int fd, int64_t off, int whence) nogil
    ctypedef long ssize_t
    int fdatasync(int fd) nogil
    int munmap(void *addr, size_t length) nogil

# Linux's O_DIRECT and O_CLOEXEC, taken from the os module (the same numbers
# the C library uses) so that no platform header is needed here.
O_DIRECT = getattr(os, "O_DIRECT", 0)
DEFAULT_ALIGNMENT = 4096


# ---------------------------------------------------------------------------
# C level: nogil, -errno
# ---------------------------------------------------------------------------

cdef enum:
    IOV_MAX = 1024       # iovecs one preadv/pwritev takes (Linux UIO_MAXIOV)
    IOV_PART = 64        # iovecs passed after a short transfer stopped inside one


cdef int64_t _rw_full(int fd, const iovec *iov, int iovcnt, int64_t offset,
                      bint write) noexcept nogil:
    """preadv/pwritev until every iovec is done (reads: or end of file).

    A short transfer can stop anywhere, inside an iovec too: the next call
    starts there.  The caller's array is never changed (it may be reused for
    the next request, or shared); when the first iovec is partly done, a
    copy of the next few, the first one trimmed, is passed instead."""
    cdef int64_t done = 0
    cdef ssize_t r
    cdef size_t skip = 0          # bytes of iov[i] already transferred
    cdef size_t left
    cdef int i = 0, n, k
    cdef iovec part[IOV_PART]
    cdef const iovec *v
    while i < iovcnt:
        if iov[i].iov_len <= skip:                 # an empty iovec, or done
            i += 1
            skip = 0
            continue
        n = iovcnt - i
        if skip:
            if n > IOV_PART:
                n = IOV_PART
            for k in range(n):
                part[k] = iov[i + k]
            part[0].iov_base = <char *>part[0].iov_base + skip
            part[0].iov_len -= skip
            v = part
        else:
            if n > IOV_MAX:
                n = IOV_MAX
            v = iov + i
        if write:
            r = pwritev(fd, v, n, offset + done)
        else:
            r = preadv(fd, v, n, offset + done)
        if r < 0:
            if errno == EINTR:
                continue
            return -errno
        if r == 0:
            if write:
                return -EIO        # a zero-length write of a non-empty buffer
            break                  # end of file
        done += r
        while r > 0:               # step over what this call transferred
            left = iov[i].iov_len - skip
            if <size_t>r < left:
                skip += <size_t>r
                break
            r -= <ssize_t>left
            i += 1
            skip = 0
    return done


cdef int64_t preadv_full(int fd, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil:
    """Fill the iovecs from offset on; fewer bytes only at end of file.
    Bytes read, or -errno."""
    return _rw_full(fd, iov, iovcnt, offset, False)


cdef int64_t pwritev_full(int fd, const iovec *iov, int iovcnt, int64_t offset) noexcept nogil:
    """Write every byte of the iovecs from offset on, retrying EINTR and
    short writes.  Bytes written, or -errno."""
    return _rw_full(fd, iov, iovcnt, offset, True)


cdef int64_t pread_full(int fd, void *buf, int64_t length, int64_t offset) noexcept nogil:
    """Read up to length bytes; fewer only at end of file."""
    cdef iovec v
    v.iov_base = buf
    v.iov_len = <size_t>length
    return _rw_full(fd, &v, 1, offset, False)


cdef int64_t pwrite_full(int fd, const void *buf, int64_t length, int64_t offset) noexcept nogil:
    """Write exactly length bytes, retrying EINTR and short writes."""
    cdef iovec v
    v.iov_base = <void *>buf
    v.iov_len = <size_t>length
    return _rw_full(fd, &v, 1, offset, True)


cdef int flush_fd(int fd) noexcept nogil:
    cdef int r
    while True:
        r = fdatasync(fd)
        if r == 0:
            return 0
        if errno != EINTR:
            return -errno


cdef int zero_range(int fd, int64_t offset, int64_t length, bint is_block,
                    bint unmap) noexcept nogil:
    """Make [offset, offset+length) read as zeros without writing a buffer.

    Files: PUNCH_HOLE (unmap) or ZERO_RANGE, both guaranteed to read back as
    zeros.  Block devices: BLKZEROOUT, which the kernel guarantees to zero
    (it may discard underneath only where the device promises zeros).
    Returns -EOPNOTSUPP where none applies (the one answer for "no such
    call here": a device without BLKZEROOUT says ENOTTY, a filesystem or a
    range the call does not take says EINVAL); the caller then writes zeros.
    """
    cdef int r
    if length <= 0:
        return 0
    if is_block:
        return _zeroing_unsupported(fm_blk_zeroout(fd, <uint64_t>offset, <uint64_t>length))
    if unmap:
        r = _zeroing_unsupported(
            fm_fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length))
        if r != -EOPNOTSUPP:
            return r
    return _zeroing_unsupported(
        fm_fallocate(fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length))


cdef inline int _zeroing_unsupported(int r) noexcept nogil:
    """-EOPNOTSUPP for every way a zeroing call says it does not apply."""
    if r == -ENOTTY or r == -EINVAL:
        return -EOPNOTSUPP
    return r


cdef bint buffer_is_zero(const void *buf, size_t length) noexcept nogil:
    """True when every byte is zero: check the first word, then compare the
    buffer with itself shifted by one word (memcmp is vectorised)."""
    cdef const unsigned char *p = <const unsigned char *>buf
    cdef size_t i
    if length < 64:
        for i in range(length):
            if p[i]:
                return False
        return True
    for i in range(64):
        if p[i]:
            return False
    return memcmp(p, p + 64, length - 64) == 0


cdef void *alloc_buffer(size_t length) noexcept nogil:
    """An I/O buffer of at least length bytes, 2 MiB aligned (see
    fm_map_buffer); NULL when memory is short.  Free with free_buffer() and
    the same length."""
    return fm_map_buffer(length)


cdef void free_buffer(void *buf, size_t length) noexcept nogil:
    fm_unmap_buffer(buf, length)


cdef int64_t monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <int64_t>ts.tv_sec * 1000000000 + ts.tv_nsec


# ---------------------------------------------------------------------------
# Python level
# ---------------------------------------------------------------------------

def uring_error():
    """None when io_uring can run reads and writes here; otherwise why not
    (a string): built without the kernel header, a kernel older than 5.6, a
    seccomp profile or kernel.io_uring_disabled refusing it."""
    cdef int r
    with nogil:
        r = fm_ring_probe()
    if r == 0:
        return None
    return os.strerror(-r)


def _raise(int err, path=None):
    err = -err if err < 0 else err
    raise OSError(err, os.strerror(err), path)


class DeviceInfo:
    """What fastmirror learned about an open file or block device."""
    __slots__ = ("size", "is_block", "mem_align", "offset_align", "blksize", "source")

    def __init__(self, size, is_block, mem_align, offset_align, blksize, source):
        self.size = size                  # bytes
        self.is_block = is_block          # a block device (not a regular file)
        self.mem_align = mem_align        # O_DIRECT buffer alignment
        self.offset_align = offset_align  # O_DIRECT offset and length alignment
        self.blksize = blksize            # preferred I/O size (st_blksize)
        self.source = source              # where the alignment came from

    @property
    def alignment(self):
        """One alignment good for memory, offsets and lengths."""
        return max(self.mem_align, self.offset_align)

    def __repr__(self):
        return ("DeviceInfo(size=%d, is_block=%s, mem_align=%d, offset_align=%d, "
                "blksize=%d, source=%r)" % (self.size, self.is_block, self.mem_align,
                                            self.offset_align, self.blksize, self.source))


def probe(int fd):
    """Size and O_DIRECT alignment of an open file or block device."""
    cdef fm_statx stx
    cdef int r, sector = 0
    cdef uint64_t blk_size = 0
    with nogil:
        r = fm_statx_fd(fd, &stx)
    st = os.fstat(fd)
    is_block = _stat.S_ISBLK(st.st_mode)
    size = st.st_size
    mem_align = offset_align = 0
    source = "default"
    if r == 0 and (stx.stx_mask & FM_STATX_DIOALIGN) and stx.stx_dio_offset_align:
        mem_align = stx.stx_dio_mem_align
        offset_align = stx.stx_dio_offset_align
        source = "statx"
    if is_block:
        with nogil:
            r = fm_blk_size(fd, &blk_size)
        if r < 0:
            _raise(r)
        size = blk_size
        if not offset_align:
            with nogil:
                r = fm_blk_sector_size(fd, &sector)
            if r == 0 and sector > 0:
                mem_align = offset_align = sector
                source = "BLKSSZGET"
    if not offset_align:
        mem_align = offset_align = DEFAULT_ALIGNMENT
    return DeviceInfo(size, is_block, mem_align, offset_align, st.st_blksize, source)


def open_file(path, int flags, bint direct, int mode=0o644):
    """Open path; with direct, try O_DIRECT first.  A filesystem that refuses
    O_DIRECT answers EINVAL at open: then open buffered and say so.

    Returns (fd, direct_in_effect)."""
    flags |= os.O_CLOEXEC
    if direct and O_DIRECT:
        try:
            return os.open(path, flags | O_DIRECT, mode), True
        except OSError as e:
            if e.errno != EINVAL:
                raise
    return os.open(path, flags, mode), False


def data_extents(int fd, int64_t start, int64_t end):
    """List of (offset, length) ranges of [start, end) that may hold data,
    found with SEEK_DATA/SEEK_HOLE.  Where the filesystem cannot tell, the
    whole range is data."""
    cdef int64_t pos = start, d, h
    out = []
    while pos < end:
        with nogil:
            d = fm_lseek(fd, pos, SEEK_DATA)
        if d == -6:   # ENXIO: no data past pos
            break
        if d < 0:
            return [(start, end - start)] if not out else out + [(pos, end - pos)]
        if d >= end:
            break
        with nogil:
            h = fm_lseek(fd, d, SEEK_HOLE)
        if h < 0 or h > end:
            h = end
        out.append((d, h - d))
        pos = h
    return out


def zero(int fd, int64_t offset, int64_t length, bint is_block, bint unmap=True):
    """Make a range read as zeros; returns False where no zeroing call is
    supported (the caller writes zeros instead).  Raises OSError otherwise."""
    cdef int r
    with nogil:
        r = zero_range(fd, offset, length, is_block, unmap)
    if r == -EOPNOTSUPP:
        return False
    if r < 0:
        _raise(r)
    return True


def preallocate(int fd, int64_t offset, int64_t length):
    """Allocate a file range before writing it (fallocate mode 0: the range
    reads as zeros until written).  On ext4, direct writes into holes each
    take the inode lock exclusively, so parallel copies into a fresh sparse
    file queue behind each other; into allocated blocks they run together.
    Returns False where the filesystem cannot, or has no space: the copy
    then allocates as it writes, and reports ENOSPC itself."""
    cdef int r
    if length <= 0:
        return True
    with nogil:
        r = fm_fallocate(fd, 0, offset, length)
    return r == 0


def _rw_py(int fd, buffers, int64_t offset, bint write):
    """preadv_full/pwritev_full over a sequence of contiguous buffers."""
    cdef const unsigned char[::1] ro
    cdef unsigned char[::1] rw
    cdef Py_ssize_t n, i
    cdef int64_t r
    cdef iovec *iov
    buffers = list(buffers)
    n = len(buffers)
    iov = <iovec *>PyMem_Malloc((n if n else 1) * sizeof(iovec))
    if iov == NULL:
        raise MemoryError()
    held = []                     # the views keep every buffer exported until the call ends
    try:
        for i in range(n):
            if write:
                ro = buffers[i]
                held.append(ro)
                iov[i].iov_base = <void *>&ro[0] if ro.shape[0] else NULL
                iov[i].iov_len = <size_t>ro.shape[0]
            else:
                rw = buffers[i]
                held.append(rw)
                iov[i].iov_base = <void *>&rw[0] if rw.shape[0] else NULL
                iov[i].iov_len = <size_t>rw.shape[0]
        with nogil:
            r = _rw_full(fd, iov, <int>n, offset, write)
    finally:
        PyMem_Free(iov)
    if r < 0:
        _raise(r)
    return r


def preadv_into(int fd, buffers, int64_t offset):
    """Read into a sequence of writable buffers from offset on, filling them
    in order (preadv until all are full or the file ends, retrying EINTR).
    Returns the bytes read; raises OSError."""
    return _rw_py(fd, buffers, offset, False)


def pwritev_from(int fd, buffers, int64_t offset):
    """Write a sequence of buffers from offset on, one after the other
    (pwritev until every byte is written, retrying EINTR and short writes).
    Returns the bytes written; raises OSError."""
    return _rw_py(fd, buffers, offset, True)


def flush(int fd):
    cdef int r
    with nogil:
        r = flush_fd(fd)
    if r < 0:
        _raise(r)


def is_zero(data):
    """True when a bytes-like object holds only zeros."""
    cdef const unsigned char[::1] view = data
    if view.shape[0] == 0:
        return True
    return buffer_is_zero(&view[0], view.shape[0])


def compare(int fd_a, int fd_b, int64_t length, int64_t chunk=8 << 20, int64_t start=0):
    """First offset in [start, length) where two open files differ, or -1.

    Reads both sides in large aligned chunks with the GIL released.  Raises
    OSError on a read error; a side that ends early counts as a difference at
    its end."""
    cdef int64_t off = start, n, ra, rb, i, first = -1
    cdef char *a
    cdef char *b
    cdef int err = 0
    cdef int which = 0
    if chunk <= 0 or chunk % 4096:
        raise ValueError("chunk must be a positive multiple of 4096")
    a = <char *>alloc_buffer(chunk)
    b = <char *>alloc_buffer(chunk)
    if a == NULL or b == NULL:
        free_buffer(a, chunk)
        free_buffer(b, chunk)
        raise MemoryError()
    try:
        with nogil:
            while off < length:
                n = chunk if length - off > chunk else length - off
                # Round the request up to the alignment; the kernel returns
                # only what exists at the end of a file.
                ra = pread_full(fd_a, a, (n + 4095) & ~4095, off)
                if ra < 0:
                    err = <int>ra
                    which = 0
                    break
                rb = pread_full(fd_b, b, (n + 4095) & ~4095, off)
                if rb < 0:
                    err = <int>rb
                    which = 1
                    break
                if ra > n:
                    ra = n
                if rb > n:
                    rb = n
                if ra == n and rb == n and memcmp(a, b, n) == 0:
                    off += n
                    continue
                # Find the exact first differing byte.
                i = 0
                while i < ra and i < rb and a[i] == b[i]:
                    i += 1
                first = off + i
                break
        if err:
            e = OSError(-err, os.strerror(-err))
            e.side = which
            e.offset = off
            raise e
        return first
    finally:
        free_buffer(a, chunk)
        free_buffer(b, chunk)
