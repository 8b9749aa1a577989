"""Disk images to mirror: one generator for `fastmirror bench --create`, the
demo's image and the tests' images.

The data is pseudo-random and reproducible from a seed, but cheap to make:
one pool of random bytes, rotated by a different offset for every chunk of
the image, so that no chunk repeats its neighbour and no 4 KiB block is
zero (zero detection and hole skipping spare no work the caller did not
ask to spare).  Holes are real holes of the file: the ranges are never
written, so a filesystem leaves the blocks they cover unallocated.
"""

from __future__ import annotations

import os
import random
import stat
from typing import Iterable, Optional, Union

__all__ = ["make_image", "extent_holes"]

CHUNK = 8 << 20             # bytes of the random pool, and of each write
EXTENT = 4 << 20            # the default piece of data or hole with data_fraction

Pattern = Union[str, int]


def extent_holes(size: int, data_fraction: float, extent: int = EXTENT,
                 seed: int = 0) -> list[tuple[int, int]]:
    """Holes for an image of about `data_fraction` data: each `extent`-sized
    piece of [0, size) is data with that probability (seeded), else a hole."""
    rng = random.Random(seed)
    return [(off, min(extent, size - off)) for off in range(0, size, extent)
            if rng.random() >= data_fraction]


def _data_ranges(size: int, holes: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """[0, size) less the holes, as (offset, length) ranges in order."""
    out = []
    pos = 0
    for off, length in sorted(holes):
        if off > pos:
            out.append((pos, min(off, size) - pos))
        pos = max(pos, off + length)
    if pos < size:
        out.append((pos, size - pos))
    return [(o, n) for o, n in out if n > 0]


def _piece(pattern: Pattern, pool: Optional[bytes], pos: int, n: int) -> bytes:
    """The `n` bytes of data at offset `pos` (never crossing a CHUNK)."""
    if pattern == "random":
        assert pool is not None
        # A different rotation of the pool per chunk of the image.
        k = ((pos // CHUNK) * 7919 * 512 + pos % CHUNK) % len(pool)
        return (pool[k:] + pool[:k])[:n] if k + n > len(pool) else pool[k:k + n]
    if pattern == "zero":
        return bytes(n)
    if isinstance(pattern, int) and not isinstance(pattern, bool) and 0 <= pattern < 256:
        return bytes([pattern]) * n
    raise ValueError("unknown pattern %r" % (pattern,))


def make_image(path, size: int, *, pattern: Pattern = "random",
               holes: Iterable[tuple[int, int]] = (), data_fraction: Optional[float] = None,
               extent: int = EXTENT, seed: int = 0, exclusive: bool = False) -> int:
    """Create (or overwrite) the file `path` of `size` bytes; returns the
    bytes of data written (size less the holes).

    pattern: "random" (reproducible from seed), "zero" (allocated zeros),
    an int byte value to fill with, or "sparse" (no data at all: one hole).
    holes: (offset, length) ranges left unwritten.  data_fraction: instead
    of holes, about that share of the image is data, in pieces of `extent`
    bytes (seeded).  exclusive: `path` must not exist (O_EXCL); a file this
    call created is removed again when writing it fails.  A block device is
    written in place (not truncated)."""
    path = os.fspath(path)
    if pattern == "sparse":
        holes = [(0, size)]
    elif data_fraction is not None:
        holes = extent_holes(size, data_fraction, extent, seed)
    ranges = _data_ranges(size, holes)
    pool = random.Random(seed).randbytes(min(CHUNK, max(size, 1))) \
        if pattern == "random" else None
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
    flags |= os.O_EXCL if exclusive else 0
    fd = os.open(path, flags, 0o644)
    try:
        if stat.S_ISREG(os.fstat(fd).st_mode):
            os.ftruncate(fd, 0)          # old data must not survive in the holes
            os.ftruncate(fd, size)
        written = 0
        for off, length in ranges:
            pos, end = off, off + length
            while pos < end:
                n = min(end, (pos // CHUNK + 1) * CHUNK) - pos
                view = memoryview(_piece(pattern, pool, pos, n))
                while view:
                    w = os.pwrite(fd, view, pos)
                    view = view[w:]
                    pos += w
            written += length
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        if exclusive:
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    os.close(fd)
    return written
