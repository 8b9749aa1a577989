"""A target that is an NBD export, on servers nobody here wrote: qemu-nbd,
nbdkit (memory plugin; error, delay and blocksize-policy filters) and
qemu-storage-daemon.  The copy is read back with the server's side (the
file it serves) or with nbdcopy, never only with our own client."""

from __future__ import annotations

import errno
import os
import socket
import subprocess
import threading
import time

import pytest

import fastmirror
from fastmirror.bench.images import make_image
from fastmirror.job import nbdtarget
from fastmirror.job.events import EventType, JobState
from helpers.require import fm, require

MiB = 1 << 20
SIZE = 16 * MiB


# ---------------------------------------------------------------------------
# Servers
# ---------------------------------------------------------------------------

class Server:
    """A server process on a unix socket, stopped (by its pid) at the end."""

    def __init__(self, argv, sock: str):
        self.argv = list(argv)
        self.sock = sock
        self.proc = None
        self.start()

    def start(self):
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError("%s exited: %s" % (self.argv[0], self.proc.stderr.read()))
            if os.path.exists(self.sock):
                s = socket.socket(socket.AF_UNIX)
                try:
                    s.connect(self.sock)
                    return
                except OSError:
                    pass
                finally:
                    s.close()
            time.sleep(0.02)
        raise RuntimeError("%s did not listen on %s" % (self.argv[0], self.sock))

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def uri(self, name: str = "") -> str:
        return "nbd+unix:///%s?socket=%s" % (name, self.sock)


@pytest.fixture
def servers():
    started = []
    yield started
    for s in started:
        s.stop()


def qemu_nbd(servers, tmp_path, path, *extra):
    require("qemu-nbd")
    s = Server(["qemu-nbd", "-t", "-k", str(tmp_path / "q.sock"), "-f", "raw", *extra,
                str(path)], str(tmp_path / "q.sock"))
    servers.append(s)
    return s


def nbdkit(servers, tmp_path, *args, name="k"):
    require("nbdkit")
    sock = str(tmp_path / ("%s.sock" % name))
    s = Server(["nbdkit", "-f", "-U", sock, *args], sock)
    servers.append(s)
    return s


def read_back(uri: str, out) -> bytes:
    """The export's bytes, read by nbdcopy (libnbd), not by our client."""
    require("nbdcopy")
    subprocess.run(["nbdcopy", uri, str(out)], check=True, timeout=60)
    with open(out, "rb") as f:
        return f.read()


