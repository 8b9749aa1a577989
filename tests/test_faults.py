"""Real faults: I/O errors injected at the system-call boundary (an LD_PRELOAD
shim built here), a target filesystem that fills up, a source that changes
size.  Each runs a real job and checks the events, the policy's action, that
a failed range is never left clean, and the final content."""

import errno
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
from helpers.faults import build_shim
from helpers import require_that

import fastmirror
from fastmirror.job.verify import first_difference

HERE = os.path.dirname(os.path.abspath(__file__))
SIZE = 8 << 20
BAD = 3 << 20            # the injected fault covers [BAD, BAD + 64 KiB)




@pytest.fixture(scope="module")
def shim(tmp_path_factory):
    return build_shim(tmp_path_factory.mktemp("shim"))


@pytest.fixture
def images(tmp_path):
    src, dst = tmp_path / "source.img", tmp_path / "target.img"
    src.write_bytes(os.urandom(SIZE))
    return str(src), str(dst)


def run_driver(shim, faults, src, dst, *args, timeout=90):
    env = dict(os.environ, LD_PRELOAD=shim, FM_FAULTS=faults)
    r = subprocess.run([sys.executable, os.path.join(HERE, "faults", "driver.py"),
                        src, dst, *args], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    events = [x for x in lines if x["kind"] == "event"]
    paused = [x for x in lines if x["kind"] == "paused"]
    final = [x for x in lines if x["kind"] == "final"][0]
    return events, paused, final


def rule(op, path, start=BAD, end=BAD + 65536, err=errno.EIO, count=-1):
    return "%s:%s:%d:%d:%d:%d" % (op, path, start, end, err, count)


# -- report ---------------------------------------------------------------

def test_source_read_eio_report_fails(shim, images):
    src, dst = images
    events, _, final = run_driver(shim, rule("read", "source.img"), src, dst)
    errors = [e for e in events if e["event"] == "ERROR"]
    assert errors and errors[0]["errno"] == errno.EIO
    assert errors[0]["operation"] == "read" and errors[0]["action"] == "report"
    assert errors[0]["path"] == src
    assert BAD <= errors[0]["error_offset"] < BAD + 65536 or \
        errors[0]["error_offset"] <= BAD < errors[0]["error_offset"] + (1 << 20)
    assert final["event"] == "FAILED" and final["errno"] == errno.EIO
    assert final["operation"] == "read" and final["io_status"] == "failed"
    assert "READY" not in [e["event"] for e in events]


def test_target_write_eio_report_fails(shim, images):
    src, dst = images
    events, _, final = run_driver(shim, rule("write", "target.img"), src, dst)
    errors = [e for e in events if e["event"] == "ERROR"]
    assert errors[0]["operation"] == "write" and errors[0]["path"] == dst
    assert final["event"] == "FAILED" and final["errno"] == errno.EIO
    assert final["path"] == dst


def test_target_flush_eio_blocks_ready(shim, images):
    """READY needs a successful flush of the target."""
    src, dst = images
    events, _, final = run_driver(shim, "flush:target.img:0:0:5:-1", src, dst)
    kinds = [e["event"] for e in events]
    assert "READY" not in kinds
    assert [e for e in events if e["event"] == "ERROR"][0]["operation"] == "flush"
    assert final["event"] == "FAILED"


# -- ignore ---------------------------------------------------------------

def test_source_read_eio_ignore_retries_then_completes(shim, images):
    src, dst = images
    events, _, final = run_driver(shim, rule("read", "source.img", count=3), src, dst,
                                  "--on-source-error", "ignore")
    errors = [e for e in events if e["event"] == "ERROR"]
    assert len(errors) >= 3
    assert all(e["action"] == "ignore" for e in errors)
    assert final["event"] == "COMPLETED"
    assert first_difference(src, dst) == -1


def test_target_write_eio_ignore_retries_then_completes(shim, images):
    src, dst = images
    events, _, final = run_driver(shim, rule("write", "target.img", count=2), src, dst,
                                  "--on-target-error", "ignore")
    assert [e["action"] for e in events if e["event"] == "ERROR"] == ["ignore"] * 2
    assert final["event"] == "COMPLETED"
    assert first_difference(src, dst) == -1


# -- io_uring submission refused -------------------------------------------

def _need_uring():
    why = fastmirror._core.blockio.uring_error()
    require_that(why is None, "io_uring is refused here: %s" % why)


def test_io_uring_submission_refused_for_a_while_is_retried(shim, images):
    """io_uring_enter failing with EAGAIN (the kernel short of memory) 200
    times: the queued entries wait and go in later; nothing fails."""
    _need_uring()
    src, dst = images
    events, _, final = run_driver(shim, "uring_enter:-:0:0:%d:200" % errno.EAGAIN, src, dst,
                                  "--io-engine", "io_uring")
    assert [e for e in events if e["event"] == "ERROR"] == []
    assert final["event"] == "COMPLETED"
    assert first_difference(src, dst) == -1


@pytest.mark.parametrize("err", [errno.EINVAL, errno.ENOMEM])
def test_io_uring_submission_refused_for_good_fails_the_copies(shim, images, err):
    """io_uring_enter failing for good: the queued copies are taken back and
    fail (dirty again) instead of hanging the job; report ends it FAILED."""
    _need_uring()
    src, dst = images
    events, _, final = run_driver(shim, "uring_enter:-:0:0:%d:-1" % err, src, dst,
                                  "--io-engine", "io_uring", timeout=60)
    errors = [e for e in events if e["event"] == "ERROR"]
    assert errors and errors[0]["errno"] == err and errors[0]["operation"] == "read"
    assert final["event"] == "FAILED"


# -- stop -----------------------------------------------------------------

def test_target_write_eio_stop_pauses_then_resume_finishes(shim, images):
    src, dst = images
    events, paused, final = run_driver(shim, rule("write", "target.img", count=2), src, dst,
                                       "--on-target-error", "stop",
                                       "--resume-after-pause", "5")
    errors = [e for e in events if e["event"] == "ERROR"]
    assert errors and all(e["action"] == "stop" for e in errors)
    assert paused, "the job never paused"
    for p in paused:
        assert p["state"] == "paused" and p["io_status"] == "failed"
        assert p["failed_chunk_dirty"] is True        # never left clean
    assert final["event"] == "COMPLETED"
    assert first_difference(src, dst) == -1


def test_source_read_eio_stop_pauses_and_cancel_is_cancelled(shim, images):
    src, dst = images
    events, paused, final = run_driver(shim, rule("read", "source.img"), src, dst,
                                       "--on-source-error", "stop")
    assert paused and paused[0]["failed_chunk_dirty"] is True
    assert paused[0]["errno"] == errno.EIO
    assert final["event"] == "CANCELLED"


def test_enospc_policy_reports_other_errors(shim, images):
    src, dst = images
    _, _, final = run_driver(shim, rule("write", "target.img"), src, dst,
                             "--on-target-error", "enospc")
    assert final["event"] == "FAILED" and final["errno"] == errno.EIO


def test_enospc_policy_stops_on_enospc(shim, images):
    src, dst = images
    events, paused, final = run_driver(
        shim, rule("write", "target.img", err=errno.ENOSPC, count=1), src, dst,
        "--on-target-error", "enospc", "--resume-after-pause", "2")
    errors = [e for e in events if e["event"] == "ERROR"]
    assert errors[0]["errno"] == errno.ENOSPC and errors[0]["action"] == "stop"
    assert paused and paused[0]["io_status"] == "nospace"
    assert final["event"] == "COMPLETED"
    assert first_difference(src, dst) == -1


# -- a real full filesystem -------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    require_that(os.geteuid() == 0, "needs root to mount a small ext4 filesystem")
    require_that(shutil.which("mkfs.ext4") is not None, "mkfs.ext4 (e2fsprogs) not installed")
    image = tmp_path / "fs.img"
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(64 << 20)
    subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(image)], check=True)
    r = subprocess.run(["mount", "-o", "loop", str(image), str(mnt)],
                       capture_output=True, text=True)
    require_that(r.returncode == 0, "cannot mount a loop filesystem: " + r.stderr.strip())
    try:
        yield mnt
    finally:
        r = subprocess.run(["umount", str(mnt)], capture_output=True, text=True)
        if r.returncode:
            subprocess.run(["umount", "-l", str(mnt)], check=False)
            pytest.fail("the filesystem was still busy at the end: " + r.stderr)


