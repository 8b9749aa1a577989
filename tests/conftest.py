"""Shared fixtures and helpers for the fastmirror tests.

Helpers (import them with ``from conftest import ...``):
  make_image(path, size, pattern=..., holes=..., seed=...)  a test image
  read_bytes(path, offset, length) / sha256(path, length)   plain reads
  first_difference(a, b, length)                           plain-Python compare
  assert_same(a, b, length=None)                           plain compare + message
  qemu_img_compare(a, b) / assert_qemu_equal(a, b)         qemu-img as a judge
  require(tool) / require_root() / require_loop()          skip, or fail with
                                                           FASTMIRROR_REQUIRE_ALL=1
  Writers                                                  threads writing through
                                                           job.source

Fixtures:
  mkjob            build MirrorJobs; a job a test leaves running is closed and
                   the test fails
  loopdev          attach a loop device (sector size, direct I/O); always detached
  no_thread_leak   (autouse) no "fastmirror-*" thread outlives a test
  clean_trace      (autouse) no tracepoint listener or printer outlives a test

The equality checks here deliberately do not use fastmirror.job.verify: the code
under test must not judge itself.
"""

from __future__ import annotations

import hashlib
import os
import random
import shutil
import subprocess
import sys
import threading
import time

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:          # `from conftest import ...` in test modules
    sys.path.insert(0, _HERE)

KiB = 1024
MiB = 1024 * 1024

REQUIRE_ALL = os.environ.get("FASTMIRROR_REQUIRE_ALL") == "1"


# ---------------------------------------------------------------------------
# Requirements: skip with a reason, or fail on a machine that must run all
# ---------------------------------------------------------------------------