def content(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def blank(path, size: int) -> None:
    with open(path, "wb") as f:
        f.truncate(size)


def blank_qemu_nbd(servers, tmp_path):
    """qemu-nbd serving an empty (sparse) SIZE-byte file: (the file, the server)."""
    dst = tmp_path / "dst.img"
    blank(dst, SIZE)
    return dst, qemu_nbd(servers, tmp_path, dst)


def allocated(path) -> int:
    return os.stat(path).st_blocks * 512


@pytest.fixture
def src(tmp_path):
    p = tmp_path / "src.img"
    make_image(p, SIZE, data_fraction=0.5, extent=MiB, seed=3)
    return p


def mirror(src, uri, **kw):
    job = fastmirror.MirrorJob(str(src), uri, **kw)
    try:
        job.start()
        assert job.wait_ready(60), job.status().error
        job.complete()
        ev = job.wait(60)
        assert ev is not None and ev.type == EventType.COMPLETED, ev
        return job.status()
    finally:
        job.close()


# ---------------------------------------------------------------------------
# The URI
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("uri, name, host, port, sock", [
    ("nbd://example.com/disk", "disk", "example.com", 10809, None),
    ("nbd+unix:///disk?socket=sock", "disk", None, 10809, "sock"),
    ("nbd://example.com/", "", "example.com", 10809, None),
    ("nbd://example.com", "", "example.com", 10809, None),
    ("nbd://example.com//disk", "/disk", "example.com", 10809, None),
    ("nbd://example.com/hello%20world", "hello world", "example.com", 10809, None),
    ("nbd://10.0.0.1:10810/d", "d", "10.0.0.1", 10810, None),
    ("nbd://[::1]:4000/d", "d", "::1", 4000, None),
    ("NBD+UNIX:///?socket=/run/a%20b.sock", "", None, 10809, "/run/a b.sock"),
])
def test_uri_forms_of_the_nbd_uri_document(uri, name, host, port, sock):
    p = nbdtarget.parse_uri(uri)
    assert (p.name, p.host, p.port, p.socket) == (name, host, port, sock)
    assert nbdtarget.is_nbd_uri(uri)


@pytest.mark.parametrize("uri, words", [
    ("nbds://h/d", "TLS"),
    ("nbds+unix:///d?socket=s", "TLS"),
    ("nbd+unix:///d", "socket=PATH"),
    ("nbd+unix://host/d?socket=s", "no host"),
    ("nbd:///d", "no host"),
    ("nbd://h:99999/d", "malformed"),
    ("nbd://h/d?socket=s", r"is for nbd\+unix"),
    ("nbd://h/d?tls-type=x509&x-foo=1", "unknown parameters"),
    ("nbd://h/d#frag", "fragment"),
])
def test_malformed_uri_refused(uri, words):
    with pytest.raises(ValueError, match=words):
        nbdtarget.parse_uri(uri)


def test_files_are_not_uris():
    for path in ("disk.img", "/tmp/nbd://x", "nbd:/x", b"nbd://h/d"):
        assert not nbdtarget.is_nbd_uri(path)


# ---------------------------------------------------------------------------
# Copies
# ---------------------------------------------------------------------------

def test_qemu_nbd_file_equals_source_and_stays_sparse(tmp_path, servers, src):
    dst = tmp_path / "dst.img"
    blank(dst, SIZE)
    with open(dst, "r+b") as f:          # old data where the source has holes
        f.write(b"\xaa" * SIZE)
    q = qemu_nbd(servers, tmp_path, dst)
    st = mirror(src, q.uri(), verify=True)
    assert content(dst) == content(src)
    assert st.io_engine == "threads (NBD target)"
    assert "NBD WRITE" in st.io_calls
    assert st.bytes_zeroed > 0                       # holes became WRITE_ZEROES
    # Holes stay holes: the target's allocation is near the source's.
    assert allocated(dst) <= allocated(src) + 2 * MiB, (allocated(dst), allocated(src))


def test_nbdkit_memory_read_back_with_nbdcopy(tmp_path, servers, src):
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)
    st = mirror(src, k.uri(), connections=3)
    assert "3 connections (multi-conn)" in st.io_calls
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_block_sizes_honoured_and_unaligned_end(tmp_path, servers):
    """A server that errors on any request outside its block sizes: the
    copy splits to the maximum, aligns to the minimum and writes the
    source's unaligned end by reading, patching and writing its block."""
    size = 4 * MiB + 1000
    src = tmp_path / "odd.img"
    make_image(src, size, holes=[(MiB, MiB)], seed=5)
    k = nbdkit(servers, tmp_path, "--filter=blocksize-policy", "memory",
               "size=%d" % (5 * MiB), "blocksize-minimum=4096",
               "blocksize-preferred=65536", "blocksize-maximum=262144",
               "blocksize-error-policy=error")
    c = nbdtarget.connect(k.uri())
    try:
        assert c.block_sizes == (4096, 65536, 262144)
        c.pwrite(b"\x55" * 4096, 4 * MiB)     # the block holding the source's end
    finally:
        c.close()
    mirror(src, k.uri(), granularity=65536)
    back = read_back(k.uri(), tmp_path / "back.img")
    assert back[:size] == content(src)
    assert back[size:size + 3096] == b"\x55" * 3096     # past the source: untouched


def test_qemu_storage_daemon_export(tmp_path, servers, src):
    require("qemu-storage-daemon")
    dst = tmp_path / "dst.img"
    blank(dst, SIZE)
    sock = str(tmp_path / "qsd.sock")
    s = Server(["qemu-storage-daemon",
                "--blockdev", "driver=file,node-name=f,filename=%s" % dst,
                "--nbd-server", "addr.type=unix,addr.path=%s" % sock,
                "--export", "type=nbd,id=e,node-name=f,name=disk,writable=on"], sock)
    servers.append(s)
    mirror(src, s.uri("disk"), verify=True)
    s.stop()
    assert content(dst) == content(src)


