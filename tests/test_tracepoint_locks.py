"""A per-copy tracepoint listener runs on a copy worker (which takes the GIL
for it) and may call back into the job: none of that may deadlock against
the engine's lock, the bitmap's mutex or the job's lock (docs/design.md,
"Threads, locks and the GIL").  Every wait has a timeout, so a deadlock
fails the test instead of hanging it."""

from __future__ import annotations

import threading

from fastmirror import EventType, trace
from helpers import MiB, assert_same, make_image

TIMEOUT = 60


def test_listener_calling_back_into_the_job_does_not_deadlock(tmp_path, mkjob):
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=5)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=65536, buf_size=1 << 20, io_size=65536)
    seen = []
    lock = threading.Lock()

    def on_iteration(s, sector_num, nb_sectors):
        if s is not job:
            return
        with lock:
            n = len(seen)
            seen.append(sector_num)
        st = job.status()                   # the job's lock and the engine's
        assert 0 <= st.offset <= st.len
        job.set_speed(0)                    # the engine's lock, wakes workers
        if n < 20:
            job.mark_dirty(sector_num * 512, 4096)   # the bitmap's mutex
        s._bitmap.dirty_count                       # noqa: B018 - the mutex from Python

    trace.connect("mirror_one_iteration", on_iteration)
    try:
        job.start()
        assert job.wait_ready(TIMEOUT), "no READY: deadlock? %s" % (job.status(),)
        job.complete()
        final = job.wait(TIMEOUT)
    finally:
        trace.disconnect("mirror_one_iteration", on_iteration)
    assert final is not None, "the job never ended: deadlock? %s" % (job.status(),)
    assert final.type == EventType.COMPLETED, final
    assert len(seen) >= 128, "the listener ran for %d copies only" % len(seen)
    job.close()
    assert_same(src, dst)
