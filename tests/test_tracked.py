"""The tracked write path in C (tracked.TrackedDisk behind job.source): many
writers at once in both copy modes, more claims in flight than the old
fixed table of 64 slots held, the gate during the drain, and the claim list
of the engine on its own."""

from __future__ import annotations

import errno
import os
import random
import threading
import time

import pytest

from fastmirror import EventType, JobState, trace
from fastmirror._core.tracked import CLAIM_HELD, Claim, TrackedDisk
from helpers import KiB, MiB, assert_same, make_image, read_bytes

TIMEOUT = 60
G = 64 * KiB


def _run_writers(n, target, *args):
    threads = [threading.Thread(target=target, args=(i,) + args, daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    return threads


def _join(threads, timeout=TIMEOUT):
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, "threads still blocked: %s" % stuck[:5]


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_32_threads_every_acknowledged_write_lands(tmp_path, mkjob, copy_mode):
    """32 threads write through job.source (pwrite, write_zeroes, discard)
    from the bulk copy into phase 2, each in its own slice of the disk.  The
    job completes, the target equals the source, and every write the handle
    acknowledged holds on the target: the last one per block."""
    size, nthreads, block = 8 * MiB, 32, 4 * KiB
    src = make_image(tmp_path / "src.img", size, seed=11)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, speed=8 * MiB, copy_mode=copy_mode)
    slice_len = size // nthreads
    last = [dict() for _ in range(nthreads)]    # per thread: offset -> bytes
    stop = threading.Event()
    pause = [0.0]       # set while the job catches up: flat-out writers outrun any copy
    count = [0] * nthreads
    errors = []

    def writer(i):
        rng = random.Random(100 + i)
        base = i * slice_len
        try:
            while not stop.is_set():
                off = base + rng.randrange(slice_len // block) * block
                k = rng.random()
                if k < 0.8:
                    data = rng.randbytes(block)
                    assert job.source.pwrite(data, off) == block
                elif k < 0.9:
                    job.source.write_zeroes(off, block)
                    data = bytes(block)
                else:
                    job.source.discard(off, block)
                    data = bytes(block)
                last[i][off] = data
                count[i] += 1
                if pause[0]:
                    time.sleep(pause[0])
        except BaseException as e:
            errors.append(e)

    job.start()
    threads = _run_writers(nthreads, writer)
    try:
        deadline = time.monotonic() + TIMEOUT
        while sum(count) < 2000 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
        assert job.state == JobState.RUNNING, "the writes did not meet the bulk copy"
        pause[0] = 0.01
        job.set_speed(0)
        assert job.wait_ready(TIMEOUT), job.status()
        pause[0] = 0.0
        before = sum(count)
        while sum(count) < before + 2000 and time.monotonic() < deadline and not errors:
            time.sleep(0.01)
    finally:
        stop.set()
        _join(threads)
    assert not errors, errors[:3]
    assert job.status().copy_mode == copy_mode
    job.complete()
    final = job.wait(TIMEOUT)
    assert final is not None and final.type == EventType.COMPLETED, final
    assert_same(src, dst)
    with open(dst, "rb") as f:
        for mine in last:
            for off, data in mine.items():
                assert os.pread(f.fileno(), block, off) == data, "write at %d lost" % off


def test_100_claims_in_flight_in_write_blocking_mode(tmp_path, mkjob):
    """100 writes to both sides hold their claims at once: each waits, claim
    held, until all 100 hold theirs.  The old table had 56 claim slots, so
    the 57th write waited for a slot that no holder would give back."""
    n = 100
    size = n * G
    src = make_image(tmp_path / "src.img", size, seed=12)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, copy_mode="write-blocking")
    job.start()
    assert job.wait_ready(TIMEOUT)
    assert job.source.write_blocking
    all_held = threading.Barrier(n)
    broken = []

    def on_event(event, offset, length):
        if event == CLAIM_HELD:
            try:
                all_held.wait(10)
            except threading.BrokenBarrierError:
                broken.append(offset)

    data = [bytes([i + 1]) * 4096 for i in range(n)]

    def writer(i):
        job.source.pwrite(data[i], i * G + 512)

    job.source.set_trace(on_event)
    try:
        threads = _run_writers(n, writer)
        _join(threads, 30)
    finally:
        job.source.set_trace(None)
    assert not broken, "not all %d claims could be held at once" % n
    with open(dst, "rb") as f:       # write-blocking: on the target already
        for i in range(n):
            assert os.pread(f.fileno(), 4096, i * G + 512) == data[i]
    job.complete()
    final = job.wait(TIMEOUT)
    assert final.type == EventType.COMPLETED
    assert_same(src, dst)


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_writers_wait_at_the_gate_during_the_drain_then_land_on_the_target(
        tmp_path, mkjob, copy_mode):
    """complete() closes the gate before the drain: writes that arrive during
    it wait (nothing reaches the source), and after the pivot they land on
    the target, untracked, and never on the source."""
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, seed=13)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, copy_mode=copy_mode)
    source_before = read_bytes(src)
    n = 8
    data = [bytes([0xA0 + i]) * 8192 for i in range(n)]
    done = [False] * n
    seen = {}

    def writer(i):
        job.source.pwrite(data[i], i * 256 * KiB + 4096)
        done[i] = True

    threads = []

    def in_drain(j, dirty):
        # The coordinator is inside the drain with the gate closed: start
        # writers and see that none gets through while the drain is held.
        threads.extend(_run_writers(n, writer))
        time.sleep(0.3)
        seen["done"] = sum(done)
        seen["inside"] = job.source._disk.writers_inside
        seen["gate"] = job.source._disk.gate_is_closed
        seen["alive"] = sum(t.is_alive() for t in threads)

    job.start()
    assert job.wait_ready(TIMEOUT)
    trace.connect("mirror_before_drain", in_drain)
    try:
        job.complete()
        final = job.wait(TIMEOUT)
    finally:
        trace.disconnect("mirror_before_drain", in_drain)
    _join(threads, 10)
    assert final.type == EventType.COMPLETED
    assert seen == {"done": 0, "inside": 0, "gate": True, "alive": n}
    assert job.source.pivoted and job.source.path == str(dst)
    assert read_bytes(src) == source_before, "a write held at the gate reached the source"
    for i in range(n):
        assert read_bytes(dst, i * 256 * KiB + 4096, 8192) == data[i]
        assert job.source.pread(8192, i * 256 * KiB + 4096) == data[i]


