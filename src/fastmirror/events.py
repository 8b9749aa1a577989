"""What a job tells its users: events, status snapshots and errors."""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import Optional


class EventType(str, enum.Enum):
    READY = "READY"            # phase 2 began: the target matches the source
    ERROR = "ERROR"            # an I/O error; not final: see .action
    COMPLETED = "COMPLETED"    # final: the target equals a past state of the source
    CANCELLED = "CANCELLED"    # final: the target may be inconsistent
    FAILED = "FAILED"          # final: the job ended on an error (.error)
    COPY_MODE = "COPY_MODE"    # not final: copy_mode="auto" switched to write-blocking

    @property
    def final(self) -> bool:
        return self in (EventType.COMPLETED, EventType.CANCELLED, EventType.FAILED)


class JobState(str, enum.Enum):
    CREATED = "created"
    RUNNING = "running"        # phase 1, copying
    PAUSED = "paused"          # phase 1, paused by the user or an error policy
    READY = "ready"            # phase 2, in sync
    STANDBY = "standby"        # phase 2, paused
    DRAINING = "draining"      # complete() or cancel() in phase 2: final drain
    CONCLUDED = "concluded"    # a final event was emitted


class JobStateError(RuntimeError):
    """A verb that the job's current state does not allow."""


def io_error(err: int, path: Optional[str], offset: Optional[int] = None,
             operation: Optional[str] = None) -> OSError:
    """An OSError of the right subclass (errno picks it) carrying the path,
    the offset and the operation that failed."""
    e = OSError(err, os.strerror(err), path)
    e.offset = offset          # type: ignore[attr-defined]
    e.operation = operation    # type: ignore[attr-defined]
    return e


@dataclass(frozen=True)
class JobEvent:
    type: EventType
    offset: int                       # progress when the event fired
    len: int
    error: Optional[OSError] = None   # ERROR, FAILED
    operation: Optional[str] = None   # ERROR: "read", "write" or "flush"
    action: Optional[str] = None      # ERROR: "report", "ignore" or "stop"
    copy_mode: Optional[str] = None   # the copy mode in effect: "background" or "write-blocking"
    retry_delay: Optional[float] = None   # ERROR, action "ignore": seconds before the retry
    time: float = field(default_factory=time.time)

    def to_dict(self) -> dict:
        d = {"event": self.type.value, "offset": self.offset, "len": self.len,
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
        return d


@dataclass(frozen=True)
class JobStatus:
    state: str
    offset: int            # len - dirty_bytes (== len when ready and clean)
    len: int
    ready: bool
    paused: bool
    busy: bool             # a copy is in progress
    speed: int             # the limit in bytes/s, 0 = none (as QEMU's "speed")
    dirty_bytes: int       # bytes still to copy, copies in flight included
    io_status: str         # "ok", "failed" or "nospace"
    error: Optional[OSError]
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
