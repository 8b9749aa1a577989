"""verify on sparse files: the work follows the data, not the size.

first_difference compares only where either file holds data (the union of
both files' SEEK_DATA extents), reading both sides there, holes included, so
that data on one side against a hole on the other must be zeros to match.
Holes on both sides are equal without a read.  The answer must stay the one
a full byte-by-byte compare gives: a hypothesis test checks it against a
plain Python compare on small sparse files.

The amount of work is measured by wrapping blockio.compare, the only
function that reads: the bytes it is asked to compare are counted, and a
call beyond the budget fails at once (the old code, which read every hole,
would have taken hours on 8 TiB; here it fails in a second).
"""

import os
import random
import tempfile

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, given, settings

import fastmirror
from helpers import MiB, fm, require_loop
from fastmirror._core import blockio as _io
from fastmirror.job import verify

TiB = 1 << 40
BIG = 8 * TiB


class Budget:
    """Counts the bytes blockio.compare is asked to compare; raises once
    they exceed `limit`."""

    def __init__(self, limit: int):
        self.limit = limit
        self.bytes = 0
        self.calls = 0

    def wrap(self, real):
        def compare(fd_a, fd_b, length, chunk=8 << 20, start=0):
            self.calls += 1
            self.bytes += max(0, length - start)
            if self.bytes > self.limit:
                raise AssertionError("verify asked to compare %d bytes, budget %d"
                                     % (self.bytes, self.limit))
            return real(fd_a, fd_b, length, chunk, start)
        return compare


@pytest.fixture
def budget(monkeypatch):
    def make(limit: int) -> Budget:
        b = Budget(limit)
        monkeypatch.setattr(_io, "compare", b.wrap(_io.compare))
        return b
    return make


def _sparse(path, size: int, writes) -> str:
    """A sparse file of `size` bytes with `writes` [(offset, bytes)]."""
    with open(path, "wb") as f:
        f.truncate(size)
        for off, data in writes:
            os.pwrite(f.fileno(), data, off)
    return str(path)


def _require_holes(path) -> None:
    """The filesystem under the test's folder must report holes."""
    st_ = os.stat(path)
    if st_.st_blocks * 512 >= st_.st_size:
        pytest.skip("the filesystem of %s does not keep sparse files" % path)


def _pair(tmp_path):
    """Two 8 TiB sparse files with a few MiB of data at scattered offsets:
    equal data on both sides, zeros written as data on one side against a
    hole on the other, and data at different places that happen to match."""
    rng = random.Random(11)
    same = [(0, rng.randbytes(MiB)),
            (TiB + 123, rng.randbytes(300000)),
            (3 * TiB - 4096, rng.randbytes(8192)),        # across a TiB boundary
            (5 * TiB + 777, rng.randbytes(2 * MiB)),
            (BIG - 5000, rng.randbytes(5000))]            # up to the end
    src_only = [(2 * TiB, bytes(MiB)),                    # zeros as data vs a hole
                (6 * TiB + 4096, bytes(65536))]
    dst_only = [(4 * TiB + 12345, bytes(100000))]         # and the other way round
    a = _sparse(tmp_path / "a.img", BIG, same + src_only)
    b = _sparse(tmp_path / "b.img", BIG, same + dst_only)
    _require_holes(a)
    return a, b


def test_8tib_sparse_pair_reads_only_the_data(tmp_path, budget):
    a, b = _pair(tmp_path)
    counter = budget(64 * MiB)
    assert verify.first_difference(a, b) == -1
    # The data, each extent widened to 1 MiB boundaries: a few MiB, not 8 TiB.
    assert 0 < counter.bytes <= 16 * MiB, counter.bytes


@pytest.mark.parametrize("threads", [1, 16])
def test_difference_after_a_long_hole_is_found_at_its_offset(tmp_path, budget, threads):
    a, b = _pair(tmp_path)
    # Data on the target (zeros, then one non-zero byte) in the middle of a
    # hole of both files more than 1 TiB long, where the source still has
    # its hole; and a later difference that must not win.
    where = 7 * TiB + 123456789
    with open(b, "r+b") as f:
        os.pwrite(f.fileno(), b"\0\0\0\x01", where - 3)
        os.pwrite(f.fileno(), b"\xff", BIG - 100)
    counter = budget(64 * MiB)
    assert verify.first_difference(a, b, threads=threads) == where
    assert counter.bytes <= 16 * MiB


