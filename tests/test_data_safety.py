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
from helpers import MiB, assert_same, make_image, read_bytes, require_uring
from test_faults import SIZE, run_driver, shim  # noqa: F401 - shim is a fixture

import fastmirror
from fastmirror import EventType, HBitmap
from fastmirror._core import blockio as _io
from fastmirror._core.engine import EV_CLEAN, CopyEngine
from fastmirror._core.tracked import Claim

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


# -- 1. a failed flush dirties again what it may have lost -----------------

def test_failed_flush_in_phase1_copies_everything_again_ignore(shim, images):  # noqa: F811
    """The first flush (before READY) fails and loses the whole copy: under
    "ignore" the job copies it all again before it retries the flush."""
    src, dst = images
    events, _, final = run_driver(shim, LOSSY_ONCE, src, dst, "--on-target-error", "ignore")
    errors = _flush_errors(events)
    assert len(errors) == 1 and errors[0]["action"] == "ignore"
    assert final["event"] == "COMPLETED"
    assert _ready(events)["bytes_copied"] >= 2 * SIZE     # copied before and after the failure
    assert_same(src, dst)


def test_failed_flush_in_phase1_copies_everything_again_stop_resume(shim, images):  # noqa: F811
    src, dst = images
    events, paused, final = run_driver(shim, LOSSY_ONCE, src, dst,
                                       "--on-target-error", "stop", "--resume-after-pause", "2")
    assert [e["action"] for e in _flush_errors(events)] == ["stop"]
    # While paused by the policy, what the failed flush covered is dirty.
    assert paused and paused[0]["failed_chunk_dirty"] is True
    assert final["event"] == "COMPLETED"
    assert _ready(events)["bytes_copied"] >= 2 * SIZE
    assert_same(src, dst)


@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_failed_flush_in_drain_redoes_writes_since_the_last_good_flush(shim, images,  # noqa: F811
                                                                       copy_mode):
    """READY's flush succeeds; then 4 blocks are written through job.source
    (copied in background mode, written to both sides in write-blocking
    mode) and the drain's flush fails, losing them.  Exactly those chunks
    are copied again, not the whole disk (it was flushed at READY)."""
    src, dst = images
    events, _, final = run_driver(shim, LOSSY_ONCE + ":1", src, dst,
                                  "--on-target-error", "ignore", "--copy-mode", copy_mode,
                                  "--write-when-ready", "4")
    assert final["event"] == "COMPLETED" and final["copy_mode"] == copy_mode
    assert len(_flush_errors(events)) == 1
    after_ready = final["bytes_copied"] - _ready(events)["bytes_copied"]
    copies_per_write = 2 if copy_mode == "background" else 1
    assert 4 * GRAN * copies_per_write <= after_ready < SIZE // 2
    assert_same(src, dst)


# -- 2. the "ignore" backoff starts over after a success --------------------

def test_ignore_backoff_starts_over_after_a_successful_flush(shim, images):  # noqa: F811
    """Three failed flushes wait 10, 20, 40 ms; the fourth flush succeeds
    (READY); the drain's failed flush waits 10 ms again, not 80."""
    src, dst = images
    faults = "flush:target.img:0:0:5:3;flush:target.img:0:0:5:1:1"
    events, _, final = run_driver(shim, faults, src, dst, "--on-target-error", "ignore")
    delays = [e["retry_delay"] for e in _flush_errors(events)]
    assert delays == pytest.approx([0.01, 0.02, 0.04, 0.01])
    kinds = [e["event"] for e in events]
    assert kinds.index("READY") == 3                       # between the 3rd and 4th failure
    assert final["event"] == "COMPLETED"
    assert_same(src, dst)


