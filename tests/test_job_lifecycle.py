"""The job's phases and verbs (docs/design.md, "The job"), events, status,
listeners, the context manager and tracepoints.

Jobs that must stay in phase 1 run under a speed limit far below what the
test needs: at 64 KiB/s each 1 MiB copy reserves 16 s of the budget, so a
throttled job cannot become ready during a test, whatever the machine's load.
No assertion depends on timing; waits have generous timeouts.
"""

from __future__ import annotations

import io
import logging
import os
import re
import threading

import pytest

from fastmirror import EventType, JobState, JobStateError, MirrorJob, trace
from fastmirror.job.events import JobEvent

from helpers import (KiB, MiB, assert_all_bytes, assert_same,
                     make_image, read_bytes)

G = 64 * KiB
TIMEOUT = 60
CRAWL = 64 * KiB      # bytes/s: a job at this speed stays in phase 1


@pytest.fixture
def images(tmp_path):
    """(source, target) paths: 8 MiB random source, no target yet."""
    return make_image(tmp_path / "src.img", 8 * MiB, seed=1), tmp_path / "dst.img"


@pytest.fixture
def big_images(tmp_path):
    return make_image(tmp_path / "src.img", 32 * MiB, seed=2), tmp_path / "dst.img"


def recorder(job):
    events = []
    job.add_listener(events.append)
    return events


def types(events):
    return [e.type for e in events]


# ---------------------------------------------------------------------------
# READY and the final events
# ---------------------------------------------------------------------------

