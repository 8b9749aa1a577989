"""Real I/O errors below both I/O engines.

The LD_PRELOAD shim of test_faults.py intercepts the C library's pread and
pwrite, which io_uring never calls.  Here the errors come from underneath the
kernel's file interface instead: qemu-storage-daemon exports an image through
FUSE as a regular file, with QEMU's blkdebug driver between the export and
the image failing reads or writes at a chosen sector with EIO.  Whatever
engine submits the I/O, read(2), pwrite(2) or io_uring, the kernel hands it
to the daemon and returns its error.

Each case runs with the io_uring driver and with the threads, and checks what
QEMU documents for the policy: report fails the job, ignore retries until the
chunk is copied, stop pauses with the failed chunk still dirty until resume.

Only the failing side is exported; the other is the image itself.  A target
export gets one copy in flight at a time: QEMU's FUSE export (7.2, Debian 12)
loses data under concurrent asynchronous direct writes from anyone, as
`fio --ioengine=libaio --iodepth=4 --direct=1 --rw=write --verify=crc32c`
on it shows, which would hide what is tested here.
"""

import errno
import os
import subprocess
import time

import pytest

import fastmirror
from helpers import MiB, first_difference, require, require_root, require_that
from fastmirror import EventType

IO_ENGINES = ("io_uring", "threads")
SIZE = 8 * MiB
BAD = 2 * MiB + 64 * 1024          # inside the third 1 MiB copy


