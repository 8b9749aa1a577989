"""MirrorJob: the mirror job's state machine, phases, events and policies.

The job owns one control thread (the coordinator) and a few copy workers.
Workers live in the compiled engine with the GIL released; the coordinator
sleeps in CopyEngine.wait_event() and wakes for failures, for the first clean
instant (phase 1 -> READY), for verbs (kick) and a few times a second to
refresh rates and check the source's size.

Lifecycle (one table, one function performs every transition):

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
    RUNNING --clean+flush--> READY <--pause/resume--> STANDBY
    READY/STANDBY --complete/cancel--> DRAINING --clean+flush--> CONCLUDED (COMPLETED)
    DRAINING --pause--> STANDBY --resume--> DRAINING
    RUNNING/PAUSED --cancel--> ABORTING --> CONCLUDED (CANCELLED); so does any
    state on cancel(force=True)
    any --error (report)--> CONCLUDED (FAILED)

As in QEMU's job.c, a verb is checked against the table and moves the state
before it returns, under the job's lock; the control thread never applies a
verb later.  It only makes the moves nobody asks for: RUNNING -> READY, the
end of a drain or an abort, and an error policy's pause.
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import threading
import time
import warnings
from typing import Callable, Optional, overload

from fastmirror import trace
from fastmirror._core import blockio as _io
from fastmirror._core.engine import (CopyEngine, EV_CLEAN, EV_ERROR, EV_STOPPED,
                                OP_READ)
from fastmirror._core.actlog import ActivityLog, RECORD_SIZE as _AL_RECORD
from fastmirror._core.hbitmap import HBitmap
from fastmirror.job.events import (EventType, JobError, JobEvent, JobState,
                               JobStateError, JobStatus, as_job_error, io_error)
from fastmirror.job.endpoints import validate_pair
from fastmirror.job import nbdtarget
from fastmirror.job import state as _state
from fastmirror.job.source import TrackedSource
from fastmirror.job.states import PAUSED_STATES, TRANSITIONS, VERBS, WORKING_STATES

__all__ = ["MirrorJob"]

_log = logging.getLogger("fastmirror")

S = JobState
POLICIES = ("report", "ignore", "stop", "enospc")
SYNC_MODES = ("full", "none")
COPY_MODES = ("auto", "background", "write-blocking")
# How copies are issued: "io_uring" keeps every copy's read or write in flight
# at once from DRIVERS threads; "threads" runs one thread per copy with
# blocking pread/pwrite; "auto" takes io_uring where the kernel allows it.
IO_ENGINES = ("auto", "io_uring", "threads")
DRIVERS = 2                 # io_uring threads; the copies in flight are split between them
# copy_mode="auto" switches to write-blocking when, over this many seconds,
# the work left did not shrink by a tenth while writes kept coming.
AUTO_WINDOW = 2.0
# How buf_size is split into copies in flight.  Measured on a virtio disk
# (README, Performance): bytes in flight matter most, and at equal bytes
# fewer, larger requests win up to 2 MiB (8 x 2 MiB beat 16 x 1 MiB), while
# 4 x 4 MiB left the disk idle.  So: a copy is buf_size/8, within
# [MIN_IO, MAX_IO], and up to MAX_WORKERS copies run at once.
MIN_IO = 1 << 20
MAX_IO = 4 << 20
IO_SPLIT = 8
MAX_WORKERS = 16            # copies in flight, as QEMU's 16 operations
MAX_BUF_SIZE = 1 << 30
MAX_GRANULARITY = 64 << 20  # as QEMU's mirror: 512 bytes to 64 MiB
MAX_SPEED = 1 << 50         # 1 PB/s: anything above is a typo
TICK = 0.1                  # seconds between coordinator wake-ups
RETRY_BACKOFF = (0.01, 1.0)  # "ignore": first and longest wait before retrying
NBD_ZERO_THREADS = 8        # an NBD target's holes: WRITE_ZEROES in flight at once
# A copy into an NBD target is at most 1 MiB unless io_size says otherwise,
# as QEMU's mirror (its MAX_IO_BYTES): with 2 MiB writes into qemu-nbd about
# half the runs took twice as long (0.42 s against 0.21 s for 256 MiB, half
# holes); 1 MiB took 0.17 to 0.25 s, as QEMU's 0.19 to 0.25 s.
NBD_IO = 1 << 20


def copy_shape(buf_size: int, granularity: int,
               io_size: Optional[int] = None) -> tuple[int, int]:
    """(bytes per copy, copies in flight) for a job's buf_size, granularity
    and io_size: a copy is buf_size/IO_SPLIT within [MIN_IO, MAX_IO] unless
    io_size says otherwise, a multiple of the granularity, and as many run at
    once as buf_size holds (up to MAX_WORKERS).  The bench shapes its fio
    ceiling with this too."""
    buf = max(buf_size, granularity)          # below one chunk: one chunk
    if io_size is None:
        io_size = min(MAX_IO, max(MIN_IO, buf // IO_SPLIT))
    max_io = max(granularity, min(io_size, buf) // granularity * granularity)
    return max_io, max(1, min(MAX_WORKERS, buf // max_io))


def _threads_because(why: str) -> str:
    """io_engine's value when io_uring was refused: the engine and why."""
    return "threads (io_uring: %s)" % why


