"""Typed stub for fastmirror._core.engine (a Cython module): the copy engine of
the mirror job.  Its copy slots are driven with the GIL released, by one
thread per slot in ``run_worker()`` or by io_uring threads in
``run_driver()``; the coordinator sleeps in ``wait_event()``."""

from collections.abc import Callable
from typing import Final

from typing_extensions import disjoint_base

from fastmirror._core.hbitmap import HBitmap
from fastmirror._core.nbdclient import NbdClient

# What wait_event() returns.
EV_TIMEOUT: Final = 0
"""The timeout passed, or kick() was called."""
EV_CLEAN: Final = 1
"""No dirty chunk and no copy in progress."""
EV_ERROR: Final = 2
"""At least one failure waits in take_failures()."""
EV_STOPPED: Final = 3
"""stop() was called and every worker has returned."""

# Failure operations, as take_failures() reports them.
OP_READ: Final = 0
OP_WRITE: Final = 1

RING_CALLS: Final[tuple[str, ...]]
"""The values of CopyEngine.ring_calls: "auto", "fixed", "vectored", "plain"."""

@disjoint_base
class CopyEngine:
    """Copies the dirty chunks of ``bitmap`` from ``src_fd`` to ``dst_fd``.

    The engine works on its own close-on-exec duplicates of the descriptors
    it is given, closed by ``close()`` or when it is freed, so the caller
    may close its own at any time.  The caller owns the threads: it starts
    ``nworkers`` threads running ``run_worker(slot)``, or a few running
    ``run_driver(first, count)`` over disjoint slot ranges, and, to finish,
    calls ``stop()`` and joins them."""

    detect_zeroes: bool
    """All-zero data becomes a zeroed range on the target."""
    sync_source: bool
    """flush() fdatasyncs the source before the target (a job with a state
    file records what a flush covers as clean)."""
    unmap: bool
    """Zeroed file ranges are punched out (holes)."""
    def __init__(
        self,
        bitmap: HBitmap,
        src_fd: int,
        dst_fd: int,
        dst_tail_fd: int,
        size: int,
        align: int,
        max_io: int,
        nworkers: int,
        dst_is_block: bool = False,
        detect_zeroes: bool = True,
        unmap: bool = True,
        nbd: NbdClient | None = None,
    ) -> None:
        """With ``nbd`` the target is that NBD export (``dst_fd`` and
        ``dst_tail_fd`` are ignored): WRITE, WRITE_ZEROES and FLUSH go
        through the client's C functions from the worker threads."""
    @property
    def nbd_client(self) -> NbdClient | None: ...
    def reconnect_target(self) -> int:
        """NBD target: connect again the connections that failed, after
        dirtying again what was written since the last successful flush
        (the workers are then held until ``release()``).  OSError when the
        server is still away; 0 for a file target."""
    @property
    def bitmap(self) -> HBitmap: ...
    @property
    def size(self) -> int:
        """Bytes mirrored: ``[0, size)``."""
    @property
    def align(self) -> int:
        """O_DIRECT offset and length alignment of both sides."""
    @property
    def max_io(self) -> int:
        """Largest single copy in bytes, a multiple of the granularity."""
    @property
    def nworkers(self) -> int: ...
    @property
    def ring_calls(self) -> str:
        """How io_uring drivers started from now on issue reads and writes:
        "auto" (the default) and "fixed" register the slots' buffers and
        issue READ_FIXED/WRITE_FIXED where the kernel takes them, READ/WRITE
        otherwise; "vectored" READV/WRITEV; "plain" READ/WRITE."""
    @ring_calls.setter
    def ring_calls(self, value: str) -> None: ...
    @property
    def ring_io(self) -> str | None:
        """What the io_uring drivers issue: None before one has started, else
        "READ_FIXED/WRITE_FIXED" (registered buffers), "READV/WRITEV",
        "READ/WRITE", with why registered buffers were refused where they
        were, e.g. "READ/WRITE (registered buffers refused: Cannot allocate
        memory)"; rings that differ are counted."""
    @property
    def bytes_copied(self) -> int: ...
    @property
    def bytes_zeroed(self) -> int:
        """Holes of the source zeroed on the target."""
    @property
    def bytes_zero_detected(self) -> int:
        """Zero data stored as zeroed ranges."""
    @property
    def bytes_marked(self) -> int:
        """Bytes reported written through mark_dirty."""
    @property
    def chunks_copied(self) -> int: ...
    @property
    def copies(self) -> int: ...
    @property
    def busy_ns(self) -> int:
        """Wall time with at least one copy in progress."""
    @property
    def speed(self) -> int:
        """The speed limit in bytes per second; 0 means unlimited."""
    def persistable(self, out: HBitmap) -> None:
        """Set in ``out`` every chunk a state file must keep dirty: dirty,
        unflushed, being flushed, or in flight (copies and claims)."""
    @property
    def unflushed_bytes(self) -> int:
        """Bytes written to the target since the last successful flush, in
        whole chunks (an upper bound while a flush is in progress)."""

    # Marking (any thread)
    def mark_dirty(self, offset: int, length: int) -> None:
        """Dirty every chunk overlapping ``[offset, offset + length)`` and wake
        a worker.  Call it after the write has reached the source."""

    # Control (the job)
    def set_paused(self, paused: bool) -> None: ...
    def release(self) -> None:
        """Let workers pick extents again after a failure was handled."""
    def stop(self) -> None:
        """Workers finish the copy in hand and return."""
    def kick(self) -> None:
        """Wake the coordinator from wait_event()."""
    def set_speed(self, speed: int) -> None: ...
    def set_trace(
        self,
        on_iteration: Callable[[int, int], object] | None,
        on_iteration_done: Callable[[int, int, int], object] | None,
    ) -> None:
        """Per-copy tracepoints: ``on_iteration(sector_num, nb_sectors)``
        before a copy, ``on_iteration_done(offset, nbytes, ret)`` after it."""
    def wait_event(self, timeout: float, want_clean: bool = True) -> int:
        """Sleep until something needs the coordinator; returns an ``EV_*``."""
    def take_failures(self) -> tuple[list[tuple[int, int, int, int]], int]:
        """``([(op, errno, offset, length), ...], dropped)``, oldest first."""
    def flush(self) -> int:
        """fdatasync the target: 0 or -errno.  On failure every chunk written
        to the target since the last successful flush, and every copy or
        claim in flight, is dirty again when it returns, and the workers
        pick nothing until ``release()``."""
    def close(self) -> None:
        """Close the engine's descriptors once no worker runs (RuntimeError
        otherwise); later I/O fails with EBADF.  Idempotent."""
    def zero_target(self, offset: int, length: int) -> int:
        """Make a target range read as zeros: 0 or -errno; -EOPNOTSUPP means
        the caller must copy the range instead."""
    def counters(self) -> dict[str, int]:
        """A consistent snapshot of the counters."""
    def snapshot(self) -> tuple[int, int, bool, bool]:
        """``(busy, inflight_bytes, paused, held)``."""

    # The workers
    def run_worker(self, slot: int) -> None:
        """Run one copy worker until stop().  Call from a dedicated thread."""
    def run_driver(self, first: int, count: int) -> None:
        """Run the slots ``[first, first + count)`` from this one thread until
        stop(), their reads and writes in flight together on an io_uring.
        Raises OSError if io_uring cannot be set up."""

def _log_callback_error(name: str) -> None: ...