def test_ignore_backoff_starts_over_after_a_successful_copy(shim, images):  # noqa: F811
    """One copy worker (1 MiB buffer), copying in one sweep.  The read of
    [6, 7) MiB fails once (10 ms), then [7, 8) MiB fails (20 ms: a failure in
    a row), then [6, 7) MiB copies, then [7, 8) MiB fails again: 10 ms, the
    copy in between was a success."""
    src, dst = images
    faults = ";".join("read:source.img:%d:%d:5:%d" % (off, off + GRAN, n)
                      for off, n in ((6 * MiB, 1), (7 * MiB, 2)))
    events, _, final = run_driver(shim, faults, src, dst, "--on-source-error", "ignore")
    errors = [e for e in events if e["event"] == "ERROR"]
    assert [e["error_offset"] for e in errors] == [6 * MiB, 7 * MiB, 7 * MiB]
    assert [e["retry_delay"] for e in errors] == pytest.approx([0.01, 0.02, 0.01])
    assert final["event"] == "COMPLETED"
    assert_same(src, dst)


# -- the engine: failed flushes, owned descriptors ---------------------------

def _engine(src_fd, dst_fd, size, nworkers=2, max_io=MiB):
    return CopyEngine(HBitmap(size, GRAN), src_fd, dst_fd, dst_fd, size, 512, max_io, nworkers)


@contextlib.contextmanager
def _workers(eng, use_ring=False):
    """The engine's workers run inside the block (stop() is for good)."""
    if use_ring:
        threads = [threading.Thread(target=eng.run_driver, args=(0, eng.nworkers))]
    else:
        threads = [threading.Thread(target=eng.run_worker, args=(i,))
                   for i in range(eng.nworkers)]
    for t in threads:
        t.start()
    try:
        yield
    finally:
        eng.stop()
        for t in threads:
            t.join()


def _wait_clean(eng):
    ev = eng.wait_event(30.0)
    assert ev == EV_CLEAN, ev


def _copy_all(eng):
    with _workers(eng):
        _wait_clean(eng)


def _fds():
    return set(os.listdir("/proc/self/fd"))


def _fds_on(*paths):
    """This process's descriptors open on any of `paths`."""
    want = {os.path.realpath(p) for p in paths}
    out = set()
    for fd in _fds():
        try:
            if os.readlink("/proc/self/fd/" + fd) in want:
                out.add(fd)
        except FileNotFoundError:
            pass
    return out


@contextlib.contextmanager
def _engine_onto_null(tmp_path, size):
    """An engine copying a random image to /dev/null, whose fdatasync fails
    (EINVAL): every flush of it fails."""
    src = make_image(tmp_path / "s", size, seed=1)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open("/dev/null", os.O_WRONLY)
    try:
        eng = _engine(sfd, dfd, size)
        yield eng
        eng.close()
    finally:
        os.close(sfd)
        os.close(dfd)


@pytest.mark.parametrize("use_ring", [False, True], ids=["threads", "io_uring"])
def test_engine_failed_flush_dirties_what_was_copied(tmp_path, use_ring):
    """The blocking workers and the io_uring driver both record their
    copies: a flush that fails (fdatasync of /dev/null: EINVAL) dirties
    every chunk copied since the last successful flush."""
    if use_ring:
        require_uring()
    size = 4 * MiB
    with _engine_onto_null(tmp_path, size) as eng:
        eng.bitmap.set(0, size)
        with _workers(eng, use_ring):
            _wait_clean(eng)
            assert eng.bytes_copied == size and eng.bitmap.dirty_count == 0
            assert eng.unflushed_bytes == size
            assert eng.flush() == -errno.EINVAL
            assert eng.bitmap.dirty_bytes == size
            assert eng.snapshot()[3]             # held until the policy is applied
            eng.release()
            _wait_clean(eng)
            assert eng.bytes_copied == 2 * size


def test_engine_failed_flush_dirties_a_claim_in_flight(tmp_path):
    """A write that goes to both sides (write-blocking) may have reached the
    target just before a flush failed: its chunks are dirty afterwards."""
    with _engine_onto_null(tmp_path, 4 * MiB) as eng:
        claim = Claim(eng, MiB, 4096)
        claim.acquire()
        assert eng.flush() < 0
        claim.release()
        assert eng.bitmap.get(MiB) and eng.bitmap.dirty_count == 1