def test_ready_emitted_once_then_completed(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.start()
    assert job.wait_ready(TIMEOUT)
    # Dirty and re-sync a few times in phase 2: no second READY.
    for i in range(5):
        job.source.pwrite(os.urandom(100 * KiB), i * MiB + 512)
        job.source.flush()
    st = job.status()
    assert st.ready and st.state == "ready"
    job.complete()
    final = job.wait(TIMEOUT)
    assert types(events) == [EventType.READY, EventType.COMPLETED]
    assert final is events[-1]
    assert events[0].offset == events[0].len == 8 * MiB
    assert job.wait(0) is final, "wait() must keep returning the final event"
    assert job.state == JobState.CONCLUDED
    assert_same(src, dst)


def test_wait_returns_none_on_timeout_then_the_final_event(big_images, mkjob):
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    events = recorder(job)
    job.start()
    assert job.wait(0.05) is None
    assert job.wait_ready(0.05) is False
    job.cancel()
    final = job.wait(TIMEOUT)
    assert isinstance(final, JobEvent) and final.type == EventType.CANCELLED
    assert events == [final]
    assert job.wait_ready(0) is False, "a job that ended without READY is not ready"


def test_add_listener_gets_every_event_in_order(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    a, b = [], []
    job.add_listener(a.append)
    job.add_listener(lambda e: b.append((e.type, threading.current_thread().name)))
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.complete()
    final = job.wait(TIMEOUT)
    assert types(a) == [EventType.READY, EventType.COMPLETED]
    assert [t for t, _ in b] == types(a)
    assert a[-1] is final and final.type.final and not a[0].type.final
    with pytest.raises(TypeError):
        job.add_listener(42)


# ---------------------------------------------------------------------------
# cancel
# ---------------------------------------------------------------------------

def test_cancel_in_phase1_is_cancelled(big_images, mkjob):
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    events = recorder(job)
    job.start()
    assert job.status().state == "running"
    job.cancel()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.CANCELLED
    assert types(events) == [EventType.CANCELLED]
    st = job.status()
    assert not st.ready and st.state == "concluded"
    assert final.offset < final.len, "a throttled job cannot have copied everything"
    job.cancel()    # cancelling a concluded job is harmless
    assert job.wait(0) is final


def test_cancel_in_phase2_completes_without_pivot(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.source.pwrite(b"\x11" * 70000, 3 * MiB + 512)
    job.cancel()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert types(events) == [EventType.READY, EventType.COMPLETED]
    assert_same(src, dst)
    # No pivot: job.source still writes the source, untracked.
    assert not job.source.pivoted
    job.source.pwrite(b"\x22" * 4096, 0)
    assert read_bytes(src, 0, 4096) == b"\x22" * 4096
    assert read_bytes(dst, 0, 4096) != b"\x22" * 4096


def test_force_cancel_in_phase1(big_images, mkjob):
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    events = recorder(job)
    job.start()
    job.cancel(force=True)
    assert job.wait(TIMEOUT).type == EventType.CANCELLED
    assert types(events) == [EventType.CANCELLED]


def test_force_cancel_in_phase2(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.cancel(force=True)
    final = job.wait(TIMEOUT)
    assert final.type == EventType.CANCELLED
    assert types(events) == [EventType.READY, EventType.CANCELLED]
    assert not job.source.pivoted
    job.source.pwrite(b"\x33" * 512, 512)
    assert read_bytes(src, 512, 512) == b"\x33" * 512


def test_force_cancel_while_paused_in_phase2(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.pause()
    job.cancel(force=True)
    assert job.wait(TIMEOUT).type == EventType.CANCELLED


def test_cancel_while_paused_in_phase2_still_drains(images, mkjob):
    """cancel() on a paused job in phase 2: the drain resumes the workers and
    ends COMPLETED with the target equal to the source."""
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.pause()
    job.source.pwrite(os.urandom(300 * KiB), 5 * MiB)     # dirty while paused
    job.cancel()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert_same(src, dst)


def test_cancel_before_start(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.cancel()
    final = job.wait(0)
    assert final.type == EventType.CANCELLED
    assert final.offset == 0, "nothing was copied"
    assert types(events) == [EventType.CANCELLED]
    with pytest.raises(JobStateError):
        job.start()
    assert not os.path.exists(dst) or read_bytes(dst) == bytes(8 * MiB)


# ---------------------------------------------------------------------------
# complete and pivot
# ---------------------------------------------------------------------------

def test_complete_pivots_job_source_to_the_target(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.source.pwrite(b"\x44" * 8192, 1 * MiB)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert_same(src, dst)
    assert job.source.pivoted
    src_before = read_bytes(src)
    job.source.pwrite(b"\x55" * 4096, 2 * MiB)
    job.source.write_zeroes(3 * MiB, 64 * KiB)
    job.source.flush()
    assert read_bytes(dst, 2 * MiB, 4096) == b"\x55" * 4096
    assert_all_bytes(dst, 3 * MiB, 64 * KiB, 0)
    assert job.source.pread(4096, 2 * MiB) == b"\x55" * 4096   # reads the target too
    assert read_bytes(src) == src_before, "a write after the pivot reached the source"


def test_complete_before_ready_raises(big_images, mkjob):
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    with pytest.raises(JobStateError):
        job.complete()                 # not even started
    job.start()
    with pytest.raises(JobStateError):
        job.complete()
    assert job.state == JobState.RUNNING
    job.cancel(force=True)
    assert job.wait(TIMEOUT).type == EventType.CANCELLED


def test_complete_while_paused_raises_then_works_after_resume(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.pause()
    with pytest.raises(JobStateError):
        job.complete()
    job.resume()
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    with pytest.raises(JobStateError):
        job.complete()                 # concluded
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# pause / resume
# ---------------------------------------------------------------------------

def test_pause_twice_and_resume_running_raise(big_images, mkjob):
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    with pytest.raises(JobStateError):
        job.pause()                    # not started
    job.start()
    with pytest.raises(JobStateError):
        job.resume()                   # running
    job.pause()
    st = job.status()
    assert st.paused and st.state == "paused" and not st.ready
    with pytest.raises(JobStateError):
        job.pause()
    job.resume()
    assert job.status().state == "running" and not job.status().paused
    with pytest.raises(JobStateError):
        job.resume()
    job.cancel()
    assert job.wait(TIMEOUT).type == EventType.CANCELLED


def test_paused_job_in_phase1_copies_nothing_until_resumed(tmp_path, mkjob):
    """Pause stops the copying (no timing: we pause at the first copy from a
    tracepoint, then check nothing was copied after it while paused)."""
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=3)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, buf_size=G)    # one worker, 64 KiB copies
    first = threading.Event()
    copies = []

    def on_iter(j, sector_num, nb_sectors):
        copies.append(sector_num)
        if len(copies) == 1:
            j.pause()
            first.set()

    trace.connect("mirror_one_iteration", on_iter)
    try:
        job.start()
        assert first.wait(TIMEOUT)
        assert job.status().state == "paused"
        # Let the single worker finish its copy in hand and go idle: the
        # coordinator is woken by every status change; wait for !busy.
        for _ in range(1000):
            if not job.status().busy:
                break
            threading.Event().wait(0.01)
        n = len(copies)
        st = job.status()
        assert not st.busy
        threading.Event().wait(0.2)
        assert len(copies) == n == 1, "copies went on while paused"
        assert job.status().dirty_bytes == 8 * MiB - G
        job.resume()
        assert job.wait_ready(TIMEOUT)
    finally:
        trace.disconnect("mirror_one_iteration", on_iter)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert_same(src, dst)


def test_pause_in_phase2_keeps_ready(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.pause()
    st = job.status()
    assert st.ready and st.paused and st.state == "standby"
    assert st.offset == st.len
    job.source.pwrite(os.urandom(4096), 4096)       # dirty while paused
    st = job.status()
    assert st.ready and st.dirty_bytes == G and st.offset == st.len   # phase 2
    job.resume()
    st = job.status()
    assert st.ready and not st.paused and st.state == "ready"
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert types(events) == [EventType.READY, EventType.COMPLETED]
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# speed
# ---------------------------------------------------------------------------

def test_set_speed_wakes_a_throttled_job_at_once(big_images, mkjob):
    """At 16 KiB/s the first 1 MiB copy costs 64 s of the budget: the workers
    sleep that long before the next one.  After set_speed(0) the job must
    become ready well before (the 30 s timeout is generous, yet shorter), so
    set_speed must wake the sleeping workers."""
    src, dst = big_images
    slow = 16 * KiB
    job = mkjob(src, dst, granularity=G, speed=slow)
    job.start()
    assert job.status().speed == slow
    assert not job.wait_ready(0.2)
    job.set_speed(0)
    assert job.status().speed == 0
    assert job.wait_ready(30), "set_speed(0) did not wake the throttled workers"
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert_same(src, dst)


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_a_job_sleeping_on_the_limit_holds_no_chunk(big_images, mkjob, copy_mode):
    """Under a speed limit the workers wait for their turn before they take
    an extent: a throttled job is not busy, and in write-blocking mode a
    write through job.source never waits for a copy that has not started.
    At 16 KiB/s each copy (1 MiB or more) costs a minute: a job that held extents while
    sleeping would stay busy, and block these writes, far beyond the
    (generous) timeouts."""
    src, dst = big_images
    job = mkjob(src, dst, granularity=G, speed=16 * KiB, copy_mode=copy_mode)
    job.start()
    for _ in range(3000):
        if job.status().chunks_copied > 0 and not job.status().busy:
            break
        threading.Event().wait(0.01)
    st = job.status()
    assert st.chunks_copied > 0 and not st.busy, "a throttled job stays busy: %s" % (st,)
    # One copy ran; the next waits for its turn without holding an extent.
    assert st.dirty_bytes == 32 * MiB - job._engine.max_io, \
        "extents held while sleeping count as in flight"
    if copy_mode == "write-blocking":
        assert job.source.write_blocking
    done = threading.Event()

    def write_everywhere():
        for off in range(0, 32 * MiB, 512 * KiB):
            job.source.pwrite(b"\x77" * 4096, off + 4096)
        done.set()

    t = threading.Thread(target=write_everywhere, daemon=True)
    t.start()
    assert done.wait(30), "writes through job.source waited for a throttled job"
    t.join(30)
    job.set_speed(0)
    assert job.wait_ready(TIMEOUT)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert_same(src, dst)


def test_set_speed_validation_and_after_the_end(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    with pytest.raises(ValueError):
        job.set_speed(-1)
    with pytest.raises(ValueError):
        job.set_speed(1.5)
    job.set_speed(10 * MiB)                # allowed before start
    assert job.status().speed == 10 * MiB
    job.start()
    job.set_speed(0)
    assert job.wait_ready(TIMEOUT)
    job.complete()
    job.wait(TIMEOUT)
    with pytest.raises(JobStateError):
        job.set_speed(1)


# ---------------------------------------------------------------------------
# status
# ---------------------------------------------------------------------------

def test_status_fields_in_both_phases(big_images, mkjob):
    src, dst = big_images
    size = 32 * MiB
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    st = job.status()
    assert st.state == "created" and st.len == size and not st.ready
    job.start()
    st = job.status()
    assert st.state == "running"
    assert st.len == size
    assert st.speed == CRAWL
    assert st.offset == st.len - st.dirty_bytes
    assert 0 < st.dirty_bytes <= size
    assert not st.ready and not st.paused
    assert st.io_status == "ok" and st.error is None
    job.set_speed(0)
    assert job.wait_ready(TIMEOUT)
    st = job.status()
    assert st.ready and st.state == "ready"
    assert st.offset == st.len == size and st.dirty_bytes == 0
    assert st.speed == 0 and st.io_status == "ok"
    assert st.bytes_copied >= size
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    st = job.status()
    assert st.state == "concluded" and st.offset == size and st.dirty_bytes == 0


# ---------------------------------------------------------------------------
# construction details
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("buf_size", [1, 512, 4096, G - 1])
def test_buf_size_below_a_chunk_is_rounded_up(images, mkjob, buf_size):
    src, dst = images
    job = mkjob(src, dst, granularity=G, buf_size=buf_size)
    assert job.buf_size == G
    job.start()
    assert job.wait_ready(TIMEOUT)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert_same(src, dst)


def test_sync_none_copies_only_what_is_written_after_start(tmp_path, mkjob):
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=4)
    dst = make_image(tmp_path / "dst.img", size, pattern=0xAB)
    job = mkjob(src, dst, granularity=G, sync="none")
    job.start()
    assert job.wait_ready(TIMEOUT)
    writes = [(0, 4096), (G * 10 + 100, 3000), (5 * MiB, 3 * G)]
    for off, length in writes:
        job.source.pwrite(os.urandom(length), off)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    copied = set()
    for off, length in writes:
        copied.update(range(off // G, (off + length + G - 1) // G))
    for c in range(size // G):
        if c in copied:
            assert read_bytes(dst, c * G, G) == read_bytes(src, c * G, G), "chunk %d" % c
        else:
            assert_all_bytes(dst, c * G, G, 0xAB)


def test_opaque(images, mkjob):
    src, dst = images
    marker = object()
    job = mkjob(src, dst, opaque=marker)
    assert job.opaque is marker


# ---------------------------------------------------------------------------
# context manager
# ---------------------------------------------------------------------------

def test_context_manager_in_phase2_completes_and_leaves_no_thread(images):
    src, dst = images
    with MirrorJob(src, dst, granularity=G) as job:
        assert job.state != JobState.CREATED
        assert job.wait_ready(TIMEOUT)
        job.source.pwrite(b"\x66" * 4096, 8192)
    assert job.state == JobState.CONCLUDED
    assert job.wait(0).type == EventType.COMPLETED
    assert not [t for t in threading.enumerate() if t.name.startswith("fastmirror-")]
    assert_same(src, dst)


def test_context_manager_in_phase1_cancels(big_images):
    src, dst = big_images
    with MirrorJob(src, dst, granularity=G, speed=CRAWL) as job:
        assert job.status().state == "running"
    assert job.wait(0).type == EventType.CANCELLED
    assert not [t for t in threading.enumerate() if t.name.startswith("fastmirror-")]


def test_context_manager_on_exception_force_cancels(images):
    src, dst = images
    with pytest.raises(KeyError):
        with MirrorJob(src, dst, granularity=G) as job:
            assert job.wait_ready(TIMEOUT)
            raise KeyError("boom")
    assert job.wait(0).type == EventType.CANCELLED
    assert not [t for t in threading.enumerate() if t.name.startswith("fastmirror-")]


# ---------------------------------------------------------------------------
# listeners and tracepoints that raise
# ---------------------------------------------------------------------------

def test_listener_that_raises_is_logged_and_job_goes_on(images, mkjob, caplog):
    src, dst = images
    job = mkjob(src, dst, granularity=G)

    def bad(event):
        raise RuntimeError("listener bug %s" % event.type.value)

    job.add_listener(bad)
    events = recorder(job)
    with caplog.at_level(logging.ERROR, logger="fastmirror"):
        job.start()
        assert job.wait_ready(TIMEOUT)
        job.complete()
        final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert types(events) == [EventType.READY, EventType.COMPLETED]
    logged = [r for r in caplog.records if r.exc_info and "listener bug" in str(r.exc_info[1])]
    assert len(logged) == 2, [r.getMessage() for r in caplog.records]
    assert_same(src, dst)


def test_tracepoint_that_raises_is_logged_and_job_goes_on(images, mkjob, caplog):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    calls = {}

    def bad(name):
        def fn(*args):
            calls[name] = calls.get(name, 0) + 1
            raise ValueError("trace bug in %s" % name)
        return fn

    fns = {n: bad(n) for n in ("mirror_start", "mirror_before_flush", "mirror_before_drain",
                               "mirror_one_iteration", "mirror_iteration_done")}
    for n, fn in fns.items():
        trace.connect(n, fn)
    try:
        with caplog.at_level(logging.ERROR, logger="fastmirror"):
            job.start()
            assert job.wait_ready(TIMEOUT)
            job.complete()
            final = job.wait(TIMEOUT)
    finally:
        for n, fn in fns.items():
            trace.disconnect(n, fn)
    assert final.type == EventType.COMPLETED
    assert set(calls) == set(fns), calls
    logged = {str(r.exc_info[1]) for r in caplog.records if r.exc_info}
    for n in fns:
        assert "trace bug in %s" % n in logged, (n, logged)
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# tracepoints
# ---------------------------------------------------------------------------

def test_trace_events_declared_as_in_the_seed():
    assert trace.EVENTS["mirror_start"] == ("bs", "s", "co", "opaque")
    assert trace.EVENTS["mirror_before_flush"] == ("s",)
    assert trace.EVENTS["mirror_before_drain"] == ("s", "cnt")
    assert trace.EVENTS["mirror_before_sleep"] == ("s", "cnt", "synced")
    assert trace.EVENTS["mirror_one_iteration"] == ("s", "sector_num", "nb_sectors")
    with pytest.raises(ValueError):
        trace.connect("no_such_event", print)
    with pytest.raises(ValueError):
        trace.enable("nothing_matches_*")


def test_trace_enable_prints_qemu_format(images, mkjob):
    src, dst = images
    out = io.StringIO()
    marker = object()
    job = mkjob(src, dst, granularity=G, opaque=marker)
    enabled = trace.enable("mirror_*", file=out)
    assert "mirror_one_iteration" in enabled and "mirror_start" in enabled
    try:
        job.start()
        assert job.wait_ready(TIMEOUT)
        job.complete()
        assert job.wait(TIMEOUT).type == EventType.COMPLETED
    finally:
        trace.disable("mirror_*")
    lines = out.getvalue().splitlines()
    pid = os.getpid()
    s = "%#x" % id(job)
    line_re = re.compile(r"^(\d+)@(\d+\.\d{6}):(\w+) (.*)$")
    parsed = []
    for line in lines:
        m = line_re.match(line)
        assert m, "not in QEMU's log format: %r" % line
        assert int(m.group(1)) == pid
        parsed.append((m.group(3), m.group(4)))
    names = [n for n, _ in parsed]
    assert names[0] == "mirror_start"
    args = parsed[0][1]
    assert re.fullmatch(r"bs 0x[0-9a-f]+ s %s co 0x[0-9a-f]+ opaque %#x" % (s, id(marker)),
                        args), args
    iters = [a for n, a in parsed if n == "mirror_one_iteration"]
    assert iters
    covered = 0
    for a in iters:
        m = re.fullmatch(r"s %s sector_num (\d+) nb_sectors (\d+)" % s, a)
        assert m, a
        assert int(m.group(1)) * 512 % G == 0
        covered += int(m.group(2))
    assert covered == 8 * MiB // 512
    assert any(re.fullmatch(r"s %s" % s, a) for n, a in parsed if n == "mirror_before_flush")
    assert any(re.fullmatch(r"s %s dirty count \d+" % s, a)
               for n, a in parsed if n == "mirror_before_drain")
    # After disable, nothing more is printed.
    n = len(out.getvalue())
    trace.emit("mirror_before_flush", job)
    assert len(out.getvalue()) == n


def test_trace_listener_connected_while_running_and_disconnected(tmp_path, mkjob):
    """Connecting a per-copy listener to a running job takes effect; after
    disconnect it is never called again (the engine drops the callbacks)."""
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=5)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G)
    never = []
    trace.connect("mirror_one_iteration", lambda *a: never.append(a))
    trace.disconnect("mirror_one_iteration", trace.listeners("mirror_one_iteration")[0])
    job.start()
    assert job.wait_ready(TIMEOUT)
    assert never == [], "a listener disconnected before start was called"
    seen = []

    def fn(j, sector_num, nb_sectors):
        seen.append(sector_num)

    trace.connect("mirror_one_iteration", fn)
    try:
        job.source.pwrite(os.urandom(4096), 2 * MiB)
        job.source.flush()
        for _ in range(1000):
            if seen:
                break
            threading.Event().wait(0.01)
        assert seen == [2 * MiB // 512], seen
    finally:
        trace.disconnect("mirror_one_iteration", fn)
    job.source.pwrite(os.urandom(4096), 3 * MiB)
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert seen == [2 * MiB // 512], "called after disconnect"
    assert not trace.is_active("mirror_one_iteration")
    assert_same(src, dst)


def test_trace_before_sleep_and_drain_counts(images, mkjob):
    """mirror_before_drain carries the dirty count when the drain begins."""
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    drains = []
    fn = lambda s, cnt: drains.append((s, cnt))   # noqa: E731
    trace.connect("mirror_before_drain", fn)
    try:
        job.start()
        assert job.wait_ready(TIMEOUT)
        job.complete()
        assert job.wait(TIMEOUT).type == EventType.COMPLETED
    finally:
        trace.disconnect("mirror_before_drain", fn)
    assert len(drains) == 1 and drains[0][0] is job and drains[0][1] >= 0


# ---------------------------------------------------------------------------
# the source's size
# ---------------------------------------------------------------------------

def test_source_size_change_fails_the_job(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G)
    events = recorder(job)
    job.start()
    assert job.wait_ready(TIMEOUT)
    os.truncate(src, 8 * MiB + 4096)
    final = job.wait(TIMEOUT)
    assert final is not None and final.type == EventType.FAILED
    assert final.error is not None and "size" in str(final.error)
    assert types(events) == [EventType.READY, EventType.FAILED]
    assert job.status().error is final.error