def test_claims_overlapping_serialize_disjoint_do_not_block(tmp_path, mkjob):
    """The engine's claim list on its own (no copy runs: the job is not
    started): a claim waits for every overlapping claim, in chunks, and
    only for those; a release wakes exactly the claims it blocked."""
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, seed=14)
    job = mkjob(src, tmp_path / "dst.img", granularity=G)
    eng = job._engine

    def acquire_in_thread(c):
        t = threading.Thread(target=c.acquire, daemon=True)
        t.start()
        return t

    a = Claim(eng, 0, G)                  # chunk 0
    a.acquire()
    b = Claim(eng, G - 512, 1024)         # chunks 0 and 1: overlaps a
    c = Claim(eng, 3 * G + 100, 10)       # chunk 3: disjoint
    d = Claim(eng, G, G)                  # chunk 1: overlaps b only
    tb = acquire_in_thread(b)
    tb.join(0.3)
    assert tb.is_alive() and not b.held, "an overlapping claim did not wait"
    tc = acquire_in_thread(c)
    tc.join(5)
    assert not tc.is_alive() and c.held, "a disjoint claim was blocked"
    # d overlaps only b, which is not held yet: it goes through.
    td = acquire_in_thread(d)
    td.join(5)
    assert d.held
    a.release()
    tb.join(0.3)
    assert tb.is_alive() and not b.held, "b went through while d held chunk 1"
    d.release()
    tb.join(5)
    assert b.held
    # A zero-length claim holds the chunk at its offset.
    e = Claim(eng, G + 10, 0)
    te = acquire_in_thread(e)
    te.join(0.3)
    assert te.is_alive()
    b.release()
    c.release()
    te.join(5)
    assert e.held
    e.release()
    with pytest.raises(ValueError):
        Claim(eng, size - 10, 11)


def test_500_claims_queued_on_one_chunk_all_pass(tmp_path, mkjob):
    """Hundreds of claims waiting for the same chunk (each with its own
    condition, woken by the release that blocked it) all get through, one
    at a time."""
    size = 1 * MiB
    src = make_image(tmp_path / "src.img", size, seed=15)
    job = mkjob(src, tmp_path / "dst.img", granularity=G)
    eng = job._engine
    inside = [0]
    overlap = []
    lock = threading.Lock()

    def one(i):
        with Claim(eng, (i % 7) * 100, 4096):      # all in chunk 0
            with lock:
                inside[0] += 1
                if inside[0] > 1:
                    overlap.append(i)
            time.sleep(0)
            with lock:
                inside[0] -= 1

    threads = _run_writers(500, one)
    _join(threads, 60)
    assert not overlap


