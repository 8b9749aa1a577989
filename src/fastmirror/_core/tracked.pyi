"""Typed stub for fastmirror._tracked (a Cython module): the tracked write
path.  Each request passes the gate, claims its chunks in write-blocking
mode, writes and marks, in one C call made with the GIL released; C callers
cimport the same path from _tracked.pxd."""

from collections.abc import Callable
from types import TracebackType
from typing import Final

from typing_extensions import Buffer, Self, disjoint_base

from fastmirror._core.actlog import ActivityLog
from fastmirror._core.engine import CopyEngine

# Events of TrackedDisk.set_trace().
CLAIM_WAIT: Final = 0
"""Before waiting for a claim (write-blocking mode)."""
CLAIM_HELD: Final = 1
"""Claimed: the write to both sides starts."""
CLAIM_RELEASE: Final = 2
"""About to release the claim."""
MARK: Final = 3
"""About to mark the range dirty: the write has landed."""

@disjoint_base
class TrackedDisk:
    """A disk of ``size`` bytes whose writes are marked dirty in ``engine``
    until ``stop_tracking()`` or ``pivot()``.  Descriptors given to it are
    its own.  I/O methods return bytes done or 0, or ``-errno``; a range
    outside ``[0, size)`` raises ValueError."""

    @property
    def size(self) -> int: ...
    @property
    def pivoted(self) -> bool: ...
    def __init__(self, size: int, engine: CopyEngine | None) -> None: ...
    def pwrite(self, data: Buffer, offset: int) -> int: ...
    def write_zeroes(self, offset: int, length: int) -> int: ...
    def discard(self, offset: int, length: int) -> int:
        """-EOPNOTSUPP where the disk has no way to discard."""
    def pread(self, length: int, offset: int) -> bytes | int: ...
    def flush(self) -> int: ...
    def attach(self, fd: int, is_block: bool) -> bool:
        """Hand over the disk's descriptor; False (fd stays the caller's) if
        it has one already or is closed."""
    def close_gate(self) -> None:
        """Hold new requests and wait for those inside to end."""
    def open_gate(self) -> None: ...
    def pivot(self, fd: int, is_block: bool) -> None:
        """Requests go to fd (handed over), untracked.  Gate closed."""
    def set_direct(self, on: bool) -> bool:
        """Serve aligned requests with O_DIRECT (a twin descriptor), the
        target too after a pivot; True when O_DIRECT is in effect."""
    def track(self, engine: CopyEngine) -> None: ...
    def set_activity_log(self, al: ActivityLog | None) -> None:
        """Record each write's extent in ``al`` before it lands; waits until
        no request is inside."""
    @property
    def activity_log(self) -> ActivityLog | None: ...
    @property
    def untracked_writes(self) -> int:
        """Writes that went through while no job tracked the disk."""
    def stop_tracking(self) -> None: ...
    def start_mirroring(self, fd: int, is_block: bool) -> None: ...
    def stop_mirroring(self) -> None: ...
    def close(self) -> None: ...
    def set_trace(self, on_event: Callable[[int, int, int], object] | None) -> None: ...
    @property
    def attached(self) -> bool: ...
    @property
    def is_closed(self) -> bool: ...
    @property
    def served_direct(self) -> bool: ...
    @property
    def write_blocking(self) -> bool: ...
    @property
    def tracking(self) -> bool: ...
    @property
    def writers_inside(self) -> int: ...
    @property
    def gate_is_closed(self) -> bool: ...

@disjoint_base
class Claim:
    """The chunks of ``[offset, offset + length)`` of ``engine``, held from
    ``acquire()`` (which waits for overlapping copies and claims) to
    ``release()``."""

    @property
    def offset(self) -> int: ...
    @property
    def length(self) -> int: ...
    @property
    def held(self) -> bool: ...
    def __init__(self, engine: CopyEngine, offset: int, length: int) -> None: ...
    def acquire(self) -> None: ...
    def release(self) -> None: ...
    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
