"""Choosing the I/O engine: io_uring where the kernel allows it, the blocking
threads otherwise, and a clear answer either way.

Where io_uring is refused is real here: as root, kernel.io_uring_disabled=2
makes io_uring_setup(2) fail with EPERM for every process, as a seccomp
profile or a hardened kernel would.  The sysctl is restored after each test.
"""

import contextlib
import os

import pytest

import fastmirror
from helpers import (MiB, assert_same, fm, make_image, require_root, require_that,
                     require_uring)
from fastmirror import EventType
from fastmirror._core import blockio as _io

SYSCTL = "/proc/sys/kernel/io_uring_disabled"


@contextlib.contextmanager
def io_uring_disabled():
    require_root()
    require_that(os.path.exists(SYSCTL),
                 "the kernel has no %s (Linux 6.6 or later)" % SYSCTL)
    with open(SYSCTL) as f:
        old = f.read().strip()
    with open(SYSCTL, "w") as f:
        f.write("2")
    try:
        yield
    finally:
        with open(SYSCTL, "w") as f:
            f.write(old)


@pytest.fixture
def images(tmp_path):
    src = make_image(tmp_path / "src.img", 8 * MiB, seed=3)
    return str(src), str(tmp_path / "dst.img")


def run_job(job):
    job.start()
    assert job.wait_ready(60)
    job.complete()
    final = job.wait(60)
    job.close()
    return final


def test_io_uring_is_used_where_the_kernel_allows_it(images):
    require_uring()
    for engine in ("auto", "io_uring"):
        job = fastmirror.MirrorJob(*images, io_engine=engine)
        assert job.status().io_engine == "io_uring"
        assert run_job(job).type == EventType.COMPLETED
        assert_same(*images)
        os.unlink(images[1])


def test_threads_engine_on_request(images):
    job = fastmirror.MirrorJob(*images, io_engine="threads")
    assert job.status().io_engine == "threads"
    assert run_job(job).type == EventType.COMPLETED
    assert_same(*images)


def test_unknown_io_engine_is_refused_before_anything_is_written(images):
    with pytest.raises(ValueError, match="io_engine"):
        fastmirror.MirrorJob(*images, io_engine="aio")
    assert not os.path.exists(images[1])


def test_refused_io_uring_auto_falls_back_and_explicit_is_an_error(images):
    with io_uring_disabled():
        why = _io.uring_error()
        assert why is not None and "not permitted" in why
        with pytest.raises(ValueError, match="io_uring.*not available"):
            fastmirror.MirrorJob(*images, io_engine="io_uring")
        assert not os.path.exists(images[1])
        job = fastmirror.MirrorJob(*images)
        assert job.status().io_engine == "threads (io_uring: %s)" % why
        assert run_job(job).type == EventType.COMPLETED
    assert_same(*images)


def test_io_uring_refused_after_the_probe_falls_back_to_threads(images):
    """The probe passed when the job was built, then setting up the rings
    fails when the job starts: the copy slots run as blocking threads."""
    require_uring()
    job = fastmirror.MirrorJob(*images, buf_size=4 * MiB)
    assert job.status().io_engine == "io_uring"
    with io_uring_disabled():
        job.start()
        assert job.wait_ready(60)
        st = job.status()
        job.complete()
        final = job.wait(60)
        job.close()
    assert final.type == EventType.COMPLETED
    assert st.io_engine.startswith("threads (io_uring: ")
    assert_same(*images)


def test_command_line_io_engine(images):
    r = fm("mirror", *images, "--io-engine", "threads", "--json")
    assert r.returncode == 0, r.stderr
    assert_same(*images)
    r = fm("mirror", *images, "--io-engine", "posix-aio")
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_command_line_says_when_io_uring_is_refused(images):
    with io_uring_disabled():
        r = fm("mirror", images[0], images[1] + ".2", "--io-engine", "io_uring")
        assert r.returncode == 2
        assert "io_uring" in r.stderr and "Traceback" not in r.stderr
        assert not os.path.exists(images[1] + ".2")
        r = fm("mirror", *images)
        assert r.returncode == 0, r.stderr
        assert "copying with threads (io_uring: Operation not permitted)" in r.stderr
    assert_same(*images)


def _rss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no Rss in smaps_rollup")


def test_copy_buffers_take_buf_size_not_a_huge_page_per_copy(tmp_path):
    """16 copies of 256 KiB: the buffers are one mapping of buf_size (4 MiB,
    faulted in when the job is built), not 16 huge pages of 2 MiB (32 MiB)."""
    src = make_image(tmp_path / "src.img", 4 * MiB, seed=5)
    jobs = []
    before = _rss()
    try:
        for i in range(4):
            jobs.append(fastmirror.MirrorJob(str(src), str(tmp_path / ("d%d.img" % i)),
                                             buf_size=4 * MiB, io_size=256 << 10))
            assert jobs[-1]._engine.nworkers == 16
        grown = _rss() - before
    finally:
        for job in jobs:
            job.close()
    assert 4 * 4 * MiB <= grown < 4 * 8 * MiB, grown
