"""HBitmap benchmarks, side by side with numpy scans of the same bits.

Maps of 1 GiB, 1 TiB and 16 TiB at 64 KiB granularity (2**14, 2**24 and 2**28
chunks) with 0.01 %, 1 % and 100 % of their chunks dirty, spread at random so
that the dirty runs are many (100 % is one run).  Each benchmark group holds
the HBitmap operation and its numpy baseline, so pytest-benchmark's table
shows the ratio:

- set / reset: 1000 random single chunks, one Python call each, against one
  vectorised numpy.bitwise_or.at / bitwise_and.at over the packed uint64 words.
- next_dirty_area: 20 lookups from random offsets, against a numpy scan of the
  packed words from the same offsets (in blocks that grow, so it stops early).
- walk: every dirty run, by iterating dirty_areas() (Python), by a
  next_dirty_area() loop (Python) and by dirty_extents() (one C pass), against
  numpy.flatnonzero over the packed uint64 bottom-level words (2**22 words at
  16 TiB) and over the unpacked bits (numpy.unpackbits, one byte per chunk).

`pytest bench --benchmark-disable` runs each body once as a smoke test.
"""

import random
import timeit

import numpy as np
import pytest

from fastmirror import HBitmap

GRANULARITY = 64 << 10
SIZES = {"1GiB": 1 << 30, "1TiB": 1 << 40, "16TiB": 16 << 40}
DENSITIES = {"0.01%": 1e-4, "1%": 1e-2, "100%": 1.0}
OPS = 1000          # set / reset calls per round
LOOKUPS = 20        # next_dirty_area calls per round
ALL_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)

pytestmark = pytest.mark.benchmark(max_time=0.5, min_rounds=3)


class Map:
    """A bitmap, the same bits as packed uint64 words for numpy, and facts."""

    def __init__(self, size, dirty_chunks):
        self.size = size
        self.bm = HBitmap(size, GRANULARITY)
        self.n = len(self.bm)
        if dirty_chunks is None:
            self.bm.set(0, size)
        else:
            g = GRANULARITY
            for c in dirty_chunks.tolist():
                self.bm.set(c * g, 1)
        blob = self.bm.to_bytes()
        nwords = (self.n + 63) // 64
        # The words sit between the header and the 4-byte checksum.
        self.words = np.frombuffer(blob, dtype="<u8", count=nwords,
                                   offset=len(blob) - 4 - 8 * nwords).copy()
        self.runs = len(self.bm.dirty_extents())
        self.info = {"chunks": self.n, "dirty_chunks": self.bm.dirty_count,
                     "runs": self.runs, "map_bytes": self.bm.memory_bytes}


def random_chunks(n, density, seed):
    rng = np.random.default_rng(seed)
    k = max(1, round(n * density))
    chunks = np.sort(rng.integers(0, n, size=k, dtype=np.int64))
    return chunks[np.concatenate(([True], chunks[1:] != chunks[:-1]))]  # np.unique is slow


@pytest.fixture(scope="module")
def maps():
    """Maps built on first use and kept for the whole module: a 16 TiB map
    with 2.7 million dirty chunks takes a second to build."""
    cache = {}

    def get(size_name, density_name):
        key = (size_name, density_name)
        if key not in cache:
            size = SIZES[size_name]
            density = DENSITIES[density_name]
            n = size // GRANULARITY
            seed = 10 * list(SIZES).index(size_name) + list(DENSITIES).index(density_name)
            chunks = None if density >= 1 else random_chunks(n, density, seed)
            cache[key] = Map(size, chunks)
        return cache[key]

    return get


params = pytest.mark.parametrize(
    "size_name, density_name",
    [(s, d) for s in SIZES for d in DENSITIES])


def group(benchmark, what, m, size_name, density_name):
    benchmark.group = f"{what} {size_name} {density_name} dirty"
    benchmark.extra_info.update(m.info)


# -- memory ------------------------------------------------------------------

def rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def test_memory_16tib(benchmark):
    """A 16 TiB map at 64 KiB granularity, every chunk dirty: the computed
    allocation and the resident-memory growth both stay within 33 MiB."""
    result = {}

    def build():
        before = rss_bytes()
        bm = HBitmap(16 << 40, GRANULARITY)
        bm.set(0, bm.size)              # touch every page of every level
        result["rss_delta"] = rss_bytes() - before
        result["memory_bytes"] = bm.memory_bytes
        del bm

    benchmark.group = "memory 16TiB"
    benchmark.pedantic(build, rounds=1, iterations=1)
    if not result:      # --benchmark-disable still runs it once; be safe
        build()
    benchmark.extra_info.update(result)
    benchmark.extra_info["memory_MiB"] = round(result["memory_bytes"] / 2**20, 3)
    benchmark.extra_info["rss_delta_MiB"] = round(result["rss_delta"] / 2**20, 3)
    assert result["memory_bytes"] <= 33 << 20
    assert result["rss_delta"] <= 34 << 20   # 1 MiB of slack for the allocator


# -- set / reset -------------------------------------------------------------

