"""The NBD export, judged by clients that no one here wrote: nbdinfo,
qemu-io, qemu-img, nbdcopy; and a raw socket for what they never send."""

from __future__ import annotations

import errno
import os
import random
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
from typing import Optional

import pytest

import fastmirror
from fastmirror import EventType
from helpers.files import allocated_bytes, make_image
from helpers.require import fm, require

KiB = 1024
MiB = 1024 * KiB

IHAVEOPT = 0x49484156454F5054
NBD_OPT_GO = 7
NBD_REQUEST_MAGIC = 0x25609513
NBD_CMD_READ, NBD_CMD_WRITE, NBD_CMD_DISC = 0, 1, 2


def run(*cmd, timeout=60) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, "%s failed (%d): %s%s" % (cmd[0], r.returncode, r.stdout, r.stderr)
    return r


def qemu_io(url: str, *commands: str) -> str:
    args = [require("qemu-io"), "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    r = run(*args, url)
    # qemu-io reports a failed command on stdout and still exits 0 in -c mode.
    assert "fail" not in r.stdout.lower() and "error" not in r.stdout.lower(), r.stdout
    return r.stdout


@pytest.fixture
def served(tmp_path):
    src = make_image(tmp_path / "src.img", 8 * MiB, holes=[(2 * MiB, 2 * MiB), (6 * MiB, 2 * MiB)])
    sock = str(tmp_path / "nbd.sock")
    with fastmirror.Export(src, socket=sock) as export:
        yield src, export


# -- a raw client, for what the real ones never send -----------------------------

def recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise EOFError("closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return out


def connect(where) -> socket.socket:
    """A connected socket: `where` is a unix socket's path or (host, port)."""
    if isinstance(where, tuple):
        s = socket.create_connection(where, timeout=10)
    else:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(10)
        s.connect(where)
    return s


def handshake(path, name: bytes = b"", structured: bool = False
              ) -> tuple[socket.socket, int]:
    """Fixed newstyle, NBD_OPT_GO (simple replies unless `structured`) on a
    unix socket's path or a (host, port); (socket, size)."""
    s = connect(path)
    magic, opt, hflags = struct.unpack(">QQH", recv_exact(s, 18))
    assert magic == 0x4e42444d41474943 and opt == IHAVEOPT and hflags & 1
    s.sendall(struct.pack(">I", 3))                   # FIXED_NEWSTYLE | NO_ZEROES
    if structured:
        s.sendall(struct.pack(">QII", IHAVEOPT, 8, 0))
        assert struct.unpack(">QIII", recv_exact(s, 20))[2] == 1      # ACK
    data = struct.pack(">I", len(name)) + name + struct.pack(">H", 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data)
    size = None
    while True:
        _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        body = recv_exact(s, n)
        if rtype == 1:          # ACK
            break
        assert rtype == 3, hex(rtype)
        if struct.unpack(">H", body[:2])[0] == 0:
            size = struct.unpack(">Q", body[2:10])[0]
    assert size is not None
    return s, size


def request(s, cmd, offset, length, cookie=7, payload=b"", magic=NBD_REQUEST_MAGIC):
    s.sendall(struct.pack(">IHHQQI", magic, 0, cmd, cookie, offset, length) + payload)


def simple_reply(s, data_len=0) -> tuple[int, int, bytes]:
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698
    return err, cookie, recv_exact(s, data_len) if not err else b""


def structured_chunks(s) -> list[tuple[int, int, int, bytes]]:
    """The chunks of one structured reply: (flags, type, offset, payload)."""
    out = []
    while True:
        magic, flags, ctype, cookie, n = struct.unpack(">IHHQI", recv_exact(s, 20))
        assert magic == 0x668e33ef
        body = recv_exact(s, n)
        out.append((flags, ctype, struct.unpack(">Q", body[:8])[0] if n >= 8 else -1, body[8:]))
        if flags & 1:
            return out


def is_closed(s: socket.socket) -> bool:
    try:
        return s.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True


# -- peers ------------------------------------------------------------------------

def test_nbdinfo_shows_size_name_and_holes(tmp_path):
    nbdinfo = require("nbdinfo")
    src = make_image(tmp_path / "src.img", 4 * MiB, holes=[(1 * MiB, 2 * MiB)])
    with fastmirror.Export(src, socket=str(tmp_path / "s"), name="disk1") as export:
        assert export.url == "nbd+unix:///disk1?socket=%s" % (tmp_path / "s")
        info = run(nbdinfo, "--json", export.url).stdout
        import json
        d = json.loads(info)
        (exp,) = d["exports"]
        assert exp["export-name"] == "disk1"
        assert exp["export-size"] == 4 * MiB
        assert exp["block_size_maximum"] == 32 * MiB
        assert "base:allocation" in exp["contexts"]
        lines = [line.split() for line in run(nbdinfo, "--map", export.url).stdout.splitlines()]
        extents = [(int(a), int(b), int(c)) for a, b, c, *_ in lines]
        assert extents == [(0, 1 * MiB, 0), (1 * MiB, 2 * MiB, 3), (3 * MiB, 1 * MiB, 0)]
        # Another name is refused; "" is the default export.
        bad = subprocess.run([nbdinfo, "nbd+unix:///other?socket=%s" % export.socket_path],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0
        run(nbdinfo, "--size", "nbd+unix:///?socket=%s" % export.socket_path)


def test_socket_is_0600_and_removed_on_close(tmp_path):
    src = make_image(tmp_path / "src.img", 1 * MiB)
    sock = tmp_path / "s"
    export = fastmirror.Export(src, socket=str(sock))
    try:
        mode = os.stat(sock).st_mode
        assert stat.S_ISSOCK(mode) and stat.S_IMODE(mode) == 0o600
    finally:
        export.close()
    export.close()          # idempotent
    assert not sock.exists()


def test_qemu_io_writes_and_reads_back_patterns(served):
    src, export = served
    qemu_io(export.url, "write -P 0xab 0 64k", "read -P 0xab 0 64k",
            "write -P 0xcd -f 3m 100k",                 # FUA, inside a hole
            "write -z 64k 64k", "read -P 0 64k 64k",
            "discard 7m 64k", "read -P 0 7m 64k", "flush")
    with open(src, "rb") as f:
        data = f.read()
    assert data[:64 * KiB] == b"\xab" * (64 * KiB)
    assert data[64 * KiB:128 * KiB] == bytes(64 * KiB)
    assert data[3 * MiB:3 * MiB + 100 * KiB] == b"\xcd" * (100 * KiB)
    assert data[7 * MiB:7 * MiB + 64 * KiB] == bytes(64 * KiB)


def test_qemu_img_compare_and_nbdcopy_equal_the_file(served, tmp_path):
    src, export = served
    run(require("qemu-img"), "compare", "-f", "raw", "-F", "raw", export.url, src)
    out = tmp_path / "copy.img"
    run(require("nbdcopy"), export.url, str(out))
    with open(src, "rb") as a, open(out, "rb") as b:
        assert a.read() == b.read()


def test_connections_share_one_disk_and_flush(served):
    src, export = served
    a, _ = handshake(export.socket_path)
    b, _ = handshake(export.socket_path)
    request(a, NBD_CMD_WRITE, 0, 5, payload=b"from-")
    request(b, NBD_CMD_WRITE, 5, 1, payload=b"b")
    assert simple_reply(a)[0] == 0 and simple_reply(b)[0] == 0
    request(b, 3, 0, 0, cookie=3)                       # NBD_CMD_FLUSH on the other one
    assert simple_reply(b) == (0, 3, b"")
    request(a, NBD_CMD_READ, 0, 6, cookie=4)
    assert simple_reply(a, 6) == (0, 4, b"from-b")
    assert export.connections == 2
    a.close()
    b.close()
    with open(src, "rb") as f:
        assert f.read(6) == b"from-b"


def test_read_only_export_refuses_writes(tmp_path):
    src = make_image(tmp_path / "src.img", 1 * MiB, pattern=0x11)
    with fastmirror.Export(src, socket=str(tmp_path / "s"), read_only=True) as export:
        s, _ = handshake(export.socket_path)
        request(s, NBD_CMD_WRITE, 0, 4, payload=b"ABCD")
        err, _, _ = simple_reply(s)
        assert err == 1                                 # NBD_EPERM
        request(s, NBD_CMD_READ, 0, 4)
        assert simple_reply(s, 4) == (0, 7, b"\x11" * 4)
        s.close()
    with open(src, "rb") as f:
        assert f.read(4) == b"\x11" * 4


def test_structured_reads_send_holes_as_hole_chunks(served):
    src, export = served                    # a hole at [2 MiB, 4 MiB)
    with open(src, "rb") as f:
        f.seek(2 * MiB - 4 * KiB)
        before = f.read(4 * KiB)
    s, _ = handshake(export.socket_path, structured=True)
    request(s, NBD_CMD_READ, 2 * MiB - 4 * KiB, 12 * KiB)
    chunks = structured_chunks(s)
    assert [(f, t, o) for f, t, o, _ in chunks] == [(0, 1, 2 * MiB - 4 * KiB), (1, 2, 2 * MiB)]
    assert chunks[0][3] == before
    assert struct.unpack(">I", chunks[1][3])[0] == 8 * KiB
    # DF (don't fragment): the data in one chunk, the hole as zeros.
    s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, 1 << 2, NBD_CMD_READ, 8,
                          2 * MiB - 4 * KiB, 12 * KiB))
    chunks = structured_chunks(s)
    assert [(f, t, o) for f, t, o, _ in chunks] == [(1, 1, 2 * MiB - 4 * KiB)]
    assert chunks[0][3] == before + bytes(8 * KiB)
    s.close()


def test_a_structured_read_of_nothing_is_one_none_chunk(served):
    """An OFFSET_DATA chunk carries at least one byte (proto.md: its length
    is at least 9): a zero-length READ is answered with NBD_REPLY_TYPE_NONE."""
    _, export = served
    s, _ = handshake(export.socket_path, structured=True)
    for flags in (0, 1 << 2):           # with DF too
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, NBD_CMD_READ, 9, 4096, 0))
        assert structured_chunks(s) == [(1, 0, -1, b"")]
    request(s, NBD_CMD_READ, 0, 4)      # the connection goes on
    assert [(f, t, o) for f, t, o, _ in structured_chunks(s)] == [(1, 1, 0)]
    s.close()


