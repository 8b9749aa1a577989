"""The NBD export serves many requests of one connection at once, and with
direct=True serves aligned requests with O_DIRECT.

A raw client sends requests back to back without waiting (as fio's nbd
engine and a guest's queue do): every request gets exactly one reply, in
any order, the data is right, and NBD_CMD_DISC or a malformed request after
them still lets every earlier request finish and answer first; through the
io_uring path (plain reads and writes) and through the worker pool.  O_DIRECT is
judged by the page cache: fincore (util-linux) counts the pages of the file
that are cached after writes through the export, with and without direct.
"""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
import time

import pytest

import fastmirror
from fastmirror import EventType
from helpers.files import make_image
from helpers.jobs import stopped_export_state
from helpers.nbd import connect, recv_exact
from helpers.require import require

KiB = 1024
MiB = 1024 * KiB
REQUEST_MAGIC = 0x25609513
READ, WRITE, DISC, FLUSH = 0, 1, 2, 3


def req(cmd: int, cookie: int, offset: int, length: int, payload: bytes = b"",
        magic: int = REQUEST_MAGIC) -> bytes:
    return struct.pack(">IHHQQI", magic, 0, cmd, cookie, offset, length) + payload


def replies(s: socket.socket, lengths: dict[int, int]) -> dict[int, tuple[int, bytes]]:
    """One simple reply per cookie of `lengths` (cookie -> bytes of data a
    successful reply carries), in whatever order they come."""
    out: dict[int, tuple[int, bytes]] = {}
    while len(out) < len(lengths):
        magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
        assert magic == 0x67446698
        assert cookie in lengths and cookie not in out, (cookie, sorted(out))
        out[cookie] = (err, recv_exact(s, lengths[cookie]) if not err else b"")
    return out


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except ConnectionResetError:    # closed with the client's bytes unread
        return True
    except socket.timeout:
        return False


def blocks(n: int, size: int) -> list[bytes]:
    return [os.urandom(size) for _ in range(n)]


@pytest.fixture(params=["ring", "pool"])
def export(tmp_path, request):
    """An export; "pool": with a trace listener on its disk, which keeps
    every request off the io_uring path (the listener sees claims and marks
    in the request's own thread), so the worker pool serves them all."""
    src = make_image(tmp_path / "src.img", 8 * MiB)
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock")) as e:
        if request.param == "pool":
            e.disk.set_trace(lambda event, offset, length: None)
        yield src, e


def test_pipelined_writes_and_reads_each_get_one_reply(export):
    src, e = export
    data = blocks(48, 4 * KiB)
    with connect(e.socket_path) as s:
        # 48 writes at once, more than the server serves at a time.
        s.sendall(b"".join(req(WRITE, 100 + i, i * 64 * KiB, 4 * KiB, d)
                           for i, d in enumerate(data)))
        got = replies(s, {100 + i: 0 for i in range(48)})
        assert all(err == 0 for err, _ in got.values())
        s.sendall(b"".join(req(READ, 200 + i, i * 64 * KiB, 4 * KiB) for i in range(48))
                  + req(FLUSH, 300, 0, 0))
        got = replies(s, {**{200 + i: 4 * KiB for i in range(48)}, 300: 0})
        assert all(got[200 + i] == (0, d) for i, d in enumerate(data))
        assert got[300][0] == 0
    with open(src, "rb") as f:
        for i, d in enumerate(data):
            f.seek(i * 64 * KiB)
            assert f.read(4 * KiB) == d


def _close_gate_within(e, seconds: float) -> bool:
    import threading
    done = threading.Event()
    threading.Thread(target=lambda: (e.disk.close_gate(), done.set()), daemon=True).start()
    return done.wait(seconds)


