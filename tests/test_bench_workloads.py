"""The workloads the bench, the demo and the tests share: the image generator
(fastmirror.bench.images) and the paced random writer
(fastmirror.bench.writers.RandomWriter)."""

import errno
import os
import threading
import time

import pytest

from fastmirror.bench.images import extent_holes, make_image
from fastmirror.bench.writers import RandomWriter, blocks
from helpers import KiB, MiB, read_bytes


def _data_ranges(path):
    """(offset, length) of the data the filesystem holds (SEEK_DATA/SEEK_HOLE)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size, pos, out = os.fstat(fd).st_size, 0, []
        while pos < size:
            try:
                d = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break
                raise
            h = os.lseek(fd, d, os.SEEK_HOLE)
            out.append((d, h - d))
            pos = h
        return out
    finally:
        os.close(fd)


def test_random_image_is_seeded_and_has_no_zero_block(tmp_path):
    a, b, c = (str(tmp_path / n) for n in "abc")
    size = 20 * MiB + 3 * KiB            # crosses two pool rotations, odd tail
    assert make_image(a, size, seed=5) == size
    make_image(b, size, seed=5)
    make_image(c, size, seed=6)
    data = read_bytes(a)
    assert len(data) == size and data == read_bytes(b)
    assert data != read_bytes(c)
    zero = bytes(4 * KiB)
    assert all(data[i:i + 4 * KiB] != zero for i in range(0, size, 4 * KiB))
    # Each 8 MiB chunk is another rotation: no chunk repeats the first.
    assert data[8 * MiB:9 * MiB] != data[:MiB]


def test_holes_and_data_fraction_leave_real_holes(tmp_path):
    path = str(tmp_path / "img")
    size = 32 * MiB
    holes = extent_holes(size, 0.5, 4 * MiB, seed=3)
    assert 0 < len(holes) < 8
    written = make_image(path, size, data_fraction=0.5, extent=4 * MiB, seed=3)
    assert written == size - sum(n for _, n in holes)
    data = read_bytes(path)
    for off, n in holes:
        assert data[off:off + n] == bytes(n)
    ranges = _data_ranges(path)
    if ranges != [(0, size)]:       # a filesystem without SEEK_HOLE reports all data
        assert sum(n for _, n in ranges) == written


def test_byte_zero_and_sparse_patterns(tmp_path):
    p = str(tmp_path / "img")
    assert make_image(p, MiB + 512, pattern=0xAB, holes=[(4096, 8192)]) == MiB + 512 - 8192
    data = read_bytes(p)
    assert data[:4096] == b"\xab" * 4096 and data[4096:12288] == bytes(8192)
    assert data[12288:] == b"\xab" * (MiB + 512 - 12288)
    assert make_image(p, MiB, pattern="zero") == MiB and read_bytes(p) == bytes(MiB)
    assert make_image(p, MiB, pattern="sparse") == 0 and read_bytes(p) == bytes(MiB)
    with pytest.raises(ValueError):
        make_image(p, MiB, pattern="stripes")


def test_overwrite_leaves_no_old_data_in_holes(tmp_path):
    p = str(tmp_path / "img")
    make_image(p, MiB, pattern=0xCD)
    make_image(p, MiB, pattern=0x11, holes=[(0, 64 * KiB)])
    assert read_bytes(p, 0, 64 * KiB) == bytes(64 * KiB)


def test_exclusive_refuses_an_existing_file(tmp_path):
    p = str(tmp_path / "img")
    make_image(p, MiB, pattern=1)
    with pytest.raises(FileExistsError):
        make_image(p, MiB, exclusive=True)
    assert read_bytes(p) == b"\x01" * MiB


def test_blocks_stay_aligned_and_in_range():
    lo, hi = 3 * 4096, 3 * 4096 + 200 * KiB
    for off, n in [x for _, x in zip(range(2000), blocks(lo, hi, 1))]:
        assert off % 4096 == 0 and n % 4096 == 0
        assert 4 * KiB <= n <= 64 * KiB and lo <= off and off + n <= hi
    # A range smaller than the largest block: blocks shrink to fit it.
    for off, n in [x for _, x in zip(range(200), blocks(0, 8192, 2))]:
        assert off + n <= 8192
    # Unaligned writes of any length.
    seen = {n for _, (off, n) in zip(range(2000), blocks(0, 1000, 3, 1, 999, 1))}
    assert min(seen) < 50 and max(seen) > 900


class Recorder:
    """A write target: every write recorded, optionally short or failing."""

    def __init__(self, short_after=None, fail_after=None):
        self.lock = threading.Lock()
        self.writes = []
        self.short_after = short_after
        self.fail_after = fail_after

    def pwrite(self, data, offset):
        with self.lock:
            self.writes.append((offset, bytes(data), threading.current_thread().name))
            n = len(self.writes)
        if self.fail_after is not None and n > self.fail_after:
            raise OSError(errno.EIO, "injected")
        if self.short_after is not None and n > self.short_after:
            return len(data) - 1
        return len(data)


def _until(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond() and time.monotonic() < deadline:
        time.sleep(0.002)
    assert cond()


def test_regions_keep_writers_apart_and_the_hook_sees_every_write():
    target = Recorder()
    hooked = []
    w = RandomWriter(target.pwrite, 1 * MiB, None, 4, regions=True, seed=3,
                     hook=lambda *a: hooked.append(a), name="t-writer").start()
    _until(lambda: w.writes >= 400)
    assert w.stop() == []
    w.check()
    assert w.error is None and w.writes == len(target.writes) == len(hooked)
    span = MiB // 4
    for off, data, name in target.writes:
        i = int(name.rsplit("-", 1)[1])
        assert i * span <= off and off + len(data) <= (i + 1) * span
    assert {h[0] for h in hooked} == {0, 1, 2, 3}
    assert w.bytes == sum(len(d) for _, d, _ in target.writes)


def test_the_rate_bounds_the_bytes_written():
    target = Recorder()
    rate = 2 * MiB
    w = RandomWriter(target.pwrite, 16 * MiB, rate, 2, name="t-writer")
    t0 = time.perf_counter()
    w.start()
    time.sleep(0.3)
    assert w.stop() == []
    elapsed = time.perf_counter() - t0
    # Pacing can only slow it down: never more than the rate allows, plus
    # one block per thread written before the first wait.
    assert 0 < w.bytes <= rate * elapsed + 2 * 64 * KiB
    assert w.rate_between(w.samples[0][0], w.samples[-1][0]) is not None


@pytest.mark.parametrize("short", [True, False])
def test_a_short_or_failed_write_stops_the_writer_with_an_error(short):
    target = Recorder(**({"short_after": 5} if short else {"fail_after": 5}))
    w = RandomWriter(target.pwrite, MiB, None, 1, name="t-writer").start()
    _until(lambda: not w.threads[0].is_alive())
    w.stop()
    assert w.writes == 5
    assert w.error and ("short write" in w.error if short else "injected" in w.error)
    with pytest.raises(OSError):
        w.check()


def test_failures_after_stop_are_not_errors():
    """A job closed under its writers after stop(): the writes that fail then
    are not the writer's errors."""
    closing = threading.Event()
    waiting = []

    def pwrite(data, offset):
        if closing.is_set():
            waiting.append(offset)
            w.stop_event.wait(10)
            raise ValueError("I/O operation on a closed handle")
        return len(data)

    w = RandomWriter(pwrite, MiB, None, 2, name="t-writer").start()
    _until(lambda: w.writes > 10)
    closing.set()
    _until(lambda: len(waiting) == 2)
    assert w.stop() == []
    assert w.error is None and w.exception is None