def test_data_against_a_hole_is_read_not_assumed(tmp_path, budget):
    """Data on the source only, over a hole of the target: equal when it is
    zeros, different at its first non-zero byte otherwise."""
    size = TiB
    a = _sparse(tmp_path / "a.img", size, [(TiB // 2, bytes(MiB))])
    b = _sparse(tmp_path / "b.img", size, [])
    _require_holes(a)
    budget(8 * MiB)
    assert verify.first_difference(a, b) == -1
    with open(a, "r+b") as f:
        os.pwrite(f.fileno(), b"\x07", TiB // 2 + 4321)
    assert verify.first_difference(a, b) == TiB // 2 + 4321
    assert verify.first_difference(b, a) == TiB // 2 + 4321


def test_shorter_sparse_target_differs_at_its_end(tmp_path, budget):
    a = _sparse(tmp_path / "a.img", BIG, [(0, b"x" * 4096)])
    b = _sparse(tmp_path / "b.img", BIG // 2, [(0, b"x" * 4096)])
    _require_holes(a)
    budget(8 * MiB)
    assert verify.first_difference(a, b) == BIG // 2


@pytest.mark.timeout(60)
def test_mirror_job_verify_of_an_8tib_sparse_source(tmp_path, budget):
    """verify=True uses the same compare: the job ends COMPLETED, and its
    verify read about the data only."""
    rng = random.Random(5)
    a = _sparse(tmp_path / "a.img", BIG, [(off, rng.randbytes(MiB))
                                          for off in (0, TiB + 65536, 7 * TiB)])
    _require_holes(a)
    counter = budget(64 * MiB)
    job = fastmirror.MirrorJob(a, str(tmp_path / "b.img"), verify=True,
                               granularity=1 << 20)
    try:
        job.start()
        assert job.wait_ready(50)
        job.complete()
        final = job.wait(50)
        assert final is not None and final.type == fastmirror.EventType.COMPLETED, final
    finally:
        job.close()
        job.source.close()
    assert 0 < counter.bytes <= 16 * MiB


@pytest.mark.timeout(60)
def test_cli_verify_of_an_8tib_sparse_pair(tmp_path):
    """`fastmirror verify` (another process: no counter; the old code read
    8 TiB of holes and would hit the timeout)."""
    a, b = _pair(tmp_path)
    r = fm("verify", a, b, timeout=50)
    assert r.returncode == 0, r.stderr
    with open(b, "r+b") as f:
        os.pwrite(f.fileno(), b"\x01", 7 * TiB + 99)
    r = fm("verify", a, b, timeout=50)
    assert r.returncode == 1 and "%d" % (7 * TiB + 99) in r.stdout, (r.stdout, r.stderr)


def test_block_device_is_read_whole(tmp_path, budget, loopdev):
    """A loop device has no hole information (SEEK_DATA calls it all data):
    it is read whole, whatever its backing file holds."""
    require_loop()
    size = 16 * MiB
    img = _sparse(tmp_path / "a.img", size, [(MiB, b"y" * 4096)])
    dev = loopdev(img)
    b = _sparse(tmp_path / "b.img", size, [(MiB, b"y" * 4096)])
    counter = budget(size)
    assert verify.first_difference(dev, b) == -1
    assert counter.bytes == size


# ---------------------------------------------------------------------------
# The same answer as a full compare
# ---------------------------------------------------------------------------

def _plain_first_difference(a: bytes, b: bytes) -> int:
    """What first_difference(a, b) must return: the first differing byte
    over the source's size; a shorter target differs at its end."""
    n = len(a)
    common = min(n, len(b))
    for i in range(common):
        if a[i] != b[i]:
            return i
    return common if common < n else -1


# One change to a file: (kind, offset, length, seed); offsets and lengths in
# a 256 KiB space so that 4 KiB blocks, holes and segments all come into play.
SPACE = 256 << 10
_change = st.tuples(st.sampled_from(["data", "zeros", "punch"]),
                    st.integers(0, SPACE - 1), st.integers(1, 40000),
                    st.integers(0, 2**16))


def _apply(fd: int, size: int, changes) -> None:
    for kind, off, length, seed in changes:
        if off >= size:
            continue
        length = min(length, size - off)
        if kind == "data":
            os.pwrite(fd, random.Random(seed).randbytes(length), off)
        elif kind == "zeros":
            os.pwrite(fd, bytes(length), off)
        else:
            _io.zero(fd, off, length, False, True)    # a hole (or zeros)


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(size_a=st.integers(0, SPACE), size_b=st.integers(0, SPACE),
       shared=st.lists(_change, max_size=6), only_a=st.lists(_change, max_size=3),
       only_b=st.lists(_change, max_size=3), threads=st.sampled_from([1, 3]))
def test_same_answer_as_a_full_compare(size_a, size_b, shared, only_a, only_b, threads):
    with tempfile.TemporaryDirectory() as d, \
            pytest.MonkeyPatch.context() as mp:
        # Small grains and segments, so that a 256 KiB file has many
        # extents, several segments, and threads taking them in turn.
        mp.setattr(verify, "GRAIN", 4096)
        mp.setattr(verify, "SEGMENT", 32768)
        paths = []
        for name, size, own in (("a", size_a, only_a), ("b", size_b, only_b)):
            path = os.path.join(d, name)
            with open(path, "wb") as f:
                f.truncate(size)
                _apply(f.fileno(), size, shared)
                _apply(f.fileno(), size, own)
            paths.append(path)
        with open(paths[0], "rb") as f:
            a = f.read()
        with open(paths[1], "rb") as f:
            b = f.read()
        expected = _plain_first_difference(a, b)
        assert verify.first_difference(paths[0], paths[1], chunk=8192,
                                       threads=threads) == expected