def test_engine_records_every_write_until_a_flush_succeeds(tmp_path):
    """Copies, zeroing and claims count as written until a successful flush."""
    size = 4 * MiB
    src = make_image(tmp_path / "s", size, seed=1)
    dst = make_image(tmp_path / "d", size, pattern=0)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    try:
        eng = _engine(sfd, dfd, size)
        eng.bitmap.set(0, MiB)
        with _workers(eng):
            _wait_clean(eng)
            assert eng.unflushed_bytes == MiB
            assert eng.flush() == 0 and eng.unflushed_bytes == 0
            assert eng.zero_target(2 * MiB, GRAN) == 0
            claim = Claim(eng, 3 * MiB, 100)
            claim.acquire()
            claim.release()
            assert eng.unflushed_bytes == 2 * GRAN
            assert eng.flush() == 0 and eng.unflushed_bytes == 0
            assert eng.bitmap.dirty_count == 0
        eng.close()
    finally:
        os.close(sfd)
        os.close(dfd)


def test_engine_works_on_its_own_descriptors(tmp_path):
    """Closing the descriptors the engine was given breaks nothing: it copies
    and flushes through its own close-on-exec duplicates, and close()
    releases them."""
    size = 4 * MiB + 4096
    src = make_image(tmp_path / "s", size, seed=2)
    dst = make_image(tmp_path / "d", size, pattern=0)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open(dst, os.O_RDWR)
    eng = _engine(sfd, dfd, size)
    os.close(sfd)
    os.close(dfd)
    # The engine's descriptors: those open on the two files (other tests'
    # objects may close or open descriptors of their own meanwhile).
    mine = _fds_on(src, dst)
    assert len(mine) == 2
    for fd in mine:
        assert fcntl.fcntl(int(fd), fcntl.F_GETFD) & fcntl.FD_CLOEXEC
    eng.bitmap.set(0, size)
    _copy_all(eng)
    assert eng.take_failures() == ([], 0)
    assert eng.flush() == 0
    assert_same(src, dst)
    eng.close()
    assert _fds_on(src, dst) == set()
    eng.close()                                  # again: nothing to do
    assert eng.flush() == -errno.EBADF
    with pytest.raises(RuntimeError):
        eng.run_worker(0)


def test_engine_close_refused_while_workers_run(tmp_path):
    size = MiB
    src = make_image(tmp_path / "s", size, seed=2)
    sfd = os.open(src, os.O_RDONLY)
    dfd = os.open("/dev/null", os.O_WRONLY)
    eng = _engine(sfd, dfd, size, nworkers=1, max_io=GRAN)
    os.close(sfd)
    os.close(dfd)
    eng.set_speed(GRAN)               # one chunk a second: the worker stays in
    eng.bitmap.set(0, size)
    t = threading.Thread(target=eng.run_worker, args=(0,))
    t.start()
    try:
        while eng.copies == 0:        # the worker is inside run_worker
            eng.wait_event(0.01, want_clean=False)
        with pytest.raises(RuntimeError):
            eng.close()
        assert eng.flush() == -errno.EINVAL      # still open
    finally:
        eng.stop()
        t.join()
    eng.close()


def test_job_leaves_no_descriptor_after_close(tmp_path):
    """A job's lifetime, with writes through job.source, write-blocking mode
    and a pivot, ends with no descriptor open on either file."""
    src = make_image(tmp_path / "s", 4 * MiB, seed=3)
    dst = str(tmp_path / "d")
    job = fastmirror.MirrorJob(src, dst, copy_mode="write-blocking")
    job.start()
    job.source.pwrite(b"x" * 4096, 0)
    assert job.wait_ready(30)
    job.source.pwrite(b"y" * 4096, 8192)
    job.complete()
    assert job.wait(30).type == EventType.COMPLETED
    job.close()
    job.source.close()
    assert _fds_on(src, dst) == set()


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