def test_tracked_disk_errors_and_range(tmp_path, mkjob):
    """-errno from the C path becomes OSError with errno, path and offset;
    ranges outside [0, size) are refused; a closed handle refuses I/O."""
    size = 1 * MiB
    src = make_image(tmp_path / "src.img", size, seed=16)
    job = mkjob(src, tmp_path / "dst.img", granularity=G)
    h = job.source
    # A descriptor opened read-only: the write fails in the C path.
    fd = os.open(src, os.O_RDONLY)
    assert h._disk.attach(fd, False)
    with pytest.raises(ValueError):
        h.pwrite(b"x", size)
    with pytest.raises(ValueError):
        h.write_zeroes(-1, 10)
    with pytest.raises(ValueError):
        h.pread(2, size - 1)
    with pytest.raises(OSError) as e:
        h.pwrite(b"y" * 100, 4096)
    assert e.value.errno == errno.EBADF
    assert e.value.filename == str(src)
    assert e.value.offset == 4096
    assert e.value.operation == "write"
    assert h.pread(3, 0) == read_bytes(src, 0, 3)
    h.close()
    with pytest.raises(ValueError, match="closed"):
        h.pwrite(b"z", 0)
    with pytest.raises(ValueError, match="closed"):
        h.flush()


def test_tracked_disk_refuses_a_foreign_engine():
    with pytest.raises(TypeError):
        TrackedDisk(4096, object())


def test_set_direct_racing_a_pivot_serves_the_target_direct(tmp_path, monkeypatch):
    """set_direct() opens the O_DIRECT twin of the disk's descriptor without
    the lock: a pivot between that and the swap must not leave the twin of
    the old source in place, where aligned writes would land on the source
    instead of the target."""
    import fastmirror._core.tracked as tracked
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=3)
    dst = make_image(tmp_path / "dst.img", 1 * MiB, seed=4)
    disk = TrackedDisk(1 * MiB, None)
    assert disk.attach(os.open(src, os.O_RDWR), False)
    if tracked._open_twin(os.open(src, os.O_RDONLY)) < 0:     # (leaks two: a test)
        pytest.skip("the filesystem of %s refuses O_DIRECT" % tmp_path)
    real = tracked._open_twin

    def twin_then_pivot(fd):
        twin = real(fd)
        monkeypatch.setattr(tracked, "_open_twin", real)
        disk.close_gate()
        disk.pivot(os.open(dst, os.O_RDWR), False)       # the job's pivot, meanwhile
        disk.open_gate()
        return twin
    monkeypatch.setattr(tracked, "_open_twin", twin_then_pivot)
    disk.set_direct(True)
    import mmap
    data = os.urandom(64 * KiB)
    aligned = mmap.mmap(-1, len(data))          # page-aligned: the O_DIRECT twin takes it
    aligned[:] = data
    before = read_bytes(src, 0, len(data))
    assert disk.pwrite(aligned, 0) == len(data)
    assert disk.pread(len(data), 0) == data
    assert read_bytes(dst, 0, len(data)) == data
    assert read_bytes(src, 0, len(data)) == before
    assert disk.served_direct
    disk.close()


@pytest.mark.parametrize("call", ["set_direct", "set_activity_log"])
def test_waiting_for_requests_does_not_open_a_gate_a_job_closed(tmp_path, call):
    """set_direct() and set_activity_log() wait until no request is inside;
    a job that closes the gate meanwhile (its drain, its pivot) must find it
    still closed when they are done, or writers pass during the pivot."""
    from fastmirror._core.engine import CopyEngine
    from fastmirror._core.hbitmap import HBitmap
    size = 1 * MiB
    src = make_image(tmp_path / "src.img", size, seed=5)
    dst = make_image(tmp_path / "dst.img", size, seed=6)
    sfd, dfd = os.open(src, os.O_RDWR), os.open(dst, os.O_RDWR)
    eng = CopyEngine(HBitmap(size, G), sfd, dfd, dfd, size, 512, MiB, 1)
    disk = TrackedDisk(size, eng)
    assert disk.attach(os.open(src, os.O_RDWR), False)
    inside, go = threading.Event(), threading.Event()
    # A writer held inside the gate (in its mark's trace call).
    disk.set_trace(lambda event, offset, length: (inside.set(), go.wait(TIMEOUT)))
    threads = _run_writers(1, lambda i: disk.pwrite(b"x" * 4096, 0))
    assert inside.wait(TIMEOUT)
    if call == "set_direct":
        threads += _run_writers(1, lambda i: disk.set_direct(True))
    else:
        threads += _run_writers(1, lambda i: disk.set_activity_log(None))
    time.sleep(0.2)
    threads += _run_writers(1, lambda i: disk.close_gate())      # the job's drain
    time.sleep(0.2)
    go.set()
    _join(threads)
    try:
        assert disk.gate_is_closed
    finally:
        disk.open_gate()
        disk.set_trace(None)
        disk.close()
        os.close(sfd)
        os.close(dfd)
