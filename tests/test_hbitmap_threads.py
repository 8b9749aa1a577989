"""HBitmap under concurrent use: threads marking while another walks and
resets, as the copy engine does; many threads on shared words; and two
bitmaps merged into each other from two threads (lock order).

Every thread is joined with a timeout, so a deadlock fails the test instead of
hanging it.  Nothing here relies on the GIL: bookkeeping shared between
threads is behind a threading.Lock, so the tests mean the same under
free-threaded Python.
"""

import random
import threading
import time

import pytest

from fastmirror import HBitmap

JOIN_TIMEOUT = 60


# Calls from many threads must really interleave (conftest.py).
pytestmark = pytest.mark.usefixtures("fast_thread_switching")


def run_threads(targets, timeout=JOIN_TIMEOUT):
    """Start one thread per callable, join them all with a timeout and re-raise
    the first exception any of them raised."""
    errors = []

    def wrap(fn):
        def run():
            try:
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(fn), daemon=True) for fn in targets]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threads if t.is_alive()]
    assert not alive, f"{len(alive)} threads still running: deadlock?"
    if errors:
        raise errors[0]


class Clock:
    """A global sequence number, to order events across threads."""

    def __init__(self):
        self._lock = threading.Lock()
        self._now = 0

    def tick(self):
        with self._lock:
            self._now += 1
            return self._now


