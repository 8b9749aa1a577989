"""What a job tells its users: events, status snapshots and errors."""

from __future__ import annotations

import enum
import errno as _errno
import os
import time
from dataclasses import dataclass, field
from typing import Optional


class EventType(str, enum.Enum):
    """What a JobEvent reports; COMPLETED, CANCELLED and FAILED are final."""

    READY = "READY"            # phase 2 began: the target matches the source
    ERROR = "ERROR"            # an I/O error; not final: see .action
    COMPLETED = "COMPLETED"    # final: the target equals a past state of the source
    CANCELLED = "CANCELLED"    # final: the target may be inconsistent
    FAILED = "FAILED"          # final: the job ended on an error (.error)
    COPY_MODE = "COPY_MODE"    # not final: copy_mode="auto" switched to write-blocking

    @property
    def final(self) -> bool:
        """True for the event that ends the job (one per job)."""
        return self in (EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED)


class JobState(str, enum.Enum):
    """MirrorJob.state: where the job is in its lifecycle (job/states.py
    holds the table of moves and of the verbs each state allows)."""

    CREATED = "created"
    RUNNING = "running"        # phase 1, copying
    PAUSED = "paused"          # phase 1, paused by the user or an error policy
    READY = "ready"            # phase 2, in sync
    STANDBY = "standby"        # phase 2, paused
    DRAINING = "draining"      # complete() or cancel() in phase 2: final drain
    ABORTING = "aborting"      # cancel() in phase 1, or cancel(force=True): stopping
    CONCLUDED = "concluded"    # a final event was emitted


class JobStateError(RuntimeError):
    """A verb that the job's current state does not allow."""


class JobError(OSError):
    """An OSError raised or reported by fastmirror, with where it happened.

    errno still picks the usual subclass: an error with ENOENT is both a
    JobError and a FileNotFoundError, one with ENOSPC both a JobError and an
    OSError whose .errno is ENOSPC.  Beside errno, strerror and filename (the
    path of the side that failed) it carries:

    offset:    the byte offset where the operation failed, or None where no
               offset applies (a failed open or stat); for a verify failure,
               the first differing byte; for a source whose size changed,
               the new size.
    operation: what failed: "read", "write", "flush", "open", "stat" or
               "verify"; None when unknown.
    """

    offset: Optional[int] = None
    operation: Optional[str] = None

    def __reduce__(self):
        return (_rebuild, (self.errno, self.strerror, self.filename, self.offset,
                           self.operation))


# errno's OSError subclass -> the JobError subclass deriving from both.
_ERROR_CLASSES: dict[type, type[JobError]] = {OSError: JobError}


def _error_class(base: type) -> type[JobError]:
    cls = _ERROR_CLASSES.get(base)
    if cls is None:
        cls = type(base.__name__, (JobError, base),
                   {"__module__": __name__, "__doc__": JobError.__doc__})
        _ERROR_CLASSES[base] = cls
    return cls


def io_error(err: int, path: Optional[str], offset: Optional[int] = None,
             operation: Optional[str] = None) -> JobError:
    """A JobError of the right subclass (errno picks it, as OSError's own
    constructor does) carrying the path, the offset and the operation that
    failed."""
    plain = OSError(err, os.strerror(err), path)
    e = _error_class(type(plain))(err, os.strerror(err), path)
    e.offset = offset
    e.operation = operation
    return e


def as_job_error(e: OSError) -> JobError:
    """e itself when it is a JobError; otherwise a JobError with the same
    errno, message and path (offset and operation kept where e has them),
    chained to e."""
    if isinstance(e, JobError):
        return e
    err = io_error(e.errno or _errno.EIO, e.filename, getattr(e, "offset", None),
                   getattr(e, "operation", None))
    if e.strerror:
        err.strerror = e.strerror
        err.args = (err.errno, e.strerror)
    err.__cause__ = e
    return err


def _rebuild(err, strerror, path, offset, operation) -> JobError:
    e = io_error(err, path, offset, operation)
    e.strerror = strerror
    e.args = (err, strerror)
    return e


@dataclass(frozen=True)
class JobEvent:
    """One event of a job, passed to listeners and returned by wait().

    `error` is a JobError: an OSError (errno, strerror, filename: the path of
    the side that failed) with `.offset` (int, or None) and `.operation`.
    `offset`/`len` are the job's progress when the event fired (len when
    READY or later)."""

    type: EventType
    offset: int                       # progress when the event fired
    len: int
    error: Optional[JobError] = None  # ERROR, FAILED: errno, path, .offset, .operation
    operation: Optional[str] = None   # ERROR: "read", "write" or "flush"
    action: Optional[str] = None      # ERROR: "report", "ignore" or "stop"
    copy_mode: Optional[str] = None   # the copy mode in effect: "background" or "write-blocking"
    retry_delay: Optional[float] = None   # ERROR, action "ignore": seconds before the retry
    bytes_copied: Optional[int] = None    # final events: bytes this run copied (a resumed
                                          # job counts from its restart)
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict[str, object]:
        d: dict[str, object] = {"event": self.type.value, "offset": self.offset, "len": self.len,
             "time": round(self.time, 6)}
        if self.error is not None:
            d["errno"] = self.error.errno
            d["error"] = self.error.strerror
            d["path"] = self.error.filename
            d["error_offset"] = getattr(self.error, "offset", None)
        if self.operation is not None:
            d["operation"] = self.operation
        if self.action is not None:
            d["action"] = self.action
        if self.copy_mode is not None:
            d["copy_mode"] = self.copy_mode
        if self.retry_delay is not None:
            d["retry_delay"] = self.retry_delay
        if self.bytes_copied is not None:
            d["bytes_copied"] = self.bytes_copied
        return d


@dataclass(frozen=True)
class JobStatus:
    """A snapshot returned by MirrorJob.status(); QEMU's query-block-jobs
    fields (offset, len, ready, paused, busy, speed, io_status) and measured
    ones.  `error` is the last JobError, as in the events."""

    state: str
    offset: int            # len - dirty_bytes (== len when ready and clean)
    len: int
    ready: bool
    paused: bool
    busy: bool             # a copy is in progress
    speed: int             # the limit in bytes/s, 0 = none (as QEMU's "speed")
    dirty_bytes: int       # bytes still to copy, copies in flight included
    io_status: str         # "ok", "failed" or "nospace"
    error: Optional[JobError]  # the last error (see JobError), None if none
    bytes_copied: int      # data moved so far, recopies included
    copy_rate: float       # bytes/s, measured over the last seconds
    dirty_rate: float      # bytes/s written through the job or mark_dirty
    eta: Optional[float]   # seconds to READY (phase 1) at the measured rates
    direct: bool           # O_DIRECT in effect on both sides
    io_mode: str           # "direct", or why it fell back to buffered I/O
    elapsed: float         # seconds since start
    time_to_ready: Optional[float]
    chunks_copied: int
    chunks_recopied: int   # copied again because a write dirtied them
    copy_mode: str = "background"   # in effect now: "background" or "write-blocking"
    io_engine: str = "threads"      # "io_uring", or "threads" and why (see MirrorJob)
    io_calls: str = "preadv/pwritev"  # the calls a copy issues, e.g. READ_FIXED/WRITE_FIXED
    bytes_zeroed: int = 0           # holes of the source made to read zeros on the target
    bytes_zero_detected: int = 0    # read as zeros, stored as zeroed ranges (in bytes_copied)