def pick(m, count, seed):
    rng = random.Random(seed)
    chunks = sorted(rng.sample(range(m.n), min(count, m.n)))
    words = np.array([c >> 6 for c in chunks], dtype=np.int64)
    masks = np.array([1 << (c & 63) for c in chunks], dtype=np.uint64)
    return chunks, words, masks


@params
def test_set(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "set", m, size_name, density_name)
    chunks, _, _ = pick(m, OPS, 1)
    bm, g = m.bm, GRANULARITY
    was = [bm.get(c * g) for c in chunks]
    offsets = [c * g for c in chunks]

    def clean():                    # untimed: make the timed sets do work
        for off in offsets:
            bm.reset(off, g)

    def run():
        for off in offsets:
            bm.set(off, 1)

    benchmark.pedantic(run, setup=clean, rounds=20, iterations=1)
    for off, dirty in zip(offsets, was):    # leave the map as it was
        if not dirty:
            bm.reset(off, g)


@params
def test_set_numpy(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "set", m, size_name, density_name)
    _, w, masks = pick(m, OPS, 1)
    words = m.words                 # restored below
    saved = words[w].copy()

    def clean():
        np.bitwise_and.at(words, w, ~masks)

    def run():
        np.bitwise_or.at(words, w, masks)

    benchmark.pedantic(run, setup=clean, rounds=20, iterations=1)
    words[w] = saved


@params
def test_reset(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "reset", m, size_name, density_name)
    chunks, _, _ = pick(m, OPS, 2)
    bm, g = m.bm, GRANULARITY
    was = [bm.get(c * g) for c in chunks]
    offsets = [c * g for c in chunks]

    def dirty():
        for off in offsets:
            bm.set(off, 1)

    def run():
        for off in offsets:
            bm.reset(off, g)

    benchmark.pedantic(run, setup=dirty, rounds=20, iterations=1)
    for off, d in zip(offsets, was):
        if d:
            bm.set(off, 1)


@params
def test_reset_numpy(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "reset", m, size_name, density_name)
    _, w, masks = pick(m, OPS, 2)
    words = m.words
    saved = words[w].copy()

    def dirty():
        np.bitwise_or.at(words, w, masks)

    def run():
        np.bitwise_and.at(words, w, ~masks)

    benchmark.pedantic(run, setup=dirty, rounds=20, iterations=1)
    words[w] = saved


# -- next_dirty_area ---------------------------------------------------------

def lookup_offsets(m, seed):
    rng = random.Random(seed)
    return [rng.randrange(m.n) * GRANULARITY for _ in range(LOOKUPS)]


def numpy_next_dirty_area(words, nchunks, chunk):
    """The numpy way: scan the packed words from `chunk` for a non-zero word,
    then for a word that is not all ones; blocks grow so it stops early."""
    nwords = len(words)
    w = chunk >> 6
    first = int(words[w]) & ~((1 << (chunk & 63)) - 1)
    if first:
        start = (w << 6) + ((first & -first).bit_length() - 1)
    else:
        start = -1
        block, i = 4096, w + 1
        while i < nwords:
            hits = np.flatnonzero(words[i:i + block])
            if len(hits):
                j = i + int(hits[0])
                v = int(words[j])
                start = (j << 6) + ((v & -v).bit_length() - 1)
                break
            i, block = i + block, block * 2
        if start < 0:
            return None
    w = start >> 6
    rest = ~int(words[w]) & ((1 << 64) - 1) & ~((1 << (start & 63)) - 1)
    if rest:
        stop = (w << 6) + ((rest & -rest).bit_length() - 1)
    else:
        stop = nchunks
        block, i = 4096, w + 1
        while i < nwords:
            hits = np.flatnonzero(words[i:i + block] != ALL_ONES)
            if len(hits):
                j = i + int(hits[0])
                v = ~int(words[j]) & ((1 << 64) - 1)
                stop = (j << 6) + ((v & -v).bit_length() - 1)
                break
            i, block = i + block, block * 2
    stop = min(stop, nchunks)
    return start * GRANULARITY, (stop - start) * GRANULARITY