@pytest.mark.parametrize("policy", ["stop", "enospc"])
def test_target_filesystem_full_stop_then_free_space_and_resume(tmp_path, small_fs, policy):
    src = tmp_path / "source.img"
    src.write_bytes(os.urandom(24 << 20))
    ballast = small_fs / "ballast"
    free = shutil.disk_usage(small_fs).free
    # Leave about 8 MiB: the 24 MiB mirror fills the filesystem a third of the way.
    with open(ballast, "wb") as f:
        f.write(b"\1" * (free - (8 << 20)))
        os.fsync(f.fileno())
    dst = small_fs / "target.img"
    job = fastmirror.MirrorJob(str(src), str(dst), on_target_error=policy)
    events = []
    job.add_listener(events.append)
    try:
        job.start()
        deadline = time.monotonic() + 60
        while not job.status().paused and time.monotonic() < deadline:
            assert job.wait(timeout=0.05) is None, "the job ended instead of pausing"
        st = job.status()
        assert st.paused and st.io_status == "nospace"
        err_events = [e for e in events if e.type == fastmirror.EventType.ERROR]
        assert err_events[0].error.errno == errno.ENOSPC
        assert err_events[0].action == "stop" and err_events[0].operation == "write"
        assert "No space left" in str(err_events[0].error)
        off = err_events[0].error.offset
        assert job._bitmap.get(off)                     # never left clean
        os.unlink(ballast)
        # ext4 returns the ballast's blocks when its journal commits: make
        # that happen now rather than in up to five seconds.
        os.sync()
        job.resume()
        # Copies that were already failing when space came back may stop
        # the job once more; as a user would, resume again.
        resumes = 1
        deadline = time.monotonic() + 60
        while not job.wait_ready(0.5):
            assert time.monotonic() < deadline, "never ready after space was freed"
            assert job.wait(0) is None, "the job ended after resume"
            st = job.status()
            if st.paused:
                assert st.io_status == "nospace" and resumes < 5
                os.sync()
                job.resume()
                resumes += 1
        job.complete()
        final = job.wait(60)
    finally:
        job.close()
        job.source.close()          # after the pivot it holds the target open
    assert final.type == fastmirror.EventType.COMPLETED
    assert first_difference(str(src), str(dst)) == -1


