"""HBitmap against a plain shadow bitmap, checked after every operation.

The shadow is a bytearray with one byte per chunk; bytearray.find does its
searches in C, so even the 64**3-sized maps stay quick to check.  Sizes cross
each level boundary of the hierarchy (64, 64**2, 64**3 chunks, +-1) and
include sizes that are not a multiple of the granularity (a partial last chunk).
"""

import pickle
import random
import struct
import sys
import zlib

import numpy as np
import pytest

from fastmirror import HBitmap

HEADER = struct.Struct("<8sIIQQQ")  # magic, version, flags, size, granularity, nwords
TIB = 1 << 40


class Shadow:
    """The obvious bitmap: one byte per chunk, all searches by bytearray.find."""

    def __init__(self, size, granularity):
        self.size = size
        self.g = granularity
        self.n = -(-size // granularity)
        self.bits = bytearray(self.n)

    def _chunks_before(self, offset):  # ceil(offset / g)
        return -(-offset // self.g)

    def set(self, offset, length):
        if length:
            a, b = offset // self.g, (offset + length - 1) // self.g + 1
            self.bits[a:b] = b"\x01" * (b - a)

    def reset(self, offset, length):
        a, b = offset // self.g, self._chunks_before(offset + length)
        self.bits[a:b] = bytes(b - a)

    def clear(self):
        self.bits = bytearray(self.n)

    def merge(self, other):
        self.bits = bytearray(
            (np.frombuffer(self.bits, np.uint8) | np.frombuffer(other.bits, np.uint8)).tobytes())

    def count(self):
        return self.bits.count(1)

    def dirty_bytes(self):
        total = self.count() * self.g
        if self.n and self.bits[-1]:
            total -= self.n * self.g - self.size
        return total

    def _next(self, value, offset, end):
        end = self.size if end is None else end
        if offset >= end:
            return -1
        c = self.bits.find(value, offset // self.g, self._chunks_before(end))
        return -1 if c < 0 else max(offset, c * self.g)

    def next_dirty(self, offset, end=None):
        return self._next(1, offset, end)

    def next_clean(self, offset, end=None):
        return self._next(0, offset, end)

    def next_dirty_area(self, offset, end=None, max_length=None):
        end = self.size if end is None else end
        start = self.next_dirty(offset, end)
        if start < 0:
            return None
        c = self.bits.find(0, start // self.g, self._chunks_before(end))
        stop = end if c < 0 else min(c * self.g, end)
        if max_length is not None:
            stop = min(stop, start + max_length)
        return (start, stop - start)

    def runs(self):
        out = []
        c = self.bits.find(1)
        while c >= 0:
            e = self.bits.find(0, c)
            e = self.n if e < 0 else e
            out.append((c * self.g, min(e * self.g, self.size) - c * self.g))
            c = self.bits.find(1, e)
        return out


def bottom_bits(blob):
    """The bottom level decoded from to_bytes(), independently of HBitmap:
    one uint8 per bit, including the padding bits of the last word."""
    nwords = HEADER.unpack_from(blob)[5]
    words = np.frombuffer(blob, dtype="<u8", count=nwords, offset=HEADER.size)
    return np.unpackbits(words.view(np.uint8), bitorder="little")


def interesting_offsets(sh, rng, count):
    """Byte offsets worth searching from: the ends, run edges, level edges
    and random ones."""
    size, g = sh.size, sh.g
    offs = {0, size, max(size - 1, 0)}
    runs = sh.runs()
    for start, length in rng.sample(runs, min(len(runs), 6)):
        for o in (start - 1, start, start + 1, start + length - 1, start + length):
            offs.add(o)
    for c in (63, 64, 65, 4095, 4096, 4097, 262143, 262144):
        offs.add(c * g)
        offs.add(c * g - 1)
    offs.update(rng.randrange(size + 1) for _ in range(count))
    return sorted(o for o in offs if 0 <= o <= size)


def check(bm, sh, rng, *, exhaustive, searches=25):
    """Everything HBitmap says must match the shadow."""
    size, g, n = sh.size, sh.g, sh.n
    bm._check_invariants()
    assert len(bm) == n
    assert bm.dirty_count == sh.count()
    assert bm.dirty_bytes == sh.dirty_bytes()

    chunks = range(n) if exhaustive else rng.sample(range(n), min(n, 64))
    for c in list(chunks) + [0, n - 1]:
        if 0 <= c < n:
            last = min((c + 1) * g, size) - 1
            assert bm.get(c * g) == bool(sh.bits[c]), c
            assert bm.get(last) == bool(sh.bits[c]), c

    for off in interesting_offsets(sh, rng, searches):
        end = rng.choice([None, size, rng.randint(off, size)])
        assert bm.next_dirty(off, end) == sh.next_dirty(off, end), (off, end)
        assert bm.next_clean(off, end) == sh.next_clean(off, end), (off, end)
        max_length = rng.choice([None, rng.randint(1, 3 * g), rng.randint(1, max(size, 1))])
        assert bm.next_dirty_area(off, end, max_length) == sh.next_dirty_area(
            off, end, max_length), (off, end, max_length)

    runs = sh.runs()
    assert list(bm.dirty_areas()) == runs
    extents = bm.dirty_extents()
    assert extents.dtype == np.int64 and extents.shape == (len(runs), 2)
    assert extents.tolist() == [list(r) for r in runs]

    blob = bm.to_bytes()
    bits = bottom_bits(blob)
    assert bits[:n].tobytes() == bytes(sh.bits)
    assert not bits[n:].any(), "bits set past the last chunk"
    copy = HBitmap.from_bytes(blob)
    copy._check_invariants()
    assert copy.size == size and copy.granularity == g
    assert copy.to_bytes() == blob
    assert copy.dirty_count == bm.dirty_count
    assert list(copy.dirty_areas()) == runs


def random_chunk(rng, limit):
    """A chunk in [0, limit]: uniform, or next to a word or level edge."""
    if rng.random() < 0.3:
        unit = rng.choice([64, 64 ** 2, 64 ** 3])
        c = unit * rng.randint(0, limit // unit) + rng.randint(-2, 2)
        return min(max(c, 0), limit)
    return rng.randint(0, limit)


def random_range(rng, sh, *, aligned):
    """A random (offset, length) inside the map: mostly short, sometimes long."""
    size, g, n = sh.size, sh.g, sh.n
    span = rng.choices([1, 3, 70, 5000, n], weights=[30, 20, 20, 10, 3])[0]  # chunks
    if aligned:
        a = random_chunk(rng, size // g)  # an aligned offset, at most size
        b = rng.randint(a, min(n, a + span))
        offset = a * g
        end = size if b == n else b * g
        return offset, end - offset
    offset = min(random_chunk(rng, n) * g + rng.randrange(g), size)
    return offset, rng.randint(0, min(size - offset, span * g))


def random_op(bm, sh, rng):
    op = rng.choices(["set", "reset", "clear", "merge"], weights=[60, 30, 1, 6])[0]
    if op == "set":
        offset, length = random_range(rng, sh, aligned=False)
        bm.set(offset, length)
        sh.set(offset, length)
    elif op == "reset":
        offset, length = random_range(rng, sh, aligned=True)
        bm.reset(offset, length)
        sh.reset(offset, length)
    elif op == "clear":
        bm.clear()
        sh.clear()
    else:
        other, osh = HBitmap(sh.size, sh.g), Shadow(sh.size, sh.g)
        for _ in range(rng.randint(0, 4)):
            offset, length = random_range(rng, osh, aligned=False)
            other.set(offset, length)
            osh.set(offset, length)
        bm.merge(other)
        sh.merge(osh)
    return op


# (chunks, granularity, bytes missing from the last chunk)
SIZES = [
    (1, 512, 0), (1, 65536, 4321),
    (63, 512, 0), (63, 4096, 1),
    (64, 512, 0), (64, 65536, 65535),
    (65, 512, 0), (65, 4096, 100),
    (4095, 512, 0), (4095, 65536, 7),
    (4096, 512, 0), (4096, 4096, 2048),
    (4097, 512, 0), (4097, 65536, 1),
    (262143, 512, 0), (262143, 65536, 9999),
    (262144, 512, 0), (262144, 4096, 1),
    (262145, 512, 0), (262145, 65536, 30000),
]


@pytest.mark.parametrize("nchunks, granularity, short", SIZES)
def test_random_ops_against_shadow(nchunks, granularity, short):
    rng = random.Random(nchunks * 7919 + granularity + short)
    size = nchunks * granularity - short
    bm, sh = HBitmap(size, granularity), Shadow(size, granularity)
    assert len(bm) == nchunks
    big = nchunks > 5000
    ops = 100 if big else 150
    check(bm, sh, rng, exhaustive=not big)
    for _ in range(ops):
        random_op(bm, sh, rng)
        check(bm, sh, rng, exhaustive=not big, searches=10 if big else 25)


@pytest.mark.parametrize("nchunks, levels", [
    (0, (1,)), (1, (1,)), (64, (1,)), (65, (1, 2)), (4096, (1, 64)),
    (4097, (1, 2, 65)), (262144, (1, 64, 4096)), (262145, (1, 2, 65, 4097)),
])
def test_level_shape(nchunks, levels):
    assert HBitmap(nchunks * 512, 512)._check_invariants() == levels


@pytest.mark.parametrize("nchunks", [1, 63, 64, 65, 4095, 4096, 4097, 262143, 262144, 262145])
def test_single_chunks_at_level_edges(nchunks):
    """One dirty chunk at each place where a search must climb or descend."""
    g = 512
    size = nchunks * g - 7
    bm = HBitmap(size, g)
    for c in (0, 1, 62, 63, 64, 65, 127, 128, 4095, 4096, 4097, 262143, 262144, nchunks - 1):
        if not 0 <= c < nchunks:
            continue
        start, stop = c * g, min((c + 1) * g, size)
        bm.set(start + 3, 1)
        assert bm.dirty_count == 1
        assert bm.next_dirty(0) == start
        assert bm.next_dirty(start + 5) == start + 5
        assert bm.next_dirty(stop) == -1
        assert bm.next_dirty(0, start) == -1
        assert bm.next_dirty(0, start + 1) == start
        assert bm.next_clean(start) == (stop if stop < size else -1)
        assert bm.next_clean(0) == (0 if c else (stop if stop < size else -1))
        assert bm.next_dirty_area(0) == (start, stop - start)
        assert list(bm.dirty_areas()) == [(start, stop - start)]
        bm._check_invariants()
        bm.reset(start, stop - start)
        assert bm.dirty_count == 0
        assert bm.next_dirty(0) == -1
        assert list(bm.dirty_areas()) == []
        bm._check_invariants()


def test_two_far_chunks_16tib():
    """A 16 TiB map: chunks far apart are found through the summaries."""
    g = 65536
    bm = HBitmap(16 * TIB, g)
    n = len(bm)
    assert n == 1 << 28
    marks = [5, 64 ** 2 + 1, 64 ** 3 * 7 + 13, 64 ** 4 * 3, n - 1]
    for c in marks:
        bm.set(c * g, 1)
    assert bm.dirty_count == len(marks)
    assert [o // g for o, _ in bm.dirty_areas()] == marks
    assert bm.dirty_extents()[:, 0].tolist() == [c * g for c in marks]
    off = 0
    for c in marks:
        off = bm.next_dirty(off)
        assert off == c * g
        off += g
    assert bm.next_dirty(off) == -1
    bm.reset(marks[2] * g, g)
    assert bm.next_dirty(marks[1] * g + g) == marks[3] * g
    bm.clear()
    assert bm.dirty_count == 0 and bm.next_dirty(0) == -1


def test_memory_16tib_within_budget():
    bm = HBitmap(16 * TIB, 65536)
    # 2**28 chunks: a 32 MiB bottom level plus summaries must stay <= 33 MiB.
    assert 32 << 20 <= bm.memory_bytes <= 33 << 20
    assert sys.getsizeof(bm) <= 33 << 20
    assert bm.memory_bytes == 8 * sum(bm._check_invariants())


def test_fully_dirty_map_is_one_run():
    size = 4097 * 4096 - 5
    bm = HBitmap(size, 4096)
    bm.set(0, size)
    assert bm.dirty_count == 4097
    assert bm.dirty_bytes == size
    assert list(bm.dirty_areas()) == [(0, size)]
    assert bm.next_clean(0) == -1
    assert bm.next_dirty_area(10, max_length=5) == (10, 5)
    assert bm.next_dirty_area(10, end=20) == (10, 10)
    bm._check_invariants()
    bm.reset(0, size)
    assert bm.dirty_count == 0
    bm._check_invariants()


def test_next_dirty_returns_offset_inside_dirty_chunk():
    bm = HBitmap(10 * 4096, 4096)
    bm.set(4096 * 3 + 100, 1)
    assert bm.next_dirty(0) == 4096 * 3
    assert bm.next_dirty(4096 * 3 + 7) == 4096 * 3 + 7
    assert bm.next_clean(4096 * 3 + 7) == 4096 * 4
    assert bm.next_clean(4096 * 2 + 7) == 4096 * 2 + 7
    assert bm.next_dirty_area(4096 * 3 + 7) == (4096 * 3 + 7, 4096 - 7)


def test_dirty_bytes_clips_last_chunk():
    bm = HBitmap(3 * 4096 + 10, 4096)
    bm.set(3 * 4096, 1)
    assert bm.dirty_count == 1
    assert bm.dirty_bytes == 10
    bm.set(0, 1)
    assert bm.dirty_bytes == 4096 + 10
    assert list(bm.dirty_areas()) == [(0, 4096), (3 * 4096, 10)]


def test_empty_map():
    bm = HBitmap(0)
    assert len(bm) == 0 and bm.size == 0 and bm.granularity == 65536
    assert bm.dirty_count == 0 and bm.dirty_bytes == 0
    bm.set(0, 0)
    bm.reset(0, 0)
    assert bm.next_dirty(0) == -1 and bm.next_clean(0) == -1
    assert bm.next_dirty_area(0) is None
    assert list(bm.dirty_areas()) == []
    assert bm.dirty_extents().shape == (0, 2)
    with pytest.raises(ValueError):
        bm.set(0, 1)
    with pytest.raises(ValueError):
        bm.get(0)
    copy = HBitmap.from_bytes(bm.to_bytes())
    assert copy.size == 0 and len(copy) == 0
    bm.merge(copy)
    bm.clear()


def test_merge():
    g = 512
    a, b = HBitmap(5000 * g, g), HBitmap(5000 * g, g)
    a.set(0, 10 * g)
    b.set(5 * g, 10 * g)
    b.set(4999 * g, 1)
    a.merge(b)
    assert list(a.dirty_areas()) == [(0, 15 * g), (4999 * g, g)]
    assert a.dirty_count == 16
    assert list(b.dirty_areas()) == [(5 * g, 10 * g), (4999 * g, g)]  # untouched
    a.merge(a)
    assert a.dirty_count == 16
    a._check_invariants()
    b.merge(HBitmap(5000 * g, g))
    assert b.dirty_count == 11


@pytest.mark.parametrize("other", [
    lambda: HBitmap(5000 * 512 + 1, 512), lambda: HBitmap(5000 * 512, 1024)])
def test_merge_mismatch(other):
    with pytest.raises(ValueError):
        HBitmap(5000 * 512, 512).merge(other())


def test_merge_wrong_type():
    with pytest.raises(TypeError):
        HBitmap(4096, 512).merge(None)
    with pytest.raises(TypeError):
        HBitmap(4096, 512).merge(b"bits")


def test_clear():
    bm = HBitmap(300000 * 512, 512)
    for c in (0, 64, 4096, 262144, 299999):
        bm.set(c * 512, 512)
    bm.clear()
    assert bm.dirty_count == 0
    assert bm.next_dirty(0) == -1
    assert not bottom_bits(bm.to_bytes()).any()
    bm._check_invariants()
    bm.set(512 * 262144, 1)
    assert list(bm.dirty_areas()) == [(512 * 262144, 512)]


def test_len_repr_pickle():
    bm = HBitmap(10 * 65536 + 1)
    bm.set(65536, 2)
    assert len(bm) == 11
    text = repr(bm)
    assert "HBitmap" in text and "size=655361" in text and "dirty=1" in text
    copy = pickle.loads(pickle.dumps(bm))
    assert copy.to_bytes() == bm.to_bytes()


def test_readonly_attributes():
    bm = HBitmap(4096, 512)
    with pytest.raises(AttributeError):
        bm.size = 1
    with pytest.raises(AttributeError):
        bm.granularity = 1024


def test_iterators_are_independent():
    g = 512
    bm = HBitmap(1000 * g, g)
    for c in (1, 10, 100):
        bm.set(c * g, 1)
    it1, it2 = bm.dirty_areas(), bm.dirty_areas()
    assert next(it1) == (g, g)
    assert next(it2) == (g, g)
    assert next(it1) == (10 * g, g)
    assert list(it2) == [(10 * g, g), (100 * g, g)]
    assert list(it1) == [(100 * g, g)]


def test_index_like_arguments():
    bm = HBitmap(np.int64(8192), np.int64(512))
    bm.set(np.int64(512), np.uint32(10))
    assert bm.get(np.int32(512))
    assert bm.next_dirty(True) == 512


# -- bad arguments ------------------------------------------------------------

@pytest.mark.parametrize("size, granularity", [
    (-1, 512), (4096, 0), (4096, 256), (4096, 511), (4096, 513), (4096, 1000),
    (4096, -512), (4096, 3 << 10), (2 ** 64, 512), (4096, 2 ** 63), (4096, 2 ** 80),
])
def test_bad_constructor(size, granularity):
    with pytest.raises(ValueError):
        HBitmap(size, granularity)


@pytest.mark.parametrize("size, granularity",
                         [(4096.0, 512), ("4096", 512), (4096, 512.0), (None, 512)])
def test_non_int_constructor(size, granularity):
    with pytest.raises((TypeError, ValueError)):
        HBitmap(size, granularity)


SIZE = 10 * 4096 + 100


@pytest.mark.parametrize("call", [
    lambda bm: bm.set(-1, 1),
    lambda bm: bm.set(0, -1),
    lambda bm: bm.set(SIZE, 1),
    lambda bm: bm.set(SIZE - 1, 2),
    lambda bm: bm.set(SIZE + 1, 0),
    lambda bm: bm.set(2 ** 70, 1),
    lambda bm: bm.set(0, 2 ** 64),
    lambda bm: bm.reset(1, 4095),            # unaligned offset
    lambda bm: bm.reset(0, 4095),            # unaligned end
    lambda bm: bm.reset(4096, 100),
    lambda bm: bm.reset(10 * 4096, 99),      # end not aligned and not size
    lambda bm: bm.reset(10 * 4096, 101),     # past the end
    lambda bm: bm.reset(-4096, 4096),
    lambda bm: bm.reset(1, 0),               # unaligned, even if empty
    lambda bm: bm.get(-1),
    lambda bm: bm.get(SIZE),
    lambda bm: bm.next_dirty(-1),
    lambda bm: bm.next_dirty(SIZE + 1),
    lambda bm: bm.next_dirty(0, SIZE + 1),
    lambda bm: bm.next_dirty(0, -1),
    lambda bm: bm.next_clean(-5),
    lambda bm: bm.next_clean(0, SIZE + 1),
    lambda bm: bm.next_dirty_area(-1),
    lambda bm: bm.next_dirty_area(0, SIZE + 1),
    lambda bm: bm.next_dirty_area(0, None, 0),
    lambda bm: bm.next_dirty_area(0, None, -1),
], ids=lambda f: None)
def test_bad_arguments(call):
    bm = HBitmap(SIZE, 4096)
    bm.set(4096, 4096)
    before = bm.to_bytes()
    with pytest.raises(ValueError):
        call(bm)
    assert bm.to_bytes() == before


@pytest.mark.parametrize("call", [
    lambda bm: bm.set(0.0, 1),
    lambda bm: bm.set("0", 1),
    lambda bm: bm.set(0, None),
    lambda bm: bm.reset(0, 4096.0),
    lambda bm: bm.get(1.5),
    lambda bm: bm.next_dirty("a"),
    lambda bm: bm.next_dirty_area(0, 1.0),
])
def test_non_int_arguments(call):
    with pytest.raises((TypeError, ValueError)):
        call(HBitmap(SIZE, 4096))


def test_edges_that_are_allowed():
    bm = HBitmap(SIZE, 4096)
    bm.set(SIZE, 0)
    bm.set(SIZE - 1, 1)
    assert bm.get(SIZE - 1)
    bm.reset(10 * 4096, 100)                 # end == size
    assert not bm.get(SIZE - 1)
    assert bm.next_dirty(SIZE) == -1
    assert bm.next_dirty(5, 5) == -1
    assert bm.next_dirty_area(SIZE) is None
    assert bm.next_dirty(7, 3) == -1          # empty window


# -- serialization ------------------------------------------------------------

def sample_blob():
    bm = HBitmap(200 * 4096 + 123, 4096)
    for off, length in ((0, 1), (4096 * 63, 4096 * 3), (200 * 4096, 123)):
        bm.set(off, length)
    return bm, bm.to_bytes()


def with_crc(body):
    return body + struct.pack("<I", zlib.crc32(body))


def test_serialization_format():
    bm, blob = sample_blob()
    magic, version, flags, size, granularity, nwords = HEADER.unpack_from(blob)
    assert (magic, version, flags) == (b"FMHBITMP", 1, 0)
    assert (size, granularity, nwords) == (bm.size, 4096, 4)
    assert len(blob) == HEADER.size + 8 * nwords + 4
    assert struct.unpack_from("<I", blob, len(blob) - 4)[0] == zlib.crc32(blob[:-4])
    assert HBitmap.from_bytes(bytearray(blob)).to_bytes() == blob
    assert HBitmap.from_bytes(memoryview(blob)).to_bytes() == blob
    # An unaligned buffer decodes the same.
    assert HBitmap.from_bytes(memoryview(b"x" + blob)[1:]).to_bytes() == blob


def test_every_flipped_byte_is_refused():
    _, blob = sample_blob()
    for i in range(len(blob)):
        corrupt = bytearray(blob)
        corrupt[i] ^= 0x10
        with pytest.raises(ValueError):
            HBitmap.from_bytes(bytes(corrupt))


def test_truncated_or_padded_is_refused():
    _, blob = sample_blob()
    for cut in (0, 1, 8, 39, 40, 43, 44, len(blob) - 5, len(blob) - 1):
        with pytest.raises(ValueError):
            HBitmap.from_bytes(blob[:cut])
    with pytest.raises(ValueError):
        HBitmap.from_bytes(blob + b"\0")


def test_wrong_magic_or_version_is_refused():
    _, blob = sample_blob()
    body = blob[:-4]
    with pytest.raises(ValueError, match="magic"):
        HBitmap.from_bytes(with_crc(b"QEMUBITS" + body[8:]))
    with pytest.raises(ValueError, match="version"):
        HBitmap.from_bytes(with_crc(body[:8] + struct.pack("<I", 2) + body[12:]))


def header_with(blob, **fields):
    names = ["magic", "version", "flags", "size", "granularity", "nwords"]
    values = dict(zip(names, HEADER.unpack_from(blob)))
    values.update(fields)
    return HEADER.pack(*(values[k] for k in names)) + blob[HEADER.size:-4]


@pytest.mark.parametrize("fields", [
    {"size": 200 * 4096 + 123 + 64 * 4096},  # more chunks than words hold
    {"size": 100 * 4096},                    # fewer chunks than words
    {"granularity": 8192},                   # likewise
    {"granularity": 3000},                   # not a power of two
    {"granularity": 256},                    # too small
    {"nwords": 5},                           # disagrees with the length
    {"flags": 1},                            # unknown flags
    {"size": 2 ** 64 - 1},
])
def test_mismatched_header_is_refused(fields):
    _, blob = sample_blob()
    with pytest.raises(ValueError):
        HBitmap.from_bytes(with_crc(header_with(blob, **fields)))


def test_bits_past_the_end_are_refused():
    bm, blob = sample_blob()  # 201 chunks: the last word holds 9 valid bits
    body = bytearray(blob[:-4])
    last = HEADER.size + 3 * 8
    word = int.from_bytes(body[last:last + 8], "little") | (1 << 9)
    body[last:last + 8] = word.to_bytes(8, "little")
    with pytest.raises(ValueError, match="past"):
        HBitmap.from_bytes(with_crc(bytes(body)))


def test_from_bytes_not_a_buffer():
    with pytest.raises(TypeError):
        HBitmap.from_bytes(12345)
    with pytest.raises(TypeError):
        HBitmap.from_bytes("FMHBITMP")