def test_a_client_that_reads_no_replies_does_not_hold_the_gate(export):
    """The job's drain and pivot close the gate (every other client's writes
    wait there): a request must leave it once its I/O is done, not once its
    reply went out to a client that may never read it.  On the io_uring
    path the completer ends each request's I/O as it completes, also while
    it waits for the socket to take an earlier reply."""
    src, e = export
    with connect(e.socket_path) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(b"".join(req(READ, i, (i % 2) * 4 * MiB, 4 * MiB) for i in range(16)))
        time.sleep(0.5)
        closed = _close_gate_within(e, 3)
        got = replies(s, {i: 4 * MiB for i in range(16)})
        assert all(err == 0 for err, _ in got.values())
        assert _close_gate_within(e, 10)
        e.disk.open_gate()
    assert closed, "the gate waited for the client to read its replies"


def test_large_pipelined_writes(export):
    src, e = export
    data = blocks(4, 2 * MiB)
    with connect(e.socket_path) as s:
        s.sendall(b"".join(req(WRITE, i, i * 2 * MiB, 2 * MiB, d) for i, d in enumerate(data)))
        assert all(err == 0 for err, _ in replies(s, {i: 0 for i in range(4)}).values())
    with open(src, "rb") as f:
        assert f.read(8 * MiB) == b"".join(data)


def test_disconnect_after_pipelined_writes_answers_them_first(export):
    src, e = export
    data = blocks(20, 4 * KiB)
    with connect(e.socket_path) as s:
        s.sendall(b"".join(req(WRITE, i, i * 8 * KiB, 4 * KiB, d) for i, d in enumerate(data))
                  + req(DISC, 99, 0, 0))
        got = replies(s, {i: 0 for i in range(20)})
        assert all(err == 0 for err, _ in got.values())
        assert is_closed(s)
    with open(src, "rb") as f:
        for i, d in enumerate(data):
            f.seek(i * 8 * KiB)
            assert f.read(4 * KiB) == d


def test_malformed_request_after_pipelined_writes(export):
    src, e = export
    with open(src, "rb") as f:
        before = f.read()
    data = blocks(10, 4 * KiB)
    with connect(e.socket_path) as s:
        s.sendall(b"".join(req(WRITE, i, i * 4 * KiB, 4 * KiB, d) for i, d in enumerate(data))
                  + req(WRITE, 50, 1 * MiB, 4 * KiB, b"\xee" * 4 * KiB, magic=0x12345678))
        got = replies(s, {i: 0 for i in range(10)})
        assert all(err == 0 for err, _ in got.values())
        assert is_closed(s)
    with open(src, "rb") as f:
        after = f.read()
    assert after[:40 * KiB] == b"".join(data)
    assert after[40 * KiB:] == before[40 * KiB:], "the malformed request reached the disk"
    # The export goes on serving others.
    with connect(e.socket_path) as s:
        s.sendall(req(READ, 1, 0, 4 * KiB))
        assert replies(s, {1: 4 * KiB})[1] == (0, data[0])


def test_errors_come_back_on_their_own_request(export):
    src, e = export
    with connect(e.socket_path) as s:
        s.sendall(req(WRITE, 1, 0, 4 * KiB, b"a" * 4 * KiB)
                  + req(WRITE, 2, 8 * MiB - 2 * KiB, 4 * KiB, b"b" * 4 * KiB)  # past the end
                  + req(READ, 3, 8 * MiB, 1)                                    # past the end
                  + req(WRITE, 4, 4 * KiB, 4 * KiB, b"c" * 4 * KiB))
        got = replies(s, {1: 0, 2: 0, 3: 1, 4: 0})
        assert got[1][0] == 0 and got[4][0] == 0
        assert got[2][0] == 22 and got[3][0] == 22          # NBD_EINVAL
    with open(src, "rb") as f:
        assert f.read(8 * KiB) == b"a" * 4 * KiB + b"c" * 4 * KiB


# -- direct=True ----------------------------------------------------------------

