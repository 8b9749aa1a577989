"""Fixtures and pytest hooks for the fastmirror tests; the helpers (images,
byte compares, requirements, writers) are in the helpers package: ``from
helpers import ...``.

Fixtures:
  mkjob            build MirrorJobs; a job a test leaves running is closed and
                   the test fails
  loopdev          attach a loop device (sector size, direct I/O); always detached
  io_engine        the io_engine mkjob gives its jobs (IO_ENGINES of the module)
  fast_thread_switching   switch threads as often as possible
  no_thread_leak   (autouse) no "fastmirror-*" thread outlives a test
  clean_trace      (autouse) no tracepoint listener or printer outlives a test
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest

_HERE = os.path.dirname(os.path.abspath(__file__))
if _HERE not in sys.path:          # `from helpers import ...` in test modules
    sys.path.insert(0, _HERE)

from helpers.require import require_loop, require_uring  # noqa: E402


@pytest.fixture
def fast_thread_switching():
    """Under the GIL, switch threads as often as possible, so that calls from
    several threads really interleave."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    yield
    sys.setswitchinterval(old)


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
