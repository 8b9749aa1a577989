"""MirrorJob: the mirror job's state machine, phases, events and policies.

The job owns one control thread (the coordinator) and a few copy workers.
Workers live in the compiled engine with the GIL released; the coordinator
sleeps in CopyEngine.wait_event() and wakes for failures, for the first clean
instant (phase 1 -> READY), for verbs (kick) and a few times a second to
refresh rates and check the source's size.

Lifecycle (one table, one function performs every transition):

    CREATED --start--> RUNNING <--pause/resume--> PAUSED
    RUNNING --clean+flush--> READY <--pause/resume--> STANDBY
    READY --complete/cancel--> DRAINING --clean+flush--> CONCLUDED (COMPLETED)
    any --cancel (phase 1) / force / error (report)--> CONCLUDED
"""

from __future__ import annotations

import errno as _errno
import logging
import os
import threading
import time
import warnings
from typing import Callable, Optional

from fastmirror import trace
from fastmirror._core import blockio as _io
from fastmirror._core.engine import (CopyEngine, EV_CLEAN, EV_ERROR, EV_STOPPED,
                                OP_READ)
from fastmirror._core.hbitmap import HBitmap
from fastmirror.job.events import (EventType, JobEvent, JobState, JobStateError,
                               JobStatus, io_error)
from fastmirror.job.endpoints import validate_pair
from fastmirror.job.source import TrackedSource

__all__ = ["MirrorJob"]

_log = logging.getLogger("fastmirror")

