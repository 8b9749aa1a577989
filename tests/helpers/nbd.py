"""A raw NBD client's handshake, for the tests that speak the protocol
themselves: fixed newstyle, NBD_OPT_GO on the default export, simple
replies."""

from __future__ import annotations

import socket
import struct

IHAVEOPT = 0x49484156454F5054
NBD_OPT_GO = 7


def recv_exact(s: socket.socket, n: int) -> bytes:
    """`n` bytes; ConnectionError when the peer closes first."""
    out = bytearray()
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("closed after %d of %d bytes" % (len(out), n))
        out += chunk
    return bytes(out)


def connect(path: str, timeout: float = 20.0) -> socket.socket:
    """A unix socket connection to the NBD server at `path`, past the
    handshake (NBD_OPT_GO), ready for transmission."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    s.connect(path)
    recv_exact(s, 18)
    s.sendall(struct.pack(">I", 3))
    data = struct.pack(">IH", 0, 0)
    s.sendall(struct.pack(">QII", IHAVEOPT, NBD_OPT_GO, len(data)) + data)
    while True:
        _, _, rtype, n = struct.unpack(">QIII", recv_exact(s, 20))
        recv_exact(s, n)
        if rtype == 1:
            return s
        assert rtype == 3, hex(rtype)