def cached_bytes(path) -> int:
    out = subprocess.run([require("fincore"), "--bytes", "--noheadings", "--output", "RES",
                          str(path)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


def drop_file_cache(path) -> int:
    """Drop the file's pages from the page cache; what is left cached (a
    page under writeback stays: try again a few times)."""
    for _ in range(20):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        left = cached_bytes(path)
        if left < 64 * KiB:
            break
        time.sleep(0.05)
    return left


def write_through(e, data: bytes, offset: int) -> None:
    with connect(e.socket_path) as s:
        chunks = [data[i:i + MiB] for i in range(0, len(data), MiB)]
        s.sendall(b"".join(req(WRITE, i, offset + i * MiB, len(c), c)
                           for i, c in enumerate(chunks)))
        assert all(err == 0 for err, _ in replies(s, {i: 0 for i in
                                                      range(len(chunks))}).values())


@pytest.mark.parametrize("direct", [False, True])
def test_direct_export_bypasses_the_page_cache(tmp_path, direct):
    src = make_image(tmp_path / "src.img", 8 * MiB)
    data = os.urandom(4 * MiB)
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), direct=direct) as e:
        if direct and not e.direct:
            pytest.skip("the filesystem of %s refuses O_DIRECT" % tmp_path)
        assert e.disk.served_direct == direct
        base = drop_file_cache(src)
        write_through(e, data, 2 * MiB)
        cached = cached_bytes(src) - base
        if direct:
            assert cached < 256 * KiB, "%d bytes of the writes went through the page cache" \
                % cached
        else:
            assert cached >= 4 * MiB, cached     # the control: buffered writes are cached
        # Unaligned requests go through the page cache, in direct mode too.
        with connect(e.socket_path) as s:
            # Requests in flight together may be served in any order (NBD
            # allows it): the read is sent once the write is answered.
            s.sendall(req(WRITE, 1, 100, 10, b"0123456789"))
            assert replies(s, {1: 0})[1][0] == 0
            s.sendall(req(READ, 2, 96, 16))
            err, got = replies(s, {2: 16})[2]
            assert err == 0 and got[4:14] == b"0123456789"
    with open(src, "rb") as f:
        f.seek(100)
        assert f.read(10) == b"0123456789"
        f.seek(2 * MiB)
        assert f.read(4 * MiB) == data


def test_direct_export_serves_the_target_direct_after_the_pivot(tmp_path):
    src = make_image(tmp_path / "src.img", 8 * MiB)
    dst = str(tmp_path / "dst.img")
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), direct=True) as e:
        if not e.direct:
            pytest.skip("the filesystem of %s refuses O_DIRECT" % tmp_path)
        job = e.mirror(dst)
        assert job.wait_ready(60)
        job.complete()
        final = job.wait(60)
        assert final is not None and final.type == EventType.COMPLETED, final
        assert e.disk.pivoted and e.disk.served_direct
        base = drop_file_cache(dst)
        data = os.urandom(2 * MiB)
        write_through(e, data, 4 * MiB)
        assert cached_bytes(dst) - base < 256 * KiB
    with open(dst, "rb") as f:
        f.seek(4 * MiB)
        assert f.read(2 * MiB) == data


def test_pipelined_writes_with_a_state_file_are_in_the_activity_log(tmp_path):
    """With state=, a write is acknowledged only once its extent is active
    in the activity log on disk: a plain write must not take the io_uring
    path past the log.  Eight pipelined writes into eight 4 MiB extents (the
    log keeps 64, so none leaves): all eight are in the log's record."""
    from fastmirror.job import state as _state
    src = make_image(tmp_path / "src.img", 40 * MiB)
    st = str(tmp_path / "state")
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), state=st) as e:
        job = e.mirror(str(tmp_path / "dst.img"), speed=1 * MiB)
        extents = list(range(1, 9))
        data = blocks(len(extents), 4 * KiB)
        with connect(e.socket_path) as s:
            s.sendall(b"".join(req(WRITE, x, x * 4 * MiB + 4 * KiB, 4 * KiB, d)
                               for x, d in zip(extents, data)))
            got = replies(s, {x: 0 for x in extents})
            assert all(err == 0 for err, _ in got.values())
            rec = _state.read_activity_log(_state.al_path(st), job._run_id)
            assert rec is not None
            assert set(extents) <= set(rec.extents), rec.extents
        job.cancel(force=True)
        job.wait()
    with open(src, "rb") as f:
        for x, d in zip(extents, data):
            f.seek(x * 4 * MiB + 4 * KiB)
            assert f.read(4 * KiB) == d


