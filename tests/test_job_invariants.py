"""One test (or a few) per invariant of docs/design.md, section "Invariants".

1. clear before copy          test_inv1_*
2. mark after write           test_inv2_*
3. one copy of a chunk        test_inv3_*
4. source never written,
   target only in [0, len)    test_inv4_*
5. holes are real zeros       test_inv5_*
6. COMPLETED means consistent test_inv6_*
7. bad input refused          test_inv7_*

Tracepoint listeners run in the copy workers, where an exception would only be
logged: they record what they see and the test asserts afterwards.
"""

from __future__ import annotations

import os
import random
import subprocess
import threading

import pytest

from fastmirror import EventType, JobState, MirrorJob, trace
from fastmirror._core.tracked import CLAIM_HELD, CLAIM_WAIT, MARK

from helpers import (KiB, MiB, Writers, allocated_bytes, assert_all_bytes,
                     assert_qemu_equal, assert_same, make_image, phase1_then_phase2,
                     read_bytes, require, require_root, sha256, write_bytes)

# Every test building a job runs once per I/O engine (conftest.py).
IO_ENGINES = ("io_uring", "threads")

G = 64 * KiB
TIMEOUT = 60          # generous: a shared 2-core machine; never a timing assertion


def run_to_completion(job, writers=None):
    """Start (if needed), wait for READY, stop writers, complete, wait."""
    if job.state == JobState.CREATED:
        job.start()
    assert job.wait_ready(TIMEOUT), "job never became ready: %s" % (job.status(),)
    if writers is not None:
        writers.stop()
    job.complete()
    final = job.wait(TIMEOUT)
    assert final is not None, "job did not finish"
    assert final.type == EventType.COMPLETED, final
    return final


# ---------------------------------------------------------------------------
# 1. Clear before copy
# ---------------------------------------------------------------------------

def test_inv1_bits_are_clean_when_the_copy_starts(tmp_path, mkjob):
    """At mirror_one_iteration (after the pick, before the source is read)
    every chunk of the extent is already clean; a write landing then (through
    job.source, from inside the listener) dirties it again and is not lost."""
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=1)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G)
    lock = threading.Lock()
    seen = []          # (offset, end, [dirty bit per chunk])
    rewrites = []      # (offset, dirty right after the write)
    state = {"stop": False}
    rng = random.Random(11)

    def on_iteration(j, sector_num, nb_sectors):
        off, end = sector_num * 512, min(size, (sector_num + nb_sectors) * 512)
        bits = [j._bitmap.get(o) for o in range(off, end, G)]
        with lock:
            seen.append((off, end, bits))
            if state["stop"] or len(rewrites) >= 8 or j.state != JobState.RUNNING:
                return
            length = rng.randrange(512, 8 * KiB + 1, 512)
            w_off = off + rng.randrange(0, (end - off - length) // 512 + 1) * 512
            data = rng.randbytes(length)
            # Under the lock: the test stops these writes before complete().
            j.source.pwrite(data, w_off)
            rewrites.append((w_off, j._bitmap.get(w_off)))

    trace.connect("mirror_one_iteration", on_iteration)
    try:
        job.start()
        assert job.wait_ready(TIMEOUT)
        with lock:
            state["stop"] = True
    finally:
        trace.disconnect("mirror_one_iteration", on_iteration)
    run_to_completion(job)

    assert seen, "mirror_one_iteration never fired"
    dirty_at_start = [(off, bits) for off, _, bits in seen if any(bits)]
    assert not dirty_at_start, "chunks still dirty when their copy began: %s" % dirty_at_start[:5]
    covered = set()
    for off, end, _ in seen:
        covered.update(range(off, end, G))
    assert covered == set(range(0, size, G)), "not every chunk was copied"
    assert len(rewrites) == 8, "the listener made %d writes" % len(rewrites)
    lost = [off for off, dirty in rewrites if not dirty]
    assert not lost, "writes during a copy did not re-dirty their chunk: %s" % lost
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# 2. Mark after write
# ---------------------------------------------------------------------------

def test_inv2_job_source_marks_after_the_write_reached_the_source(tmp_path, mkjob):
    """When job.source marks a range dirty, the new data is already in the
    source file (pwrite, write_zeroes, discard), before and during the job."""
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, seed=2)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G)
    handle = job.source
    expected = {}
    checks = []

    def spy(event, offset, length):
        if event != MARK:
            return
        want = expected["data"]
        got = read_bytes(src, offset, length)
        checks.append((expected["op"], offset, length, got == want[:length]))

    handle.set_trace(spy)
    rng = random.Random(3)

    def do(op, offset, length):
        if op == "pwrite":
            data = rng.randbytes(length)
            expected.update(op=op, data=data)
            handle.pwrite(data, offset)
        else:
            expected.update(op=op, data=bytes(length))
            getattr(handle, op)(offset, length)

    do("pwrite", 100 * KiB, 12 * KiB)        # before start: CREATED
    job.start()
    do("pwrite", 1 * MiB + 512, 70 * KiB)
    assert job.wait_ready(TIMEOUT)
    do("pwrite", 3 * MiB, 64 * KiB)
    do("write_zeroes", 2 * MiB, 128 * KiB)
    do("discard", 2 * MiB + 256 * KiB, 64 * KiB)
    run_to_completion(job)

    early = [c for c in checks if not c[3]]
    assert not early, "marked before the data reached the source: %s" % early
    assert [c[0] for c in checks] == ["pwrite", "pwrite", "pwrite", "write_zeroes", "discard"]
    assert_same(src, dst)
    assert read_bytes(dst, 2 * MiB, 128 * KiB) == bytes(128 * KiB)