def _missing(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but " + reason, pytrace=False)
    pytest.skip(reason)


def require_that(ok: bool, reason: str) -> None:
    """Skip (or fail) with `reason` unless ok."""
    if not ok:
        _missing(reason)


def require(tool: str) -> str:
    """The full path of `tool`; skips (or fails) when it is not installed."""
    path = shutil.which(tool)
    if path is None:
        _missing("%s is not installed (not on PATH)" % tool)
    return path


def require_root() -> None:
    if os.geteuid() != 0:
        _missing("needs root (running as uid %d)" % os.geteuid())


def require_uring() -> None:
    """io_uring usable for reads and writes here (kernel, seccomp, sysctl)."""
    from fastmirror._core import blockio as _io

    why = _io.uring_error()
    require_that(why is None, "io_uring is refused here: %s" % why)


def require_loop() -> str:
    """Root, losetup and the loop driver; returns losetup's path."""
    require_root()
    losetup = require("losetup")
    if not os.path.exists("/dev/loop-control"):
        _missing("no loop device support (/dev/loop-control is missing)")
    return losetup


def fm(*args, timeout: float = 120, **kw) -> subprocess.CompletedProcess:
    """Run the fastmirror command as a user does: a separate process."""
    return subprocess.run([sys.executable, "-m", "fastmirror", *args],
                          capture_output=True, text=True, timeout=timeout, **kw)


@pytest.fixture
def fast_thread_switching():
    """Under the GIL, switch threads as often as possible, so that calls from
    several threads really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


# ---------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------

def pattern_bytes(length: int, seed: int = 0) -> bytes:
    """Deterministic pseudo-random bytes."""
    return random.Random(seed).randbytes(length)


def make_image(path, size: int, pattern="random", holes=(), seed: int = 0):
    """Create (or overwrite) the file `path` of `size` bytes.

    pattern: "random" (deterministic from seed), "zero" (allocated zeros),
    "sparse" (no data at all: one big hole), or an int byte value to fill with.
    holes: (offset, length) ranges left unwritten, so they are real holes of
    the file where they cover whole filesystem blocks (4 KiB here).
    Returns path."""
    path = os.fspath(path)
    holes = sorted(holes)
    data_ranges = []
    pos = 0
    for off, length in holes:
        if off > pos:
            data_ranges.append((pos, off - pos))
        pos = max(pos, off + length)
    if pos < size:
        data_ranges.append((pos, size - pos))
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        if pattern == "sparse":
            return path
        for off, length in data_ranges:
            done = 0
            while done < length:
                n = min(4 * MiB, length - done)
                if pattern == "random":
                    buf = rng.randbytes(n)
                elif pattern == "zero":
                    buf = bytes(n)
                elif isinstance(pattern, int):
                    buf = bytes([pattern]) * n
                else:
                    raise ValueError("unknown pattern %r" % (pattern,))
                f.seek(off + done)
                f.write(buf)
                done += n
        f.flush()
        os.fsync(f.fileno())
    return path


def allocated_bytes(path) -> int:
    return os.stat(path).st_blocks * 512


def device_size(path) -> int:
    """Size of a regular file or a block device."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def read_bytes(path, offset: int = 0, length: int | None = None) -> bytes:
    """Read with plain buffered I/O (a fresh descriptor each time)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if length is None:
            length = os.lseek(fd, 0, os.SEEK_END) - offset
        out = bytearray()
        while len(out) < length:
            b = os.pread(fd, min(8 * MiB, length - len(out)), offset + len(out))
            if not b:
                break
            out += b
        return bytes(out)
    finally:
        os.close(fd)


def write_bytes(path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        done = 0
        while done < len(data):
            done += os.pwrite(fd, data[done:], offset + done)
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path, length: int | None = None) -> str:
    h = hashlib.sha256()
    if length is None:
        length = device_size(path)
    pos = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        while pos < length:
            b = os.pread(fd, min(8 * MiB, length - pos), pos)
            if not b:
                break
            h.update(b)
            pos += len(b)
    finally:
        os.close(fd)
    return h.hexdigest()


def first_difference(a, b, length: int | None = None, chunk: int = 4 * MiB) -> int:
    """First offset in [0, length) where a and b differ (a side that ends early
    differs at its end), or -1.  length defaults to the size of a."""
    if length is None:
        length = device_size(a)
    fa, fb = os.open(a, os.O_RDONLY), os.open(b, os.O_RDONLY)
    try:
        pos = 0
        while pos < length:
            n = min(chunk, length - pos)
            x, y = os.pread(fa, n, pos), os.pread(fb, n, pos)
            if x != y:
                for i in range(min(len(x), len(y))):
                    if x[i] != y[i]:
                        return pos + i
                return pos + min(len(x), len(y))
            if len(x) < n:
                return pos + len(x)
            pos += n
        return -1
    finally:
        os.close(fa)
        os.close(fb)


def assert_same(a, b, length: int | None = None) -> None:
    d = first_difference(a, b, length)
    if d >= 0:
        ctx_a = read_bytes(a, d, 16)
        ctx_b = read_bytes(b, d, 16)
        pytest.fail("%s and %s differ at offset %d (chunk %d of 64 KiB): %s vs %s"
                    % (a, b, d, d // (64 * KiB), ctx_a.hex(), ctx_b.hex()))


def assert_all_bytes(path, offset: int, length: int, value: int) -> None:
    data = read_bytes(path, offset, length)
    assert len(data) == length, "%s: short read at %d" % (path, offset)
    if data.count(value) != length:
        bad = next(i for i, c in enumerate(data) if c != value)
        pytest.fail("%s: byte at %d is %#x, expected %#x"
                    % (path, offset + bad, data[bad], value))


# ---------------------------------------------------------------------------
# qemu-img compare: an independent judge of equality
# ---------------------------------------------------------------------------

def qemu_img_compare(a, b) -> subprocess.CompletedProcess:
    """Run `qemu-img compare -f raw -F raw a b`.  Exit status 0: identical,
    1: different (when sizes differ, the extra part must read as zeros),
    2 and above: an error."""
    qemu_img = require("qemu-img")
    # -U: no image locking; the job that used the files is over, and a loop
    # device or another reader must not make the comparison fail.
    return subprocess.run([qemu_img, "compare", "-U", "-f", "raw", "-F", "raw",
                           os.fspath(a), os.fspath(b)],
                          capture_output=True, text=True, timeout=120)


def assert_qemu_equal(a, b) -> None:
    r = qemu_img_compare(a, b)
    assert r.returncode == 0, "qemu-img compare %s %s: rc=%d %s%s" % (
        a, b, r.returncode, r.stdout, r.stderr)


# ---------------------------------------------------------------------------
# Writers: threads hammering the source through job.source
# ---------------------------------------------------------------------------

class Writers:
    """`n` threads each writing random 4-64 KiB blocks at random offsets of
    [lo, hi) through `handle` (job.source) until stop().  Each write is
    recorded with the job's state just before and after it."""

    def __init__(self, handle, n: int = 4, lo: int = 0, hi: int | None = None,
                 seed: int = 0, min_len: int = 4 * KiB, max_len: int = 64 * KiB,
                 align: int = 512, job=None, pause: float = 0.0,
                 regions: bool = False):
        self.handle = handle
        self.n = n
        self.lo = lo
        self.hi = handle.size if hi is None else hi
        self.seed = seed
        self.min_len = min_len
        self.max_len = max_len
        self.align = align
        self.job = job
        self.pause = pause
        # regions=True: writer i owns [lo + i*span, lo + (i+1)*span), so that
        # per-writer order is the only order that matters (see model()).
        self.regions = regions
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        # (writer, seq, off, data, before, after)
        self.log: list[tuple[int, int, int, bytes, str, str]] = []
        self.errors: list[BaseException] = []
        self.count = 0
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                         name="test-writer-%d" % i) for i in range(n)]

    def _range(self, i: int) -> tuple[int, int]:
        if not self.regions:
            return self.lo, self.hi
        span = (self.hi - self.lo) // self.n // self.align * self.align
        return self.lo + i * span, self.lo + (i + 1) * span

    def _run(self, i: int) -> None:
        rng = random.Random(self.seed * 1000 + i)
        lo, hi = self._range(i)
        seq = 0
        try:
            while not self.stop_event.is_set():
                length = rng.randrange(self.min_len, self.max_len + 1, self.align)
                length = min(length, hi - lo)
                off = lo + rng.randrange(0, (hi - lo - length) // self.align + 1) * self.align
                data = rng.randbytes(length)
                before = self.job.state.value if self.job is not None else ""
                n = self.handle.pwrite(data, off)
                after = self.job.state.value if self.job is not None else ""
                assert n == length, "short write through job.source: %d of %d" % (n, length)
                with self.lock:
                    self.log.append((i, seq, off, data, before, after))
                    self.count += 1
                seq += 1
                if self.pause:
                    time.sleep(self.pause)
        except BaseException as e:  # noqa: BLE001 - re-raised by stop()
            self.errors.append(e)

    def start(self) -> "Writers":
        for t in self.threads:
            t.start()
        return self

    def set_pause(self, seconds: float) -> None:
        """Change the pause between two writes of each writer, at once."""
        self.pause = seconds

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Wait until at least `count` writes were made in total."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.count >= count or self.errors:
                    break
            time.sleep(0.005)
        self.check()

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout)
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, "writer threads did not stop: %s" % alive
        self.check()

    def check(self) -> None:
        if self.errors:
            raise self.errors[0]

    def states_seen(self) -> set[str]:
        """States of the job seen around writes (both before and after)."""
        with self.lock:
            return {s for w in self.log for s in (w[4], w[5])}

    def writes_in(self, state: str) -> int:
        """Writes that began and ended while the job was in `state`."""
        with self.lock:
            return sum(1 for w in self.log if w[4] == state and w[5] == state)

    def model(self, base: bytes) -> bytes:
        """`base` with every write applied in each writer's own order; only
        meaningful with regions=True (writers never overlap)."""
        assert self.regions, "model() needs disjoint writer regions"
        buf = bytearray(base)
        with self.lock:
            for _, _, off, data, _, _ in sorted(self.log, key=lambda w: (w[0], w[1])):
                buf[off:off + len(data)] = data
        return bytes(buf)


