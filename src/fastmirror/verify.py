"""Comparing a source and a target byte for byte."""

from __future__ import annotations

import os
from typing import Optional

from fastmirror import _io


def _open(path: str) -> tuple[int, int]:
    fd, _ = _io.open_file(path, os.O_RDONLY, True)
    try:
        return fd, _io.probe(fd).size
    except BaseException:
        os.close(fd)
        raise


def first_difference(source: str, target: str, length: Optional[int] = None,
                     chunk: int = 8 << 20) -> int:
    """The first offset in [0, length) where target differs from source, or -1.

    length defaults to the source's size; a target larger than that is
    compared only over [0, length) (a mirror writes only there), a shorter one
    differs at its end.  Reads run with the GIL released, in large aligned
    chunks, O_DIRECT where the filesystem allows it."""
    sfd, ssize = _open(os.fspath(source))
    try:
        tfd, tsize = _open(os.fspath(target))
        try:
            n = ssize if length is None else length
            common = min(n, tsize)
            try:
                first = _io.compare(sfd, tfd, common, chunk)
            except OSError as e:
                path = source if getattr(e, "side", 0) == 0 else target
                raise OSError(e.errno, e.strerror, os.fspath(path)) from None
            if first < 0 and common < n:
                return common
            return first
        finally:
            os.close(tfd)
    finally:
        os.close(sfd)