def test_inv2_write_while_a_chunk_is_in_flight_is_not_lost(tmp_path, mkjob):
    """mirror_iteration_done fires after the copy wrote the target but while the
    extent is still in flight: a write to the source then must be copied
    again, not swallowed by the end of the copy."""
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=4)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G)
    lock = threading.Lock()
    writes = []
    state = {"stop": False}
    rng = random.Random(5)

    def on_done(j, offset, nbytes, ret):
        with lock:
            if state["stop"] or len(writes) >= 16 or ret != 0:
                return
            length = min(nbytes, rng.randrange(512, 32 * KiB + 1, 512))
            w_off = offset + rng.randrange(0, (nbytes - length) // 512 + 1) * 512
            j.source.pwrite(rng.randbytes(length), w_off)
            writes.append((w_off, length, j._bitmap.get(w_off)))

    trace.connect("mirror_iteration_done", on_done)
    try:
        job.start()
        assert job.wait_ready(TIMEOUT)
        with lock:
            state["stop"] = True
    finally:
        trace.disconnect("mirror_iteration_done", on_done)
    run_to_completion(job)

    # One write per copy of the bulk (8 extents of 1 MiB) at least; each
    # makes a recopy, which writes again, up to 16.
    assert len(writes) >= 8, writes
    for w_off, length, _ in writes:
        assert read_bytes(dst, w_off, length) == read_bytes(src, w_off, length), \
            "write at %d during its chunk's copy was lost" % w_off
    assert all(dirty for _, _, dirty in writes), writes
    assert len(writes) == 16, "the writes made no recopy"
    assert_same(src, dst)


def test_inv2_mark_dirty_after_an_outside_write(tmp_path, mkjob):
    """Someone else writes the source (os.pwrite) and calls job.mark_dirty
    afterwards, in phase 1 and in phase 2: the target gets it."""
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=6)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, speed=256 * KiB)
    rng = random.Random(7)
    job.start()
    assert job.state == JobState.RUNNING
    for _ in range(10):                               # phase 1 (throttled)
        off, data = rng.randrange(0, size - 40 * KiB), rng.randbytes(40 * KiB)
        write_bytes(src, off, data)
        job.mark_dirty(off, len(data))
    assert not job.status().ready
    job.set_speed(0)
    assert job.wait_ready(TIMEOUT)
    for _ in range(10):                               # phase 2
        off, data = rng.randrange(0, size - 40 * KiB), rng.randbytes(40 * KiB)
        write_bytes(src, off, data)
        job.mark_dirty(off, len(data))
    run_to_completion(job)
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# 3. One copy of a chunk in flight
# ---------------------------------------------------------------------------