class FaultyExport:
    """`image` exported read-only (source) or writable (target) at `path`
    through FUSE, with blkdebug failing `event` ("read_aio" or "write_aio")
    at byte `offset` with EIO, once or always."""

    def __init__(self, tmp_path, name, image, event, offset, once, writable):
        self.path = str(tmp_path / (name + ".exp"))
        open(self.path, "wb").close()          # a FUSE export mounts over a file
        rule = ("inject-error.0.event=%s,inject-error.0.errno=%d,"
                "inject-error.0.sector=%d,inject-error.0.once=%s"
                % (event, errno.EIO, offset // 512, "on" if once else "off"))
        self.proc = subprocess.Popen(
            [require("qemu-storage-daemon"),
             "--blockdev", "driver=file,node-name=img,filename=%s,cache.direct=on" % image,
             "--blockdev", "driver=blkdebug,node-name=dbg,image=img," + rule,
             "--blockdev", "driver=raw,node-name=fmt,file=dbg",
             "--export", "type=fuse,id=exp,node-name=fmt,mountpoint=%s,writable=%s"
             % (self.path, "on" if writable else "off")],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        before = os.stat(self.path).st_dev
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                out = self.proc.stdout.read()
                require_that(False, "qemu-storage-daemon cannot export through FUSE: %s"
                             % out.strip())
            st = os.stat(self.path)
            if st.st_dev != before and st.st_size == os.path.getsize(image):
                return
            time.sleep(0.02)
        self.close()
        pytest.fail("the FUSE export of %s never appeared" % image)

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


@pytest.fixture
def exports(tmp_path):
    """make(source_rule, target_rule) -> (source export, target export, source
    image, target image); a rule is (event, offset, once) or None."""
    require_root()
    require("qemu-storage-daemon")
    require_that(os.path.exists("/dev/fuse"), "no FUSE (/dev/fuse is missing)")
    made = []
    src_img, dst_img = tmp_path / "s.raw", tmp_path / "t.raw"
    src_img.write_bytes(os.urandom(SIZE))
    with open(dst_img, "wb") as f:
        f.truncate(SIZE)

    def make(source_rule, target_rule):
        out = []
        for name, image, rule, writable in (("s", src_img, source_rule, False),
                                            ("t", dst_img, target_rule, True)):
            if rule is None:
                out.append(str(image))
                continue
            e = FaultyExport(tmp_path, name, image, *rule, writable=writable)
            made.append(e)
            out.append(e.path)
        return out[0], out[1], str(src_img), str(dst_img)

    yield make
    for e in made:
        e.close()


def run(src, dst, io_engine, resumes=0, **kw):
    """Run a job to its end, completing it at READY and resuming it up to
    `resumes` times when a policy pauses it.  Returns (final event, ERROR
    events, what was seen at each error pause)."""
    if dst.endswith(".exp"):
        kw.setdefault("buf_size", MiB)        # one write in flight: see the top
    kw.setdefault("buf_size", 4 * MiB)
    job = fastmirror.MirrorJob(src, dst, io_engine=io_engine, io_size=MiB, **kw)
    assert job.status().io_engine == io_engine
    events = []
    job.add_listener(events.append)
    pauses = []
    job.start()
    deadline = time.monotonic() + 60
    final = None
    try:
        while final is None and time.monotonic() < deadline:
            final = job.wait(0.05)
            if final is not None:
                break
            st = job.status()
            if st.paused and st.io_status != "ok":
                off = st.error.offset
                pauses.append({"errno": st.error.errno, "offset": off,
                               "operation": st.error.operation,
                               "dirty": job._bitmap.get(off)})
                if len(pauses) > resumes:
                    job.cancel(force=True)
                else:
                    job.resume()
            elif st.ready:
                try:
                    job.complete()
                except fastmirror.JobStateError:
                    pass
        assert final is not None, "the job never ended: %s" % (job.status(),)
    finally:
        job.close()
    return final, [e for e in events if e.type == EventType.ERROR], pauses


def covers(err, offset):
    return err.offset <= offset < err.offset + MiB


def test_source_read_error_report_fails_the_job(exports, io_engine):
    src, dst, _, _ = exports(("read_aio", BAD, False), None)
    final, errors, _ = run(src, dst, io_engine)
    assert final.type == EventType.FAILED
    assert errors and errors[0].error.errno == errno.EIO
    assert errors[0].error.operation == "read" and errors[0].action == "report"
    assert covers(errors[0].error, BAD)
    assert final.error.errno == errno.EIO


def test_target_write_error_report_fails_the_job(exports, io_engine):
    src, dst, _, _ = exports(None, ("write_aio", BAD, False))
    final, errors, _ = run(src, dst, io_engine)
    assert final.type == EventType.FAILED
    assert errors and errors[0].error.errno == errno.EIO
    assert errors[0].error.operation == "write" and covers(errors[0].error, BAD)


@pytest.mark.parametrize("side", ["source", "target"])
def test_errors_ignored_are_retried_until_copied(exports, io_engine, side):
    rule = ("read_aio" if side == "source" else "write_aio", BAD, True)
    src, dst, src_img, dst_img = exports(rule if side == "source" else None,
                                         rule if side == "target" else None)
    final, errors, _ = run(src, dst, io_engine, on_source_error="ignore",
                           on_target_error="ignore")
    assert final.type == EventType.COMPLETED
    assert [(e.error.operation, e.action) for e in errors] == \
        [("read" if side == "source" else "write", "ignore")]
    assert covers(errors[0].error, BAD)
    assert first_difference(src_img, dst_img) == -1


def test_target_write_error_stop_pauses_with_the_chunk_dirty(exports, io_engine):
    src, dst, src_img, dst_img = exports(None, ("write_aio", BAD, True))
    final, errors, pauses = run(src, dst, io_engine, resumes=1, on_target_error="stop")
    assert [(p["errno"], p["operation"], p["dirty"]) for p in pauses] == \
        [(errno.EIO, "write", True)]
    assert errors[0].action == "stop"
    assert final.type == EventType.COMPLETED
    assert first_difference(src_img, dst_img) == -1


def test_source_read_error_stop_then_cancel(exports, io_engine):
    src, dst, _, _ = exports(("read_aio", BAD, False), None)
    final, errors, pauses = run(src, dst, io_engine, resumes=0, on_source_error="stop")
    assert [(p["errno"], p["operation"], p["dirty"]) for p in pauses] == \
        [(errno.EIO, "read", True)]
    assert final.type == EventType.CANCELLED