def test_a_write_on_the_ring_to_an_untracked_export_counts_as_untracked(tmp_path):
    """An export whose last mirror was cancelled (state "stopped") serves
    untracked until the next mirror, which resumes the state file: it must
    copy everything if anything was written meanwhile, since nothing says
    where.  A plain write takes the io_uring path: it must count as an
    untracked write as the pool's path does, or the resumed job trusts the
    old bitmap and leaves that write's chunk stale on the target."""
    src, dst, st = stopped_export_state(tmp_path, 8 * MiB)
    data = os.urandom(64 * KiB)
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), state=st) as e:
        assert e.job is None            # "stopped": served untracked
        with connect(e.socket_path) as s:
            s.sendall(req(WRITE, 1, 2 * MiB, len(data), data))
            assert replies(s, {1: 0})[1][0] == 0
        assert e.disk.untracked_writes > 0
        job = e.mirror(dst)
        assert job.wait_ready(30)
        job.complete()
        assert job.wait().type == EventType.COMPLETED
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()


def test_a_ring_on_descriptor_0_is_closed_with_its_connection(tmp_path):
    """A server whose standard input is closed (a daemon) can get 0 for a
    connection's io_uring: it must be closed at the end like any other."""
    script = r'''
import os, socket, struct, sys, time
sys.path.insert(0, sys.argv[2])
import fastmirror
from helpers.nbd import IHAVEOPT, recv_exact
from test_nbd_pipeline import req, replies, WRITE, DISC
with fastmirror.Export(sys.argv[1], socket=sys.argv[1] + ".sock") as e:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(20)
    s.connect(e.socket_path)
    recv_exact(s, 18)
    os.close(0)     # the lowest descriptor is free when the server sets up the ring
    s.sendall(struct.pack(">I", 3) + struct.pack(">QII", IHAVEOPT, 7, 6) + bytes(6))
    while True:
        _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        if rtype == 1:
            break
    s.sendall(req(WRITE, 1, 0, 4096, b"x" * 4096))
    assert replies(s, {1: 0})[1][0] == 0
    during = os.readlink("/proc/self/fd/0") if os.path.exists("/proc/self/fd/0") else "-"
    s.sendall(req(DISC, 2, 0, 0))
    for _ in range(500):
        if e.connections == 0:
            break
        time.sleep(0.01)
    s.close()
    print(during, os.readlink("/proc/self/fd/0") if os.path.exists("/proc/self/fd/0") else "-")
'''
    src = make_image(tmp_path / "src.img", 1 * MiB)
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", script, str(src), here], capture_output=True,
                         text=True, timeout=60, stdin=subprocess.DEVNULL,
                         env={**os.environ, "PYTHONPATH": here + os.pathsep
                              + os.environ.get("PYTHONPATH", "")})
    assert out.returncode == 0, out.stderr
    during, after = out.stdout.split()
    if "io_uring" not in during:
        pytest.skip("the connection got no io_uring on descriptor 0 (%s)" % during)
    assert after == "-", "the connection's io_uring was left open: %s" % after


def test_direct_is_off_where_pages_are_larger_than_4k(tmp_path, monkeypatch):
    """With 64 KiB pages an aligned direct write could share a page with a
    buffered one: direct=True then serves everything through the page
    cache, and says so."""
    src = make_image(tmp_path / "src.img", 1 * MiB)
    real = os.sysconf
    monkeypatch.setattr(os, "sysconf",
                        lambda name: 65536 if name == "SC_PAGE_SIZE" else real(name))
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), direct=True) as e:
        assert e.direct is False and not e.disk.served_direct
    monkeypatch.setattr(os, "sysconf", real)
    with fastmirror.Export(src, socket=str(tmp_path / "nbd2.sock"), direct=True) as e:
        assert e.direct is True and e.disk.served_direct
