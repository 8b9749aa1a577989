"""The source handle: how writers reach a disk while a job mirrors it.

A write through `job.source` lands on the source first and only then marks its
chunks dirty (invariant 2: marking before the write could let the copy read
the old data and clean the chunk).  While the job performs its final drain,
writes wait at a gate so that the source becomes quiescent; after complete()
the handle pivots and writes go to the target instead.

`BlockHandle` is the interface that later front ends (an NBD export, a VM)
program against; `TrackedSource` is the implementation a MirrorJob hands out.
"""

from __future__ import annotations

import abc
import os
import threading
from typing import Callable, Optional

from fastmirror._core import blockio as _io
from fastmirror.job.endpoints import reopen
from fastmirror.job.events import io_error


class BlockHandle(abc.ABC):
    """A disk seen as a fixed-size array of bytes."""

    size: int

    @abc.abstractmethod
    def pwrite(self, data, offset: int) -> int: ...

    @abc.abstractmethod
    def pread(self, length: int, offset: int) -> bytes: ...

    @abc.abstractmethod
    def write_zeroes(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def discard(self, offset: int, length: int) -> None: ...

    @abc.abstractmethod
    def flush(self) -> None: ...


class _Side:
    """One file a handle can write to: a buffered read-write descriptor."""

    def __init__(self, path: str, fd: int, is_block: bool):
        self.path = path
        self.fd = fd
        self.is_block = is_block


class TrackedSource(BlockHandle):
    """Writes go to the source and are marked dirty after they land; after a
    pivot they go to the target untracked.

    fd, if given, is a descriptor of the source that the handle takes over:
    the first write reopens that very file read-write through it, so that
    writes reach the file the job checked and copies, even if `path` names
    another file by then.  Without it the handle opens `path`."""

    def __init__(self, path: str, size: int, is_block: bool,
                 mark: Callable[[int, int], None], fd: Optional[int] = None):
        self.size = size
        self._path = path
        self._origin = fd            # closed once the read-write side is open
        self._is_block = is_block
        self._mark: Optional[Callable[[int, int], None]] = mark
        self._side: Optional[_Side] = None   # opened on first use
        self._cond = threading.Condition()
        self._writers = 0        # writes between the gate and their mark
        self._mirror_users = 0   # of those, writes that hold the mirror's descriptor
        self._gate_closed = False
        self._closed = False
        # Write-blocking mode: (claim, unclaim, target side).  A write then
        # reaches both sides before it returns, so it never dirties a chunk.
        self._mirror: Optional[tuple[Callable[[int, int], int], Callable[[int], None],
                                     _Side]] = None

    # -- the gate (used by the job) -----------------------------------------

    def close_gate(self) -> None:
        """Block new writes and wait for those in progress to be marked."""
        with self._cond:
            self._gate_closed = True
            while self._writers:
                self._cond.wait()

    def open_gate(self) -> None:
        with self._cond:
            self._gate_closed = False
            self._cond.notify_all()

    def pivot(self, path: str, fd: int, is_block: bool) -> None:
        """From now on, writes go to the target (fd is handed over) and are no
        longer tracked.  Called with the gate closed."""
        with self._cond:
            old = self._side
            self._side = _Side(path, fd, is_block)
            self._mark = None
            mirror, self._mirror = self._mirror, None
            origin, self._origin = self._origin, None   # the source is not reopened any more
        if old is not None:
            os.close(old.fd)
        if origin is not None:
            os.close(origin)
        if mirror is not None:
            os.close(mirror[2].fd)

    def stop_tracking(self) -> None:
        with self._cond:
            self._mark = None
        self.stop_mirroring()

    def start_mirroring(self, claim: Callable[[int, int], int],
                        unclaim: Callable[[int], None], path: str, fd: int,
                        is_block: bool) -> None:
        """Write-blocking mode: from now on a write returns only once it has
        reached source and target.  fd (a buffered target descriptor) is
        handed over."""
        with self._cond:
            old = self._mirror
            self._mirror = (claim, unclaim, _Side(path, fd, is_block))
        if old is not None:
            os.close(old[2].fd)

    def stop_mirroring(self) -> None:
        with self._cond:
            old, self._mirror = self._mirror, None
            # Writes that took the old mirror may still use its descriptor;
            # new ones do not see it, so this wait is bounded even while
            # writers keep coming.
            while self._mirror_users:
                self._cond.wait()
        if old is not None:
            os.close(old[2].fd)

    @property
    def write_blocking(self) -> bool:
        return self._mirror is not None

    @property
    def pivoted(self) -> bool:
        return self._side is not None and self._side.path != self._path

    @property
    def path(self) -> str:
        return self._side.path if self._side is not None else self._path

    # -- I/O ------------------------------------------------------------------

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise ValueError("range [%d, %d) outside the disk [0, %d)"
                             % (offset, offset + length, self.size))

    def _enter(self):
        """Pass the gate; returns (side, mark, mirror) for this write."""
        with self._cond:
            while self._gate_closed:
                self._cond.wait()
            if self._closed:
                raise ValueError("I/O on a closed handle")
            if self._side is None:
                if self._origin is not None:
                    fd = reopen(self._origin, os.O_RDWR)
                    os.close(self._origin)
                    self._origin = None
                else:
                    fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
                self._side = _Side(self._path, fd, self._is_block)
            self._writers += 1
            if self._mirror is not None:
                self._mirror_users += 1
            return self._side, self._mark, self._mirror

    def _leave(self, mirror) -> None:
        with self._cond:
            self._writers -= 1
            if mirror is not None:
                self._mirror_users -= 1
            if not self._writers or (mirror is not None and not self._mirror_users):
                self._cond.notify_all()

    def _write(self, offset: int, length: int, op: Callable[[_Side], int]) -> int:
        self._check(offset, length)
        side, mark, mirror = self._enter()
        slot = -1
        try:
            if mirror is not None and mark is not None and length:
                # No copy of these chunks may be in flight while both sides
                # are written, or an older read could land after this write.
                slot = mirror[0](offset, length)
            try:
                n = op(side)
            except OSError as e:
                raise io_error(e.errno or 5, side.path, offset, "write") from None
            if mark is None or not n:
                return n
            if mirror is not None:
                try:
                    op(mirror[2])
                    return n
                except OSError:
                    pass    # the target refused: let the background copy retry it
            # Invariant 2: the write has reached the source; mark it now.
            mark(offset, n)
            return n
        finally:
            if slot >= 0:
                mirror[1](slot)
            self._leave(mirror)

    def pwrite(self, data, offset: int) -> int:
        view = memoryview(data).cast("B")
        length = len(view)

        def op(side: _Side) -> int:
            done = 0
            while done < length:
                done += os.pwrite(side.fd, view[done:], offset + done)
            return done
        return self._write(offset, length, op)

    def write_zeroes(self, offset: int, length: int) -> None:
        def op(side: _Side) -> int:
            if not _io.zero(side.fd, offset, length, side.is_block, False):
                zeros = bytes(min(length, 1 << 20))
                done = 0
                while done < length:
                    done += os.pwrite(side.fd, zeros[:length - done], offset + done)
            return length
        self._write(offset, length, op)

    def discard(self, offset: int, length: int) -> None:
        """Drop a range.  Files get a hole (reads zeros); on a block device the
        range is zeroed, since a discard there may leave any content."""
        def op(side: _Side) -> int:
            if not _io.zero(side.fd, offset, length, side.is_block, True):
                raise OSError(95, os.strerror(95), side.path)
            return length
        self._write(offset, length, op)

    def pread(self, length: int, offset: int) -> bytes:
        self._check(offset, length)
        side, _, mirror = self._enter()   # reads pass the gate too: they never race a pivot
        try:
            chunks = []
            done = 0
            while done < length:
                b = os.pread(side.fd, length - done, offset + done)
                if not b:
                    break
                chunks.append(b)
                done += len(b)
            return b"".join(chunks)
        except OSError as e:
            raise io_error(e.errno or 5, side.path, offset, "read") from None
        finally:
            self._leave(mirror)

    def flush(self) -> None:
        side, _, mirror = self._enter()
        try:
            os.fdatasync(side.fd)
            if mirror is not None:
                os.fdatasync(mirror[2].fd)
        finally:
            self._leave(mirror)

    def close(self) -> None:
        self.stop_mirroring()
        with self._cond:
            self._closed = True
            side, self._side = self._side, None
            origin, self._origin = self._origin, None
        if side is not None:
            os.close(side.fd)
        if origin is not None:
            os.close(origin)

    def __del__(self) -> None:
        side = getattr(self, "_side", None)
        for fd in (side.fd if side is not None else -1, getattr(self, "_origin", None)):
            if fd is not None and fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def __repr__(self) -> str:
        return "<TrackedSource %s size=%d%s>" % (self.path, self.size,
                                                 " pivoted" if self.pivoted else "")
