"""Many threads at once: the shared state of the compiled modules under load.

The extensions declare themselves free-threading compatible
(``freethreading_compatible`` in setup.py), so on a free-threaded Python
(3.14t) nothing serialises these threads but the modules' own locks.  Under
the GIL the same tests run with a tiny switch interval, so that threads are
interleaved as often as the interpreter allows.

Two loads, run at the same time in the last test:
  * one HBitmap shared by markers (each owning a region, keeping a plain
    Python set as the model), readers that search, iterate, serialize and
    merge while the markers work;
  * several MirrorJobs on small files, each with writers through job.source,
    started, completed and checked from their own threads.
Each is checked afterwards: the bitmap against the union of the models,
every target against its source and against the writers' model.
"""

from __future__ import annotations

import os
import random
import sys
import sysconfig
import threading
import time

import pytest

from fastmirror import HBitmap, MirrorJob
from fastmirror.job.events import EventType, JobState

KiB = 1024
MiB = 1024 * KiB

FREE_THREADED = bool(sysconfig.get_config_var("Py_GIL_DISABLED"))
GIL_ENABLED = getattr(sys, "_is_gil_enabled", lambda: True)()

pytestmark = [pytest.mark.timeout(240),
              # Calls from many threads must really interleave (conftest.py).
              pytest.mark.usefixtures("fast_thread_switching")]


class Team:
    """Threads started together (behind a barrier); the first exception of
    any of them is re-raised by join()."""

    def __init__(self):
        self.targets: list[tuple[str, object]] = []
        self.errors: list[BaseException] = []
        self.stop = threading.Event()

    def add(self, name, fn, *args):
        self.targets.append((name, lambda: fn(*args)))

    def run(self, timeout: float = 180.0) -> None:
        barrier = threading.Barrier(len(self.targets))

        def wrap(fn):
            try:
                barrier.wait(timeout)
                fn()
            except BaseException as e:  # noqa: BLE001 - re-raised below
                self.errors.append(e)
                self.stop.set()
                barrier.abort()

        threads = [threading.Thread(target=wrap, args=(fn,), name="test-" + name, daemon=True)
                   for name, fn in self.targets]
        for t in threads:
            t.start()
        deadline = time.monotonic() + timeout
        for t in threads:
            t.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        self.stop.set()
        if self.errors:
            raise self.errors[0]
        assert not alive, "threads still running after %ss: %s" % (timeout, alive)


# ---------------------------------------------------------------------------
# The bitmap
# ---------------------------------------------------------------------------

G = 512                  # granularity: many chunks in a small map
MARKERS = 8
REGION_CHUNKS = 64 * 64 + 37   # each marker's region crosses level boundaries
NCHUNKS = MARKERS * REGION_CHUNKS
BM_SIZE = NCHUNKS * G - 100    # a partial last chunk