@pytest.mark.timeout(120)
@pytest.mark.parametrize("seed", [1, 2])
def test_markers_and_engine_like_walker(seed):
    g = 512
    n = 20000
    size = n * g - 100
    bm = HBitmap(size, g)
    clock = Clock()
    book = threading.Lock()
    last_set_start = [0] * n    # seq taken *before* the latest set() of a chunk began
    last_reset_end = [0] * n    # seq taken *after* the latest reset() of it returned
    ever_set = [False] * n
    markers_done = threading.Event()
    nmarkers = 4
    walked = []

    def marker(k):
        rng = random.Random(seed * 100 + k)
        region = n // nmarkers
        for i in range(2500):
            if rng.random() < 0.5:   # disjoint: inside this marker's own region
                first = k * region + rng.randrange(region - 10)
            else:                    # overlapping: anywhere
                first = rng.randrange(n - 10)
            length = rng.randint(1, 10 * g)
            offset = min(first * g + rng.randrange(g), size - length)
            chunks = range(offset // g, (offset + length - 1) // g + 1)
            with book:
                for c in chunks:
                    ever_set[c] = True
            start = clock.tick()
            bm.set(offset, length)
            with book:
                for c in chunks:
                    last_set_start[c] = max(last_set_start[c], start)
            if i % 64 == 0:
                time.sleep(0)

    def walker():
        rng = random.Random(seed)
        pos = 0
        idle_passes = 0
        while True:
            done = markers_done.is_set()
            area = bm.next_dirty_area(pos, max_length=rng.choice([None, g, 7 * g]))
            if area is None:
                if pos == 0:
                    idle_passes += 1
                    if done and idle_passes > 1:
                        return
                pos = 0
                continue
            start, length = area
            assert start % g == 0 and 0 < length and start + length <= size
            assert length <= size
            bm.reset(start, length)
            end = clock.tick()
            first, stop = start // g, -(-(start + length) // g)
            with book:
                for c in range(first, stop):
                    last_reset_end[c] = end
            walked.append(area)
            pos = start + length if start + length < size else 0
            # Stop a while after the markers, leaving what they set at the end.
            if done and rng.random() < 0.01:
                return

    def markers():
        try:
            run_threads([lambda k=k: marker(k) for k in range(nmarkers)])
        finally:
            markers_done.set()

    run_threads([markers, walker])

    bm._check_invariants()
    assert walked, "the walker never found anything"
    for c in range(n):
        dirty = bm.get(c * g)
        if last_set_start[c] > last_reset_end[c]:
            # Set after the walker's last reset of it had returned: must survive.
            assert dirty, f"chunk {c} lost a mark"
        if not ever_set[c]:
            assert not dirty, f"chunk {c} dirty but never set"
    assert bm.dirty_count == sum(bm.get(c * g) for c in range(n))


@pytest.mark.timeout(120)
def test_many_threads_on_shared_words():
    """Each worker owns a region whose edges fall inside shared 64-bit words
    and keeps a shadow of it: whatever the others do, its own view must be
    exact.  Other threads read counts, serialize, check the invariants and
    walk; one works on a region big enough to take the GIL-free path."""
    g = 512
    nworkers = 6
    region = 1000                    # chunks; not a multiple of 64
    big_first = nworkers * region
    big = (1 << 18) + 3000           # > BIG_RANGE_CHUNKS: released-GIL path
    n = big_first + big + 37
    size = n * g - 1
    bm = HBitmap(size, g)
    stop = threading.Event()

    def worker(k):
        rng = random.Random(k)
        first_chunk = k * region
        shadow = bytearray(region)
        for _ in range(3000):
            a = rng.randrange(region)
            b = min(region, a + rng.choice([1, 2, 5, 64, 200]))
            if rng.random() < 0.55:
                bm.set((first_chunk + a) * g + rng.randrange(g), (b - a - 1) * g + 1)
                shadow[a:b] = b"\x01" * (b - a)
            else:
                bm.reset((first_chunk + a) * g, (b - a) * g)
                shadow[a:b] = bytes(b - a)
            c = rng.randrange(region)
            assert bm.get((first_chunk + c) * g) == bool(shadow[c])
            lo, hi = (first_chunk + a) * g, (first_chunk + region) * g
            want = shadow.find(1, a)
            assert bm.next_dirty(lo, hi) == (-1 if want < 0 else (first_chunk + want) * g)
            want = shadow.find(0, a)
            assert bm.next_clean(lo, hi) == (-1 if want < 0 else (first_chunk + want) * g)
        for c in range(region):
            assert bm.get((first_chunk + c) * g) == bool(shadow[c]), (k, c)

    def big_worker():
        lo = big_first * g
        for _ in range(40):
            bm.set(lo, big * g)
            assert bm.next_clean(lo, lo + big * g) == -1
            bm.reset(lo, big * g)
            assert bm.next_dirty(lo, lo + big * g) == -1

    def reader():
        while not stop.is_set():
            assert 0 <= bm.dirty_count <= n
            assert 0 <= bm.dirty_bytes <= size
            copy = HBitmap.from_bytes(bm.to_bytes())
            copy._check_invariants()
            bm._check_invariants()
            extents = bm.dirty_extents()
            prev_end = -1
            for off, length in extents.tolist():
                assert off > prev_end and length > 0 and off + length <= size
                prev_end = off + length
            for off, length in bm.dirty_areas():
                assert 0 <= off and off + length <= size

    def workers():
        try:
            run_threads([lambda k=k: worker(k) for k in range(nworkers)] + [big_worker])
        finally:
            stop.set()

    run_threads([workers, reader, reader])
    bm._check_invariants()
    assert bm.next_dirty(big_first * g) == -1


@pytest.mark.timeout(60)
def test_cross_merge_does_not_deadlock():
    g = 512
    size = 70000 * g
    a, b = HBitmap(size, g), HBitmap(size, g)
    a.set(0, g)
    b.set(size - g, g)

    def merge_loop(dst, src):
        for _ in range(2000):
            dst.merge(src)

    run_threads([lambda: merge_loop(a, b), lambda: merge_loop(b, a),
                 lambda: merge_loop(a, a)])
    for bm in (a, b):
        bm._check_invariants()
        assert list(bm.dirty_areas()) == [(0, g), (size - g, g)]


@pytest.mark.timeout(60)
def test_shared_iterator():
    """Several threads pulling from one dirty_areas() iterator: every run is
    delivered once, none twice."""
    g = 512
    n = 50000
    bm = HBitmap(n * g, g)
    for c in range(0, n, 3):
        bm.set(c * g, 1)
    it = bm.dirty_areas()
    got = []
    lock = threading.Lock()

    def pull():
        mine = list(it)
        with lock:
            got.extend(mine)

    run_threads([pull] * 4)
    assert sorted(got) == [(c * g, g) for c in range(0, n, 3)]