def _positive_int(name: str, value, minimum: int = 0, maximum: Optional[int] = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError("%s must be an integer, not %r" % (name, value))
    if value < minimum:
        raise ValueError("%s must be >= %d, got %d" % (name, minimum, value))
    if maximum is not None and value > maximum:
        raise ValueError("%s %d is absurd (more than %d)" % (name, value, maximum))
    return value


class _Rate:
    """A rate measured over a sliding window of samples."""

    def __init__(self, window: float = 3.0):
        self.window = window
        self.samples: list[tuple[float, int]] = []

    def add(self, t: float, total: int) -> None:
        self.samples.append((t, total))
        while len(self.samples) > 2 and t - self.samples[0][0] > self.window:
            self.samples.pop(0)

    def rate(self) -> float:
        if len(self.samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0


class MirrorJob:
    """Mirror `source` to `target` while the source stays in use.

    Construction validates everything and opens both sides without writing
    a byte; a missing target file is created sparse, of the source's size.

    Other owners are refused (docs/design.md, invariant 8; job/owners.py): the job
    holds QEMU's image locks until close() (the target written and not
    shared for writing, the source read and not shared for writing or
    resizing), so a source that another process writes raises
    owners.InUseError, unless `force_share=True` (as `qemu-img -U`: the copy
    may then not be consistent); so does a target that another process
    uses, or a block device target that is mounted or held (opened with
    O_EXCL).  A target that starts with an image format header (qcow2,
    vmdk, vhdx, vdi, LUKS...) raises owners.ImageTargetError unless
    `allow_image_target=True`.

    Bad input raises ValueError or the OSError subclass of its errno, naming
    the path.

    `target` may be an NBD URI, nbd://host[:port]/name or
    nbd+unix:///name?socket=PATH (job/nbdtarget.py): the export is checked
    before any write (it answers the handshake, exists, is writable and
    large enough), written through the C NBD client over `connections`
    connections (default 2) when the server allows multi-conn, else one.
    With an NBD target copy_mode="write-blocking" is refused, there is no
    pivot (after complete(), job.source writes the source again, untracked),
    and a lost connection is connected again by the "ignore" retry or by
    resume().

    The job runs in two phases, as QEMU's mirror job: start() begins phase 1,
    the bulk copy; the first moment the target equals the source (flushed)
    is the READY event and phase 2, where the job keeps the target in sync;
    complete() then drains what is left, flushes, ends COMPLETED and pivots
    (writes through `source` go to the target from then on).  cancel(),
    pause(), resume() and set_speed() act at any time their state allows
    (JobStateError otherwise); wait_ready(), wait(), status() and
    add_listener() observe it.

    Attributes:

    source
        The tracked handle (a BlockHandle: pwrite, pread, write_zeroes,
        discard, flush, close) through which writers reach the disk while
        the job runs: a write lands on the source, then its chunks are
        marked dirty (or, in write-blocking mode, it reaches both sides
        before it returns).  Hand it to whoever writes the disk instead of
        the source's path.  Its lifetime is not the job's: after a
        complete() it writes to the target; after a cancel or a failure it
        writes to the source, no longer tracked.  It holds a descriptor of
        its own until source.close(), which job.close() does not call.
    size, granularity, buf_size, copy_mode, io_engine, ...
        The settings in effect (construction arguments after validation).

    `with MirrorJob(...) as job:` starts the job on entry (unless already
    started).  On exit, a job that has not ended is cancelled (cancel(); with
    force=True when the block raised), waited for and closed: before READY it
    ends CANCELLED, after READY the cancel drains and it ends COMPLETED
    without a pivot.  Without `with`, call close() when done: it releases the
    job's descriptors (cancelling a running job first, with force) and may be
    called more than once.  A job garbage-collected while still running emits
    a ResourceWarning.
    """

    def __init__(self, source, target, *, granularity: int = 65536,
                 buf_size: int = 16 << 20, speed: int = 0, sync: str = "full",
                 direct: bool = True, target_is_zero: bool = False,
                 on_source_error: str = "report", on_target_error: str = "report",
                 opaque=None, detect_zeroes: bool = True, unmap: bool = True,
                 verify: bool = False, copy_mode: str = "auto",
                 io_size: Optional[int] = None, io_engine: str = "auto",
                 force_share: bool = False, allow_image_target: bool = False,
                 connections: Optional[int] = None, state=None, _disk=None):
        granularity = _positive_int("granularity", granularity, 512, MAX_GRANULARITY)
        if granularity & (granularity - 1):
            raise ValueError("granularity %d is not a power of two" % granularity)
        buf_size = _positive_int("buf_size", buf_size, 1, MAX_BUF_SIZE)
        speed = _positive_int("speed", speed, 0, MAX_SPEED)
        if sync not in SYNC_MODES:
            raise ValueError("sync must be one of %s, not %r" % (SYNC_MODES, sync))
        if copy_mode not in COPY_MODES:
            raise ValueError("copy_mode must be one of %s, not %r" % (COPY_MODES, copy_mode))
        if io_engine not in IO_ENGINES:
            raise ValueError("io_engine must be one of %s, not %r" % (IO_ENGINES, io_engine))
        uring_error = _io.uring_error() if io_engine != "threads" else None
        if io_engine == "io_uring" and uring_error is not None:
            raise ValueError("io_engine='io_uring' is not available here: %s" % uring_error)
        for name, pol in (("on_source_error", on_source_error),
                          ("on_target_error", on_target_error)):
            if pol not in POLICIES:
                raise ValueError("%s must be one of %s, not %r" % (name, POLICIES, pol))

        # A damaged state file is refused before anything is opened; one of
        # another pair, or of a finished mirror, right after (below).
        state_path = os.fspath(state) if state is not None else None
        existing = _state.load(state_path) if state_path is not None else None

        # A target may be an NBD URI (job/nbdtarget.py): no file, no
        # descriptor; the engine writes through the NBD client.
        self._nbd = nbdtarget.is_nbd_uri(target)
        if self._nbd:
            if copy_mode == "write-blocking":
                raise ValueError("copy_mode='write-blocking' needs a file or block device "
                                 "target; an NBD target is mirrored in the background")
            self._src, self._dst = nbdtarget.validate_pair(
                os.fspath(source), target, direct, force_share=force_share,
                allow_image_target=allow_image_target, connections=connections)
        else:
            if connections is not None:
                raise ValueError("connections is for an NBD target (nbd://...)")
            self._src, self._dst = validate_pair(os.fspath(source), os.fspath(target), direct,
                                                 force_share=force_share,
                                                 allow_image_target=allow_image_target)
        try:
            align = max(self._src.info.alignment, self._dst.info.alignment)
            if granularity < align:
                raise ValueError("granularity %d is below the I/O alignment %d of %s"
                                 % (granularity, align, self._dst.path
                                    if self._dst.info.alignment == align else self._src.path))
            if state_path is not None:
                ids = (_state.identity(self._src.path, self._src.fd, self._src.info.size),
                       _state.identity(self._dst.path, None if self._nbd else self._dst.fd,
                                       self._dst.info.size))
                if existing is not None and existing.phase == "pivoted":
                    # Finished: its target is the disk now.  Mirroring that
                    # disk onward starts a new state; anything else is refused.
                    existing.check_onward(state_path, ids[0])
                    existing = None
                if existing is not None:
                    existing.check_pair(state_path, ids[0], ids[1], self._src.info.size,
                                        granularity)
        except BaseException:
            self._close_endpoints(remove_created=True)
            raise

        self.size = self._src.info.size
        self.granularity = granularity
        self.buf_size = max(buf_size, granularity)   # below one chunk: one chunk
        self.sync = sync
        self.direct = direct
        self.target_is_zero = target_is_zero or self._dst.created
        self.on_source_error = on_source_error
        self.on_target_error = on_target_error
        self.opaque = opaque
        self.verify = verify
        self.copy_mode = copy_mode
        if io_engine == "threads":
            self.io_engine = "threads"
        elif self._nbd:
            # The NBD client's calls block: one thread per copy, every copy
            # a request in flight.
            self.io_engine = "threads (NBD target)"
        elif uring_error is None:
            self.io_engine = "io_uring"
        else:
            self.io_engine = _threads_because(uring_error)
        self._write_blocking = False
        self._progress: list[tuple[float, int, int]] = []   # (time, work left, bytes marked)
        self._align = align

        if io_size is not None:
            io_size = _positive_int("io_size", io_size, 1, MAX_BUF_SIZE)
        elif self._nbd:
            io_size = NBD_IO
        max_io, nworkers = copy_shape(self.buf_size, granularity, io_size)
        try:
            self._bitmap = HBitmap(self.size, granularity)
            self._engine = CopyEngine(
                self._bitmap, self._src.fd, self._dst.fd, self._dst.tail_fd,
                self.size, align, max_io, nworkers, dst_is_block=self._dst.info.is_block,
                detect_zeroes=detect_zeroes, unmap=unmap,
                nbd=self._dst.client if self._nbd else None)
        except BaseException:      # e.g. MemoryError: leave nothing behind
            self._close_endpoints(remove_created=True)
            raise
        self._engine.set_speed(speed)
        self._al = None             # the activity log, with a state file
        self._state_path = state_path
        self._resume_bits: Optional[HBitmap] = None   # a resumed job's first dirty chunks
        self._untracked_seen = 0    # the disk's untracked writes when _open_state looked
        self._floor: Optional[HBitmap] = None     # dirty in every state file until marked
        self._persisted_at = 0.0
        self._persisted_news: tuple = ()
        self.resumed = existing is not None
        if state_path is not None:
            self._engine.sync_source = True     # see CopyEngine.flush
            try:
                self._open_state(existing, ids, _disk, dict(
                    granularity=granularity, buf_size=self.buf_size, speed=speed, sync=sync,
                    direct=direct, on_source_error=on_source_error,
                    on_target_error=on_target_error, detect_zeroes=detect_zeroes,
                    unmap=unmap, verify=verify, copy_mode=copy_mode, io_size=io_size,
                    io_engine=io_engine, force_share=force_share,
                    allow_image_target=allow_image_target))
            except BaseException:
                self._engine.close()
                self._close_endpoints(remove_created=True)
                raise
        # The handle reopens the checked source through its own duplicate
        # of our descriptor, not by path (a path may name another file now).
        # _disk: a TrackedDisk already serving the source (fastmirror.Export);
        # the job tracks it instead of making its own, so that every writer
        # of the export goes through the job and sees the pivot.
        try:
            self.source = TrackedSource(self._src.path, self.size, self._src.info.is_block,
                                        self._engine, fd=os.dup(self._src.fd), disk=_disk,
                                        al=self._al)
        except BaseException:
            self._engine.close()
            self._close_endpoints(remove_created=True)
            raise
        if (self._resume_bits is not None and _disk is not None
                and _disk.untracked_writes != self._untracked_seen):
            # Written untracked after _open_state looked, before track():
            # nothing says where, so everything is copied again, and the
            # state file says so before the job starts.
            self._resume_bits = self._distrusted(self._resume_bits)
            assert self._floor is not None
            self._floor.set(0, self.size)
            self._persist_quietly()

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._state = S.CREATED
        self._ready = False
        # The drain asked for in phase 2: "complete" (then pivot) or "cancel"
        # (no pivot); None until complete() or cancel() in phase 2.
        self._ending: Optional[str] = None
        self._final: Optional[JobEvent] = None
        self._error: Optional[JobError] = None
        self._io_status = "ok"
        self._listeners: list[Callable[[JobEvent], object]] = []
        self._pivot_hooks: list[Callable[[str], object]] = []
        self._threads: list[threading.Thread] = []
        self._coordinator: Optional[threading.Thread] = None
        self._copy_rate = _Rate()
        self._dirty_rate = _Rate()
        self._started_at: Optional[float] = None
        self._ready_at: Optional[float] = None
        self._initial_chunks = 0
        # sync="full" until _initial_marking is done: nothing is known to be
        # copied yet, so progress must not read as complete (offset == len).
        self._marking = sync == "full"
        self._retries = 0           # "ignore": failures in a row, for the backoff
        self._last_failure: Optional[tuple[str, int]] = None   # (kind, engine.copies then)
        self._flush_failed = False
        self._persister: Optional[threading.Thread] = None
        if self._al is not None:
            self._persister = threading.Thread(target=self._persist_loop,
                                               name="fastmirror-state", daemon=True)
            self._persister.start()

    # ------------------------------------------------------------------
    # State machine
    # ------------------------------------------------------------------

    def _verb(self, verb: str) -> None:
        """Under the lock: raise unless `verb` is allowed now."""
        if self._state not in VERBS[verb]:
            raise JobStateError("cannot %s a job that is %s" % (verb, self._state.value))

    def _transition(self, new: JobState) -> None:
        """Under the lock: the one place where the state changes.  The
        engine's pause follows the state here, so the two never disagree."""
        old = self._state
        if new not in TRANSITIONS[old]:
            raise JobStateError("illegal transition %s -> %s" % (old.value, new.value))
        self._state = new
        if new in PAUSED_STATES:
            self._engine.set_paused(True)
        elif new in WORKING_STATES and old in PAUSED_STATES:
            # Also lets workers go that a handled failure held.  ABORTING
            # stays paused: the workers are stopped next.
            self._engine.set_paused(False)
            self._engine.release()
        if threading.current_thread() is not self._coordinator:
            self._engine.kick()      # the control thread acts on the new state now
        self._cond.notify_all()

    @property
    def state(self) -> JobState:
        """The state now (see fastmirror.job.states for the table)."""
        return self._state

    # ------------------------------------------------------------------
    # Verbs
    # ------------------------------------------------------------------

    def start(self) -> "MirrorJob":
        """Begin phase 1 (the bulk copy) and return the job.  The copy runs
        on the job's own threads; start() returns at once.  Only once, on a
        job just created; `with MirrorJob(...)` calls it for you."""
        with self._lock:
            self._verb("start")
            self._transition(S.RUNNING)
            self._started_at = time.monotonic()
        trace._watch(self._refresh_trace)
        self._refresh_trace()
        # The copy workers are started by the coordinator once the initial
        # marking is done (see _start_workers); so is write-blocking mode.
        self._coordinator = threading.Thread(target=self._run, name="fastmirror-job",
                                             daemon=True)
        self._coordinator.start()
        return self

    def pause(self) -> None:
        """Stop copying until resume(): phase 1 goes PAUSED, phase 2 (also a
        drain asked for by complete() or cancel()) goes STANDBY.  Writes
        through `source` go on and are tracked; a paused drain lets writers
        through again.  The job stays ready in phase 2, and a paused job
        never switches copy_mode="auto" to write-blocking: only time spent
        running counts."""
        with self._lock:
            self._verb("pause")
            self._transition(S.PAUSED if self._state == S.RUNNING else S.STANDBY)

    def resume(self) -> None:
        """Copy again after pause(), also after an error policy's pause
        (stop, enospc), which it acknowledges (status().io_status is "ok"
        again).  A paused drain drains again."""
        if self._nbd and self._state in VERBS["resume"]:
            self._reconnect_target()
        with self._lock:
            self._verb("resume")
            self._io_status = "ok"
            if self._state == S.PAUSED:
                self._transition(S.RUNNING)
            else:
                self._transition(S.DRAINING if self._ending else S.READY)

    def set_speed(self, speed: int) -> None:
        """Limit the copy to `speed` bytes per second (0: no limit), at once,
        also for a copy already waiting on the previous limit."""
        speed = _positive_int("speed", speed, 0, MAX_SPEED)
        with self._lock:
            self._verb("set_speed")
            self._engine.set_speed(speed)

    def cancel(self, force: bool = False) -> None:
        """Phase 1: stop soon, CANCELLED.  Phase 2: drain, flush, COMPLETED
        (no pivot, also after complete()).  force=True: stop at once,
        CANCELLED, in either phase.  A paused job is resumed (as QEMU's
        job_cancel does): a paused drain drains.  Nothing on a job that is
        concluded or already aborting."""
        with self._lock:
            self._verb("cancel")
            state = self._state
            if state in (S.CONCLUDED, S.ABORTING):
                return
            if state == S.CREATED:
                self._conclude(EventType.CANCELLED)
            elif force or not self._ready:
                self._transition(S.ABORTING)
            else:
                self._ending = "cancel"
                if state != S.DRAINING:
                    self._transition(S.DRAINING)

    def complete(self) -> None:
        """Phase 2 only: drain, flush, COMPLETED, then writes through
        job.source go to the target."""
        with self._lock:
            self._verb("complete")
            self._ending = "complete"
            self._transition(S.DRAINING)

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once READY was emitted; False on timeout or if the job ended
        without becoming ready."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._final is not None, timeout)
            return self._ready

    @overload
    def wait(self, timeout: None = None) -> JobEvent: ...

    @overload
    def wait(self, timeout: Optional[float]) -> Optional[JobEvent]: ...

    def wait(self, timeout: Optional[float] = None) -> Optional[JobEvent]:
        """The final event (COMPLETED, CANCELLED or FAILED), once the job has
        ended; joins every thread of the job.  Without a timeout it waits as
        long as it takes and always returns the event; with one it returns
        None when the job has not ended in time.  A job never started never
        ends by itself: cancel() or close() it."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._final is not None, timeout):
                return None
            final = self._final
        deadline = None if timeout is None else time.monotonic() + timeout
        for t in [self._coordinator] + self._threads:
            if t is not None and t is not threading.current_thread():
                t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        return final

    def mark_dirty(self, offset: int, length: int) -> None:
        """Tell the job that someone else wrote [offset, offset+length) of the
        source.  Call it after the write has reached the source."""
        self._mark_write(offset, length)

    def add_listener(self, callback: Callable[[JobEvent], object]) -> None:
        """callback(JobEvent) for every event, from the job's thread."""
        if not callable(callback):
            raise TypeError("listener must be callable")
        with self._lock:
            self._listeners.append(callback)

    def on_pivot(self, callback: Callable[[str], object]) -> None:
        """callback(target_path) at the pivot, before COMPLETED: from the
        job's thread, with no lock of the job held, while writers are still
        held at the gate, so that no write reaches the target before it
        returns.  For whoever serves the disk and must know what it serves
        from then on (fastmirror.Export).  It must not write through
        job.source (the gate is closed).  Add it before complete(); one that
        raises is logged and the pivot stands."""
        if not callable(callback):
            raise TypeError("on_pivot's callback must be callable")
        with self._lock:
            self._pivot_hooks.append(callback)

    def _run_pivot_hooks(self) -> None:
        with self._lock:
            hooks = list(self._pivot_hooks)
        for cb in hooks:
            try:
                cb(self._dst.path)
            except Exception:
                _log.exception("on_pivot callback %r raised", cb)

    def remove_listener(self, callback: Callable[[JobEvent], object]) -> None:
        """Stop calling a callback given to add_listener (ValueError if it
        was not)."""
        with self._lock:
            self._listeners.remove(callback)

    # ------------------------------------------------------------------
    # Status
    # ------------------------------------------------------------------

    def status(self) -> JobStatus:
        """A snapshot of the job now (a JobStatus: state, progress as
        offset/len, dirty_bytes, rates and ETA, the copy mode and I/O engine
        in effect, the last error); cheap enough to poll."""
        busy, inflight, _, _ = self._engine.snapshot()
        with self._lock:
            dirty = min(self.size, self._bitmap.dirty_bytes + inflight)
            if self._marking:
                dirty = self.size
            if self._final is not None and self._final.type == EventType.COMPLETED:
                dirty = 0
            now = time.monotonic()
            copy_rate = self._copy_rate.rate()
            dirty_rate = self._dirty_rate.rate()
            eta = None
            if not self._ready and self._final is None:
                net = copy_rate - dirty_rate
                eta = dirty / net if net > 0 else (0.0 if dirty == 0 else None)
            copied = self._engine.chunks_copied
            return JobStatus(
                state=self._state.value,
                # Phase 2 reads as done; dirty_bytes tells what is pending.
                offset=self.size if self._ready else self.size - dirty,
                len=self.size,
                ready=self._ready,
                paused=self._state in PAUSED_STATES,
                busy=busy > 0,
                speed=self._engine.speed,
                dirty_bytes=dirty,
                io_status=self._io_status,
                error=self._error,
                bytes_copied=self._engine.bytes_copied,
                copy_rate=copy_rate,
                dirty_rate=dirty_rate,
                eta=eta,
                direct=self._src.direct and self._dst.direct,
                io_mode=self.io_mode,
                elapsed=(now - self._started_at) if self._started_at else 0.0,
                time_to_ready=(self._ready_at - self._started_at)
                if self._ready_at is not None and self._started_at is not None else None,
                chunks_copied=copied,
                chunks_recopied=max(0, copied - self._initial_chunks),
                copy_mode="write-blocking" if self._write_blocking else "background",
                io_engine=self.io_engine,
                io_calls=self._io_calls(),
                bytes_zeroed=self._engine.bytes_zeroed,
                bytes_zero_detected=self._engine.bytes_zero_detected,
            )

    def _io_calls(self) -> str:
        """What the copies issue: the rings' calls (registered buffers or
        not, and why) once the drivers run, else the blocking calls."""
        if self._nbd:
            return "preadv, NBD WRITE/WRITE_ZEROES/FLUSH over %s" % self._dst.describe()
        if self.io_engine == "io_uring":
            return self._engine.ring_io or "io_uring"
        return "preadv/pwritev"

    @property
    def target_path(self) -> str:
        """The target as given (after validation)."""
        return self._dst.path

    @property
    def io_mode(self) -> str:
        """"direct" when both sides use O_DIRECT, otherwise "buffered (...)"
        saying why and which side."""
        if self._src.direct and self._dst.direct:
            return "direct"
        sides = [e.path for e in (self._src, self._dst) if not e.direct]
        why = "refused O_DIRECT" if self.direct else "direct I/O off"
        return "buffered (%s: %s)" % (why, ", ".join(sides))

    # ------------------------------------------------------------------
    # Context manager and cleanup
    # ------------------------------------------------------------------

    def __enter__(self) -> "MirrorJob":
        """Start the job (unless already started) and return it."""
        if self._state == S.CREATED:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """Cancel a job that has not ended (with force when the block
        raised), wait for it and close it.  job.source stays open."""
        if self._final is None:
            try:
                self.cancel(force=exc_type is not None)
            except JobStateError:
                pass
        self.wait()
        self.close()

    def close(self) -> None:
        """Release the job's descriptors.  A running job is cancelled first
        (forcefully); its threads are joined, also when it concluded just now
        and they are still on their way out.  Safe to call more than once.
        job.source is not closed: it outlives the job (see the class
        documentation); close it with job.source.close()."""
        self.cancel(force=True)
        if self._coordinator is not None:
            self.wait()
        self._stop_persister()
        self._engine.close()        # the workers have returned
        self._close_endpoints()

    def _close_endpoints(self, remove_created: bool = False) -> None:
        if remove_created and getattr(self, "_dst", None) is not None:
            self._dst.remove_created()      # while its descriptor tells which file it is
        for e in (getattr(self, "_src", None), getattr(self, "_dst", None)):
            if e is not None:
                e.close()

    def __del__(self):
        try:
            if self._state not in (S.CREATED, S.CONCLUDED):
                warnings.warn("MirrorJob collected while %s" % self._state.value,
                              ResourceWarning, stacklevel=2)
        except AttributeError:
            pass

    def __repr__(self) -> str:
        return "<MirrorJob %s -> %s %s>" % (self._src.path, self._dst.path, self._state.value)

    # ------------------------------------------------------------------
    # Internals
    # ------------------------------------------------------------------

    def _mark_write(self, offset: int, length: int) -> None:
        if self._final is not None:
            return
        self._engine.mark_dirty(offset, length)   # counts engine.bytes_marked

    def _refresh_trace(self) -> None:
        one = trace.listeners("mirror_one_iteration")
        done = trace.listeners("mirror_iteration_done")

        def on_iteration(sector_num, nb_sectors):
            for fn in trace.listeners("mirror_one_iteration"):
                try:
                    fn(self, sector_num, nb_sectors)
                except Exception:
                    _log.exception("tracepoint mirror_one_iteration listener raised")

        def on_done(offset, nbytes, ret):
            for fn in trace.listeners("mirror_iteration_done"):
                try:
                    fn(self, offset, nbytes, ret)
                except Exception:
                    _log.exception("tracepoint mirror_iteration_done listener raised")

        self._engine.set_trace(on_iteration if one else None, on_done if done else None)

    def _emit(self, event: JobEvent) -> None:
        """Call listeners with no lock held; a listener that raises is
        logged and the job goes on."""
        with self._lock:
            listeners = list(self._listeners)
        for cb in listeners:
            try:
                cb(event)
            except Exception:
                _log.exception("job listener %r raised on %s", cb, event.type.value)

    def _event(self, type_: EventType, **kw) -> JobEvent:
        dirty = self.size if self._marking else self._bitmap.dirty_bytes
        # Phase 2 (READY and every event after it) reads as done.
        offset = (self.size if self._ready or type_ in (EventType.READY, EventType.COMPLETED)
                  else self.size - dirty)
        kw.setdefault("copy_mode", "write-blocking" if self._write_blocking else "background")
        return JobEvent(type_, offset, self.size, **kw)

    def _enter_write_blocking(self) -> None:
        """From now on writes through job.source reach both sides before
        they return, so they no longer add work: the job always converges."""
        self.source.start_mirroring(self._dst.path, self._dst.open_buffered(),
                                    self._dst.info.is_block)
        with self._lock:
            self._write_blocking = True

    def _auto_copy_mode(self, now: float) -> None:
        """copy_mode="auto": switch to write-blocking when writes outpace the
        copy, that is when over AUTO_WINDOW seconds of writes the work left
        did not shrink by a tenth (and is more than two copies' worth).

        Only time spent running counts: while the job is paused (by the user
        or an error policy) the copy is stopped on purpose, so writes piling
        up then say nothing about convergence.  A pause drops the window, and
        measuring starts afresh once the job runs again."""
        if self.copy_mode != "auto" or self._write_blocking or self._nbd:
            return
        if self._state in PAUSED_STATES:
            self._progress.clear()
            return
        _, inflight, _, _ = self._engine.snapshot()
        left = self._bitmap.dirty_bytes + inflight
        self._progress.append((now, left, self._engine.bytes_marked))
        while len(self._progress) > 2 and now - self._progress[1][0] >= AUTO_WINDOW:
            self._progress.pop(0)
        t0, left0, marked0 = self._progress[0]
        if now - t0 < AUTO_WINDOW or self._engine.bytes_marked == marked0:
            return
        if left >= 0.9 * left0 and left > 2 * self._engine.max_io:
            with self._lock:
                if self._state in PAUSED_STATES:   # paused since the check above
                    self._progress.clear()
                    return
            self._enter_write_blocking()
            _log.info("writes outpace the copy (%d bytes left, was %d %.1f s ago): "
                      "switching to write-blocking", left, left0, now - t0)
            self._emit(self._event(EventType.COPY_MODE))

    def _conclude(self, type_: EventType, error: Optional[JobError] = None) -> None:
        """Under the lock: record the final event (emitted by the caller)."""
        if self._final is not None:
            return
        self._final = self._event(type_, error=error, bytes_copied=self._engine.bytes_copied)
        if error is not None:
            self._error = error
        self._transition(S.CONCLUDED)
        if self._coordinator is None:      # never started: emit here
            self._finish_handle()
            self._emit(self._final)

    def _finish_handle(self) -> None:
        if self._al is not None:
            # Before writes go untracked: from now on the first one records
            # ALL_DIRTY in the log (a resumed job then copies everything).
            if self.source.pivoted:
                self._al.stop()
            else:
                self._al.poison()
        if not self.source.pivoted:
            self.source.stop_tracking()
        self.source.open_gate()
        if self._al is not None:
            self._persist_quietly("pivoted" if self.source.pivoted else "stopped")
            self._stop_persister(join=False)

    # -- the coordinator thread ------------------------------------------

    def _run(self) -> None:
        final_type, error = EventType.FAILED, None
        try:
            trace.emit("mirror_start", self.source, self, threading.current_thread(), self.opaque)
            if self._resume_bits is not None:
                # Resuming: what the state file and the activity log say, not
                # the whole disk; the rest of the target is the source's.
                self._bitmap.merge(self._resume_bits)
                self._initial_chunks = self._bitmap.dirty_count
            else:
                self._initial_marking()
            self._marking = False
            self._floor = None      # the engine's bitmap holds it all now
            if self.copy_mode == "write-blocking":
                # Only now: the initial marking zeroes target ranges that are
                # clean, and a write that went to both sides leaves its chunks
                # clean, so it would be zeroed away.  Until here writes are
                # marked dirty and copied like in background mode.
                self._enter_write_blocking()
            self._start_workers()
            final_type, error = self._loop()
        except BaseException as e:   # a bug must still end the job
            _log.exception("mirror job crashed")
            final_type = EventType.FAILED
            error = as_job_error(e) if isinstance(e, OSError) else io_error(_errno.EIO, None)
            if not isinstance(e, OSError):
                error.__cause__ = e
        finally:
            self._engine.stop()
            for t in self._threads:
                t.join()
            trace._unwatch(self._refresh_trace)
            with self._lock:
                self._conclude(final_type, error)   # unless the drain did
                final = self._final
            self._finish_handle()
            self._emit(final)
            with self._cond:
                self._cond.notify_all()

    def _start_workers(self) -> None:
        """Start the copy workers, only after _initial_marking: the marking
        sets bits without waking sleeping workers, and its hole zeroing must
        not race a copy (a chunk being copied, or already copied after a
        write through job.source, reads clean and would be zeroed)."""
        n = self._engine.nworkers
        if self.io_engine != "io_uring":
            for slot in range(n):
                self._start_thread(self._engine.run_worker, (slot,), "fastmirror-copy-%d" % slot)
            return
        drivers = min(DRIVERS, n)
        for d in range(drivers):
            first, end = d * n // drivers, (d + 1) * n // drivers
            self._start_thread(self._drive, (first, end - first), "fastmirror-ring-%d" % d)

    def _start_thread(self, target, args, name: str) -> None:
        t = threading.Thread(target=target, args=args, name=name, daemon=True)
        with self._lock:
            self._threads.append(t)
        t.start()

    def _drive(self, first: int, count: int) -> None:
        """One io_uring thread; if the ring cannot be set up after all (the
        probe's small ring passed, but a larger one hit a limit), its slots
        fall back to a blocking thread each."""
        try:
            self._engine.run_driver(first, count)
        except OSError as e:
            _log.warning("io_uring refused (%s): copying with threads", e)
            with self._lock:
                self.io_engine = _threads_because(e.strerror)
            for slot in range(first + 1, first + count):
                self._start_thread(self._engine.run_worker, (slot,), "fastmirror-copy-%d" % slot)
            self._engine.run_worker(first)

    def _initial_marking(self) -> None:
        """sync="full": every chunk with data is dirty; chunks that are holes
        in the source are not read, and the target is made to read zeros there
        unless it is known to be zero already (invariant 5)."""
        if self.sync != "full" or self.size == 0:
            return
        extents = _io.data_extents(self._src.fd, 0, self.size)
        for off, length in extents:
            self._bitmap.set(off, length)
        self._initial_chunks = self._bitmap.dirty_count
        if not self._dst.info.is_block and self._dst.fd >= 0:
            # Allocate the file target where data will go, so that the
            # parallel direct writes do not serialize on allocation.
            for off, length in extents:
                if not _io.preallocate(self._dst.fd, off, length):
                    break
        if self.target_is_zero:
            return
        holes = []
        pos = 0
        while pos < self.size:
            clean = self._bitmap.next_clean(pos)
            if clean < 0:
                break
            dirty = self._bitmap.next_dirty(clean)
            end = self.size if dirty < 0 else dirty
            holes.append((clean, end - clean))
            pos = end
        if self._nbd and len(holes) > 1:
            # Each WRITE_ZEROES is a round trip to the server: keep several
            # in flight (zero_target releases the GIL; no copy runs yet).
            from concurrent.futures import ThreadPoolExecutor
            with ThreadPoolExecutor(min(NBD_ZERO_THREADS, len(holes)),
                                    thread_name_prefix="fastmirror-zero") as pool:
                results = list(pool.map(lambda h: self._engine.zero_target(*h), holes))
        else:
            results = [self._engine.zero_target(off, n) for off, n in holes]
        for (off, n), r in zip(holes, results):
            if r < 0:
                # No zeroing call (or it failed): copy the zeros instead; the
                # copy reports real errors under the target's policy.
                self._bitmap.set(off, n)
                self._initial_chunks += (n + self.granularity - 1) // self.granularity

    def _loop(self) -> tuple[EventType, Optional[JobError]]:
        eng = self._engine
        last_size_check = 0.0
        while True:
            with self._lock:
                state = self._state
            if state == S.ABORTING:
                return EventType.CANCELLED, None
            if state == S.DRAINING:
                result = self._drain()
                if result is not None:
                    return result
                continue   # paused (by the user or an error policy) or aborted

            ev = eng.wait_event(TICK, want_clean=state == S.RUNNING)
            now = time.monotonic()
            self._copy_rate.add(now, eng.bytes_copied)
            self._dirty_rate.add(now, self._engine.bytes_marked)
            self._auto_copy_mode(now)

            if ev == EV_ERROR:
                result = self._handle_failures()
                if result is not None:
                    return result
            elif ev == EV_STOPPED:
                return EventType.CANCELLED, None
            if now - last_size_check > 0.5:
                last_size_check = now
                err = self._check_source_size()
                if err is not None:
                    return EventType.FAILED, err
            if (self._al is not None and state in (S.RUNNING, S.READY)
                    and now - self._persisted_at >= _state.PERSIST_INTERVAL):
                news = self._persist_news()     # before the flush: see _persist
                if news == self._persisted_news:
                    # Nothing copied, marked, zeroed or added to the log since:
                    # the last file still holds (an idle READY job costs no I/O).
                    self._persisted_at = now
                else:
                    # A chunk is recorded clean only once a flush covers its copy.
                    if self._flush_target() == "report":
                        return EventType.FAILED, self._error
                    if not self._flush_failed:
                        self._persist_quietly(news=news)
            if ev == EV_CLEAN and state == S.RUNNING:
                with self._lock:
                    if self._state != S.RUNNING:
                        continue
                trace.emit("mirror_before_flush", self)
                if self._flush_target() == "report":
                    return EventType.FAILED, self._error
                if self._flush_failed:
                    continue
                with self._lock:
                    if self._state != S.RUNNING:
                        continue
                    self._ready = True
                    self._ready_at = time.monotonic()
                    self._transition(S.READY)
                if self._al is not None:
                    self._persist_quietly("ready")
                self._emit(self._event(EventType.READY))
            elif trace.is_active("mirror_before_sleep"):
                trace.emit("mirror_before_sleep", self, self._bitmap.dirty_count,
                           int(self._ready))

    def _drain(self) -> Optional[tuple[EventType, Optional[JobError]]]:
        """complete() or cancel() in phase 2: quiesce writers, copy what is
        left, flush.  None when the state left DRAINING (a pause, by the user
        or an error policy, or an abort): the caller looks at the state."""
        eng = self._engine
        self.source.close_gate()
        try:
            trace.emit("mirror_before_drain", self, self._bitmap.dirty_count)
            while True:
                with self._lock:
                    if self._state != S.DRAINING:
                        return None
                ev = eng.wait_event(TICK, want_clean=True)
                if ev == EV_ERROR:
                    result = self._handle_failures()
                    if result is not None:
                        return result
                    continue
                if ev == EV_STOPPED:
                    return EventType.CANCELLED, None
                if ev != EV_CLEAN:
                    continue
                err = self._check_source_size()
                if err is not None:
                    return EventType.FAILED, err
                trace.emit("mirror_before_flush", self)
                if self._flush_target() == "report":
                    return EventType.FAILED, self._error
                if self._flush_failed:
                    continue
                if self.verify:
                    err = self._verify_target()
                    if err is not None:
                        return EventType.FAILED, err
                said_pivoted = False
                if self._al is not None and self._ending == "complete" and not self._nbd:
                    # The state says "pivoted" before any write can reach the
                    # target (the gate is closed): a restarted serve --state
                    # must serve the target, never the stale source.
                    try:
                        self._persist("pivoted")
                    except OSError as e:
                        return EventType.FAILED, as_job_error(e)
                    said_pivoted = True
                with self._lock:
                    # The last word is the state's: a pause or a cancel that
                    # came during the flush is obeyed (back to the loop's top).
                    undo = self._state != S.DRAINING or (said_pivoted
                                                         and self._ending != "complete")
                    if not undo:
                        if self._ending == "complete" and self._nbd:
                            # Nothing to pivot to: job.source writes to the
                            # source again, untracked (see the class docs).
                            _log.info("target %s is complete; job.source is not switched to "
                                      "an NBD target", self._dst.path)
                        elif self._ending == "complete":
                            self.source.pivot(self._dst.path, self._dst.open_buffered(),
                                              self._dst.info.is_block)
                        self._conclude(EventType.COMPLETED)
                if undo:
                    if said_pivoted:
                        try:        # the gate is still closed: no write went anywhere
                            self._persist("ready")
                        except OSError as e:
                            # Writers reach the source again when the gate
                            # opens: no file may say "pivoted" then.
                            self._unsay_pivoted()
                            return EventType.FAILED, as_job_error(e)
                    continue
                if self._ending == "complete" and not self._nbd:
                    self._run_pivot_hooks()     # writers still held at the gate
                return EventType.COMPLETED, None
        finally:
            self.source.open_gate()

    def _verify_target(self) -> Optional[JobError]:
        """verify=True: with writers still held at the gate, compare the
        source and the flushed target byte for byte (GIL released)."""
        from fastmirror.job.verify import first_difference, first_difference_nbd
        try:
            if self._nbd:
                diff = first_difference_nbd(self._src.path, self._dst.client, self.size,
                                            fd=self._src.fd)
            else:
                diff = first_difference(self._src.path, self._dst.path, self.size,
                                        fds=(self._src.fd, self._dst.fd))
        except OSError as e:
            return as_job_error(e)
        if diff < 0:
            return None
        err = io_error(_errno.EIO, self._dst.path, diff, "verify")
        err.strerror = "target differs from source at offset %d" % diff
        err.args = (_errno.EIO, err.strerror)
        return err

    def _flush_target(self) -> Optional[str]:
        """Flush the target; on failure apply the target's policy and return
        the action taken (self._flush_failed tells whether it failed)."""
        r = self._engine.flush()     # on failure, what it may have lost is dirty again
        self._flush_failed = r != 0
        if r == 0:
            self._retries = 0        # a success: the next failure waits the first backoff
            self._last_failure = None
            return None
        return self._apply_policy([("flush", -r, 0, self.size)])

    def _policy_for(self, source_side: bool, err: int) -> str:
        pol = self.on_source_error if source_side else self.on_target_error
        if pol == "enospc":
            return "stop" if err == _errno.ENOSPC else "report"
        return pol

    def _handle_failures(self) -> Optional[tuple[EventType, Optional[JobError]]]:
        failures, dropped = self._engine.take_failures()
        if dropped:
            _log.warning("%d further I/O errors were not reported one by one", dropped)
        ops = [("read" if op == OP_READ else "write", err, off, ln)
               for op, err, off, ln in failures]
        action = self._apply_policy(ops)
        if action == "report":
            return EventType.FAILED, self._error
        return None

    def _apply_policy(self, failures) -> str:
        """Emit an ERROR event per failure and act on the strictest policy:
        report ends the job, stop pauses it, ignore retries after a backoff.
        The failed ranges were already marked dirty again by the engine."""
        worst = "ignore"
        rank = {"ignore": 0, "stop": 1, "report": 2}
        actions = [self._policy_for(op == "read", err) for op, err, _, _ in failures]
        for action in actions:
            if rank[action] > rank[worst]:
                worst = action
        delay = None
        if worst == "ignore":
            delay = self._backoff("flush" if failures[0][0] == "flush" else "copy")
        for (operation, err, off, _length), action in zip(failures, actions):
            source_side = operation == "read"
            path = self._src.path if source_side else self._dst.path
            error = io_error(err, path, off, operation)
            with self._lock:
                self._error = error
                self._io_status = "nospace" if err == _errno.ENOSPC else "failed"
            self._emit(self._event(EventType.ERROR, error=error, operation=operation,
                                   action=action, retry_delay=delay))
        if worst == "stop":
            with self._lock:
                # Already paused by the user: it stays paused, and resume()
                # (which releases the held workers) ends both pauses.
                if self._state in WORKING_STATES:
                    self._transition(S.PAUSED if self._state == S.RUNNING else S.STANDBY)
        elif delay is not None:
            self._engine.wait_event(delay, want_clean=False)   # sleeps unless kicked
            if self._nbd:
                self._reconnect_target()
            self._engine.release()
        return worst

    def _reconnect_target(self) -> None:
        """NBD target: connect again what failed (the retry of "ignore",
        resume() after "stop").  What the server acknowledged since the last
        flush is copied again (engine.reconnect_target).  A server still away
        is only logged: the next copy fails under the policy again."""
        try:
            n = self._engine.reconnect_target()
        except OSError as e:
            _log.warning("cannot reconnect to %s: %s", self._dst.path, e.strerror or e)
            return
        if n:
            _log.info("reconnected %d connection%s to %s", n, "" if n == 1 else "s",
                      self._dst.path)

    def _backoff(self, kind: str) -> float:
        """"ignore": seconds to wait before retrying after a failure of
        `kind` ("copy" or "flush").  The wait doubles with each failure in a
        row and starts again from the first once the last failure was
        followed by a success: a successful flush (see _flush_target), or,
        after a failed copy, a successful one."""
        copies = self._engine.copies
        last = self._last_failure
        if last is not None and last[0] == "copy" and copies != last[1]:
            self._retries = 0
        self._last_failure = (kind, copies)
        delay = min(RETRY_BACKOFF[1], RETRY_BACKOFF[0] * (2 ** min(self._retries, 10)))
        self._retries += 1
        return delay

    def _check_source_size(self) -> Optional[JobError]:
        try:
            size = self._src.current_size()
        except OSError as e:
            return io_error(e.errno or _errno.EIO, self._src.path, None, "stat")
        if size != self.size:
            e = io_error(_errno.EIO, self._src.path, size, "stat")
            e.strerror = "source size changed from %d to %d bytes during the job" % (
                self.size, size)
            e.args = (_errno.EIO, e.strerror)
            return e
        return None

    # ------------------------------------------------------------------
    # The state file and the activity log (job/state.py, _core/actlog.pyx;
    # docs/design.md, "The crash model")
    # ------------------------------------------------------------------

    def _open_state(self, existing, ids, disk, options: dict) -> None:
        """Decide what to copy (all of it, or what a state file and its
        activity log say), write the first state file of this run, then
        start a fresh activity log tied to it."""
        path = self._state_path
        assert path is not None
        self._state_ids = ids
        self._state_options = options
        self._phase = "mirroring"
        self._persist_lock = threading.Lock()
        self._persist_stop = threading.Event()
        seq = 0
        if existing is not None:
            bits = existing.bitmap
            if bits is None:
                bits = HBitmap(self.size, self.granularity)
                bits.set(0, self.size)
            _state.set_extents(bits, existing.al_extents, existing.al_extent)
            rec = _state.read_activity_log(_state.al_path(path), existing.run_id)
            self._untracked_seen = disk.untracked_writes if disk is not None else 0
            full = self._untracked_seen > 0
            seq = existing.al_seq
            if rec is not None:
                seq = max(seq, rec.seq)
                full = full or rec.all_dirty
                _state.set_extents(bits, rec.extents, 1 << rec.shift)
            # Written untracked since (after a cancel, or on an export before
            # this job): nothing says where, so everything is copied again.
            self._resume_bits = self._distrusted(bits) if full else bits
        # Until the coordinator has the first marking in the engine's bitmap,
        # every state file keeps all of it dirty.
        self._floor = HBitmap(self.size, self.granularity)
        if self._resume_bits is not None:
            self._floor.merge(self._resume_bits)
        else:
            self._floor.set(0, self.size)
        self._run_id = _state.new_run_id()
        self._persist()
        # Only now (the state file names the new run id) the sidecar is
        # reset: until then its records, of the old run, still counted.
        alp = _state.al_path(path)
        fd = os.open(alp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 2 * _AL_RECORD)
            self._al = ActivityLog(fd, self.size, _state.AL_EXTENT, _state.AL_SLOTS,
                                   bytes.fromhex(self._run_id), seq)
        finally:
            os.close(fd)
        _state.sync_folder(alp)

    def _distrusted(self, bits: HBitmap) -> Optional[HBitmap]:
        """What a resumed job that cannot trust its state file copies:
        everything.  sync="full": None, the initial marking marks it all;
        sync="none" marks nothing, so all of `bits` is dirtied here (or even
        the chunks the state file has would go)."""
        if self.sync == "full":
            return None
        bits.set(0, self.size)
        return bits

    def _persist(self, phase: Optional[str] = None, news: Optional[tuple] = None) -> None:
        """Write the state file now: what a crash could leave different on
        the target (engine.persistable) plus every extent of the activity
        log, captured before the bitmap; then those extents may leave the
        log (covered)."""
        with self._persist_lock:
            if phase is not None:
                self._phase = phase
            if news is None or phase is not None:
                news = self._persist_news()
            al = self._al
            mark, extents = al.capture() if al is not None else (0, [])
            bits = HBitmap(self.size, self.granularity)
            floor = self._floor
            if floor is not None:
                bits.merge(floor)
            self._engine.persistable(bits)
            _state.set_extents(bits, extents, _state.AL_EXTENT)
            _state.save(self._state_path, _state.State(
                phase=self._phase, size=self.size, granularity=self.granularity,
                source=self._state_ids[0], target=self._state_ids[1],
                options=self._state_options, run_id=self._run_id, bitmap=bits,
                al_extent=_state.AL_EXTENT, al_extents=extents,
                al_seq=al.seq if al is not None else 0))
            if al is not None:
                al.covered(mark)
            self._persisted_at = time.monotonic()
            self._persisted_news = news

    def _unsay_pivoted(self) -> None:
        """A state file that says "pivoted" for a pivot that did not happen
        goes (unlinking works where writing failed, e.g. ENOSPC): without it
        a restarted serve --state serves the source, and a new mirror starts
        over; a later "stopped" file of this run (the job's end) is right
        too."""
        with self._persist_lock:
            try:
                os.unlink(self._state_path)
                _state.sync_folder(self._state_path)
            except FileNotFoundError:
                pass
            except OSError as e:
                _log.error("state file %s says the job pivoted, but it did not, and it cannot "
                           "be removed: %s; remove it before serving %s with it",
                           self._state_path, e, self._src.path)
            self._phase = "stopped"

    def _persist_news(self) -> tuple:
        """What changes whenever a new state file could say something new.
        Read before the flush that precedes a state file (or before its
        capture): a copy that ends after it shows as news next time, so a
        chunk left dirty as unflushed is written clean once flushed."""
        eng = self._engine
        return (eng.bytes_copied, eng.bytes_marked, eng.bytes_zeroed, eng.copies,
                self._al.misses if self._al is not None else 0, self._floor is None,
                self._phase)

    def _persist_quietly(self, phase: Optional[str] = None,
                         news: Optional[tuple] = None) -> None:
        """_persist() where a failure only delays: the previous file stays
        valid (it is replaced atomically), and the next attempt comes soon."""
        try:
            self._persist(phase, news)
        except OSError as e:
            if phase is not None:
                self._phase = phase
            _log.warning("cannot write the state file %s: %s", self._state_path, e)

    def _persist_loop(self) -> None:
        """The state writer: a state file when a write waits for a slot of
        the activity log, and every other second when nobody else wrote one
        (before start, while paused)."""
        al = self._al
        assert al is not None
        while not self._persist_stop.is_set():
            asked = al.wait_request(_state.PERSIST_INTERVAL)
            if self._persist_stop.is_set():
                return
            if asked or time.monotonic() - self._persisted_at >= 2 * _state.PERSIST_INTERVAL:
                self._persist_quietly()

    def _stop_persister(self, join: bool = True) -> None:
        t = self._persister
        if t is None:
            return
        self._persist_stop.set()
        assert self._al is not None
        self._al.wake()
        if join and t is not threading.current_thread():
            t.join()
