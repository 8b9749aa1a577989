"""fastmirror.job.verify: the first differing byte, found by several threads
comparing consecutive segments."""

import os

import pytest

from fastmirror.job import verify


@pytest.fixture
def small_segments(monkeypatch):
    # Many segments over a small file, so that the ordering logic is exercised.
    monkeypatch.setattr(verify, "SEGMENT", 256 << 10)


@pytest.mark.parametrize("threads", [1, 2, 4, 8])
def test_first_difference_in_file_order(tmp_path, small_segments, threads):
    size = (3 << 20) + 1234
    data = os.urandom(size)
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(data)
    later = size - 7
    for off in [0, 1, (256 << 10) - 1, 256 << 10, (1 << 20) + 4097, size - 8]:
        d = bytearray(data)
        d[off] ^= 0x40
        d[later] ^= 0x01          # a second, later difference never wins
        b.write_bytes(d)
        assert verify.first_difference(a, b, chunk=64 << 10, threads=threads) == off
    b.write_bytes(data)
    assert verify.first_difference(a, b, chunk=64 << 10, threads=threads) == -1


def test_shorter_target_differs_at_its_end(tmp_path, small_segments):
    data = os.urandom(1 << 20)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data[:300000])
    assert verify.first_difference(tmp_path / "a", tmp_path / "b") == 300000


def test_longer_target_compared_over_source_size(tmp_path, small_segments):
    data = os.urandom(1 << 20)
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data + b"extra")
    assert verify.first_difference(tmp_path / "a", tmp_path / "b") == -1


def test_missing_file_raises_with_path(tmp_path):
    (tmp_path / "a").write_bytes(b"x" * 4096)
    with pytest.raises(FileNotFoundError) as info:
        verify.first_difference(tmp_path / "a", tmp_path / "nope")
    assert "nope" in str(info.value)