class _FlightRecorder:
    """Records every copy (mirror_one_iteration .. mirror_iteration_done) and,
    in write-blocking mode, every claim of a write that goes to both sides,
    as intervals on one logical clock, in chunks."""

    def __init__(self, job, granularity):
        self.job = job
        self.g = granularity
        self.lock = threading.Lock()
        self.clock = 0
        # first chunk -> (tick, first chunk, end chunk).  Keyed by the copy, not
        # the thread: one io_uring thread has many copies in flight.
        self.open_copies = {}
        self.open_claims = {}     # first chunk -> (tick, first, end)
        self.copies = []          # (start, end tick, first, end chunk)
        self.claims = []
        self.contended = 0        # claims asked for while an overlapping copy ran
        self.problems = []

    def _tick(self):
        self.clock += 1
        return self.clock

    def _chunks(self, off, length):
        return off // self.g, max(off // self.g + 1, -(-(off + length) // self.g))

    def on_iteration(self, j, sector_num, nb_sectors):
        first, end = self._chunks(sector_num * 512, nb_sectors * 512)
        with self.lock:
            if first in self.open_copies:
                self.problems.append("a copy at chunk %d started inside another" % first)
            self.open_copies[first] = (self._tick(), first, end)
        # Widen the window in which another copy (or a write to both sides)
        # could wrongly overlap this one; the GIL is released while waiting.
        threading.Event().wait(0.0005)

    def on_done(self, j, offset, nbytes, ret):
        with self.lock:
            start = self.open_copies.pop(offset // self.g, None)
            if start is None:
                self.problems.append("iteration_done at %d without one_iteration" % offset)
                return
            self.copies.append((start[0], self._tick(), start[1], start[2]))

    def on_claim(self, event, off, length):
        """job.source's trace: overlapping claims cannot be held at once, so
        the first chunk names an open claim."""
        if event == MARK:
            return
        first, end = self._chunks(off, length)
        with self.lock:
            if event == CLAIM_WAIT:
                if any(f < end and first < e for _, f, e in self.open_copies.values()):
                    self.contended += 1
            elif event == CLAIM_HELD:
                if first in self.open_claims:
                    self.problems.append("two claims of chunk %d held at once" % first)
                self.open_claims[first] = (self._tick(), first, end)
            else:
                s = self.open_claims.pop(first)
                self.claims.append((s[0], self._tick(), s[1], s[2]))

    def overlaps(self):
        """Pairs of intervals overlapping both in time and in chunks (a sweep
        over start times); and how many intervals started while another was
        open."""
        tagged = sorted([(s, e, f, c, "copy") for s, e, f, c in self.copies] +
                        [(s, e, f, c, "claim") for s, e, f, c in self.claims])
        violations, concurrent, active = [], 0, []
        for iv in tagged:
            active = [a for a in active if a[1] > iv[0]]
            if active:
                concurrent += 1
            for a in active:
                if a[2] < iv[3] and iv[2] < a[3]:
                    violations.append((a, iv))
            active.append(iv)
        return violations, concurrent


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_inv3_two_copies_of_one_chunk_never_overlap(tmp_path, mkjob, copy_mode):
    """Four writers hammer the source through job.source in both phases;
    every copy is recorded from mirror_one_iteration to mirror_iteration_done
    on a logical clock.  No two copies of overlapping chunks may overlap in
    time; in write-blocking mode neither may a copy and a write that goes to
    both sides, nor two such writes.  The test checks it really saw
    concurrent copies, and recopies (background) or writes that had to wait
    for a copy (write-blocking)."""
    size = 16 * MiB
    # Background: a small hot area, recopied again and again.  Write-blocking:
    # writes never dirty, so they go everywhere to meet the bulk copy.
    hot = 2 * MiB if copy_mode == "background" else size
    src = make_image(tmp_path / "src.img", size, seed=8)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G, speed=4 * MiB, copy_mode=copy_mode)
    rec = _FlightRecorder(job, G)
    trace.connect("mirror_one_iteration", rec.on_iteration)
    trace.connect("mirror_iteration_done", rec.on_done)
    writers = Writers(job.source, n=4, hi=hot, seed=9, job=job, min_len=512,
                      max_len=64 * KiB)
    job.source.set_trace(rec.on_claim)
    try:
        phase1_then_phase2(job, writers, 300, timeout=TIMEOUT)
        writers.stop()
    finally:
        job.source.set_trace(None)
        writers.stop_event.set()
        trace.disconnect("mirror_one_iteration", rec.on_iteration)
        trace.disconnect("mirror_iteration_done", rec.on_done)
    run_to_completion(job)

    assert not rec.problems, rec.problems[:5]
    assert writers.writes_in("running") > 0 and writers.writes_in("ready") > 0
    violations, concurrent = rec.overlaps()
    assert not violations, "overlapping copies of the same chunks: %s" % violations[:5]
    # The test means something only if copies did run concurrently and the
    # race it guards against had a chance to happen.
    assert concurrent > 0, "no two copies were ever in flight together"
    if copy_mode == "background":
        # Recopies: hot chunks copied again while writes kept dirtying them.
        # (How many copies that takes depends on the engine: the io_uring
        # driver picks the chunks dirtied meanwhile as one run.)
        per_chunk = [sum(1 for _, _, f, e in rec.copies if f <= c < e) for c in range(hot // G)]
        recopied = sum(1 for n in per_chunk if n >= 2)
        assert recopied >= len(per_chunk) // 2, \
            "the hot area was not recopied: copies per chunk %s" % per_chunk
    else:
        assert len(rec.claims) > 0, "no write went to both sides"
        assert rec.contended > 0, "no write ever met a copy of its chunks in flight"
    assert_same(src, dst)


# ---------------------------------------------------------------------------
# 4. The source is never written; the target only in [0, len)
# ---------------------------------------------------------------------------

def test_inv4_source_unchanged_by_the_job(tmp_path, mkjob):
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=12, holes=[(2 * MiB, 1 * MiB)])
    dst = make_image(tmp_path / "dst.img", size, pattern=0xAB)
    before = os.stat(src)
    digest = sha256(src)
    job = mkjob(src, dst, granularity=G)
    run_to_completion(job)
    job.close()
    after = os.stat(src)
    assert sha256(src) == digest
    assert after.st_mtime_ns == before.st_mtime_ns, "the source's mtime changed"
    assert after.st_ctime_ns == before.st_ctime_ns, "the source's ctime changed"
    assert after.st_size == before.st_size
    assert after.st_blocks == before.st_blocks, "the source's allocation changed"
    assert_same(src, dst)


def test_inv4_an_immutable_source_is_enough(tmp_path, mkjob):
    """The job never opens the source for writing: an immutable source file
    (chattr +i, which even root cannot open for writing) mirrors fine."""
    require_root()
    chattr = require("chattr")
    size = 4 * MiB
    src = make_image(tmp_path / "src.img", size, seed=13)
    dst = tmp_path / "dst.img"
    r = subprocess.run([chattr, "+i", str(src)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("chattr +i not supported here: %s" % r.stderr.strip())
    try:
        with pytest.raises(PermissionError):
            os.open(src, os.O_WRONLY)          # the premise of the test
        job = mkjob(src, dst, granularity=G)
        run_to_completion(job)
        assert_same(src, dst)
    finally:
        subprocess.run([chattr, "-i", str(src)], check=True)


@pytest.mark.parametrize("tail", [0, 1000, 1536, 4096 + 7])
@pytest.mark.parametrize("layout", ["random", "holes"])
def test_inv4_target_bigger_than_source_written_only_in_len(tmp_path, mkjob, tail, layout):
    """A larger target is accepted; everything past the source's size stays as
    it was (0xAB), whatever the source's tail and holes, with writers."""
    size = 6 * MiB + tail
    holes = [] if layout == "random" else [(0, 192 * KiB), (1 * MiB + 4 * KiB, 1 * MiB),
                                          (5 * MiB, size - 5 * MiB)]
    src = make_image(tmp_path / "src.img", size, seed=14, holes=holes)
    extra = 3 * MiB + 512
    dst = make_image(tmp_path / "dst.img", size + extra, pattern=0xAB)
    job = mkjob(src, dst, granularity=G)
    job.start()
    assert job.wait_ready(TIMEOUT)
    # Writes at the very end of the source, in phase 2.
    job.source.pwrite(b"\x5a" * 700, size - 700)
    job.source.pwrite(b"\x5b" * 3, size - 3)
    run_to_completion(job)
    job.close()
    assert os.path.getsize(dst) == size + extra, "the target's size changed"
    assert_all_bytes(dst, size, extra, 0xAB)
    assert_same(src, dst, size)
    assert read_bytes(dst, size - 3, 3) == b"\x5b" * 3


# ---------------------------------------------------------------------------
# 5. Holes are real zeros
# ---------------------------------------------------------------------------

HOLES = [
    (0, 1 * MiB),                          # at the start, chunk aligned
    (2 * MiB + 8 * KiB, 1 * MiB + 16 * KiB),  # not chunk aligned: partial chunks
    (6 * MiB, 4 * KiB),                    # one filesystem block
    (12 * MiB, 4 * MiB),                   # the whole tail
]


@pytest.mark.parametrize("detect_zeroes,unmap", [(True, True), (False, False), (True, False)])
def test_inv5_holes_read_zero_on_a_garbage_target(tmp_path, mkjob, detect_zeroes, unmap):
    """A sparse source onto an existing target full of 0xAB: the target's
    content is unknown, so the holes must be made zero, not skipped.  An
    allocated all-zero range of the source must read zero too."""
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, seed=15, holes=HOLES)
    write_bytes(src, 8 * MiB, bytes(1 * MiB))              # allocated zeros
    dst = make_image(tmp_path / "dst.img", size, pattern=0xAB)
    job = mkjob(src, dst, granularity=G, detect_zeroes=detect_zeroes, unmap=unmap)
    run_to_completion(job)
    for off, length in HOLES + [(8 * MiB, 1 * MiB)]:
        assert_all_bytes(dst, off, length, 0)
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


def test_inv5_fully_sparse_source_zeroes_the_whole_target(tmp_path, mkjob):
    size = 8 * MiB + 512
    src = make_image(tmp_path / "src.img", size, pattern="sparse")
    dst = make_image(tmp_path / "dst.img", size, pattern=0xCD)
    job = mkjob(src, dst, granularity=G)
    run_to_completion(job)
    assert_all_bytes(dst, 0, size, 0)


def test_inv5_fresh_target_stays_sparse(tmp_path, mkjob):
    """A target the job creates reads zeros: holes need no writing, and the
    target ends up about as sparse as the source."""
    size = 32 * MiB
    holes = [(0, 4 * MiB), (5 * MiB, 7 * MiB), (13 * MiB, 10 * MiB), (24 * MiB, 8 * MiB)]
    src = make_image(tmp_path / "src.img", size, seed=16, holes=holes)
    dst = tmp_path / "dst.img"
    job = mkjob(src, dst, granularity=G)
    run_to_completion(job)
    assert_same(src, dst)
    data = allocated_bytes(src)
    assert data <= 3 * MiB, "the source image is not sparse here (%d)" % data
    assert allocated_bytes(dst) <= data + 1 * MiB, \
        "target allocated %d bytes for %d bytes of source data" % (allocated_bytes(dst), data)


# ---------------------------------------------------------------------------
# 6. COMPLETED means consistent
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("seed,copy_mode", [(21, "background"), (22, "write-blocking"),
                                            (23, "auto")])
def test_inv6_completed_target_equals_source(tmp_path, mkjob, seed, copy_mode):
    """Writers in both phases; after COMPLETED the target equals the source
    (the writers stopped before complete(), so "some instant" is now)."""
    size = 16 * MiB
    src = make_image(tmp_path / "src.img", size, seed=seed,
                     holes=[(4 * MiB, 2 * MiB), (15 * MiB, 1 * MiB)])
    dst = make_image(tmp_path / "dst.img", size, pattern=0xAB)
    # Throttled so that phase 1 lasts while the writers run.
    job = mkjob(src, dst, granularity=G, speed=1 * MiB, copy_mode=copy_mode)
    writers = Writers(job.source, n=4, seed=seed, job=job)
    try:
        phase1_then_phase2(job, writers, 200, timeout=TIMEOUT)
    finally:
        writers.stop_event.set()
    final = run_to_completion(job, writers)
    assert final.offset == final.len == size
    st = job.status()
    assert st.offset == size and st.dirty_bytes == 0 and st.io_status == "ok"
    job.close()
    assert_same(src, dst)
    assert_qemu_equal(src, dst)


# ---------------------------------------------------------------------------
# 7. Bad input: a clear error, nothing written
# ---------------------------------------------------------------------------

def _snapshot(path):
    if not os.path.lexists(path):
        return None
    if os.path.isdir(path) or not os.path.isfile(path):
        return ("other", os.stat(path).st_mode)
    st = os.stat(path)
    return (sha256(path), st.st_size, st.st_mtime_ns, st.st_blocks)


BAD_INPUT = {
    # name: (setup(tmp) -> (source, target), kwargs, exception, words in message)
    "target smaller": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                  make_image(t / "d", 4 * MiB - 512, pattern=0xCD)),
                       {}, ValueError, ["smaller"]),
    "same file": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "s"),
                  {}, ValueError, ["same"]),
    "same file via symlink": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                         _symlink(t / "s", t / "d")),
                              {}, ValueError, ["same"]),
    "same file via hard link": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                           _hardlink(t / "s", t / "d")),
                                {}, ValueError, ["same"]),
    "same file via relative path": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                               t / "x" / ".." / "s"),
                                    {}, ValueError, ["same"]),
    "missing source": (lambda t: (t / "nope", t / "d"), {}, FileNotFoundError, ["nope"]),
    "missing source, existing target": (
        lambda t: (t / "nope", make_image(t / "d", MiB, pattern=0xCD)),
        {}, FileNotFoundError, ["nope"]),
    "target in a missing folder": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                              t / "no" / "such" / "d"),
                                   {}, FileNotFoundError, ["folder"]),
    "granularity not a power of two": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                                       {"granularity": 3 * 65536}, ValueError, ["power of two"]),
    "granularity 1000": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                         {"granularity": 1000}, ValueError, ["granularity"]),
    "granularity below 512": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                              {"granularity": 256}, ValueError, ["granularity", "512"]),
    "granularity zero": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                         {"granularity": 0}, ValueError, ["granularity"]),
    "granularity not an int": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                               {"granularity": 65536.0}, ValueError, ["granularity"]),
    "negative speed": (lambda t: (make_image(t / "s", 4 * MiB, seed=1),
                                  make_image(t / "d", 4 * MiB, pattern=0xCD)),
                       {"speed": -1}, ValueError, ["speed"]),
    "bad sync mode": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                      {"sync": "top"}, ValueError, ["sync"]),
    "bad error policy": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), t / "d"),
                         {"on_target_error": "retry"}, ValueError, ["on_target_error"]),
    "source is a directory": (lambda t: (_mkdir(t / "sd"), t / "d"),
                              {}, IsADirectoryError, ["directory"]),
    "source is /dev/null": (lambda t: ("/dev/null", t / "d"),
                            {}, ValueError, ["character device"]),
    "target is a directory": (lambda t: (make_image(t / "s", 4 * MiB, seed=1), _mkdir(t / "dd")),
                              {}, IsADirectoryError, ["directory"]),
}