class BitmapLoad:
    """Markers and readers on one shared HBitmap."""

    def __init__(self, ops: int = 3000, seed: int = 1):
        self.bm = HBitmap(BM_SIZE, G)
        self.ops = ops
        self.seed = seed
        self.models = [set() for _ in range(MARKERS)]   # dirty chunks per marker
        self.markers_done = threading.Event()
        self.finished = 0
        self.lock = threading.Lock()
        self.reads = 0

    def add_to(self, team: Team, readers: int = 4) -> None:
        for i in range(MARKERS):
            team.add("marker-%d" % i, self.marker, i, team.stop)
        for i in range(readers):
            team.add("reader-%d" % i, self.reader, i, team.stop)

    def marker(self, i: int, stop: threading.Event) -> None:
        rng = random.Random(self.seed * 100 + i)
        lo = i * REGION_CHUNKS
        model = self.models[i]
        try:
            for _ in range(self.ops):
                if stop.is_set():
                    return
                first = lo + rng.randrange(REGION_CHUNKS)
                n = rng.randint(1, min(200, lo + REGION_CHUNKS - first))
                offset, length = first * G, min(n * G, BM_SIZE - first * G)
                op = rng.random()
                if op < 0.55:
                    # set() takes any byte range: dirty every chunk it touches
                    # (here: shave bytes off both ends, the same chunks result).
                    self.bm.set(offset + 1, max(1, length - 2))
                    model.update(range(first, first + n))
                elif op < 0.9:
                    self.bm.reset(offset, length)
                    model.difference_update(range(first, first + n))
                else:
                    got = self.bm.get(offset)
                    assert got == (first in model), "chunk %d: %s, model %s" % (
                        first, got, first in model)
        finally:
            with self.lock:
                self.finished += 1
                if self.finished == MARKERS:
                    self.markers_done.set()

    def reader(self, i: int, stop: threading.Event) -> None:
        rng = random.Random(self.seed * 1000 + i)
        while not self.markers_done.is_set() and not stop.is_set():
            kind = rng.randrange(6)
            if kind == 0:
                n = self.bm.dirty_count
                assert 0 <= n <= NCHUNKS
            elif kind == 1:
                off = rng.randrange(BM_SIZE)
                d = self.bm.next_dirty(off)
                assert d == -1 or off <= d < BM_SIZE
            elif kind == 2:
                area = self.bm.next_dirty_area(rng.randrange(BM_SIZE), max_length=64 * G)
                if area is not None:
                    off, length = area
                    assert 0 < length <= 64 * G and off + length <= BM_SIZE
            elif kind == 3:
                # A live iterator: each step sees the map as it is then, so a
                # run may start right where the previous one ended (its next
                # chunk was dirtied in between), never before.
                prev_end = 0
                for off, length in self.bm.dirty_areas():
                    assert off >= prev_end and length > 0 and off + length <= BM_SIZE
                    prev_end = off + length
            elif kind == 4:
                copy = HBitmap.from_bytes(self.bm.to_bytes())
                copy._check_invariants()
            else:
                snap = HBitmap(BM_SIZE, G)
                snap.merge(self.bm)
                snap._check_invariants()
                ext = snap.dirty_extents()
                assert ext.shape[1] == 2
            with self.lock:
                self.reads += 1

    def check(self) -> None:
        expected = set().union(*self.models)
        assert self.bm.dirty_count == len(expected)
        got = set()
        for off, length in self.bm.dirty_extents().tolist():
            got.update(range(off // G, (off + length + G - 1) // G))
        assert got == expected
        self.bm._check_invariants()


def test_bitmap_many_threads():
    load = BitmapLoad()
    team = Team()
    load.add_to(team)
    team.run()
    load.check()
    assert load.reads > 0


# ---------------------------------------------------------------------------
# Mirror jobs
# ---------------------------------------------------------------------------

class JobLoad:
    """One MirrorJob on small files with writers through job.source, each
    writer in its own region so that the final content is known."""

    def __init__(self, tmp_path, index: int, size: int = 4 * MiB + 3 * KiB,
                 writers: int = 3, granularity: int = 64 * KiB):
        self.index = index
        self.size = size
        self.writers = writers
        self.src = str(tmp_path / ("source-%d.img" % index))
        self.dst = str(tmp_path / ("target-%d.img" % index))
        rng = random.Random(index)
        base = bytearray(rng.randbytes(size))
        base[size // 4:size // 4 + 512 * KiB] = bytes(512 * KiB)   # zero data
        hole = (size // 2 - 256 * KiB, size // 2)                     # a real hole
        base[hole[0]:hole[1]] = bytes(hole[1] - hole[0])
        self.base = bytes(base)
        with open(self.src, "wb") as f:
            f.truncate(size)
            f.write(self.base[:hole[0]])
            f.seek(hole[1])
            f.write(self.base[hole[1]:])
        # The copy modes in turn: background copies only; write-blocking
        # writes reach both sides under claims that keep copies out of the
        # way; auto may switch between them.
        self.copy_mode = ("write-blocking", "background", "auto")[index % 3]
        self.job = MirrorJob(self.src, self.dst, granularity=granularity,
                             buf_size=4 * granularity, copy_mode=self.copy_mode)
        self.log: list[list[tuple[int, bytes]]] = [[] for _ in range(writers)]
        self.final = None

    def _write(self, w: int, stop: threading.Event, phase2: threading.Event) -> None:
        """Up to PHASE1_WRITES writes while the job copies (fewer if it becomes
        ready first: the write rate is bounded so that it converges), then
        PHASE2_WRITES more once it is READY (mirrored as they come)."""
        rng = random.Random(self.index * 100 + w)
        span = self.size // self.writers // 512 * 512
        lo, hi = w * span, (w + 1) * span
        handle = self.job.source
        budget = self.PHASE1_WRITES
        for phase in (1, 2):
            if phase == 2:
                while not phase2.wait(0.05):
                    if stop.is_set():
                        return
                budget = self.PHASE2_WRITES
            for _ in range(budget):
                if stop.is_set() or (phase == 1 and phase2.is_set()):
                    break
                length = rng.randrange(512, 32 * KiB + 1, 512)
                off = lo + rng.randrange(0, (hi - lo - length) // 512 + 1) * 512
                data = rng.randbytes(length) if rng.random() < 0.8 else bytes(length)
                assert handle.pwrite(data, off) == length
                self.log[w].append((off, data))
                if rng.random() < 0.2:
                    time.sleep(0.0005)

    PHASE1_WRITES = 400
    PHASE2_WRITES = 150

    def drive(self, stop: threading.Event) -> None:
        job = self.job
        phase2 = threading.Event()
        errors: list[BaseException] = []

        def writer(w: int) -> None:
            try:
                self._write(w, stop, phase2)
            except BaseException as e:  # noqa: BLE001 - re-raised below
                errors.append(e)
                stop.set()

        writers = [threading.Thread(target=writer, args=(w,), daemon=True,
                                    name="test-job%d-writer%d" % (self.index, w))
                   for w in range(self.writers)]
        job.start()
        try:
            for t in writers:
                t.start()
            assert job.wait_ready(120), "job %d never became ready" % self.index
            status = job.status()
            assert status.ready and 0 <= status.dirty_bytes <= self.size
            phase2.set()      # writes while READY: marked and copied live
        finally:
            phase2.set()
            for t in writers:
                t.join(120)
        assert not [t.name for t in writers if t.is_alive()]
        if errors:
            raise errors[0]
        job.complete()
        self.final = job.wait(120)
        assert self.final is not None, "job %d did not conclude" % self.index
        assert self.final.type == EventType.COMPLETED, self.final
        assert job.state == JobState.CONCLUDED
        assert job.status().dirty_bytes == 0
        assert job._bitmap.dirty_count == 0

    def model(self) -> bytes:
        buf = bytearray(self.base)
        for log in self.log:
            for off, data in log:
                buf[off:off + len(data)] = data
        return bytes(buf)

    def check(self) -> None:
        with open(self.src, "rb") as f:
            src = f.read()
        with open(self.dst, "rb") as f:
            dst = f.read()
        assert len(dst) == self.size
        model = self.model()
        assert src == model, "job %d (%s): the source lost a write" % (self.index, self.copy_mode)
        if dst != src:
            first = next(i for i in range(self.size) if dst[i] != src[i])
            pytest.fail("job %d (%s): target differs from source at offset %d"
                        % (self.index, self.copy_mode, first))
        assert sum(len(log) for log in self.log) > 0, "job %d: no write was made" % self.index

    def close(self) -> None:
        try:
            self.job.close()
        except Exception:  # noqa: BLE001 - teardown goes on
            pass


@pytest.fixture
def jobs(tmp_path):
    made: list[JobLoad] = []

    def make(n: int, **kw) -> list[JobLoad]:
        for _ in range(n):
            made.append(JobLoad(tmp_path, len(made), **kw))
        return made[-n:]

    yield make
    for load in made:
        load.close()


def test_mirror_jobs_many_threads(jobs):
    loads = jobs(4)
    team = Team()
    for load in loads:
        team.add("driver-%d" % load.index, load.drive, team.stop)
    team.run()
    for load in loads:
        load.check()


def test_bitmap_and_jobs_at_once(jobs):
    """Everything together: the bitmap load and the jobs share the process,
    so the bitmap's lock, the engines' locks and the handles' conditions are
    all contended at the same time."""
    bitmap = BitmapLoad(ops=2000, seed=7)
    loads = jobs(3, size=2 * MiB + 512, writers=2)
    team = Team()
    bitmap.add_to(team, readers=2)
    for load in loads:
        team.add("driver-%d" % load.index, load.drive, team.stop)
    team.run()
    bitmap.check()
    for load in loads:
        load.check()


def test_reports_threading_mode():
    """Not a check: says in the test log which mode ran (-rA shows it)."""
    mode = "free-threaded, GIL disabled" if FREE_THREADED and not GIL_ENABLED else (
        "free-threaded build, GIL re-enabled" if FREE_THREADED else "GIL")
    print("threading mode: %s (Python %s)" % (mode, sys.version.split()[0]))
    if FREE_THREADED:
        # Importing the extensions must not have switched the GIL back on:
        # that is what freethreading_compatible declares.
        import fastmirror._core.engine  # noqa: F401
        import fastmirror._core.hbitmap  # noqa: F401
        import fastmirror._core.blockio  # noqa: F401
        assert not sys._is_gil_enabled() or os.environ.get("PYTHON_GIL") == "1"
