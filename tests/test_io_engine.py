"""Choosing the I/O engine: io_uring where the kernel allows it, the blocking
threads otherwise, and a clear answer either way.

Where io_uring is refused is real here: as root, kernel.io_uring_disabled=2
makes io_uring_setup(2) fail with EPERM for every process, as a seccomp
profile or a hardened kernel would.  The sysctl is restored after each test.
"""

import contextlib
import errno
import json
import os
import subprocess
import sys

import pytest

import fastmirror
from helpers.faults import build_shim
from helpers import (MiB, assert_same, fm, make_image, read_bytes, require_root,
                     require_that, require_uring)
from fastmirror import EventType
from fastmirror._core import blockio as _io

# This module switches io_uring off for the whole machine
# (kernel.io_uring_disabled): make test runs it alone.
pytestmark = pytest.mark.serial

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
        job.start()
        assert job.wait_ready(60)
        # The rings say which calls they issue (registered buffers, as root).
        assert job.status().io_calls.startswith(("READ_FIXED/WRITE_FIXED", "READ/WRITE")), \
            job.status().io_calls
        job.complete()
        assert job.wait(60).type == EventType.COMPLETED
        job.close()
        assert_same(*images)
        os.unlink(images[1])


def test_threads_engine_on_request(images):
    job = fastmirror.MirrorJob(*images, io_engine="threads")
    assert job.status().io_engine == "threads"
    assert job.status().io_calls == "preadv/pwritev"
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


# -- vectored transfers: preadv/pwritev until done ---------------------------

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    """The fault shim of test_faults.py: it also cuts preadv/pwritev short
    (FM_SHORT_IO) and injects errors, EINTR included, into them."""
    return build_shim(tmp_path_factory.mktemp("shim"))


SIZES = (5, 4096, 0, 777, 10000, 1)       # iovec lengths; an empty one in the middle


def test_vectored_write_and_read_across_several_iovecs(tmp_path):
    path = str(tmp_path / "v.bin")
    data = [os.urandom(n) for n in SIZES]
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        assert _io.pwritev_from(fd, data, 3) == sum(SIZES)
        # Read back into differently cut buffers: every boundary falls
        # somewhere else than the writes'.
        out = [bytearray(n) for n in (100, 0, 9000, 5000, 4000)]
        assert _io.preadv_into(fd, out, 3) == sum(SIZES)
    finally:
        os.close(fd)
    assert b"".join(out)[:sum(SIZES)] == b"".join(data)
    assert read_bytes(path) == bytes(3) + b"".join(data)


def test_vectored_read_ends_inside_an_iovec_at_end_of_file(tmp_path):
    path = str(tmp_path / "eof.bin")
    data = os.urandom(6000)
    with open(path, "wb") as f:
        f.write(data)
    out = [bytearray(b"\xee" * 4096), bytearray(b"\xee" * 4096), bytearray(b"\xee" * 10)]
    fd = os.open(path, os.O_RDONLY)
    try:
        assert _io.preadv_into(fd, out, 0) == 6000
        assert _io.preadv_into(fd, out, 5999) == 1
        assert _io.preadv_into(fd, out, 6000) == 0
        assert _io.preadv_into(fd, [], 0) == 0
    finally:
        os.close(fd)
    assert bytes(out[0]) == data[5999:6000] + data[1:4096]
    assert bytes(out[1]) == data[4096:6000] + b"\xee" * (8192 - 6000)
    assert bytes(out[2]) == b"\xee" * 10


def test_vectored_errors_raise_with_errno(tmp_path):
    fd = os.open(str(tmp_path / "ro.bin"), os.O_RDONLY | os.O_CREAT)
    try:
        with pytest.raises(OSError) as e:
            _io.pwritev_from(fd, [b"abc", b"def"], 0)
        assert e.value.errno == errno.EBADF
        with pytest.raises((TypeError, ValueError, BufferError)):
            _io.preadv_into(fd, [b"read-only"], 0)
    finally:
        os.close(fd)


VECTORED_SCRIPT = """
import json, os, sys
from fastmirror._core import blockio as _io
path, sizes = sys.argv[1], [int(x) for x in sys.argv[2].split(",")]
data = [os.urandom(n) for n in sizes]
fd = os.open(path, os.O_RDWR | os.O_CREAT)
wrote = _io.pwritev_from(fd, data, 1)
out = [bytearray(n) for n in reversed(sizes)]
got = _io.preadv_into(fd, out, 1)
os.close(fd)
print(json.dumps({"wrote": wrote, "read": got,
                  "same": b"".join(out)[:got] == b"".join(data)}))
"""