def _symlink(target, link):
    os.symlink(target, link)
    return link


def _hardlink(target, link):
    os.link(target, link)
    return link


def _mkdir(path):
    os.mkdir(path)
    return path


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_inv7_bad_input_refused_nothing_written(tmp_path, case):
    setup, kwargs, exc, words = BAD_INPUT[case]
    os.mkdir(tmp_path / "x")
    source, target = setup(tmp_path)
    src_before = _snapshot(source) if source != "/dev/null" else None
    dst_before = _snapshot(target)
    entries_before = sorted(os.listdir(tmp_path))
    with pytest.raises(exc) as info:
        MirrorJob(source, target, **kwargs)
    msg = str(info.value).lower()
    for w in words:
        assert w.lower() in msg, "message %r does not say %r" % (str(info.value), w)
    assert _snapshot(target) == dst_before, "the target was touched"
    if src_before is not None:
        assert _snapshot(source) == src_before, "the source was touched"
    assert sorted(os.listdir(tmp_path)) == entries_before, "a file was created or removed"


def test_inv7_read_only_target_refused(tmp_path):
    """A target that cannot be written (immutable: even root cannot open it
    for writing) is refused at construction, unchanged."""
    require_root()
    chattr = require("chattr")
    src = make_image(tmp_path / "s", 4 * MiB, seed=1)
    dst = make_image(tmp_path / "d", 4 * MiB, pattern=0xCD)
    r = subprocess.run([chattr, "+i", str(dst)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip("chattr +i not supported here: %s" % r.stderr.strip())
    try:
        before = _snapshot(dst)
        with pytest.raises(PermissionError) as info:
            MirrorJob(src, dst)
        assert str(dst) in str(info.value)
        assert _snapshot(dst) == before
    finally:
        subprocess.run([chattr, "-i", str(dst)], check=True)


def test_inv7_refused_job_leaves_no_descriptor(tmp_path):
    """A refused construction closes whatever it opened."""
    src = make_image(tmp_path / "s", 4 * MiB, seed=1)
    dst = make_image(tmp_path / "d", 2 * MiB, pattern=0xCD)
    fds_before = set(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(ValueError):
            MirrorJob(src, dst)
    assert set(os.listdir("/proc/self/fd")) <= fds_before
