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
import errno
import os
import threading
from typing import Callable, Optional

from fastmirror._core.tracked import TrackedDisk
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


class TrackedSource(BlockHandle):
    """Writes go to the source and are marked dirty after they land; after a
    pivot they go to the target untracked.

    A thin wrapper: the gate, the claims of write-blocking mode, the write
    and the marking all happen in one C call (tracked.TrackedDisk) that runs
    without the GIL; this class opens the source, turns -errno into OSError
    with the path and offset, and keeps the paths.

    fd, if given, is a descriptor of the source that the handle takes over:
    the first write reopens that very file read-write through it, so that
    writes reach the file the job checked and copies, even if `path` names
    another file by then.  Without it the handle opens `path`."""

    def __init__(self, path: str, size: int, is_block: bool, engine,
                 fd: Optional[int] = None, disk: Optional[TrackedDisk] = None, al=None):
        self.size = size
        self._path = path
        self._origin = fd            # closed once the read-write side is open
        self._is_block = is_block
        self._target_path: Optional[str] = None
        # A borrowed disk is the NBD export's: close() ends I/O through this
        # handle only, the export's clients keep it (and the job still gates
        # and marks their writes).
        self._borrowed = disk is not None
        self._closed = False
        self._disk = disk if disk is not None else TrackedDisk(size, engine)
        if al is not None:
            # First: no write may be tracked without the activity log.
            self._disk.set_activity_log(al)
        if disk is not None:
            # A disk already served (the NBD export): its writers from now on
            # go through the job's engine; it has its own descriptor.
            disk.track(engine)
            self._drop_origin()
        self._open_lock = threading.Lock()

    # -- the gate (used by the job) -----------------------------------------

    def close_gate(self) -> None:
        """Block new writes and wait for those in progress to be marked."""
        self._disk.close_gate()

    def open_gate(self) -> None:
        self._disk.open_gate()

    def pivot(self, path: str, fd: int, is_block: bool) -> None:
        """From now on, writes go to the target (fd is handed over) and are no
        longer tracked.  Called with the gate closed."""
        self._target_path = path
        self._disk.pivot(fd, is_block)
        with self._open_lock:
            self._drop_origin()             # the source is not reopened any more

    def stop_tracking(self) -> None:
        self._disk.stop_tracking()

    def start_mirroring(self, path: str, fd: int, is_block: bool) -> None:
        """Write-blocking mode: from now on a write returns only once it has
        reached source and target.  fd (a buffered target descriptor) is
        handed over."""
        self._disk.start_mirroring(fd, is_block)

    def stop_mirroring(self) -> None:
        self._disk.stop_mirroring()

    def set_trace(self, on_event: Optional[Callable[[int, int, int], object]]) -> None:
        """on_event(event, offset, length) around each claim of a write to
        both sides and before each mark (tracked.CLAIM_*, MARK); for tests
        of invariants 2 and 3."""
        self._disk.set_trace(on_event)

    @property
    def write_blocking(self) -> bool:
        return self._disk.write_blocking

    @property
    def pivoted(self) -> bool:
        return self._disk.pivoted

    @property
    def path(self) -> str:
        return self._target_path if self._disk.pivoted else self._path

    # -- I/O ------------------------------------------------------------------

    def _attach(self) -> None:
        """Open the source on first use (a job nobody writes through never
        opens it read-write)."""
        with self._open_lock:
            if self._disk.attached or self._disk.is_closed:
                return
            if self._origin is not None:
                fd = reopen(self._origin, os.O_RDWR)
                self._drop_origin()
            else:
                fd = os.open(self._path, os.O_RDWR | os.O_CLOEXEC)
            if not self._disk.attach(fd, self._is_block):
                os.close(fd)

    def _drop_origin(self) -> None:
        origin, self._origin = self._origin, None
        if origin is not None:
            os.close(origin)

    def _fail(self, r: int, offset: int, operation: str):
        if r == -errno.EBADF and (self._disk.is_closed or not self._disk.attached):
            return ValueError("I/O on a closed handle")
        return io_error(-r, self.path, offset, operation)

    def _call(self, operation: str, offset: int, call, *args):
        """One request through the C path: open the source on first use,
        and raise for -errno (pread returns bytes, the others a count)."""
        if self._closed:
            raise ValueError("I/O on a closed handle")
        if not self._disk.attached:
            self._attach()
        r = call(*args)
        if type(r) is int and r < 0:
            raise self._fail(r, offset, operation)
        return r

    def pwrite(self, data, offset: int) -> int:
        if type(data) is not bytes:
            data = memoryview(data).cast("B")
        return self._call("write", offset, self._disk.pwrite, data, offset)

    def write_zeroes(self, offset: int, length: int) -> None:
        self._call("write", offset, self._disk.write_zeroes, offset, length)

    def discard(self, offset: int, length: int) -> None:
        """Drop a range.  Files get a hole (reads zeros); on a block device the
        range is zeroed, since a discard there may leave any content."""
        self._call("write", offset, self._disk.discard, offset, length)

    def pread(self, length: int, offset: int) -> bytes:
        return self._call("read", offset, self._disk.pread, length, offset)

    def flush(self) -> None:
        self._call("flush", 0, self._disk.flush)

    def close(self) -> None:
        """End I/O through this handle (ValueError from then on).  The disk
        is closed with it, unless it is an NBD export's (Export.mirror):
        that one the export closes."""
        self._closed = True
        if not self._borrowed:
            self._disk.close()
        with self._open_lock:
            self._drop_origin()

    def __del__(self) -> None:
        if getattr(self, "_origin", None) is not None:
            try:
                os.close(self._origin)
            except OSError:
                pass

    def __repr__(self) -> str:
        return "<TrackedSource %s size=%d%s>" % (self.path, self.size,
                                                 " pivoted" if self.pivoted else "")
