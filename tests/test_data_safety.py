"""Data safety: what a failed flush may have lost is copied again, the
"ignore" policy's backoff starts over after a success, files are reopened
through the checked descriptor and never by path, and the copy engine owns
the descriptors it uses.

The flush tests run a job under the fault shim (tests/faults/faultinject.c)
with a `lossy_flush` rule: the target's fdatasync fails once and, as Linux
drops the dirty pages of a failed fsync, every range written to the target
since its last successful flush is overwritten with junk.  A job that
retries the flush without copying those ranges again ends COMPLETED with a
target that differs from the source."""

import contextlib
import errno
import fcntl
import os
import threading

import pytest
from conftest import MiB, assert_same, make_image, read_bytes, require_uring
from test_faults import SIZE, run_driver, shim  # noqa: F401 - shim is a fixture

import fastmirror
from fastmirror import EventType, HBitmap, _io
from fastmirror._engine import EV_CLEAN, CopyEngine

KiB = 1024
GRAN = 64 * KiB
LOSSY_ONCE = "lossy_flush:target.img:0:0:%d:1" % errno.EIO


@pytest.fixture
def images(tmp_path):
    src = make_image(tmp_path / "source.img", SIZE, seed=7)
    return str(src), str(tmp_path / "target.img")


def _ready(events):
    return next(e for e in events if e["event"] == "READY")


def _flush_errors(events):
    return [e for e in events if e["event"] == "ERROR" and e["operation"] == "flush"]


# -- 3. files are reopened through the checked descriptor --------------------

def _decoy(tmp_path, path, byte):
    """Put a new file (all `byte`) at `path`; the file that was there keeps
    a second name, returned."""
    keep = str(tmp_path / (os.path.basename(path) + ".checked"))
    os.link(path, keep)
    decoy = str(tmp_path / "decoy")
    make_image(decoy, os.path.getsize(path), pattern=byte)
    os.rename(decoy, path)
    return keep


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_target_path_replaced_after_checks_is_never_written(tmp_path, copy_mode):
    """After construction the target's path is made to name another file.
    The job (its copy, write-blocking writes, the pivot and the writes after
    it) writes only to the file it checked."""
    size = 4 * MiB
    src = make_image(tmp_path / "s", size, seed=4)
    dst = make_image(tmp_path / "d", size, pattern=0)
    job = fastmirror.MirrorJob(src, dst, copy_mode=copy_mode)
    checked = _decoy(tmp_path, dst, 0x5A)
    try:
        job.start()
        job.source.pwrite(b"a" * 8192, 12288)
        assert job.wait_ready(30)
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
        job.source.pwrite(b"b" * 4096, MiB)          # pivoted: to the target
    finally:
        job.close()
        job.source.close()
    assert read_bytes(dst) == b"\x5a" * size
    expected = bytearray(read_bytes(src))
    expected[MiB:MiB + 4096] = b"b" * 4096
    assert read_bytes(checked) == bytes(expected)


def test_source_path_replaced_after_checks_writes_reach_the_checked_file(tmp_path):
    size = 4 * MiB
    src = make_image(tmp_path / "s", size, seed=5)
    dst = str(tmp_path / "d")
    job = fastmirror.MirrorJob(src, dst)
    checked = _decoy(tmp_path, src, 0x77)
    try:
        job.start()
        job.source.pwrite(b"w" * 4096, 2 * MiB)
        assert job.wait_ready(30)
        job.cancel()                                 # phase 2: no pivot
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
        job.source.close()
    assert read_bytes(src) == b"\x77" * size
    assert read_bytes(checked, 2 * MiB, 4096) == b"w" * 4096
    assert_same(checked, dst)


def test_tail_descriptor_is_the_checked_target(tmp_path, monkeypatch):
    """The buffered descriptor for an unaligned tail is opened after the
    target's checks: the target path names another file by then."""
    size = 4 * MiB + 1000
    src = make_image(tmp_path / "s", size, seed=6)
    dst = make_image(tmp_path / "d", size, pattern=0)
    real_open = _io.open_file
    kept = []

    def open_then_swap(path, flags, direct, *args):
        r = real_open(path, flags, direct, *args)
        if os.fspath(path) == dst and not kept:
            kept.append(_decoy(tmp_path, dst, 0x33))
        return r
    monkeypatch.setattr(_io, "open_file", open_then_swap)
    job = fastmirror.MirrorJob(src, dst)
    monkeypatch.undo()
    try:
        if not job.status().direct:
            pytest.skip("no O_DIRECT here: the tail needs no second descriptor")
        job.start()
        assert job.wait_ready(30)
        job.cancel()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
        job.source.close()
    assert read_bytes(dst) == b"\x33" * size
    assert_same(src, kept[0])


def test_verify_reads_the_checked_target(tmp_path):
    """verify=True compares the file the job wrote, not whatever the target
    path names at the end."""
    size = 4 * MiB
    src = make_image(tmp_path / "s", size, seed=8)
    dst = str(tmp_path / "d")
    job = fastmirror.MirrorJob(src, dst, verify=True)
    _decoy(tmp_path, dst, 0x11)
    try:
        job.start()
        assert job.wait_ready(30)
        job.complete()
        final = job.wait(30)
    finally:
        job.close()
        job.source.close()
    assert final.type == EventType.COMPLETED, final.error


def test_refused_job_removes_only_the_target_it_created(tmp_path, monkeypatch):
    """A construction refused after the target was created removes that file,
    not another one put at its path in the meantime."""
    src = make_image(tmp_path / "s", MiB, seed=9)
    dst = str(tmp_path / "d")
    real_probe = _io.probe

    def probe_then_swap(fd):
        info = real_probe(fd)
        if os.path.exists(dst) and os.fstat(fd).st_ino == os.stat(dst).st_ino \
                and not os.path.exists(dst + ".checked"):
            _decoy(tmp_path, dst, 0x44)
            raise ValueError("refused after the target was created")
        return info
    monkeypatch.setattr(_io, "probe", probe_then_swap)
    with pytest.raises(ValueError):
        fastmirror.MirrorJob(src, dst)
    monkeypatch.undo()
    assert read_bytes(dst) == b"\x44" * MiB