def test_delay_filter_completes(tmp_path, servers, src):
    k = nbdkit(servers, tmp_path, "--filter=delay", "memory", "size=%d" % SIZE,
               "delay-write=2ms", "delay-zero=2ms")
    mirror(src, k.uri())
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_live_writer_through_source_then_complete(tmp_path, servers, src):
    dst, q = blank_qemu_nbd(servers, tmp_path)
    job = fastmirror.MirrorJob(str(src), q.uri(), speed=64 * MiB)
    stop = threading.Event()
    rounds = [0]

    def writer():
        i = 0
        while not stop.is_set():
            off = (i * 7919 * 4096) % (SIZE - 8192)
            job.source.pwrite(bytes([i % 251 + 1]) * 8192, off)
            i += 1
            rounds[0] = i
            time.sleep(0.001)

    try:
        job.start()
        t = threading.Thread(target=writer)
        t.start()
        time.sleep(0.3)
        job.set_speed(0)
        assert job.wait_ready(60)
        time.sleep(0.2)
        stop.set()
        t.join()
        job.complete()
        ev = job.wait(60)
        assert ev.type == EventType.COMPLETED
    finally:
        stop.set()
        job.close()
        job.source.close()
    assert rounds[0] > 10
    assert content(dst) == content(src)


# ---------------------------------------------------------------------------
# Refusals: nothing written
# ---------------------------------------------------------------------------

def test_smaller_export_refused_nothing_written(tmp_path, servers, src):
    dst = tmp_path / "small.img"
    make_image(dst, SIZE // 2, pattern=0x5A)
    before = content(dst)
    q = qemu_nbd(servers, tmp_path, dst)
    with pytest.raises(ValueError, match="smaller than source"):
        fastmirror.MirrorJob(str(src), q.uri())
    assert content(dst) == before


def test_read_only_export_refused(tmp_path, servers, src):
    dst = tmp_path / "ro.img"
    blank(dst, SIZE)
    q = qemu_nbd(servers, tmp_path, dst, "-r")
    with pytest.raises(PermissionError) as e:
        fastmirror.MirrorJob(str(src), q.uri())
    assert e.value.errno == errno.EROFS and e.value.filename == q.uri()


def test_unknown_export_and_no_server_refused(tmp_path, servers, src):
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)
    with pytest.raises(FileNotFoundError, match="no such export"):
        # nbdkit serves every name: the exportname filter limits them.
        nbdkit(servers, tmp_path, "--filter=exportname", "memory", "size=%d" % SIZE,
               "exportname=only", "exportname-strict=true", name="strict")
        fastmirror.MirrorJob(str(src), "nbd+unix:///other?socket=%s"
                             % (tmp_path / "strict.sock"))
    with pytest.raises(FileNotFoundError):
        fastmirror.MirrorJob(str(src), "nbd+unix:///?socket=%s" % (tmp_path / "none.sock"))
    with pytest.raises(ConnectionRefusedError):
        fastmirror.MirrorJob(str(src), "nbd://127.0.0.1:1/")
    assert k.proc.poll() is None


def test_silent_server_refused_after_the_handshake_timeout(tmp_path, src, monkeypatch):
    """A socket that accepts and never speaks: refused, not waited on."""
    path = str(tmp_path / "mute.sock")
    lst = socket.socket(socket.AF_UNIX)
    lst.bind(path)
    lst.listen(4)
    monkeypatch.setattr(nbdtarget, "HANDSHAKE_TIMEOUT", 0.3)
    try:
        t0 = time.monotonic()
        with pytest.raises(TimeoutError, match="did not answer the handshake"):
            fastmirror.MirrorJob(str(src), "nbd+unix:///?socket=%s" % path)
        assert time.monotonic() - t0 < 5
    finally:
        lst.close()


def test_image_header_read_over_nbd(tmp_path, servers, src):
    dst = tmp_path / "q.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(dst), "64M"], check=True,
                   capture_output=True)
    os.truncate(dst, SIZE)
    q = qemu_nbd(servers, tmp_path, dst)
    from fastmirror.job.owners import ImageTargetError
    with pytest.raises(ImageTargetError, match="qcow2"):
        fastmirror.MirrorJob(str(src), q.uri())


def test_write_blocking_refused_for_nbd(tmp_path, servers, src):
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)
    with pytest.raises(ValueError, match="write-blocking"):
        fastmirror.MirrorJob(str(src), k.uri(), copy_mode="write-blocking")


# ---------------------------------------------------------------------------
# Errors under the target's policy
# ---------------------------------------------------------------------------