def test_requests_are_served_while_python_holds_the_gil(served, tmp_path):
    """A connection's requests need no GIL: a client's write and read finish
    while this thread holds it (ctypes.PyDLL calls keep the GIL)."""
    import ctypes
    src, export = served
    done = tmp_path / "done"
    p = subprocess.Popen(["sh", "-c", "%s -f raw -c 'sleep 1200' -c 'write -P 0x77 0 1M' "
                          "-c 'read -P 0x77 0 1M' '%s' && date +%%s.%%N > %s"
                          % (require("qemu-io"), export.url, done)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 10
        while export.connections == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert export.connections == 1
        time.sleep(0.3)          # let the connection's thread reach its nogil loop
        held = time.time()
        # 5 s with the GIL held: on a loaded machine qemu-io's own start, its
        # 1 MiB write and read and `date` can take seconds.
        ctypes.PyDLL(None).usleep(5_000_000)
        released = time.time()
        out, err = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 0, out + err
    assert "fail" not in out.lower(), out
    # The client sleeps 1.2 s after connecting, so its requests came while
    # the GIL was held; they were answered before it was let go.
    finished = float(done.read_text())
    assert finished - held > 0.6, "the client's requests came before the GIL was taken"
    assert finished < released - 0.5, "the requests waited for the GIL"


def test_write_zeroes_flags_no_hole_and_fast_zero(tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB, pattern=0x22)
    NBD_CMD_WRITE_ZEROES, NO_HOLE, FAST_ZERO = 6, 1 << 1, 1 << 4

    def zeroes(s, offset, length, flags):
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, NBD_CMD_WRITE_ZEROES, 5,
                              offset, length))
        return simple_reply(s)[0]

    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        s, _ = handshake(export.socket_path)
        full = allocated_bytes(src)
        assert zeroes(s, 0, 1 * MiB, 0) == 0
        assert allocated_bytes(src) == full - MiB       # a hole: the fast way
        assert zeroes(s, 1 * MiB, 1 * MiB, NO_HOLE) == 0
        assert allocated_bytes(src) == full - MiB       # zeros, still allocated
        assert zeroes(s, 2 * MiB, 1 * MiB, FAST_ZERO) == 0
        # Allocated zeros fast cannot be promised: refused, nothing written.
        assert zeroes(s, 3 * MiB, 1 * MiB, FAST_ZERO | NO_HOLE) == 95     # NBD_ENOTSUP
        s.close()
    with open(src, "rb") as f:
        data = f.read()
    assert data[:3 * MiB] == bytes(3 * MiB) and data[3 * MiB:] == b"\x22" * MiB


# -- TCP, the limit on connections and on request size ----------------------------

def ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_tcp_listen_serves_qemu_io_and_nbdinfo_and_warns(tmp_path, caplog):
    import logging
    nbdinfo = require("nbdinfo")
    src = make_image(tmp_path / "src.img", 4 * MiB, pattern=0x11)
    with caplog.at_level(logging.WARNING, logger="fastmirror"):
        export = fastmirror.Export(src, listen=("127.0.0.1", 0), name="vm1")
    with export:
        host, port = export.address
        assert host == "127.0.0.1" and port > 0            # port 0: a free one
        assert export.socket_path is None
        assert export.url == "nbd://127.0.0.1:%d/vm1" % port
        assert export.urls == [export.url]
        assert "no authentication" in caplog.text and "127.0.0.1:%d" % port in caplog.text
        assert int(run(nbdinfo, "--size", export.url).stdout) == 4 * MiB
        qemu_io(export.url, "write -P 0x5c 1m 64k", "read -P 0x5c 1m 64k", "read -P 0x11 0 4k")
        s, size = handshake(("127.0.0.1", port), name=b"vm1")
        assert size == 4 * MiB
        request(s, NBD_CMD_READ, 1 * MiB, 4, cookie=3)
        assert simple_reply(s, 4) == (0, 3, b"\x5c" * 4)
        s.close()
    with open(src, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(64 * KiB) == b"\x5c" * (64 * KiB)
    # Closed: nothing listens there any more.
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=5).close()


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_tcp_and_unix_socket_together_ipv6_in_brackets(tmp_path, host):
    if host == "::1" and not ipv6_loopback():
        # The machine's network, not a tool to install: a skip even under
        # FASTMIRROR_REQUIRE_ALL (containers often run without IPv6).
        pytest.skip("no IPv6 loopback (::1) here")
    src = make_image(tmp_path / "src.img", 2 * MiB, pattern=0x22)
    sock = str(tmp_path / "s")
    with fastmirror.Export(src, socket=sock, listen=(host, 0)) as export:
        port = export.address[1]
        assert export.url == "nbd+unix:///?socket=%s" % sock
        where = "[%s]" % host if ":" in host else host
        assert export.urls == [export.url, "nbd://%s:%d/" % (where, port)]
        qemu_io(export.urls[1], "write -P 0x66 0 4k")
        qemu_io(export.urls[0], "read -P 0x66 0 4k")        # one disk behind both
        a, _ = handshake(sock)
        b, _ = handshake((host, port))
        # qemu-io's connections end a moment after qemu-io itself.
        assert wait_for(lambda: export.connections == 2), export.connections
        a.close()
        b.close()
    assert not os.path.exists(sock)


def test_export_needs_somewhere_to_listen(tmp_path):
    src = make_image(tmp_path / "src.img", 1 * MiB)
    with pytest.raises(ValueError, match="socket"):
        fastmirror.Export(src)
    with pytest.raises(ValueError, match="max_connections"):
        fastmirror.Export(src, socket=str(tmp_path / "s"), max_connections=0)
    with pytest.raises(ValueError, match="listen"):
        fastmirror.Export(src, listen=("127.0.0.1", 70000))
    # A port in use: the error, and nothing left behind (the unix socket).
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        with pytest.raises(OSError):
            fastmirror.Export(src, socket=str(tmp_path / "s"), listen=busy.getsockname())
    assert not (tmp_path / "s").exists()


def wait_for(predicate, timeout=10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_client_beyond_the_limit_is_refused_the_others_go_on(tmp_path):
    src = make_image(tmp_path / "src.img", 2 * MiB, pattern=0x33)
    sock = str(tmp_path / "s")
    with fastmirror.Export(src, socket=sock, listen=("127.0.0.1", 0),
                           max_connections=2) as export:
        assert export.max_connections == 2
        tcp = export.address
        a, _ = handshake(sock)
        b, _ = handshake(tcp)                   # the limit counts unix and TCP together
        assert export.connections == 2
        for where in (sock, tcp):
            extra = connect(where)
            # Closed before the handshake: not even the greeting.
            with pytest.raises((EOFError, ConnectionResetError)):
                recv_exact(extra, 18)
            extra.close()
        bad = subprocess.run([require("qemu-io"), "-f", "raw", "-c", "read 0 4k", export.url],
                             capture_output=True, text=True, timeout=30)
        assert bad.returncode != 0 or "read 4096/4096" not in bad.stdout
        # The two served are unaffected.
        request(a, NBD_CMD_WRITE, 0, 4, payload=b"aaaa")
        assert simple_reply(a)[0] == 0
        request(b, NBD_CMD_READ, 0, 4, cookie=5)
        assert simple_reply(b, 4) == (0, 5, b"aaaa")
        # One leaves: its place is free again.
        request(a, NBD_CMD_DISC, 0, 0)
        a.close()
        assert wait_for(lambda: export.connections == 1)
        qemu_io(export.url, "read -P 0x61 0 4", "read -P 0x33 4 4092")
        request(b, NBD_CMD_READ, 4, 4, cookie=6)
        assert simple_reply(b, 4) == (0, 6, b"\x33" * 4)
        b.close()


def test_request_size_limit_for_write_and_read(tmp_path):
    """32 MiB is the most a READ or WRITE may carry (NBD_INFO_BLOCK_SIZE's
    maximum): a longer READ is an error and the connection goes on; a longer
    WRITE ends the connection (its payload cannot be skipped safely) and
    nothing of it is written."""
    limit = 32 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(2 * limit)
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        s, _ = handshake(export.socket_path)
        request(s, NBD_CMD_READ, 0, limit + 1, cookie=1)
        assert simple_reply(s) == (22, 1, b"")                  # NBD_EINVAL
        request(s, NBD_CMD_READ, 0, limit, cookie=2)
        err, cookie, data = simple_reply(s, limit)
        assert (err, cookie) == (0, 2) and data == bytes(limit)
        payload = b"\x7e" * limit
        request(s, NBD_CMD_WRITE, limit, limit, cookie=3, payload=payload)
        assert simple_reply(s) == (0, 3, b"")                   # exactly the limit: fine
        st, _ = handshake(export.socket_path, structured=True)
        request(st, NBD_CMD_READ, 0, limit + 1, cookie=4)
        ((flags, ctype, _, _),) = structured_chunks(st)
        assert flags & 1 and ctype == 32769                      # NBD_REPLY_TYPE_ERROR
        # One byte over: dropped, whether the payload follows or not.
        for sent in (0, 4096, limit + 1):
            bad, _ = handshake(export.socket_path)
            try:
                request(bad, NBD_CMD_WRITE, 0, limit + 1, payload=b"\x99" * sent)
            except (BrokenPipeError, ConnectionResetError):
                pass
            assert is_closed(bad)
            bad.close()
        request(s, NBD_CMD_READ, 0, 4096, cookie=5)             # the others go on
        assert simple_reply(s, 4096) == (0, 5, bytes(4096))
        request(st, NBD_CMD_DISC, 0, 0)
        s.close()
        st.close()
    with open(src, "rb") as f:
        assert f.read(limit) == bytes(limit)                     # nothing of the 0x99s
        assert f.read(limit) == payload


# -- malformed input ends one connection only -------------------------------------

def test_malformed_handshake_ends_that_connection_only(served):
    src, export = served
    good, size = handshake(export.socket_path)
    assert size == 8 * MiB
    bad = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad.settimeout(10)
    bad.connect(export.socket_path)
    recv_exact(bad, 18)
    bad.sendall(struct.pack(">I", 3) + b"NOTMAGIC" + struct.pack(">II", 7, 0))
    assert is_closed(bad)
    # An option length far beyond any option: dropped too, nothing read.
    bad2 = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bad2.settimeout(10)
    bad2.connect(export.socket_path)
    recv_exact(bad2, 18)
    bad2.sendall(struct.pack(">IQII", 3, IHAVEOPT, NBD_OPT_GO, 0xFFFFFFF0))
    assert is_closed(bad2)
    request(good, NBD_CMD_WRITE, 4096, 3, payload=b"xyz")
    assert simple_reply(good)[0] == 0
    request(good, NBD_CMD_READ, 4096, 3, cookie=9)
    assert simple_reply(good, 3) == (0, 9, b"xyz")
    good.close()
    qemu_io(export.url, "read -P 0x78 4096 1")      # "x", through a real client


def test_malformed_request_ends_that_connection_only(served):
    src, export = served
    with open(src, "rb") as f:
        before = f.read()
    good, _ = handshake(export.socket_path)
    bad, _ = handshake(export.socket_path)
    request(bad, NBD_CMD_WRITE, 0, 4, payload=b"EVIL", magic=0x12345678)
    assert is_closed(bad)
    bad, _ = handshake(export.socket_path)
    request(bad, NBD_CMD_WRITE, 0, 64 * MiB)                 # beyond the request limit
    assert is_closed(bad)
    # Out of range and unknown commands are errors, and the connection lives.
    request(good, NBD_CMD_READ, 8 * MiB - 2, 4)
    assert simple_reply(good)[0] == 22                       # NBD_EINVAL
    request(good, 99, 0, 0)
    assert simple_reply(good)[0] == 22
    request(good, NBD_CMD_WRITE, 8 * MiB, 1, payload=b"!")
    assert simple_reply(good)[0] == 22
    request(good, NBD_CMD_READ, 0, 16, cookie=11)
    assert simple_reply(good, 16) == (0, 11, before[:16])
    request(good, NBD_CMD_DISC, 0, 0)
    assert is_closed(good)
    with open(src, "rb") as f:
        assert f.read() == before                            # nothing written
    qemu_io(export.url, "read -P 0 2m 4k")


def test_unknown_flags_are_refused_and_nothing_is_written(served):
    """A flag the command does not take is NBD_EINVAL, not ignored: a client
    that asks for something the server does not do must not get a write it
    did not mean.  The connection goes on (the WRITE's payload is read)."""
    src, export = served
    with open(src, "rb") as f:
        before = f.read()
    s, _ = handshake(export.socket_path)

    def send(cmd, flags, offset, length, payload=b"", cookie=1):
        s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, cookie, offset,
                              length) + payload)
        return simple_reply(s)[:2]

    assert send(NBD_CMD_WRITE, 1 << 7, 0, 4, b"EVIL") == (22, 1)
    assert send(NBD_CMD_WRITE, 2, 0, 4, b"EVIL") == (22, 1)              # NO_HOLE
    assert send(4, 2, 0, 4096) == (22, 1)                              # TRIM + NO_HOLE
    assert send(6, 8, 0, 4096) == (22, 1)                              # WRITE_ZEROES + REQ_ONE
    assert send(3, 1 << 15, 0, 0) == (22, 1)                           # FLUSH
    assert send(NBD_CMD_READ, 4, 0, 4) == (22, 1)      # DF without structured replies
    # The flags each command takes are still served.
    assert send(NBD_CMD_WRITE, 1, 8192, 4, b"good") == (0, 1)          # FUA
    assert send(6, 2 | 1, 16384, 4096) == (0, 1)                       # NO_HOLE | FUA
    request(s, NBD_CMD_READ, 8192, 4, cookie=2)
    assert simple_reply(s, 4) == (0, 2, b"good")
    s.close()
    with open(src, "rb") as f:
        after = f.read()
    assert after[:8192] == before[:8192]
    assert after[8192:8196] == b"good" and after[16384:20480] == bytes(4096)


