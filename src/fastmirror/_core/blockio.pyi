"""Typed stub for fastmirror._core.blockio (a Cython module): O_DIRECT opening,
alignment and size discovery, vectored reads and writes, flush, zeroing,
hole discovery and comparison.  Every function that takes an ``fd`` works on a descriptor
the caller owns; failures raise OSError carrying errno (and the path, where
one is known)."""

from collections.abc import Iterable
from typing import Final, NoReturn

from _typeshed import StrOrBytesPath
from typing_extensions import Buffer

O_DIRECT: Final[int]
"""os.O_DIRECT, or 0 where the platform has none."""
DEFAULT_ALIGNMENT: Final = 4096
"""The O_DIRECT alignment assumed when neither statx nor BLKSSZGET answers."""

class DeviceInfo:
    """What fastmirror learned about an open file or block device."""

    size: int
    """Bytes."""
    is_block: bool
    """A block device, not a regular file."""
    mem_align: int
    """O_DIRECT buffer alignment."""
    offset_align: int
    """O_DIRECT offset and length alignment."""
    blksize: int
    """Preferred I/O size (st_blksize)."""
    source: str
    """Where the alignment came from: "statx", "BLKSSZGET" or "default"."""
    def __init__(
        self,
        size: int,
        is_block: bool,
        mem_align: int,
        offset_align: int,
        blksize: int,
        source: str,
    ) -> None: ...
    @property
    def alignment(self) -> int:
        """One alignment good for memory, offsets and lengths."""

def probe(fd: int) -> DeviceInfo:
    """Size and O_DIRECT alignment of an open file or block device."""

def open_file(path: StrOrBytesPath, flags: int, direct: bool,
              mode: int = 0o644) -> tuple[int, bool]:
    """Open ``path``; with ``direct``, try O_DIRECT first and fall back to
    buffered I/O where the filesystem refuses it (EINVAL at open).  Returns
    ``(fd, direct_in_effect)``."""

def data_extents(fd: int, start: int, end: int) -> list[tuple[int, int]]:
    """The ``(offset, length)`` ranges of ``[start, end)`` that may hold data
    (SEEK_DATA/SEEK_HOLE); the whole range where the filesystem cannot tell."""

def zero(fd: int, offset: int, length: int, is_block: bool, unmap: bool = True) -> bool:
    """Make a range read as zeros without writing a buffer.  False where no
    zeroing call is supported (the caller writes zeros instead)."""

def preallocate(fd: int, offset: int, length: int) -> bool:
    """Allocate a file range before writing it; False where not possible."""

def preadv_into(fd: int, buffers: Iterable[Buffer], offset: int) -> int:
    """Read into writable contiguous buffers from ``offset`` on, filling them
    in order: preadv(2) until all are full or the file ends, retrying EINTR
    and continuing short reads.  Returns the bytes read."""

def pwritev_from(fd: int, buffers: Iterable[Buffer], offset: int) -> int:
    """Write contiguous buffers from ``offset`` on, one after the other:
    pwritev(2) until every byte is written, retrying EINTR and continuing
    short writes.  Returns the bytes written."""

def flush(fd: int) -> None:
    """fdatasync, retrying EINTR."""

def is_zero(data: Buffer) -> bool:
    """True when a contiguous bytes-like object holds only zeros."""

def compare(fd_a: int, fd_b: int, length: int, chunk: int = 8388608, start: int = 0) -> int:
    """The first offset in ``[start, length)`` where two open files differ,
    or -1.  ``chunk`` must be a positive multiple of 4096.  A read error
    raises OSError with extra attributes ``side`` (0 or 1) and ``offset``."""

def _raise(err: int, path: StrOrBytesPath | None = None) -> NoReturn: ...

def uring_error() -> str | None:
    """None when io_uring can run reads and writes here; otherwise why not."""
