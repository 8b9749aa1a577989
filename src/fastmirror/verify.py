"""Comparing a source and a target byte for byte."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from fastmirror import _io

# Measured on a virtio disk, 1 GiB pairs: 16 threads reading 4 MiB at a time
# beat 8 x 8 MiB, 12 x 4 MiB and 32 x 1-2 MiB.  Each thread has one read in
# flight: the device needs many to reach its speed.
CHUNK = 4 << 20        # bytes per read
SEGMENT = 64 << 20     # bytes one thread compares before taking the next segment
THREADS = 16           # segments in flight


def _open(path: str, fd: Optional[int] = None) -> tuple[int, int]:
    """A read-only descriptor (O_DIRECT where allowed) and the size of path,
    or, when fd is given, of the file behind fd whatever path names now."""
    fd, _ = _io.open_file(path if fd is None else "/proc/self/fd/%d" % fd, os.O_RDONLY, True)
    try:
        return fd, _io.probe(fd).size
    except BaseException:
        os.close(fd)
        raise


def _compare_range(sfd: int, tfd: int, start: int, end: int, chunk: int,
                   source: str, target: str) -> int:
    try:
        return _io.compare(sfd, tfd, end, chunk, start)
    except OSError as e:
        path = source if getattr(e, "side", 0) == 0 else target
        err = OSError(e.errno, e.strerror, os.fspath(path))
        err.offset = getattr(e, "offset", None)    # type: ignore[attr-defined]
        raise err from None


def first_difference(source, target, length: Optional[int] = None,
                     chunk: int = CHUNK, threads: int = THREADS,
                     fds: Optional[tuple[int, int]] = None) -> int:
    """The first offset in [0, length) where target differs from source, or -1.

    length defaults to the source's size; a target larger than that is
    compared only over [0, length) (a mirror writes only there), a shorter one
    differs at its end.  Several threads compare consecutive segments with the
    GIL released, in large aligned reads, O_DIRECT where the filesystem allows
    it; the first difference in file order wins, and later segments are
    dropped as soon as it is known.  fds, descriptors of source and target
    (a job's checked ones), are reopened instead of the paths, which then
    only name the sides in errors."""
    sfd, ssize = _open(os.fspath(source), fds[0] if fds else None)
    try:
        tfd, tsize = _open(os.fspath(target), fds[1] if fds else None)
        try:
            n = ssize if length is None else length
            common = min(n, tsize)
            first = _compare_all(sfd, tfd, common, chunk, max(1, threads),
                                 os.fspath(source), os.fspath(target))
            if first < 0 and common < n:
                return common
            return first
        finally:
            os.close(tfd)
    finally:
        os.close(sfd)


def _compare_all(sfd: int, tfd: int, length: int, chunk: int, threads: int,
                 source: str, target: str) -> int:
    if length <= SEGMENT or threads == 1:
        return _compare_range(sfd, tfd, 0, length, chunk, source, target)
    starts = range(0, length, SEGMENT)
    with ThreadPoolExecutor(threads, thread_name_prefix="fastmirror-verify") as pool:
        # Keep `threads` segments in flight, in order; results are read in
        # order, so the first difference found in file order is the answer.
        pending = []
        it = iter(starts)
        for start in it:
            pending.append(pool.submit(_compare_range, sfd, tfd, start,
                                       min(start + SEGMENT, length), chunk, source, target))
            if len(pending) >= threads:
                break
        try:
            while pending:
                r = pending.pop(0).result()
                if r >= 0:
                    return r
                start = next(it, None)
                if start is not None:
                    pending.append(pool.submit(_compare_range, sfd, tfd, start,
                                               min(start + SEGMENT, length), chunk,
                                               source, target))
            return -1
        finally:
            for f in pending:
                f.cancel()
