"""Races: writers hammering the source while the job copies it.

Four threads write random 4-64 KiB blocks through job.source during phase 1
(kept going by a speed limit) and phase 2; then complete() and the target
must be byte-equal to the source, judged in plain Python and by qemu-img
compare.  Each test is repeated for a few seeds and granularities.
"""

from __future__ import annotations

import os
import random
import threading

import pytest

from fastmirror import EventType

from helpers import (KiB, MiB, Writers, assert_qemu_equal, assert_same, make_image,
                     phase1_then_phase2, read_bytes)

# Every test building a job runs once per I/O engine (conftest.py).
IO_ENGINES = ("io_uring", "threads")

TIMEOUT = 90
WRITES = 150          # per phase, all writers together


def _phase1_then_phase2(job, writers, writes=WRITES):
    phase1_then_phase2(job, writers, writes, timeout=TIMEOUT)


@pytest.mark.parametrize("seed,granularity,copy_mode", [
    (1, 64 * KiB, "background"), (2, 4 * KiB, "background"), (3, 1 * MiB, "background"),
    (4, 512, "background"), (5, 64 * KiB, "write-blocking"), (6, 4 * KiB, "write-blocking"),
    (7, 1 * MiB, "auto")])
def test_writers_in_both_phases_then_complete(tmp_path, mkjob, seed, granularity, copy_mode):
    # With 1 MiB chunks every small write dirties a whole MiB: writers going
    # flat out could keep the job from ever catching up (as in QEMU), so they
    # breathe a little there.
    pause = 0.002 if granularity >= MiB else 0.0
    size = 32 * MiB
    rng = random.Random(seed)
    holes = sorted({(rng.randrange(0, size // MiB - 2) * MiB, MiB) for _ in range(4)})
    src = make_image(tmp_path / "src.img", size, seed=seed, holes=holes)
    dst = make_image(tmp_path / "dst.img", size, pattern=0xAB)
    job = mkjob(src, dst, granularity=granularity, speed=2 * MiB, copy_mode=copy_mode)
    writers = Writers(job.source, n=4, seed=seed, job=job, pause=pause)
    try:
        _phase1_then_phase2(job, writers)
        writers.stop()
    finally:
        writers.stop_event.set()
    job.complete()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED, final
    job.close()
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


@pytest.mark.parametrize("seed,copy_mode", [(5, "background"), (6, "write-blocking")])
def test_writers_go_on_through_complete_and_the_pivot(tmp_path, mkjob, seed, copy_mode):
    """The writers never stop: complete() holds them at the gate while it
    drains, then their writes go to the target.  Each writer owns a region,
    so the target must end equal to the source image with every write
    applied in each writer's order."""
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, seed=seed)
    base = read_bytes(src)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB, copy_mode=copy_mode)
    writers = Writers(job.source, n=4, seed=seed, job=job, regions=True)
    try:
        _phase1_then_phase2(job, writers)
        job.complete()
        final = job.wait(TIMEOUT)
        assert final.type == EventType.COMPLETED, final
        assert job.source.pivoted
        n = writers.count
        writers.wait_for(n + 100)         # writes after the pivot
        writers.stop()
    finally:
        writers.stop_event.set()
    after_pivot = writers.writes_in("concluded")
    assert after_pivot > 0
    job.close()
    model = writers.model(base)
    target = read_bytes(dst)
    if target != model:
        first = next(i for i in range(size) if target[i] != model[i])
        pytest.fail("target differs from the writers' model at offset %d" % first)
    # The source has every write made before the pivot, none after: it must
    # differ from the model somewhere (else the pivot did nothing).
    assert read_bytes(src) != model


def test_outside_writer_with_mark_dirty(tmp_path, mkjob):
    """A thread writes the source file directly with os.pwrite and tells the
    job with mark_dirty afterwards, next to writers going through job.source,
    in both phases."""
    size = 32 * MiB
    src = make_image(tmp_path / "src.img", size, seed=7)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB)
    stop = threading.Event()
    outside = {"count": 0, "states": set(), "error": None}

    def outside_writer():
        rng = random.Random(8)
        fd = os.open(src, os.O_WRONLY)
        try:
            while not stop.is_set():
                length = rng.randrange(4 * KiB, 64 * KiB + 1, 512)
                off = rng.randrange(0, (size - length) // 512 + 1) * 512
                data = rng.randbytes(length)
                before = job.state.value
                done = 0
                while done < length:
                    done += os.pwrite(fd, data[done:], off + done)
                job.mark_dirty(off, length)     # after the write: invariant 2
                outside["count"] += 1
                if job.state.value == before:
                    outside["states"].add(before)
                stop.wait(0.002)
        except BaseException as e:  # noqa: BLE001 - checked below
            outside["error"] = e
        finally:
            os.close(fd)

    t = threading.Thread(target=outside_writer, name="test-outside-writer", daemon=True)
    writers = Writers(job.source, n=3, seed=9, job=job)
    try:
        t.start()                 # marks before start() count too
        _phase1_then_phase2(job, writers)
    finally:
        stop.set()
        writers.stop_event.set()
        t.join(TIMEOUT)
    writers.stop()
    assert outside["error"] is None, outside["error"]
    assert {"running", "ready"} <= outside["states"], outside["states"]
    job.complete()
    assert job.wait(TIMEOUT).type == EventType.COMPLETED
    job.close()
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


def test_pause_resume_and_cancel_under_writers(tmp_path, mkjob):
    """Writers hammer while the job is paused and resumed in both phases, then
    cancel() in phase 2 drains: COMPLETED, target equal to the source."""
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, seed=10)
    dst = make_image(tmp_path / "dst.img", size, pattern=0x5A)
    job = mkjob(src, dst, granularity=64 * KiB, speed=2 * MiB)
    writers = Writers(job.source, n=4, seed=10, job=job)
    try:
        job.start()
        writers.start()
        for _ in range(3):                       # phase 1
            job.pause()
            writers.wait_for(writers.count + 30)
            assert job.status().state == "paused"
            job.resume()
            writers.wait_for(writers.count + 30)
        writers.set_pause(0.01)                  # let the job catch up
        job.set_speed(0)
        assert job.wait_ready(TIMEOUT)
        writers.set_pause(0)
        for _ in range(3):                       # phase 2
            job.pause()
            writers.wait_for(writers.count + 30)
            st = job.status()
            assert st.state == "standby" and st.ready
            job.resume()
            writers.wait_for(writers.count + 30)
        assert writers.writes_in("paused") > 0 and writers.writes_in("standby") > 0
        writers.stop()
    finally:
        writers.stop_event.set()
    job.cancel()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED, final
    assert not job.source.pivoted
    job.close()
    assert_same(src, dst)
    assert_qemu_equal(src, dst)
