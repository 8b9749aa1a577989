"""copy_mode: background, write-blocking and auto (QEMU's copy-mode, plus a
switch made on measured rates)."""

import os
import random
import threading
import time

import pytest

import fastmirror
from helpers import Writers
from fastmirror.job.verify import first_difference

# Every test building a job runs once per I/O engine (conftest.py).
IO_ENGINES = ("io_uring", "threads")

SIZE = 8 << 20


@pytest.fixture
def images(tmp_path):
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(os.urandom(SIZE))
    return str(src), str(dst)


def test_bad_copy_mode_is_refused(images):
    with pytest.raises(ValueError, match="copy_mode"):
        fastmirror.MirrorJob(*images, copy_mode="active")
    assert not os.path.exists(images[1])


def test_write_blocking_write_is_on_the_target_when_it_returns(images, io_engine):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, copy_mode="write-blocking", io_engine=io_engine)
    job.start()
    assert job.wait_ready(30)
    assert job.status().copy_mode == "write-blocking"
    rng = random.Random(3)
    with open(dst, "rb") as target:
        for _ in range(200):
            length = rng.randrange(1, 70000)
            offset = rng.randrange(0, SIZE - length)
            data = rng.randbytes(length)
            job.source.pwrite(data, offset)
            # No chunk was dirtied, and the target already holds the data.
            assert os.pread(target.fileno(), length, offset) == data
    assert job._bitmap.dirty_count == 0
    job.complete()
    final = job.wait(30)
    job.close()
    job.source.close()
    assert final.type == fastmirror.EventType.COMPLETED
    assert final.copy_mode == "write-blocking"
    assert first_difference(src, dst) == -1


def test_write_blocking_in_bulk_phase_with_writers(images, io_engine):
    """Blocking writes racing the bulk copy of the same chunks: they wait for
    copies in flight, so the target never ends with older data."""
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, copy_mode="write-blocking", granularity=65536,
                               speed=16 << 20, io_engine=io_engine)
    # Unaligned writes of 1 byte to 100 KB anywhere.
    writers = Writers(job.source, n=3, align=1, min_len=1, max_len=99999)
    job.start()
    writers.start()
    time.sleep(0.3)
    job.set_speed(0)
    assert job.wait_ready(30)
    writers.stop()
    job.complete()
    assert job.wait(30).type == fastmirror.EventType.COMPLETED
    job.close()
    job.source.close()
    assert first_difference(src, dst) == -1


def test_auto_switches_when_writes_outpace_the_copy(images, io_engine):
    src, dst = images
    # A copy limited to 1 MiB/s cannot keep up with a writer dirtying chunks
    # all over the disk: auto must switch to write-blocking, then converge.
    job = fastmirror.MirrorJob(src, dst, copy_mode="auto", speed=1 << 20,
                               granularity=65536, buf_size=1 << 20, io_engine=io_engine)
    events = []
    job.add_listener(events.append)
    writers = Writers(job.source, n=1, seed=7, align=1, min_len=4096, max_len=4096,
                      pause=0.0005)
    job.start()
    writers.start()
    deadline = time.monotonic() + 30
    while job.status().copy_mode != "write-blocking" and time.monotonic() < deadline:
        time.sleep(0.05)
    st = job.status()
    assert st.copy_mode == "write-blocking", "auto never switched"
    switch = [e for e in events if e.type == fastmirror.EventType.COPY_MODE]
    assert len(switch) == 1 and switch[0].copy_mode == "write-blocking"
    job.set_speed(0)
    assert job.wait_ready(30)
    writers.stop()
    job.complete()
    final = job.wait(30)
    job.close()
    job.source.close()
    assert final.type == fastmirror.EventType.COMPLETED
    assert first_difference(src, dst) == -1
    assert writers.count > 0


def test_auto_stays_background_when_the_copy_keeps_up(images):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, copy_mode="auto")
    job.start()
    for i in range(50):
        job.source.pwrite(b"x" * 4096, i * 65536)
    assert job.wait_ready(30)
    job.complete()
    final = job.wait(30)
    job.close()
    assert final.type == fastmirror.EventType.COMPLETED
    assert final.copy_mode == "background"
    assert job.status().copy_mode == "background"


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_force_cancel_ends_promptly_while_writers_hammer(images, copy_mode, io_engine):
    """The end of a job must not wait for a moment with no write in flight:
    with writers that never pause, that moment may never come."""
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, copy_mode=copy_mode, speed=4 << 20,
                               io_engine=io_engine)
    writers = Writers(job.source, n=4, align=1, min_len=1, max_len=65535)
    job.start()
    writers.start()
    try:
        time.sleep(0.5)
        job.cancel(force=True)
        final = job.wait(10)
        assert final is not None, "the job did not end while writers kept writing"
        assert final.type == fastmirror.EventType.CANCELLED
    finally:
        writers.stop()
        job.wait(30)
        job.close()
        job.source.close()


@pytest.mark.parametrize("phase", ["running", "ready"])
def test_auto_ignores_time_spent_paused(images, phase):
    """A user's pause is not a failure to converge: writes piling up while
    the job is paused (PAUSED in phase 1, STANDBY in phase 2) must not
    switch to write-blocking, however long the pause.  After resume the
    usual rule applies again: a copy throttled below the writer's pace
    switches."""
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, copy_mode="auto", granularity=65536,
                               buf_size=1 << 20)
    events = []
    job.add_listener(events.append)
    stop = threading.Event()

    def writer():
        rng = random.Random(9)
        while not stop.is_set():
            job.source.pwrite(rng.randbytes(4096), rng.randrange(0, SIZE - 4096))
            time.sleep(0.0005)

    t = threading.Thread(target=writer)
    try:
        job.start()
        if phase == "ready":
            assert job.wait_ready(30)
        job.pause()
        assert job.status().paused
        t.start()
        time.sleep(fastmirror.job.mirror.AUTO_WINDOW * 2 + 0.5)
        assert job.status().paused
        switches = [e for e in events if e.type == fastmirror.EventType.COPY_MODE]
        assert switches == [], "switched to write-blocking while paused"
        assert job.status().copy_mode == "background"
        assert job.status().dirty_bytes > 2 * (1 << 20), "the writer did not dirty enough"

        # Running again, a copy at 256 KiB/s cannot keep up with the writer.
        job.set_speed(256 << 10)
        resumed = time.time()
        job.resume()
        deadline = time.monotonic() + 30
        while job.status().copy_mode != "write-blocking" and time.monotonic() < deadline:
            time.sleep(0.05)
        switches = [e for e in events if e.type == fastmirror.EventType.COPY_MODE]
        assert len(switches) == 1, "auto never switched after resume"
        assert switches[0].time - resumed >= fastmirror.job.mirror.AUTO_WINDOW - 0.2
        job.set_speed(0)
        assert job.wait_ready(30)
        stop.set()
        t.join(30)
        job.complete()
        final = job.wait(30)
        assert final.type == fastmirror.EventType.COMPLETED
        assert final.copy_mode == "write-blocking"
    finally:
        stop.set()
        if t.is_alive():
            t.join(30)
        job.close()
        job.source.close()
    assert first_difference(src, dst) == -1