# -- the fuzz: malformed clients next to well-behaved ones ----------------------------
#
# Fuzz clients send seeded random and mutated handshakes, options and requests
# over both listeners while well-behaved clients write and read their own
# halves of the disk and a mirror job tracks every write.  No fuzz client ever
# sends a write the server may carry out: every WRITE, TRIM and WRITE_ZEROES
# of theirs is malformed (bad magic, unknown flags, out of range, over the
# size limit) or has a payload they never finish.  So afterwards the source,
# and the target after the pivot, hold exactly what the good clients wrote.
# FASTMIRROR_FUZZ_ROUNDS (connections per fuzz client) makes it longer;
# FASTMIRROR_FUZZ_SEED picks other seeds (a failure names its seed).

FUZZ_ROUNDS = int(os.environ.get("FASTMIRROR_FUZZ_ROUNDS", "80"))
FUZZ_SEED = int(os.environ.get("FASTMIRROR_FUZZ_SEED", "100"))
FUZZ_SIZE = 8 * MiB
LIMIT = 32 * MiB
CMD_FLUSH, CMD_TRIM, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS = 3, 4, 6, 7
WRITES = (NBD_CMD_WRITE, CMD_TRIM, CMD_WRITE_ZEROES)
FUA, NO_HOLE, DF, REQ_ONE, FAST_ZERO = 1, 2, 4, 8, 16
GO_DEFAULT = struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, 6) + struct.pack(">IH", 0, 0)
STRUCTURED = struct.pack(">QII", IHAVEOPT, 8, 0)


def acted_on_as_write(magic, flags, cmd, offset, length) -> bool:
    """Whether the server may carry this request out as a write (given its
    whole payload): the checks a valid write passes.  Errs on the side of
    yes: a write of 0 bytes in range counts."""
    if magic != NBD_REQUEST_MAGIC or cmd not in WRITES:
        return False
    allowed = FUA | (NO_HOLE | FAST_ZERO if cmd == CMD_WRITE_ZEROES else 0)
    if flags & ~allowed or offset > FUZZ_SIZE or length > FUZZ_SIZE - offset:
        return False
    return not (cmd == NBD_CMD_WRITE and length > LIMIT)


def payload_read(magic, cmd, length) -> Optional[int]:
    """The payload bytes the server reads after this header; None when the
    header ends the connection (bad magic, a WRITE over the limit, DISC)."""
    if magic != NBD_REQUEST_MAGIC or cmd == NBD_CMD_DISC or \
            (cmd == NBD_CMD_WRITE and length > LIMIT):
        return None
    return length if cmd == NBD_CMD_WRITE else 0


