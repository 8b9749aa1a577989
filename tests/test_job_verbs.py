"""Verbs take effect at once, under the job's lock (as QEMU's job.c checks a
verb against JobVerbTable and changes the state before returning): the
control thread never applies a verb later, so the state table alone decides
what the next verb may do.

To show that no verb waits for the control thread, several tests hold that
thread inside a tracepoint (mirror_before_sleep, which it fires on every
wake-up) while they call verbs, and release it afterwards.  No assertion
depends on timing; waits have generous timeouts.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading

import pytest

from fastmirror import EventType, JobState, JobStateError, trace
from fastmirror.job.states import TRANSITIONS, VERBS

from helpers import KiB, MiB, assert_same, make_image, read_bytes
from test_faults import rule, shim  # noqa: F401  (shim is a fixture)

G = 64 * KiB
TIMEOUT = 60
CRAWL = 64 * KiB      # bytes/s: a job at this speed stays in phase 1
S = JobState


@pytest.fixture
def images(tmp_path):
    return make_image(tmp_path / "src.img", 8 * MiB, seed=3), tmp_path / "dst.img"


@contextlib.contextmanager
def coordinator_held(job):
    """Keep the job's control thread parked in a tracepoint for the body of
    the with-block, so that only the verbs themselves can change the state."""
    inside = threading.Event()
    go = threading.Event()

    def park(s, cnt, synced):
        if s is job and not go.is_set():
            inside.set()
            go.wait(TIMEOUT)

    trace.connect("mirror_before_sleep", park)
    try:
        assert inside.wait(TIMEOUT), "the control thread never went to sleep"
        yield
    finally:
        go.set()
        trace.disconnect("mirror_before_sleep", park)


def ready_job(mkjob, images, **kw):
    src, dst = images
    job = mkjob(src, dst, granularity=G, **kw)
    events = []
    job.add_listener(events.append)
    job.start()
    assert job.wait_ready(TIMEOUT)
    return job, events


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------

def test_table_is_plain_and_complete():
    """Every state has its row; a verb is legal only in states the job can
    leave (CONCLUDED is final: only cancel, a no-op there, is accepted)."""
    assert set(TRANSITIONS) == set(S)
    assert TRANSITIONS[S.CONCLUDED] == frozenset()
    for verb, states in VERBS.items():
        assert states <= set(S), verb
        assert S.CONCLUDED not in states or verb == "cancel", verb
    assert VERBS["complete"] == {S.READY}
    assert S.DRAINING not in VERBS["complete"] and S.ABORTING not in VERBS["complete"]


# ---------------------------------------------------------------------------
# pause during a drain: resumable, never a dead end
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("end", ["complete", "cancel"])
def test_pause_during_the_final_drain_is_resumable(images, mkjob, end):
    """complete() or cancel() in READY, then pause(): the job stands by
    (writers are let through while it does) and resume() goes back to the
    drain, which ends COMPLETED; before, the job stayed DRAINING for good."""
    job, events = ready_job(mkjob, images)
    src, dst = images
    with coordinator_held(job):
        getattr(job, end)()
        assert job.state == S.DRAINING
        job.pause()
        st = job.status()
        assert st.state == "standby" and st.paused and st.ready
        with pytest.raises(JobStateError):
            job.pause()
        with pytest.raises(JobStateError):
            job.complete()          # paused, and a drain is already asked for
    # Released: a paused drain does not go on by itself, and writes pass.
    job.source.pwrite(b"\x5a" * 8192, 2 * MiB)
    assert job.wait(0.3) is None and job.state == S.STANDBY
    job.resume()
    final = job.wait(TIMEOUT)
    assert final is not None and final.type == EventType.COMPLETED
    assert [e.type for e in events] == [EventType.READY, EventType.COMPLETED]
    assert job.source.pivoted == (end == "complete")
    assert_same(src, dst)


def test_pause_of_a_throttled_drain_then_resume(images, mkjob):
    """A drain that cannot finish (throttled to a crawl with work left) is
    paused, resumed, and ends once the limit is lifted."""
    job, _ = ready_job(mkjob, images, buf_size=G)
    job.pause()
    job.set_speed(CRAWL)
    job.source.pwrite(os.urandom(1 * MiB), 1 * MiB)      # 16 chunks at 64 KiB/s
    job.resume()
    job.complete()
    assert job.state in (S.DRAINING, S.CONCLUDED)
    job.pause()     # a 16-chunk drain at 64 KiB/s cannot have ended yet
    assert job.state == S.STANDBY
    job.resume()
    assert job.state == S.DRAINING
    job.set_speed(0)
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert job.source.pivoted
    assert_same(*images)


# ---------------------------------------------------------------------------
# cancel never ends in a pivot
# ---------------------------------------------------------------------------

def test_complete_after_cancel_is_refused(images, mkjob):
    job, events = ready_job(mkjob, images)
    with coordinator_held(job):
        job.cancel()
        assert job.state == S.DRAINING
        with pytest.raises(JobStateError):
            job.complete()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert not job.source.pivoted
    assert_same(*images)


def test_cancel_after_complete_drops_the_pivot(images, mkjob):
    """A cancel is the user's last word: the drain still ends COMPLETED (the
    target is consistent) but job.source keeps writing the source."""
    job, _ = ready_job(mkjob, images)
    src, dst = images
    with coordinator_held(job):
        job.complete()
        job.cancel()
        assert job.state == S.DRAINING
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    assert not job.source.pivoted
    job.source.pwrite(b"\x44" * 4096, 0)
    assert read_bytes(src, 0, 4096) == b"\x44" * 4096


def test_force_cancel_during_the_drain_never_pivots(images, mkjob):
    job, events = ready_job(mkjob, images)
    with coordinator_held(job):
        job.complete()
        job.cancel(force=True)
        assert job.state == S.ABORTING
        for verb in ("pause", "resume", "complete"):
            with pytest.raises(JobStateError):
                getattr(job, verb)()
        job.set_speed(0)          # legal in any state that is not final
        job.cancel()              # and cancel again is harmless
    assert job.wait(TIMEOUT).type == EventType.CANCELLED
    assert not job.source.pivoted


# ---------------------------------------------------------------------------
# cancel undoes a user pause
# ---------------------------------------------------------------------------

def test_cancel_while_paused_in_phase1_aborts_at_once(images, mkjob):
    src, dst = images
    job = mkjob(src, dst, granularity=G, speed=CRAWL)
    job.start()
    job.pause()
    with coordinator_held(job):
        job.cancel()
        st = job.status()
        assert st.state == "aborting" and not st.paused
        with pytest.raises(JobStateError):
            job.resume()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.CANCELLED


def test_cancel_while_standby_drains_without_resume(images, mkjob):
    job, events = ready_job(mkjob, images)
    job.pause()
    job.source.pwrite(os.urandom(300 * KiB), 5 * MiB)     # dirty while paused
    with coordinator_held(job):
        job.cancel()
        st = job.status()
        assert st.state == "draining" and not st.paused
        with pytest.raises(JobStateError):
            job.resume()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert not job.source.pivoted
    assert_same(*images)


# ---------------------------------------------------------------------------
# Progress in phase 2: offset == len, dirty_bytes says what is pending
# ---------------------------------------------------------------------------

def test_status_in_phase2_reports_offset_equal_len_with_a_write_pending(images, mkjob):
    job, _ = ready_job(mkjob, images)
    job.pause()                          # keeps the write pending
    job.source.pwrite(os.urandom(4096), 3 * MiB)
    st = job.status()
    assert st.dirty_bytes == G
    assert st.offset == st.len
    job.resume()
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED


def test_events_after_ready_report_offset_equal_len(images, mkjob):
    """The final event of a job that failed in phase 2 with work pending."""
    job, events = ready_job(mkjob, images)
    src, _ = images
    job.pause()
    job.source.pwrite(os.urandom(4096), 3 * MiB)
    os.truncate(src, 8 * MiB + 4096)     # the size check fails the job
    final = job.wait(TIMEOUT)
    assert final.type == EventType.FAILED
    assert final.offset == final.len
    assert [e.type for e in events] == [EventType.READY, EventType.FAILED]


def test_force_cancel_in_phase2_with_work_pending_reports_offset_equal_len(images, mkjob):
    job, _ = ready_job(mkjob, images)
    job.pause()
    job.source.pwrite(os.urandom(4096), 3 * MiB)
    job.cancel(force=True)
    final = job.wait(TIMEOUT)
    assert final.type == EventType.CANCELLED and final.offset == final.len


ERROR_AFTER_READY = r"""
import json, os, sys, fastmirror
src, dst, hole = sys.argv[1], sys.argv[2], int(sys.argv[3])
job = fastmirror.MirrorJob(src, dst, granularity=65536, on_source_error="ignore",
                           io_engine="threads")
events = []
job.add_listener(events.append)
job.start()
assert job.wait_ready(60)
job.source.pwrite(os.urandom(4096), hole)    # the copy's read of it fails once
job.complete()
final = job.wait(60)
for e in events:
    print(json.dumps(e.to_dict()))
"""


def test_error_event_after_ready_reports_offset_equal_len(tmp_path, shim):  # noqa: F811
    """An ERROR in phase 2 (a read failing once under the ignore policy, the
    range marked dirty again) does not make progress go backwards."""
    hole = 3 * MiB
    src = make_image(tmp_path / "src.img", 8 * MiB, holes=[(hole, 1 * MiB)], seed=4)
    dst = tmp_path / "dst.img"
    env = dict(os.environ, LD_PRELOAD=shim,
               FM_FAULTS=rule("read", "src.img", hole, hole + 4096, count=1))
    r = subprocess.run([sys.executable, "-c", ERROR_AFTER_READY, str(src), str(dst),
                        str(hole)], env=env, capture_output=True, text=True, timeout=90)
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    assert [e["event"] for e in events] == ["READY", "ERROR", "COMPLETED"], events
    error = events[1]
    assert error["error_offset"] == hole and error["action"] == "ignore"
    assert error["offset"] == error["len"]