def _resume_until_ready(job, timeout: float = 30) -> None:
    """resume(), and again if copies that were in flight when the policy
    paused the job failed (the trigger still there) and paused it again."""
    deadline = time.monotonic() + timeout
    job.resume()
    while not job.wait_ready(0.1):
        assert time.monotonic() < deadline, job.status()
        if job.state == JobState.PAUSED:
            job.resume()


def _error_server(servers, tmp_path, trigger, err="EIO"):
    return nbdkit(servers, tmp_path, "--filter=error", "memory", "size=%d" % SIZE,
                  "error-pwrite=%s" % err, "error-pwrite-rate=100%",
                  "error-pwrite-file=%s" % trigger,
                  "error-zero=%s" % err, "error-zero-rate=100%",
                  "error-zero-file=%s" % trigger)


@pytest.mark.parametrize("name", ["ENOSPC", "EPERM", "EIO", "ENOMEM", "EINVAL",
                                  "ESHUTDOWN"])
def test_error_filter_report_fails_with_errno(tmp_path, servers, src, name):
    trigger = tmp_path / "trigger"
    k = _error_server(servers, tmp_path, trigger, name)
    job = fastmirror.MirrorJob(str(src), k.uri())
    trigger.touch()
    try:
        job.start()
        ev = job.wait(30)
    finally:
        job.close()
    assert ev.type == EventType.FAILED
    assert ev.error.errno == getattr(errno, name) and ev.error.filename == k.uri()


@pytest.mark.parametrize("policy,name,io_status", [("enospc", "ENOSPC", "nospace"),
                                                     ("stop", "EIO", "failed")])
def test_error_filter_pausing_policies_then_resume(tmp_path, servers, src, policy, name,
                                                   io_status):
    """"enospc" pauses on ENOSPC, "stop" on any error; resume() after the
    trigger goes reconnects and the copy completes."""
    trigger = tmp_path / "trigger"
    k = _error_server(servers, tmp_path, trigger, name)
    job = fastmirror.MirrorJob(str(src), k.uri(), on_target_error=policy)
    trigger.touch()
    try:
        job.start()
        deadline = time.monotonic() + 10
        while job.state != JobState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state == JobState.PAUSED and job.status().io_status == io_status
        trigger.unlink()
        _resume_until_ready(job)
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def _job_with_errors(src, uri, policy, **kw):
    """A MirrorJob under on_target_error=`policy`, and the list its ERROR
    events go to."""
    job = fastmirror.MirrorJob(str(src), uri, on_target_error=policy, **kw)
    errors = []
    job.add_listener(lambda ev: ev.type == EventType.ERROR and errors.append(ev))
    return job, errors


def test_error_filter_ignore_retries_until_the_trigger_goes(tmp_path, servers, src):
    trigger = tmp_path / "trigger"
    k = _error_server(servers, tmp_path, trigger)
    job, errors = _job_with_errors(src, k.uri(), "ignore")
    trigger.touch()
    try:
        job.start()
        deadline = time.monotonic() + 10
        while len(errors) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        trigger.unlink()
        assert job.wait_ready(30)
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
    assert len(errors) >= 2 and errors[0].error.errno == errno.EIO
    assert errors[0].action == "ignore"
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_dropped_connection_stop_restart_resume(tmp_path, servers, src):
    """The server is killed mid-copy: the copy fails under the policy
    (stop), the server comes back on the same socket, resume() reconnects
    and the copy completes; what the dead server had acknowledged without
    a flush is copied again."""
    dst, q = blank_qemu_nbd(servers, tmp_path)
    job, errors = _job_with_errors(src, q.uri(), "stop", speed=4 * MiB)
    try:
        job.start()
        time.sleep(0.4)
        assert job.state == JobState.RUNNING
        q.stop()
        deadline = time.monotonic() + 10
        while job.state != JobState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state == JobState.PAUSED
        assert errors[0].error.errno in (errno.ESHUTDOWN, errno.ECONNRESET, errno.EPIPE)
        q.start()
        job.set_speed(0)
        job.resume()
        assert job.wait_ready(30), job.status().error
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
    q.stop()
    assert content(dst) == content(src)


# ---------------------------------------------------------------------------
# Front ends: the command line, Export.mirror
# ---------------------------------------------------------------------------