def fuzz_requests(rng) -> bytes:
    """A stream of requests none of which the server carries out as a
    write.  A request after one that ends the connection is never read."""
    out = bytearray()
    for i in range(rng.randint(1, 10)):
        kind = rng.randrange(6)
        magic, flags, cmd = NBD_REQUEST_MAGIC, 0, rng.choice(WRITES)
        offset, length = rng.randrange(FUZZ_SIZE), rng.choice([0, 1, 512, 4096, 65536])
        truncate = False
        if kind == 0:                           # reads, flushes, status, unknown commands
            cmd = rng.choice([NBD_CMD_READ, CMD_FLUSH, CMD_BLOCK_STATUS, 5, 8, 9, 42,
                              rng.randrange(10, 1 << 16)])
            flags = rng.choice([0, FUA, DF, REQ_ONE, rng.randrange(1 << 16)])
            length = rng.choice([0, 1, 4096, LIMIT + 1, rng.randrange(1 << 32)])
            if rng.random() < 0.5:
                offset = rng.randrange(1 << 64)
        elif kind == 1:                         # unknown flags
            flags = rng.choice([1 << rng.randrange(5, 16), DF, REQ_ONE, NO_HOLE, FAST_ZERO,
                                rng.randrange(1 << 16)])
            if cmd == CMD_WRITE_ZEROES:
                flags &= ~(FUA | NO_HOLE | FAST_ZERO)
                flags |= 1 << rng.randrange(5, 16)
        elif kind == 2:                         # out of range
            offset = rng.choice([FUZZ_SIZE + 1, rng.randrange(FUZZ_SIZE + 1, 1 << 64),
                                 (1 << 64) - 1, FUZZ_SIZE - rng.randrange(1, 4096)])
            if offset <= FUZZ_SIZE:
                length = FUZZ_SIZE - offset + rng.randrange(1, 65536)
        elif kind == 3:                         # over the limit, or a bad magic
            if rng.random() < 0.5:
                cmd, length = NBD_CMD_WRITE, rng.choice([LIMIT + 1, 1 << 31, (1 << 32) - 1])
            else:
                magic = rng.choice([0, NBD_REQUEST_MAGIC ^ (1 << rng.randrange(32)),
                                    rng.randrange(1 << 32)])
        elif kind == 4:                         # a valid write, mutated
            raw = bytearray(struct.pack(">IHHQQI", magic, flags, cmd, i, offset, length))
            for _ in range(rng.randint(1, 4)):
                raw[rng.randrange(28)] = rng.randrange(256)
            magic, flags, cmd, _, offset, length = struct.unpack(">IHHQQI", raw)
            if acted_on_as_write(magic, flags, cmd, offset, length):
                if cmd == NBD_CMD_WRITE and length > 0:
                    truncate = True             # still valid: its payload never comes
                else:
                    magic ^= 1                  # nothing to hold back: make it bad
        else:                                   # a valid write whose payload never comes
            cmd, length, truncate = NBD_CMD_WRITE, rng.randint(1, 65536), True
            flags = rng.choice([0, FUA])
        if not truncate and acted_on_as_write(magic, flags, cmd, offset, length):
            magic ^= 1                          # a guard; the kinds above never get here
        out += struct.pack(">IHHQQI", magic, flags, cmd, i, offset, length)
        needed = payload_read(magic, cmd, length)
        if truncate:
            if cmd == NBD_CMD_WRITE and needed:
                out += rng.randbytes(rng.randrange(min(needed, 65536)))
            return bytes(out)                   # and hang up: nothing may follow
        if needed is None:
            break
        if needed > 65536:                      # too much to send: cut, and end here
            out += rng.randbytes(rng.randrange(65536))
            return bytes(out)
        out += rng.randbytes(needed)
    if rng.random() < 0.3:
        junk = rng.randbytes(rng.randrange(1, 64))
        if junk[:4] != struct.pack(">I", NBD_REQUEST_MAGIC):
            out += junk
    return bytes(out)


def fuzz_stream(rng) -> bytes:
    """What one fuzz client sends after the server's greeting."""
    kind = rng.randrange(4)
    if kind == 0:                               # junk, or a mutated handshake
        msg = bytearray(struct.pack(">I", 3) + GO_DEFAULT)
        for _ in range(rng.randint(1, 6)):
            msg[rng.randrange(len(msg))] = rng.randrange(256)
        return bytes(msg + rng.randbytes(rng.randrange(64)))
    if kind == 1:                               # options: any code, any payload
        msg = bytearray(struct.pack(">I", rng.choice([3, 1, 0, 7, rng.randrange(1 << 32)])))
        for _ in range(rng.randint(1, 4)):
            body = rng.randbytes(rng.randrange(40))
            n = len(body) if rng.random() < 0.7 else rng.randrange(1 << 32)
            msg += struct.pack(">QII", IHAVEOPT, rng.choice([1, 2, 3, 6, 7, 8, 9, 10, 99]),
                               n) + body
        return bytes(msg)
    # A valid handshake, maybe with structured replies and harmless options
    # first, then requests.
    msg = bytearray(struct.pack(">I", 3))
    if rng.random() < 0.5:
        msg += STRUCTURED
    if rng.random() < 0.3:
        msg += struct.pack(">QII", IHAVEOPT, 3, 0)                    # LIST
    if rng.random() < 0.3:
        msg += struct.pack(">QII", IHAVEOPT, rng.randrange(11, 1 << 16), 0)   # unknown
    return bytes(msg + GO_DEFAULT + fuzz_requests(rng))


def fuzz_client(where_list, seed: int, rounds: int, errors: list) -> None:
    rng = random.Random(seed)
    try:
        for _ in range(rounds):
            s = connect(rng.choice(where_list))
            try:
                recv_exact(s, 18)
                s.sendall(fuzz_stream(rng))
            except (BrokenPipeError, ConnectionResetError, EOFError):
                pass                            # the server hung up on it: fine
            finally:
                s.close()
    except Exception as e:                      # e.g. a timeout: the server stalled
        errors.append("fuzz client %d: %r" % (seed, e))


class GoodClient:
    """Writes, zeroes and reads [lo, hi) of the disk, no one else's, and
    checks every read against what it wrote."""

    def __init__(self, where, structured: bool, lo: int, hi: int, initial: bytes, seed: int):
        self.s, _ = handshake(where, structured=structured)
        self.structured = structured
        self.lo, self.hi = lo, hi
        self.model = bytearray(initial[lo:hi])
        self.rng = random.Random(seed)
        self.cookie = 0
        self.writes = 0

    def _send(self, cmd, flags, offset, length, payload=b"") -> int:
        self.cookie += 1
        self.s.sendall(struct.pack(">IHHQQI", NBD_REQUEST_MAGIC, flags, cmd, self.cookie,
                                   offset, length) + payload)
        return self.cookie

    def _ack(self, cookie) -> None:
        err, got, _ = simple_reply(self.s)      # writes get simple replies
        assert (err, got) == (0, cookie)

    def read(self, offset: int, length: int) -> bytes:
        cookie = self._send(NBD_CMD_READ, 0, offset, length)
        if not self.structured:
            err, got, data = simple_reply(self.s, length)
            assert (err, got) == (0, cookie)
            return data
        buf = bytearray(length)
        for _, ctype, off, body in structured_chunks(self.s):
            assert ctype in (1, 2), ctype           # data or hole, never an error
            if ctype == 1:
                buf[off - offset:off - offset + len(body)] = body
            else:
                buf[off - offset:off - offset + struct.unpack(">I", body)[0]] = \
                    bytes(struct.unpack(">I", body)[0])
        return bytes(buf)

    def step(self) -> None:
        rng = self.rng
        length = rng.choice([1, 512, 4096, 65536, rng.randrange(1, 200_000)])
        offset = rng.randrange(self.lo, self.hi - length)
        at = offset - self.lo
        op = rng.random()
        if op < 0.5:
            data = rng.randbytes(length)
            self._ack(self._send(NBD_CMD_WRITE, rng.choice([0, FUA]), offset, length, data))
            self.model[at:at + length] = data
            self.writes += 1
        elif op < 0.65:
            self._ack(self._send(CMD_WRITE_ZEROES, rng.choice([0, NO_HOLE, FUA]), offset,
                                 length))
            self.model[at:at + length] = bytes(length)
            self.writes += 1
        else:
            assert self.read(offset, length) == self.model[at:at + length], (offset, length)

    def check_all(self) -> None:
        for pos in range(self.lo, self.hi, 1 * MiB):
            n = min(1 * MiB, self.hi - pos)
            assert self.read(pos, n) == self.model[pos - self.lo:pos - self.lo + n], pos