def test_target_filesystem_full_report_fails(tmp_path, small_fs):
    src = tmp_path / "source.img"
    src.write_bytes(os.urandom(24 << 20))
    free = shutil.disk_usage(small_fs).free
    with open(small_fs / "ballast", "wb") as f:
        f.write(b"\1" * (free - (8 << 20)))
    job = fastmirror.MirrorJob(str(src), str(small_fs / "target.img"))
    try:
        job.start()
        final = job.wait(60)
    finally:
        job.close()
    assert final.type == fastmirror.EventType.FAILED
    assert final.error.errno == errno.ENOSPC
    assert job.status().io_status == "nospace"


# -- the source changes size ----------------------------------------------

def test_source_growing_during_job_fails_clearly(images):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, speed=1 << 20)      # stays in phase 1
    job.start()
    time.sleep(0.3)
    with open(src, "r+b") as f:
        f.truncate(SIZE + (1 << 20))
    final = job.wait(30)
    job.close()
    assert final.type == fastmirror.EventType.FAILED
    assert "size changed" in str(final.error)
    assert final.error.filename == src


def test_source_shrinking_during_ready_fails(images):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst)
    job.start()
    assert job.wait_ready(30)
    with open(src, "r+b") as f:
        f.truncate(SIZE // 2)
    final = job.wait(30)
    job.close()
    assert final.type == fastmirror.EventType.FAILED
    assert "size changed" in str(final.error)


# -- callbacks that raise ---------------------------------------------------

def test_raising_listener_and_tracepoint_do_not_kill_the_job(images, caplog):
    src, dst = images

    def bad_trace(*args):
        raise RuntimeError("tracepoint boom")

    def bad_listener(ev):
        raise RuntimeError("listener boom")

    fastmirror.trace.connect("mirror_one_iteration", bad_trace)
    fastmirror.trace.connect("mirror_before_flush", bad_trace)
    try:
        with caplog.at_level("ERROR", logger="fastmirror"):
            job = fastmirror.MirrorJob(src, dst)
            job.add_listener(bad_listener)
            job.start()
            assert job.wait_ready(30)
            job.complete()
            final = job.wait(30)
            job.close()
    finally:
        fastmirror.trace.disconnect("mirror_one_iteration", bad_trace)
        fastmirror.trace.disconnect("mirror_before_flush", bad_trace)
    assert final.type == fastmirror.EventType.COMPLETED
    assert first_difference(src, dst) == -1
    text = caplog.text
    assert "tracepoint boom" in text and "listener boom" in text


# -- verify=True ------------------------------------------------------------

def test_verify_option_passes_on_equal(images):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, verify=True)
    job.start()
    assert job.wait_ready(30)
    job.complete()
    assert job.wait(30).type == fastmirror.EventType.COMPLETED
    job.close()


def test_verify_option_catches_a_target_changed_behind_the_job(images):
    src, dst = images
    job = fastmirror.MirrorJob(src, dst, verify=True)
    job.start()
    assert job.wait_ready(30)
    # Someone writes the target behind the job's back: COMPLETED would be a lie.
    with open(dst, "r+b") as f:
        f.seek(12345)
        f.write(b"\0\1\2\3" if open(src, "rb").read()[12345:12349] != b"\0\1\2\3" else b"zzzz")
        os.fsync(f.fileno())
    job.complete()
    final = job.wait(30)
    job.close()
    assert final.type == fastmirror.EventType.FAILED
    assert final.error.offset == 12345
    assert "differs" in str(final.error)