def test_command_line_with_an_nbd_uri(tmp_path, servers, src):
    dst, q = blank_qemu_nbd(servers, tmp_path)
    r = fm("mirror", "-q", "--verify", "--connections", "2", str(src), q.uri())
    assert r.returncode == 0, r.stderr
    assert content(dst) == content(src)
    # Refusals before anything is written: exit 2.
    r = fm("mirror", "-q", str(src), "nbd+unix:///d")
    assert r.returncode == 2 and "socket=PATH" in r.stderr
    small = tmp_path / "small.img"
    blank(small, MiB)
    q.stop()
    q2 = qemu_nbd(servers, tmp_path, small)
    r = fm("mirror", "-q", str(src), q2.uri())
    assert r.returncode == 2 and "smaller than source" in r.stderr
    r = fm("verify", str(src), q2.uri())
    assert r.returncode == 1


def test_export_mirror_to_an_nbd_uri(tmp_path, servers, src):
    from fastmirror.nbd.export import Export
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)
    with Export(str(src), socket=str(tmp_path / "exp.sock")) as exp:
        job = exp.mirror(k.uri())
        assert job.wait_ready(30)
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
        assert exp.path == str(src)           # no pivot to an NBD target
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_server_that_lost_its_data_gets_everything_unflushed_again(tmp_path, servers, src):
    """nbdkit's memory plugin killed and started again has forgotten every
    write: nothing was flushed yet (phase 1), so after resume() the whole
    copy, holes zeroed included, must be done again, or the target would
    read zeros where the source has data."""
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)
    # Slow enough that the copy is far from done when the server dies, even
    # on a loaded machine (2 MiB copies, 4 MiB/s: a copy every half second).
    job = fastmirror.MirrorJob(str(src), k.uri(), on_target_error="stop", speed=4 * MiB)
    try:
        job.start()
        deadline = time.monotonic() + 10
        while job.status().bytes_copied < 2 * MiB and time.monotonic() < deadline:
            time.sleep(0.02)
        k.stop()
        k.start()                               # empty again
        deadline = time.monotonic() + 10
        while job.state != JobState.PAUSED and time.monotonic() < deadline:
            time.sleep(0.02)
        assert job.state == JobState.PAUSED
        job.set_speed(0)
        job.resume()
        assert job.wait_ready(30), job.status().error
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_qmp_drive_mirror_to_an_nbd_uri(tmp_path, servers, src):
    """drive-mirror's target passes through to the job: an NBD URI works
    as it does for QEMU (which opens it with its own NBD client)."""
    import asyncio
    try:
        from qemu.qmp import QMPClient
    except ImportError:
        from helpers.require import require_that
        require_that(False, "the qemu.qmp client is not installed (pip install qemu.qmp)")
    from fastmirror.nbd.export import Export
    from fastmirror.nbd.qmp import QMPServer
    k = nbdkit(servers, tmp_path, "memory", "size=%d" % SIZE)

    async def until(c, name):
        while True:
            ev = await asyncio.wait_for(c.events.get(), 30)
            if ev["event"] == name:
                return ev

    async def go(qmp):
        c = QMPClient("test")
        await c.connect(qmp.socket_path)
        await c.execute("drive-mirror", {"device": "vm1", "target": k.uri(),
                                         "sync": "full", "mode": "existing"})
        await until(c, "BLOCK_JOB_READY")
        await c.execute("block-job-complete", {"device": "vm1"})
        ev = await until(c, "BLOCK_JOB_COMPLETED")
        await c.disconnect()
        return ev

    with Export(str(src), socket=str(tmp_path / "e.sock"), name="vm1") as exp:
        with QMPServer(exp, socket=str(tmp_path / "qmp.sock")) as qmp:
            ev = asyncio.run(asyncio.wait_for(go(qmp), 60))
    assert "error" not in ev["data"] and ev["data"]["offset"] == SIZE
    assert read_back(k.uri(), tmp_path / "back.img") == content(src)