S = JobState
# state -> states it may move to
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.CREATED: frozenset({S.RUNNING, S.CONCLUDED}),
    S.RUNNING: frozenset({S.PAUSED, S.READY, S.CONCLUDED}),
    S.PAUSED: frozenset({S.RUNNING, S.CONCLUDED}),
    S.READY: frozenset({S.STANDBY, S.DRAINING, S.CONCLUDED}),
    S.STANDBY: frozenset({S.READY, S.DRAINING, S.CONCLUDED}),
    S.DRAINING: frozenset({S.STANDBY, S.CONCLUDED}),
    S.CONCLUDED: frozenset(),
}
# verb -> states where it is allowed
VERBS: dict[str, frozenset[JobState]] = {
    "start": frozenset({S.CREATED}),
    "pause": frozenset({S.RUNNING, S.READY}),
    "resume": frozenset({S.PAUSED, S.STANDBY}),
    "complete": frozenset({S.READY}),
    "cancel": frozenset({S.CREATED, S.RUNNING, S.PAUSED, S.READY, S.STANDBY, S.DRAINING}),
    "set_speed": frozenset(set(S) - {S.CONCLUDED}),
}

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
    """

    def __init__(self, source, target, *, granularity: int = 65536,
                 buf_size: int = 16 << 20, speed: int = 0, sync: str = "full",
                 direct: bool = True, target_is_zero: bool = False,
                 on_source_error: str = "report", on_target_error: str = "report",
                 opaque=None, detect_zeroes: bool = True, unmap: bool = True,
                 verify: bool = False, copy_mode: str = "auto",
                 io_size: Optional[int] = None, io_engine: str = "auto"):
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

        self._src, self._dst = validate_pair(os.fspath(source), os.fspath(target), direct)
        try:
            align = max(self._src.info.alignment, self._dst.info.alignment)
            if granularity < align:
                raise ValueError("granularity %d is below the I/O alignment %d of %s"
                                 % (granularity, align, self._dst.path
                                    if self._dst.info.alignment == align else self._src.path))
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
        elif uring_error is None:
            self.io_engine = "io_uring"
        else:
            self.io_engine = _threads_because(uring_error)
        self._write_blocking = False
        self._progress: list[tuple[float, int, int]] = []   # (time, work left, bytes marked)
        self._align = align

        if io_size is None:
            io_size = min(MAX_IO, max(MIN_IO, self.buf_size // IO_SPLIT))
        else:
            io_size = _positive_int("io_size", io_size, 1, MAX_BUF_SIZE)
        max_io = max(granularity, min(io_size, self.buf_size) // granularity * granularity)
        nworkers = max(1, min(MAX_WORKERS, self.buf_size // max_io))
        try:
            self._bitmap = HBitmap(self.size, granularity)
            self._engine = CopyEngine(
                self._bitmap, self._src.fd, self._dst.fd, self._dst.tail_fd,
                self.size, align, max_io, nworkers, dst_is_block=self._dst.info.is_block,
                detect_zeroes=detect_zeroes, unmap=unmap)
        except BaseException:      # e.g. MemoryError: leave nothing behind
            self._close_endpoints(remove_created=True)
            raise
        self._engine.set_speed(speed)
        self.source = TrackedSource(self._src.path, self.size, self._src.info.is_block,
                                    self._mark_write)

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._state = S.CREATED
        self._ready = False
        self._user_paused = False
        self._error_paused = False
        self._cancel_requested = False
        self._force = False
        self._complete_requested = False
        self._final: Optional[JobEvent] = None
        self._error: Optional[OSError] = None
        self._io_status = "ok"
        self._listeners: list[Callable[[JobEvent], object]] = []
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
        self._retries = 0
        self._flush_failed = False

    # ------------------------------------------------------------------
    # State machine
    # ------------------------------------------------------------------

    def _verb(self, verb: str) -> None:
        """Under the lock: raise unless `verb` is allowed now."""
        if self._state not in VERBS[verb]:
            raise JobStateError("cannot %s a job that is %s" % (verb, self._state.value))

    def _transition(self, new: JobState) -> None:
        """Under the lock: the one place where the state changes."""
        if new not in TRANSITIONS[self._state]:
            raise JobStateError("illegal transition %s -> %s"
                                % (self._state.value, new.value))
        self._state = new
        self._cond.notify_all()

    @property
    def state(self) -> JobState:
        return self._state

    # ------------------------------------------------------------------
    # Verbs
    # ------------------------------------------------------------------

    def start(self) -> "MirrorJob":
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
        with self._lock:
            self._verb("pause")
            self._user_paused = True
            self._transition(S.STANDBY if self._ready else S.PAUSED)
            self._engine.set_paused(True)

    def resume(self) -> None:
        with self._lock:
            self._verb("resume")
            self._user_paused = False
            self._error_paused = False
            self._io_status = "ok" if self._final is None else self._io_status
            if self._ready and (self._complete_requested or self._cancel_requested):
                self._transition(S.DRAINING)     # a drain that an error paused
            else:
                self._transition(S.READY if self._ready else S.RUNNING)
            self._engine.set_paused(False)
            self._engine.release()
            self._engine.kick()

    def set_speed(self, speed: int) -> None:
        speed = _positive_int("speed", speed, 0, MAX_SPEED)
        with self._lock:
            self._verb("set_speed")
            self._engine.set_speed(speed)

    def cancel(self, force: bool = False) -> None:
        """Phase 1: stop soon, CANCELLED.  Phase 2: drain, flush, COMPLETED
        (no pivot).  force=True: stop at once, CANCELLED, in either phase."""
        with self._lock:
            if self._state == S.CONCLUDED:
                return
            self._verb("cancel")
            if self._state == S.CREATED:
                self._conclude(EventType.CANCELLED)
                return
            self._cancel_requested = True
            self._force = self._force or force
            if self._state == S.STANDBY and not force:
                # A drain needs the workers: resume them.
                self._user_paused = self._error_paused = False
                self._engine.set_paused(False)
                self._engine.release()
            self._engine.kick()

    def complete(self) -> None:
        """Phase 2 only: drain, flush, COMPLETED, then writes through
        job.source go to the target."""
        with self._lock:
            self._verb("complete")
            self._complete_requested = True
            self._engine.kick()

    def wait_ready(self, timeout: Optional[float] = None) -> bool:
        """True once READY was emitted; False on timeout or if the job ended
        without becoming ready."""
        with self._cond:
            self._cond.wait_for(lambda: self._ready or self._final is not None, timeout)
            return self._ready

    def wait(self, timeout: Optional[float] = None) -> Optional[JobEvent]:
        """The final event, or None on timeout.  Joins every thread of the job."""
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

    def remove_listener(self, callback: Callable[[JobEvent], object]) -> None:
        with self._lock:
            self._listeners.remove(callback)

    # ------------------------------------------------------------------
    # Status
    # ------------------------------------------------------------------

    def status(self) -> JobStatus:
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
                offset=self.size - dirty,
                len=self.size,
                ready=self._ready,
                paused=self._state in (S.PAUSED, S.STANDBY),
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
            )

    @property
    def io_mode(self) -> str:
        if self._src.direct and self._dst.direct:
            return "direct"
        sides = [e.path for e in (self._src, self._dst) if not e.direct]
        why = "refused O_DIRECT" if self.direct else "direct I/O off"
        return "buffered (%s: %s)" % (why, ", ".join(sides))

    @property
    def paths(self) -> tuple[str, str]:
        return self._src.path, self._dst.path

    # ------------------------------------------------------------------
    # Context manager and cleanup
    # ------------------------------------------------------------------

    def __enter__(self) -> "MirrorJob":
        if self._state == S.CREATED:
            self.start()
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._final is None:
            try:
                self.cancel(force=exc_type is not None)
            except JobStateError:
                pass
        self.wait()
        self.close()

    def close(self) -> None:
        """Release the job's descriptors.  A running job is cancelled first
        (forcefully) and its threads joined."""
        if self._state != S.CONCLUDED:
            if self._state == S.CREATED:
                self.cancel()
            else:
                self.cancel(force=True)
                self.wait()
        self._close_endpoints()

    def _close_endpoints(self, remove_created: bool = False) -> None:
        for e in (getattr(self, "_src", None), getattr(self, "_dst", None)):
            if e is not None:
                e.close()
        if remove_created and getattr(self, "_dst", None) is not None and self._dst.created:
            try:
                os.unlink(self._dst.path)
            except OSError:
                pass

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
        offset = self.size if type_ in (EventType.READY, EventType.COMPLETED) else self.size - dirty
        kw.setdefault("copy_mode", "write-blocking" if self._write_blocking else "background")
        return JobEvent(type_, offset, self.size, **kw)

    def _enter_write_blocking(self) -> None:
        """From now on writes through job.source reach both sides before
        they return, so they no longer add work: the job always converges."""
        self.source.start_mirroring(self._engine.claim, self._engine.unclaim,
                                    self._dst.path, self._dst.open_buffered(),
                                    self._dst.info.is_block)
        with self._lock:
            self._write_blocking = True

    def _auto_copy_mode(self, now: float) -> None:
        """copy_mode="auto": switch to write-blocking when writes outpace the
        copy, that is when over AUTO_WINDOW seconds of writes the work left
        did not shrink by a tenth (and is more than two copies' worth)."""
        if self.copy_mode != "auto" or self._write_blocking:
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
            self._enter_write_blocking()
            _log.info("writes outpace the copy (%d bytes left, was %d %.1f s ago): "
                      "switching to write-blocking", left, left0, now - t0)
            self._emit(self._event(EventType.COPY_MODE))

    def _conclude(self, type_: EventType, error: Optional[OSError] = None) -> None:
        """Under the lock: record the final event (emitted by the caller)."""
        if self._final is not None:
            return
        self._final = self._event(type_, error=error)
        if error is not None:
            self._error = error
        self._transition(S.CONCLUDED)
        if self._coordinator is None:      # never started: emit here
            self._finish_handle()
            self._emit(self._final)

    def _finish_handle(self) -> None:
        if not self.source.pivoted:
            self.source.stop_tracking()
        self.source.open_gate()

    # -- the coordinator thread ------------------------------------------

    def _run(self) -> None:
        final_type, error = EventType.FAILED, None
        try:
            trace.emit("mirror_start", self.source, self, threading.current_thread(), self.opaque)
            self._initial_marking()
            self._marking = False
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
            error = e if isinstance(e, OSError) else io_error(_errno.EIO, None)
            if not isinstance(e, OSError):
                error.__cause__ = e
        finally:
            self._engine.stop()
            for t in self._threads:
                t.join()
            trace._unwatch(self._refresh_trace)
            with self._lock:
                if self._final is None:
                    self._final = self._event(final_type, error=error)
                    if error is not None:
                        self._error = error
                    self._state = S.CONCLUDED
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
        if not self._dst.info.is_block:
            # Allocate the file target where data will go, so that the
            # parallel direct writes do not serialize on allocation.
            for off, length in extents:
                if not _io.preallocate(self._dst.fd, off, length):
                    break
        if self.target_is_zero:
            return
        pos = 0
        while pos < self.size:
            clean = self._bitmap.next_clean(pos)
            if clean < 0:
                break
            dirty = self._bitmap.next_dirty(clean)
            end = self.size if dirty < 0 else dirty
            if self._engine.zero_target(clean, end - clean) < 0:
                # No zeroing call (or it failed): copy the zeros instead; the
                # copy reports real errors under the target's policy.
                self._bitmap.set(clean, end - clean)
                self._initial_chunks += (end - clean + self.granularity - 1) // self.granularity
            pos = end

    def _loop(self) -> tuple[EventType, Optional[OSError]]:
        eng = self._engine
        last_size_check = 0.0
        draining = False
        while True:
            with self._lock:
                if self._force or (self._cancel_requested and not self._ready):
                    return EventType.CANCELLED, None
                if self._ready and not draining and (self._complete_requested
                                                     or self._cancel_requested):
                    draining = True
                    self._transition(S.DRAINING)
                paused = self._user_paused or self._error_paused
            if draining and not paused:
                result = self._drain()
                if result is not None:
                    return result
                continue   # the drain was paused by an error policy

            ev = eng.wait_event(TICK, want_clean=not self._ready and not paused)
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
            if ev == EV_CLEAN and not self._ready:
                with self._lock:
                    if self._user_paused or self._error_paused or self._cancel_requested:
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
                self._emit(self._event(EventType.READY))
            elif trace.is_active("mirror_before_sleep"):
                trace.emit("mirror_before_sleep", self, self._bitmap.dirty_count,
                           int(self._ready))

    def _drain(self) -> Optional[tuple[EventType, Optional[OSError]]]:
        """complete() or cancel() in phase 2: quiesce writers, copy what is
        left, flush.  None when an error policy paused the drain."""
        eng = self._engine
        self.source.close_gate()
        try:
            trace.emit("mirror_before_drain", self, self._bitmap.dirty_count)
            while True:
                with self._lock:
                    if self._force:
                        return EventType.CANCELLED, None
                ev = eng.wait_event(TICK, want_clean=True)
                if ev == EV_ERROR:
                    result = self._handle_failures()
                    if result is not None:
                        return result
                    with self._lock:
                        if self._error_paused:
                            return None
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
                    with self._lock:
                        if self._error_paused:
                            return None
                    continue
                if self.verify:
                    err = self._verify_target()
                    if err is not None:
                        return EventType.FAILED, err
                with self._lock:
                    if self._complete_requested:
                        self.source.pivot(self._dst.path, self._dst.open_buffered(),
                                          self._dst.info.is_block)
                    self._final = self._event(EventType.COMPLETED)
                    self._transition(S.CONCLUDED)
                return EventType.COMPLETED, None
        finally:
            self.source.open_gate()

    def _verify_target(self) -> Optional[OSError]:
        """verify=True: with writers still held at the gate, compare the
        source and the flushed target byte for byte (GIL released)."""
        from fastmirror.job.verify import first_difference
        try:
            diff = first_difference(self._src.path, self._dst.path, self.size)
        except OSError as e:
            return e
        if diff < 0:
            return None
        e = io_error(_errno.EIO, self._dst.path, diff, "verify")
        e.strerror = "target differs from source at offset %d" % diff
        e.args = (_errno.EIO, e.strerror)
        return e

    def _flush_target(self) -> Optional[str]:
        """Flush the target; on failure apply the target's policy and return
        the action taken (self._flush_failed tells whether it failed)."""
        r = self._engine.flush()
        self._flush_failed = r != 0
        if r == 0:
            return None
        return self._apply_policy([("flush", -r, 0, self.size)])

    def _policy_for(self, source_side: bool, err: int) -> str:
        pol = self.on_source_error if source_side else self.on_target_error
        if pol == "enospc":
            return "stop" if err == _errno.ENOSPC else "report"
        return pol

    def _handle_failures(self) -> Optional[tuple[EventType, Optional[OSError]]]:
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
        for operation, err, off, _length in failures:
            source_side = operation == "read"
            action = self._policy_for(source_side, err)
            path = self._src.path if source_side else self._dst.path
            error = io_error(err, path, off, operation)
            with self._lock:
                self._error = error
                self._io_status = "nospace" if err == _errno.ENOSPC else "failed"
            self._emit(self._event(EventType.ERROR, error=error, operation=operation,
                                   action=action))
            if rank[action] > rank[worst]:
                worst = action
        if worst == "stop":
            with self._lock:
                self._error_paused = True
                if self._state in (S.RUNNING, S.READY):
                    self._transition(S.STANDBY if self._ready else S.PAUSED)
                elif self._state == S.DRAINING:
                    self._transition(S.STANDBY)
                self._engine.set_paused(True)
                self._engine.release()
        elif worst == "ignore":
            delay = min(RETRY_BACKOFF[1], RETRY_BACKOFF[0] * (2 ** min(self._retries, 10)))
            self._retries += 1
            self._engine.wait_event(delay, want_clean=False)   # sleeps unless kicked
            self._engine.release()
        return worst

    def _check_source_size(self) -> Optional[OSError]:
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