def phase1_then_phase2(job, writers, writes: int = 100, timeout: float = 90.0,
                       calm: float = 0.01) -> None:
    """Start a throttled job and the writers; once `writes` writes landed in
    phase 1, lift the limit and wait for READY, then let `writes` more land
    in phase 2.  The writers never stop; while the job catches up with them
    they pause `calm` seconds between writes, so that READY comes whatever
    the load of the machine (writers flat out can outrun any copy, in QEMU
    too).  Leaves the writers running at their own pace."""
    from fastmirror.job.events import JobState

    pace = writers.pause
    job.start()
    writers.start()
    writers.wait_for(writes)
    assert job.state in (JobState.RUNNING, JobState.PAUSED), \
        "the job left phase 1 before the writers ran: %s" % (job.status(),)
    writers.set_pause(calm)
    job.set_speed(0)
    assert job.wait_ready(timeout), "never ready: %s" % (job.status(),)
    writers.set_pause(pace)
    writers.wait_for(writers.count + writes, timeout)
    assert writers.writes_in("running") > 0, "no write landed in phase 1"
    assert writers.writes_in("ready") > 0, "no write landed in phase 2"


# ---------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------

def _fastmirror_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate()
            if t.name.startswith("fastmirror-") and t.is_alive()]


@pytest.fixture(autouse=True)
def no_thread_leak(request):
    """No fastmirror-* thread may outlive the test that started it."""
    before = set(_fastmirror_threads())
    yield
    leaked = [t for t in _fastmirror_threads() if t not in before]
    if leaked:
        names = sorted(t.name for t in leaked)
        # Give them a moment to die, so that the next test starts clean, but
        # report the leak all the same.
        for t in leaked:
            t.join(5)
        pytest.fail("threads left alive after the test: %s" % ", ".join(names),
                    pytrace=False)