def test_vectored_short_transfers_and_eintr_are_continued(shim, tmp_path):
    """Every preadv/pwritev moves at most 1000 bytes (a short transfer that
    stops inside an iovec, at a different place each time), and the first
    calls fail with EINTR: the helpers go on where they stopped."""
    path = str(tmp_path / "short.bin")
    log = tmp_path / "faults.log"
    sizes = (3000, 1, 0, 2500, 4096, 17)
    faults = "read:short.bin:0:1000000:%d:2;write:short.bin:0:1000000:%d:3" % (
        errno.EINTR, errno.EINTR)
    env = dict(os.environ, LD_PRELOAD=shim, FM_FAULTS=faults, FM_FAULTS_LOG=str(log),
               FM_SHORT_IO="1000")
    r = subprocess.run([sys.executable, "-c", VECTORED_SCRIPT, path,
                        ",".join(map(str, sizes))],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out == {"wrote": sum(sizes), "read": sum(sizes), "same": True}
    lines = log.read_text().splitlines()
    shorts = [x for x in lines if x.startswith("short")]
    eintr = [x for x in lines if x.endswith(" %d" % errno.EINTR)]
    assert len(shorts) >= 2 * (sum(sizes) // 1000), lines
    assert len(eintr) == 5, lines


def test_blocking_copy_continues_short_transfers(shim, images, tmp_path):
    """The threads engine's copies read and write through preadv/pwritev
    that move at most 12 KiB at a time (aligned, as O_DIRECT needs)."""
    log = tmp_path / "faults.log"
    env = dict(os.environ, LD_PRELOAD=shim, FM_FAULTS_LOG=str(log), FM_SHORT_IO="12288")
    r = subprocess.run([sys.executable, os.path.join(HERE, "faults", "driver.py"),
                        *images, "--io-engine", "threads"],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    final = [json.loads(x) for x in r.stdout.splitlines()][-1]
    assert final["kind"] == "final" and final["event"] == "COMPLETED", r.stdout
    shorts = log.read_text().splitlines()
    assert any(x.startswith("short 0 ") for x in shorts)     # reads
    assert any(x.startswith("short 1 ") for x in shorts)     # writes
    assert_same(*images)


# -- how the io_uring drivers issue reads and writes ------------------------

# Data, holes, a zero run inside data, and an end that is not a multiple of
# the O_DIRECT alignment: the ring's reads and writes, its short read at the
# end, and the blocking stores of zeros and of the tail all take part.
RING_SIZE = 8 * MiB + 1000
RING_HOLES = ((1 * MiB, 512 << 10), (5 * MiB + 4096, 64 << 10))


@pytest.fixture
def ring_images(tmp_path):
    src = make_image(tmp_path / "src.img", RING_SIZE, holes=RING_HOLES, seed=11)
    return str(src), str(tmp_path / "dst.img")


@pytest.mark.parametrize("calls,expect", [
    ("auto", "READ_FIXED/WRITE_FIXED"),
    ("fixed", "READ_FIXED/WRITE_FIXED"),
    ("vectored", "READV/WRITEV"),
    ("plain", "READ/WRITE"),
])
def test_ring_calls_copy_correctly(ring_images, calls, expect):
    """Each way of issuing the ring's reads and writes, registered buffers
    (READ_FIXED/WRITE_FIXED) the default, copies the source exactly.  Small
    buffers (1 MiB) stay within an unprivileged RLIMIT_MEMLOCK of 8 MiB."""
    require_uring()
    job = fastmirror.MirrorJob(*ring_images, io_engine="io_uring", buf_size=1 * MiB,
                               io_size=256 << 10)
    assert job._engine.ring_calls == "auto" and job._engine.ring_io is None
    job._engine.ring_calls = calls
    job.start()
    assert job.wait_ready(60)
    ring_io = job._engine.ring_io
    job.complete()
    final = job.wait(60)
    job.close()
    assert final.type == EventType.COMPLETED
    assert ring_io == expect
    assert_same(*ring_images)


def test_ring_calls_refuses_unknown_values(ring_images):
    job = fastmirror.MirrorJob(*ring_images, io_engine="threads")
    try:
        with pytest.raises(ValueError, match="ring_calls"):
            job._engine.ring_calls = "splice"
        assert job._engine.ring_calls == "auto"
    finally:
        job.close()


REFUSED_SCRIPT = """
import json, sys
import fastmirror

job = fastmirror.MirrorJob(sys.argv[1], sys.argv[2], io_engine="io_uring",
                           buf_size=4 << 20)
job.start()
ready = job.wait_ready(60)
ring_io = job._engine.ring_io
job.complete()
final = job.wait(60)
job.close()
print(json.dumps({"ready": ready, "event": final.type.value, "ring_io": ring_io,
                  "io_engine": job.status().io_engine}))
"""

PR_CAPBSET_DROP = 24
CAP_IPC_LOCK = 14
MEMLOCK = 512 << 10      # the rings fit, 2 MiB of buffers per ring do not


def _refuse_registration():
    """In the child, before exec: registered buffers are charged to
    RLIMIT_MEMLOCK, except with CAP_IPC_LOCK; so lower the limit, and take
    CAP_IPC_LOCK out of the bounding set, which root's exec then keeps out
    of its capabilities."""
    import ctypes
    import resource

    resource.setrlimit(resource.RLIMIT_MEMLOCK, (MEMLOCK, MEMLOCK))
    if os.geteuid() == 0:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_CAPBSET_DROP, CAP_IPC_LOCK, 0, 0, 0) != 0:
            os._exit(99)


def test_ring_falls_back_to_plain_calls_when_registration_is_refused(ring_images):
    """IORING_REGISTER_BUFFERS answers ENOMEM over RLIMIT_MEMLOCK: the rings
    issue READ/WRITE instead, say why, and the copy is exact."""
    require_uring()
    r = subprocess.run([sys.executable, "-c", REFUSED_SCRIPT, *ring_images],
                       preexec_fn=_refuse_registration, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["ready"] and out["event"] == "COMPLETED", out
    assert out["io_engine"] == "io_uring", out
    assert out["ring_io"] == "READ/WRITE (registered buffers refused: %s)" % os.strerror(
        errno.ENOMEM), out
    assert_same(*ring_images)