def test_tcp_target(tmp_path, servers, src):
    """nbd://host:port/name over TCP (TCP_NODELAY), the export name sent."""
    require("nbdkit")
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    pidfile = tmp_path / "pid"
    p = subprocess.Popen(["nbdkit", "-f", "-i", "127.0.0.1", "-p", str(port), "-P",
                          str(pidfile), "--filter=exportname", "memory", "size=%d" % SIZE,
                          "exportname=disk", "exportname-strict=true"],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not pidfile.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        uri = "nbd://127.0.0.1:%d/disk" % port
        st = mirror(src, uri, verify=True)
        assert "2 connections (multi-conn)" in st.io_calls
        with pytest.raises(FileNotFoundError, match="no such export"):
            fastmirror.MirrorJob(str(src), "nbd://127.0.0.1:%d/other" % port)
    finally:
        p.kill()
        p.wait()


def test_zero_data_becomes_write_zeroes(tmp_path, servers):
    """Zeros written as data in the source (allocated) reach the target as
    WRITE_ZEROES: the target file stays sparse there, and equal."""
    src = tmp_path / "zeros.img"
    make_image(src, SIZE, seed=9)
    with open(src, "r+b") as f:
        f.seek(4 * MiB)
        f.write(bytes(6 * MiB))             # allocated zeros
    dst, q = blank_qemu_nbd(servers, tmp_path)
    st = mirror(src, q.uri())
    assert content(dst) == content(src)
    assert st.bytes_zero_detected >= 6 * MiB - 128 * 1024
    assert allocated(dst) <= allocated(src) - 5 * MiB, (allocated(dst), allocated(src))


def test_dropped_connection_ignore_reconnects_by_itself(tmp_path, servers, src):
    """Under "ignore" the retry connects again once the server is back."""
    dst, q = blank_qemu_nbd(servers, tmp_path)
    job, errors = _job_with_errors(src, q.uri(), "ignore", speed=4 * MiB)
    try:
        job.start()
        time.sleep(0.3)
        q.stop()
        deadline = time.monotonic() + 10
        while not errors and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        q.start()
        job.set_speed(0)
        assert job.wait_ready(30), job.status().error
        job.complete()
        assert job.wait(30).type == EventType.COMPLETED
    finally:
        job.close()
    q.stop()
    assert errors and all(e.action == "ignore" for e in errors)
    assert content(dst) == content(src)


@pytest.mark.parametrize("unmap", [True, False])
def test_requests_seen_by_the_server(tmp_path, servers, src, unmap):
    """nbdkit's log filter shows what went over the wire: several WRITEs in
    flight on one connection at once, the holes as WRITE_ZEROES (may-trim
    only with unmap: NO_HOLE otherwise), never TRIM, and a FLUSH before
    READY and another at the end."""
    import re
    log = tmp_path / "nbdkit.log"
    k = nbdkit(servers, tmp_path, "--filter=log", "--filter=delay", "memory",
               "size=%d" % SIZE, "logfile=%s" % log, "delay-write=20ms")
    mirror(src, k.uri(), connections=1, unmap=unmap)
    k.stop()
    lines = log.read_text().splitlines()
    inflight = most = 0
    for line in lines:
        if re.search(r" Write id=\d+ ", line):
            inflight += 1
            most = max(most, inflight)
        elif "...Write id=" in line:
            inflight -= 1
    assert most >= 2, "never two WRITEs in flight at once"
    zeros = [line for line in lines if re.search(r" Zero id=\d+ ", line)]
    assert zeros and all(("trim=1" if unmap else "trim=0") in z for z in zeros)
    assert not [line for line in lines if re.search(r" Trim id=", line)]
    flushes = [i for i, line in enumerate(lines) if re.search(r" Flush id=\d+ ", line)]
    writes = [i for i, line in enumerate(lines) if re.search(r" Write id=\d+ ", line)]
    assert len(flushes) >= 2 and flushes[0] > writes[-1]


def test_reconnect_refuses_a_server_that_no_longer_shares_its_flush(tmp_path, servers):
    """Several connections rely on multi-conn: one FLUSH covers the writes of
    them all.  A server that comes back without multi-conn (or that now
    takes a FLUSH it did not before) would leave writes on the other
    connections unflushed while the job records their chunks clean: the
    reconnect is refused, as for an export that changed size."""
    img = tmp_path / "t.img"
    blank(img, SIZE)
    k = nbdkit(servers, tmp_path, "file", str(img))
    c = nbdtarget.connect(k.uri(), connections=4)
    try:
        assert c.multi_conn and c.connections == 4
        k.stop()
        k.argv[4:4] = ["--filter=multi-conn"]
        k.argv.append("multi-conn-mode=disable")
        k.start()
        for i in range(c.connections):      # every connection sees the old server gone
            with pytest.raises(OSError):
                c.pwrite(b"\x01" * 4096, 4096 * i)
        assert c.dead_connections == c.connections
        with pytest.raises(OSError) as e:
            c.reconnect()
        assert e.value.errno == errno.ESTALE
    finally:
        c.close()