@params
def test_next_dirty_area(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "next_dirty_area", m, size_name, density_name)
    offsets = lookup_offsets(m, 3)
    nda = m.bm.next_dirty_area

    def run():
        return [nda(off) for off in offsets]

    got = benchmark(run)
    assert got == [numpy_next_dirty_area(m.words, m.n, off // GRANULARITY) for off in offsets]


@params
def test_next_dirty_area_numpy(benchmark, maps, size_name, density_name):
    m = maps(size_name, density_name)
    group(benchmark, "next_dirty_area", m, size_name, density_name)
    chunks = [off // GRANULARITY for off in lookup_offsets(m, 3)]

    def run():
        return [numpy_next_dirty_area(m.words, m.n, c) for c in chunks]

    benchmark(run)


# -- full walk ---------------------------------------------------------------

def walk_dirty_areas(bm):
    count = 0
    for _ in bm.dirty_areas():
        count += 1
    return count


def walk_next_dirty_area(bm):
    count, offset, nda, size = 0, 0, bm.next_dirty_area, bm.size
    while offset < size:
        area = nda(offset)
        if area is None:
            break
        count += 1
        offset = area[0] + area[1]
    return count


def numpy_flatnonzero_packed(words):
    return np.flatnonzero(words)


def numpy_flatnonzero_unpacked(words):
    return np.flatnonzero(np.unpackbits(words.view(np.uint8), bitorder="little"))


@params
@pytest.mark.parametrize("how", ["dirty_areas", "next_dirty_area_loop", "dirty_extents"])
def test_walk(benchmark, maps, size_name, density_name, how):
    m = maps(size_name, density_name)
    group(benchmark, "walk", m, size_name, density_name)
    fn = {"dirty_areas": walk_dirty_areas, "next_dirty_area_loop": walk_next_dirty_area,
          "dirty_extents": lambda bm: len(bm.dirty_extents())}[how]
    runs = benchmark(fn, m.bm)
    assert runs == m.runs


@params
@pytest.mark.parametrize("how", ["flatnonzero_packed", "flatnonzero_unpacked"])
def test_walk_numpy(benchmark, maps, size_name, density_name, how):
    m = maps(size_name, density_name)
    group(benchmark, "walk", m, size_name, density_name)
    fn = {"flatnonzero_packed": numpy_flatnonzero_packed,
          "flatnonzero_unpacked": numpy_flatnonzero_unpacked}[how]
    if how == "flatnonzero_unpacked" and m.n >= 1 << 28 and density_name == "100%":
        pytest.skip("2**28 indices (2 GiB) out of a fully dirty 16 TiB map: absurd")
    if how == "flatnonzero_unpacked" and m.n >= 1 << 28:
        benchmark.pedantic(fn, args=(m.words,), rounds=3, iterations=1)
    else:
        benchmark(fn, m.words)


# -- the target: a 16 TiB map holding 1000 dirty chunks ----------------------

@pytest.fixture(scope="module")
def map_16tib_1000():
    n = (16 << 40) // GRANULARITY
    rng = np.random.default_rng(1000)
    return Map(16 << 40, np.sort(rng.choice(n, size=1000, replace=False)))


TARGET = {
    "dirty_areas": walk_dirty_areas,
    "next_dirty_area_loop": walk_next_dirty_area,
    "dirty_extents": lambda bm: len(bm.dirty_extents()),
}


@pytest.mark.parametrize("how", list(TARGET))
def test_walk_16tib_1000_chunks(benchmark, map_16tib_1000, how):
    m = map_16tib_1000
    benchmark.group = "walk 16TiB 1000 dirty chunks"
    benchmark.extra_info.update(m.info)
    assert benchmark(TARGET[how], m.bm) == 1000


@pytest.mark.parametrize("how", ["flatnonzero_packed", "flatnonzero_unpacked"])
def test_walk_16tib_1000_chunks_numpy(benchmark, map_16tib_1000, how):
    m = map_16tib_1000
    benchmark.group = "walk 16TiB 1000 dirty chunks"
    benchmark.extra_info.update(m.info)
    if how == "flatnonzero_packed":
        assert len(benchmark(numpy_flatnonzero_packed, m.words)) == 1000
    else:
        assert len(benchmark.pedantic(numpy_flatnonzero_unpacked, args=(m.words,),
                                      rounds=3, iterations=1)) == 1000


def best_of(fn, arg, number, repeat):
    return min(timeit.repeat(lambda: fn(arg), number=number, repeat=repeat)) / number


def test_walk_16tib_1000_chunks_ratio(map_16tib_1000):
    """The target, measured in the same process: walking every dirty run of a
    16 TiB map that holds 1000 dirty chunks is at least 50x faster than
    numpy.flatnonzero over its packed uint64 words (2**22 of them)."""
    m = map_16tib_1000
    baseline = best_of(numpy_flatnonzero_packed, m.words, 3, 5)
    ratios = {how: baseline / best_of(fn, m.bm, 20, 5) for how, fn in TARGET.items()}
    print(f"\nnumpy.flatnonzero(packed words): {baseline * 1e3:.2f} ms; "
          + ", ".join(f"{how}: {r:.0f}x faster" for how, r in ratios.items()))
    assert ratios["dirty_areas"] >= 50
    assert ratios["dirty_extents"] >= 50
    # A loop of Python calls that each return a tuple: typically 60-90x,
    # guarded more loosely so that a busy machine does not fail it.
    assert ratios["next_dirty_area_loop"] >= 25


def test_helpers_agree():
    """The numpy baselines and the walks agree with HBitmap on a small map
    (so the comparisons above compare the same work)."""
    m = Map(1 << 30, random_chunks((1 << 30) // GRANULARITY, 0.05, 7))
    assert walk_dirty_areas(m.bm) == walk_next_dirty_area(m.bm) == m.runs
    for c in range(0, m.n, 97):
        assert m.bm.next_dirty_area(c * GRANULARITY) == numpy_next_dirty_area(m.words, m.n, c)
    dirty = [c for c in range(m.n) if m.bm.get(c * GRANULARITY)]
    assert numpy_flatnonzero_unpacked(m.words).tolist() == dirty
    assert numpy_flatnonzero_packed(m.words).tolist() == sorted({c >> 6 for c in dirty})