def test_fuzz_clients_next_to_good_ones_write_nothing(tmp_path):
    """Several fuzz clients at once, on the unix socket and TCP, while two
    well-behaved clients write and read and a job mirrors: the server lives,
    the good clients read what they wrote, and source and target (after the
    pivot) hold exactly what the good clients wrote."""
    src = make_image(tmp_path / "src.img", FUZZ_SIZE, holes=[(2 * MiB, 1 * MiB),
                                                             (6 * MiB, 1 * MiB)])
    dst = tmp_path / "dst.img"
    with open(src, "rb") as f:
        initial = f.read()
    sock = str(tmp_path / "s")
    errors: list[str] = []
    with fastmirror.Export(src, socket=sock, listen=("127.0.0.1", 0)) as export:
        where = [sock, export.address]
        job = export.mirror(dst, direct=False)
        good = [GoodClient(sock, False, 0, FUZZ_SIZE // 2, initial, 1),
                GoodClient(export.address, True, FUZZ_SIZE // 2, FUZZ_SIZE, initial, 2)]
        fuzzers = [threading.Thread(target=fuzz_client, args=(where, FUZZ_SEED + k,
                                                              FUZZ_ROUNDS, errors))
                   for k in range(4)]
        for t in fuzzers:
            t.start()
        try:
            while any(t.is_alive() for t in fuzzers):
                for g in good:
                    g.step()
        finally:
            for t in fuzzers:
                t.join(60)
        assert not errors, errors
        assert all(g.writes > 0 for g in good)
        for g in good:
            g.check_all()
            g.s.close()
        # Every fuzz connection ended; the server still serves (both ways).
        assert wait_for(lambda: export.connections == 0), export.connections
        assert job.wait_ready(60)
        job.complete()
        assert job.wait(60).type == EventType.COMPLETED
        expected = bytes(good[0].model + good[1].model)
        with open(src, "rb") as f:
            assert f.read() == expected, \
                "the source holds something no good client wrote (seeds %d..%d)" \
                % (FUZZ_SEED, FUZZ_SEED + 3)
        with open(dst, "rb") as f:
            assert f.read() == expected, "the target differs (seeds %d..%d)" \
                % (FUZZ_SEED, FUZZ_SEED + 3)
        qemu_io(export.urls[1], "write -P 0x99 5m 4k")
        qemu_io(export.urls[0], "read -P 0x99 5m 4k")


# -- a live mirror ---------------------------------------------------------------

# A speed limit below the writers' rate: "auto" must switch to write-blocking
# to converge (background mode would not, unlimited it does).
@pytest.mark.parametrize("copy_mode,speed", [("auto", 16 * MiB), ("write-blocking", 16 * MiB),
                                             ("background", 0)])
def test_live_mirror_through_the_export_pivots_with_no_client_lost(tmp_path, copy_mode, speed):
    qemu_io_path = require("qemu-io")
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, holes=[(4 * MiB, 1 * MiB)])
    dst = tmp_path / "dst.img"
    sock = str(tmp_path / "s")
    region = 64 * KiB
    nregions = size // region
    acked: dict[int, int] = {}          # region -> pattern byte the client saw acknowledged
    stop = threading.Event()
    errors: list[str] = []

    with fastmirror.Export(src, socket=sock) as export:
        def writer():
            # One qemu-io process per batch: its exit status 0 acknowledges
            # every write of the batch.
            i = 0
            while not stop.is_set():
                batch = {}
                cmds = []
                for k in range(8):
                    r = (i * 7 + k * 13) % nregions
                    p = 1 + (i + k) % 250
                    batch[r] = p
                    cmds += ["-c", "write -P %d %d %d" % (p, r * region, region)]
                i += 1
                res = subprocess.run([qemu_io_path, "-f", "raw", *cmds, export.url],
                                     capture_output=True, text=True, timeout=60)
                if res.returncode != 0 or "fail" in res.stdout.lower():
                    errors.append(res.stdout + res.stderr)
                    return
                acked.update(batch)

        t = threading.Thread(target=writer)
        t.start()
        try:
            time.sleep(0.3)
            job = export.mirror(dst, direct=False, speed=speed, copy_mode=copy_mode)
            assert job.wait_ready(60)
            job.set_speed(0)
            time.sleep(0.3)
            job.complete()
            final = job.wait(60)
            assert final.type == EventType.COMPLETED, final
            assert export.disk.pivoted
            time.sleep(0.5)             # writes after the pivot: to the target
        finally:
            stop.set()
            t.join()
        assert not errors, errors
        seen = tmp_path / "seen.img"
        run(require("nbdcopy"), export.url, str(seen))

    with open(dst, "rb") as f:
        target = f.read()
    with open(seen, "rb") as f:
        assert f.read() == target       # what clients see after the pivot is the target
    assert acked
    for r, p in acked.items():
        assert target[r * region:(r + 1) * region] == bytes([p]) * region, r


# fio writes with checksums (--verify) at a steady rate with several writes
# in flight, and the job goes through its whole life meanwhile: bulk copy,
# READY and half a second in it, the drain, the pivot, and fio still writing
# to the target after it.  Then fio's verify of the target file reads every
# block and checks each against what fio wrote and had acknowledged.
@pytest.mark.parametrize("copy_mode", ["background", "write-blocking"])
def test_fio_verifies_the_target_after_writing_through_ready_and_the_pivot(tmp_path, copy_mode):
    from fastmirror._core import tracked
    fio = require("fio")
    size = 16 * MiB
    src = tmp_path / "src.img"
    with open(src, "wb") as f:
        f.truncate(size)
    dst = tmp_path / "dst.img"
    # Random 4 KiB writes over the whole disk (each block once, in an order
    # fio's verify replays from its seed), 1000 a second, 8 in flight: 4 s.
    common = ["--name=w", "--rw=randwrite", "--bs=4k", "--size=%d" % size,
              "--randseed=42", "--verify=crc32c", "--verify_fatal=1"]
    events: list[tuple[float, int]] = []        # (when, tracked.MARK or CLAIM_*)
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        p = subprocess.Popen([fio, "--ioengine=nbd", "--uri=" + export.url, "--iodepth=8",
                              "--rate_iops=1000", "--do_verify=0", *common],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             cwd=tmp_path)         # fio leaves its verify state there
        try:
            # 4 MiB on the source before the job: at 16 MiB/s a bulk copy of
            # a quarter second or more, with fio's writes coming meanwhile.
            assert wait_for(lambda: allocated_bytes(src) >= 4 * MiB or p.poll() is not None,
                            30)
            assert p.poll() is None, "fio ended before the job started"
            export.disk.set_trace(lambda ev, off, n: events.append((time.monotonic(), ev)))
            # 4 KiB chunks: background mode converges under fio's writes.
            job = export.mirror(dst, direct=False, copy_mode=copy_mode, speed=16 * MiB,
                                granularity=4096)
            assert job.wait_ready(30)
            ready_at = time.monotonic()
            assert p.poll() is None, "fio ended before READY"
            job.set_speed(0)
            time.sleep(0.5)                          # phase 2: writes tracked, copied
            complete_at = time.monotonic()
            job.complete()
            assert job.wait(30).type == EventType.COMPLETED
            pivot_at = time.monotonic()
            assert export.disk.pivoted and export.path == os.fspath(dst)
            assert p.poll() is None, "fio ended before the pivot: nothing was tested"
            out, _ = p.communicate(timeout=60)
        finally:
            if p.poll() is None:
                p.kill()
                p.wait()
        assert p.returncode == 0, out
        export.disk.set_trace(None)
    # Writes were tracked before READY and in READY (marked, or sent to both
    # sides in write-blocking mode), and none after the pivot.
    kind = tracked.MARK if copy_mode == "background" else tracked.CLAIM_HELD
    assert any(ev == kind and t < ready_at for t, ev in events), "no write before READY"
    assert sum(1 for t, ev in events if ev == kind and ready_at < t < complete_at) > 50
    assert not any(t > pivot_at for t, ev in events)
    ok = subprocess.run([fio, "--ioengine=psync", "--filename=%s" % dst, "--verify_only",
                         *common], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "io=16.0MiB" in ok.stdout, ok.stdout          # every block was checked
    # The same check of the source fails: the writes after the pivot are
    # only in the target (and the check can fail at all).
    bad = subprocess.run([fio, "--ioengine=psync", "--filename=%s" % src, "--verify_only",
                          *common], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode != 0 and "verify" in (bad.stdout + bad.stderr).lower()


def test_cancelled_mirror_keeps_serving_the_source(tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB)
    dst = tmp_path / "dst.img"
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        job = export.mirror(dst, direct=False)
        assert job.wait_ready(60)
        qemu_io(export.url, "write -P 0x5a 0 64k")      # tracked: lands on the source
        job.cancel()
        # After READY a cancel ends like QEMU's: COMPLETED, without a pivot.
        assert job.wait(60).type in (EventType.CANCELLED, EventType.COMPLETED)
        assert not export.disk.pivoted and not export.disk.tracking
        qemu_io(export.url, "write -P 0x6b 64k 64k", "read -P 0x5a 0 64k")
    with open(src, "rb") as f:
        data = f.read(128 * KiB)
    assert data == b"\x5a" * (64 * KiB) + b"\x6b" * (64 * KiB)


def test_a_second_mirror_after_a_pivot_mirrors_the_target_onward(tmp_path):
    src = make_image(tmp_path / "src.img", 2 * MiB, seed=3)
    t1, t2 = tmp_path / "t1.img", tmp_path / "t2.img"
    with open(src, "rb") as f:
        original = f.read()
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        job = export.mirror(t1, direct=False)
        assert job.wait_ready(60)
        job.complete()
        assert job.wait(60).type == EventType.COMPLETED
        qemu_io(export.url, "write -P 0x33 0 64k")           # lands on t1
        job = export.mirror(t2, direct=False)
        assert job.wait_ready(60)
        qemu_io(export.url, "write -P 0x44 64k 64k")         # tracked: t1, then t2
        job.complete()
        assert job.wait(60).type == EventType.COMPLETED
        assert export.path == os.fspath(t2)
        qemu_io(export.url, "read -P 0x33 0 64k", "read -P 0x44 64k 64k")
    with open(src, "rb") as f:
        assert f.read() == original                          # untouched since the pivot
    with open(t2, "rb") as f:
        assert f.read() == b"\x33" * (64 * KiB) + b"\x44" * (64 * KiB) + original[128 * KiB:]


def test_one_mirror_at_a_time_and_none_of_a_read_only_export(tmp_path):
    src = make_image(tmp_path / "src.img", 2 * MiB)
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        assert not export.disk.tracking
        job = export.mirror(tmp_path / "t1.img", direct=False, speed=1)
        assert export.disk.tracking
        with pytest.raises(RuntimeError, match="running already"):
            export.mirror(tmp_path / "t2.img", direct=False)
        with pytest.raises(RuntimeError, match="tracked already"):
            export.disk.track(job._engine)
        job.cancel(force=True)
        job.wait(30)
    with fastmirror.Export(src, socket=str(tmp_path / "s"), read_only=True) as export:
        with pytest.raises(ValueError, match="read-only"):
            export.mirror(tmp_path / "t3.img", direct=False)


def test_closing_the_jobs_source_handle_leaves_the_export_serving(tmp_path):
    """job.source of an export's job is the export's disk, borrowed: closing
    the handle ends I/O through it, not the export's clients, and the job
    still tracks their writes."""
    src = make_image(tmp_path / "src.img", 2 * MiB, pattern=0x10)
    dst = tmp_path / "dst.img"
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        job = export.mirror(dst, direct=False)
        assert job.wait_ready(60)
        job.source.close()
        with pytest.raises(ValueError, match="closed"):
            job.source.pwrite(b"x", 0)
        assert not export.disk.is_closed
        qemu_io(export.url, "write -P 0x44 64k 64k")          # tracked still
        job.complete()
        assert job.wait(60).type == EventType.COMPLETED
        qemu_io(export.url, "write -P 0x45 0 4k", "read -P 0x44 64k 64k")
        job.source.close()                                    # twice: nothing more
        job.close()
    with open(dst, "rb") as f:
        data = f.read(128 * KiB)
    assert data == b"\x45" * 4096 + b"\x10" * (60 * KiB) + b"\x44" * (64 * KiB)


def test_export_path_follows_the_pivot_hook_and_a_mirror_right_after(tmp_path):
    """The job tells the export of its pivot (MirrorJob.on_pivot) while the
    clients are held at the gate; the next mirror may start the moment the
    previous one is waited for, from any thread."""
    src = make_image(tmp_path / "src.img", 1 * MiB, seed=5)
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        seen = []
        for k in range(4):
            t = tmp_path / ("t%d.img" % k)
            job = export.mirror(t, direct=False)
            job.on_pivot(lambda path: seen.append((path, export.disk.gate_is_closed,
                                                   export.path)))
            assert job.wait_ready(60)
            job.complete()
            assert job.wait(60).type == EventType.COMPLETED
            assert export.path == os.fspath(t)
            # Gate closed in the hook, and the export already knew the path.
            assert seen[-1] == (os.fspath(t), True, os.fspath(t))
        qemu_io(export.url, "write -P 0x21 0 4k")
    with open(tmp_path / "t3.img", "rb") as f:
        assert f.read(4096) == b"\x21" * 4096


def test_on_pivot_only_at_a_pivot_and_a_raising_hook_is_logged(tmp_path, caplog):
    import logging
    src = make_image(tmp_path / "src.img", 1 * MiB)
    calls = []
    with fastmirror.MirrorJob(src, tmp_path / "a.img", direct=False) as job:
        job.on_pivot(calls.append)
        assert job.wait_ready(60)
        job.cancel()                            # in READY: a drain, no pivot
        assert job.wait(60).type == EventType.COMPLETED
        job.source.close()
    assert calls == []
    with caplog.at_level(logging.ERROR, logger="fastmirror"):
        with fastmirror.MirrorJob(src, tmp_path / "b.img", direct=False) as job:
            job.on_pivot(lambda path: 1 / 0)
            job.on_pivot(calls.append)
            assert job.wait_ready(60)
            job.complete()
            assert job.wait(60).type == EventType.COMPLETED
            assert job.source.pivoted
            job.source.close()
    assert calls == [os.fspath(tmp_path / "b.img")]
    assert "on_pivot callback" in caplog.text
    with pytest.raises(TypeError):
        job.on_pivot(None)


def test_two_mirrors_at_once_one_wins(tmp_path):
    src = make_image(tmp_path / "src.img", 2 * MiB)
    with fastmirror.Export(src, socket=str(tmp_path / "s")) as export:
        results: list = []
        barrier = threading.Barrier(2)

        def start(k):
            barrier.wait()
            try:
                results.append(export.mirror(tmp_path / ("t%d.img" % k), direct=False,
                                             speed=1))
            except RuntimeError as e:
                results.append(e)

        threads = [threading.Thread(target=start, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        jobs = [r for r in results if not isinstance(r, Exception)]
        refused = [r for r in results if isinstance(r, Exception)]
        assert len(jobs) == 1 and len(refused) == 1, results
        assert "running already" in str(refused[0])
        jobs[0].cancel(force=True)
        jobs[0].wait(30)


def test_close_does_not_wait_for_a_drain_that_clients_wait_on(tmp_path):
    """close() during a slow drain, with a client's write held at the gate:
    the job is stopped (force), the client let go, and close() returns."""
    src = make_image(tmp_path / "src.img", 8 * MiB)
    dst = tmp_path / "dst.img"
    export = fastmirror.Export(src, socket=str(tmp_path / "s"))
    try:
        job = export.mirror(dst, direct=False)
        assert job.wait_ready(60)
        job.set_speed(64 * KiB)                  # the drain copies 4 MiB: a minute
        qemu_io(export.url, "write -P 0x55 0 4M")
        job.complete()
        assert wait_for(lambda: export.disk.gate_is_closed)
        s, _ = handshake(export.socket_path)
        request(s, NBD_CMD_WRITE, 4 * MiB, 4, payload=b"held")   # waits at the gate
        time.sleep(0.2)
    finally:
        t0 = time.monotonic()
        export.close()
        took = time.monotonic() - t0
    assert took < 10, "close() waited %.1f s for the drain" % took
    assert job.state.value == "concluded"
    s.close()


# -- the command ----------------------------------------------------------------

def test_fastmirror_serve_until_sigterm(tmp_path):
    nbdinfo = require("nbdinfo")
    src = make_image(tmp_path / "src.img", 2 * MiB)
    sock = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "fastmirror", "serve", src, "--socket", str(sock),
                          "--name", "vm1"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        line = p.stdout.readline()
        assert "nbd+unix:///vm1?socket=" in line, line + p.stderr.read()
        assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
        out = run(nbdinfo, "--size", "nbd+unix:///vm1?socket=%s" % sock).stdout
        assert int(out) == 2 * MiB
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not sock.exists()
    missing = fm("serve", str(tmp_path / "missing.img"), "--socket", str(sock), timeout=60)
    assert missing.returncode == 2 and "missing.img" in missing.stderr


def test_fastmirror_serve_listen_warns_and_limits_connections(tmp_path):
    import re
    nbdinfo = require("nbdinfo")
    src = make_image(tmp_path / "src.img", 2 * MiB)
    sock = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-m", "fastmirror", "serve", src, "--socket", str(sock),
                          "--listen", "127.0.0.1:0", "--max-connections", "1", "--name", "vm1"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = p.stdout.readline()
        m = re.search(r"nbd://127\.0\.0\.1:(\d+)/vm1", line)
        assert m and "nbd+unix:///vm1?socket=%s" % sock in line, line
        url = m.group(0)
        assert int(run(nbdinfo, "--size", url).stdout) == 2 * MiB
        held, _ = handshake(("127.0.0.1", int(m.group(1))), name=b"vm1")
        refused = subprocess.run([nbdinfo, "--size", "nbd+unix:///vm1?socket=%s" % sock],
                                 capture_output=True, text=True, timeout=30)
        assert refused.returncode != 0                   # the one place is taken
        request(held, NBD_CMD_DISC, 0, 0)
        held.close()
        deadline = time.monotonic() + 10
        while subprocess.run([nbdinfo, "--size", url], capture_output=True,
                             timeout=30).returncode != 0:
            assert time.monotonic() < deadline, "the place was not freed"
            time.sleep(0.05)
        p.send_signal(signal.SIGTERM)
        assert p.wait(30) == 0
        err = p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "no authentication" in err and "127.0.0.1:%s" % m.group(1) in err, err
    assert "refused a client" in err, err
    for bad in (["--listen", "::1:10809"], ["--listen", "localhost"], ["--listen", "h:99999"],
                ["--socket", str(sock), "--max-connections", "0"], []):
        r = fm("serve", src, *bad, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith("fastmirror: "), (bad, r.stderr)


def test_a_second_export_at_a_live_socket_is_refused(tmp_path):
    """The socket of a running export is not taken over by a second one (a
    stale socket file, with nobody listening, is replaced)."""
    src = make_image(tmp_path / "src.img", 1 * MiB, pattern=0x31)
    sock = str(tmp_path / "s")
    with fastmirror.Export(src, socket=sock) as export:
        with pytest.raises(OSError) as e:
            fastmirror.Export(src, socket=sock)
        assert e.value.errno == errno.EADDRINUSE
        qemu_io(export.url, "read -P 0x31 0 4k")            # still the first one's
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock)                                         # left behind, nobody listens
    stale.close()
    with fastmirror.Export(src, socket=sock) as export:
        qemu_io(export.url, "read -P 0x31 0 4k")