@pytest.fixture(autouse=True)
def clean_trace():
    """Tracepoint listeners and log printers never leak into the next test."""
    yield
    try:
        from fastmirror import trace
    except ImportError:
        return
    trace.disable("*")
    for name in trace.EVENTS:
        for fn in trace.listeners(name):
            trace.disconnect(name, fn)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the item, so that fixtures can tell at
    teardown whether the test itself failed."""
    rep = yield
    setattr(item, "rep_" + rep.when, rep)
    return rep


def _test_failed(request) -> bool:
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


# Jobs made by mkjob in the current test, and those found still running when
# they were closed (by mkjob's teardown, or earlier by loopdev's).
_jobs: list = []
_left_running: list[str] = []


def _close_jobs() -> None:
    """Close every job of the test and its job.source handle (which, after a
    pivot, holds the target open: a loop device could not be detached)."""
    from fastmirror.job.events import JobState

    while _jobs:
        job = _jobs.pop()
        if job.state not in (JobState.CREATED, JobState.CONCLUDED):
            _left_running.append(repr(job))
        for close in (job.close, job.source.close):
            try:
                close()
            except Exception:  # noqa: BLE001 - teardown goes on
                pass


def pytest_generate_tests(metafunc):
    """A test module that sets IO_ENGINES = (...) runs each of its tests that
    build jobs with mkjob once per I/O engine: the io_uring driver and the
    blocking threads keep the same invariants by different code."""
    engines = getattr(metafunc.module, "IO_ENGINES", None)
    if engines and "io_engine" in metafunc.fixturenames:
        metafunc.parametrize("io_engine", engines, indirect=True)


@pytest.fixture
def io_engine(request):
    """The io_engine mkjob gives its jobs: "auto" unless the module asks for
    several (IO_ENGINES); "io_uring" skips, or fails under
    FASTMIRROR_REQUIRE_ALL=1, where the kernel refuses io_uring."""
    engine = getattr(request, "param", "auto")
    if engine == "io_uring":
        require_uring()
    return engine


@pytest.fixture
def mkjob(request, io_engine):
    """mkjob(source, target, **kw) -> MirrorJob (not started), with the
    io_engine of the io_engine fixture unless kw names one.  At teardown
    every job and its job.source are closed; a job that the test left
    started but not concluded is force-cancelled and the test fails: tests
    must end their jobs."""
    from fastmirror import MirrorJob

    _jobs.clear()
    _left_running.clear()

    def make(source, target, **kw):
        kw.setdefault("io_engine", io_engine)
        job = MirrorJob(source, target, **kw)
        _jobs.append(job)
        return job

    yield make

    _close_jobs()
    running = list(_left_running)
    _left_running.clear()
    if running and not _test_failed(request):
        pytest.fail("test left jobs running: %s" % ", ".join(running), pytrace=False)


@pytest.fixture
def loopdev():
    """loopdev(image, sector_size=512, read_only=False, direct_io=True) ->
    "/dev/loopN".  Needs root and losetup (skips, or fails with
    FASTMIRROR_REQUIRE_ALL=1).  Every device is detached at teardown, also
    when the test failed."""
    losetup = require_loop()
    devices: list[tuple[str, str]] = []     # (device, backing file)

    def attach(image, sector_size: int = 512, read_only: bool = False,
               direct_io: bool = True) -> str:
        cmd = [losetup, "--find", "--show", "--sector-size", str(sector_size),
               "--direct-io=%s" % ("on" if direct_io else "off")]
        if read_only:
            cmd.append("--read-only")
        cmd.append(os.fspath(image))
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            pytest.fail("losetup failed: %s %s" % (" ".join(cmd), r.stderr), pytrace=False)
        dev = r.stdout.strip()
        devices.append((dev, os.path.realpath(image)))
        # Check what we got: the sector size and direct I/O we asked for.
        info = subprocess.run([losetup, "--list", "--noheadings", "--output",
                               "LOG-SEC,DIO", dev], capture_output=True, text=True,
                              timeout=60).stdout.split()
        assert info and int(info[0]) == sector_size, \
            "%s has logical sector size %s, asked for %d" % (dev, info, sector_size)
        return dev

    yield attach

    def backing(dev: str):
        try:
            with open("/sys/block/%s/loop/backing_file" % os.path.basename(dev)) as f:
                return f.read().strip()
        except OSError:
            return None

    _close_jobs()        # a job's descriptors would keep the devices busy
    errors = []
    for dev, image in reversed(devices):
        for attempt in range(20):
            r = subprocess.run([losetup, "--detach", dev], capture_output=True,
                               text=True, timeout=60)
            if r.returncode == 0 or backing(dev) != image:
                break
            time.sleep(0.1 * (attempt + 1))    # still open somewhere: retry
        # The kernel detaches a device still open elsewhere (udev probing it,
        # say) only at its last close: wait until it lets go of our image.
        for _ in range(100):
            if backing(dev) != image:
                break
            time.sleep(0.1)
        else:
            errors.append("%s still attached to %s: %s" % (dev, image, r.stderr.strip()))
    if errors:
        pytest.fail("could not detach loop devices: %s" % "; ".join(errors), pytrace=False)
