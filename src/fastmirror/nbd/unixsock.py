"""A private unix socket to listen on: the NBD export's and QMP's."""

from __future__ import annotations

import errno
import os
import socket as _socket
import stat


def listen_private(path: str, backlog: int) -> _socket.socket:
    """A listening unix socket at path, mode 0600 from its creation on.  A
    stale socket file at path (nobody listens) is replaced; a live one, or
    any other file, is left alone: OSError EADDRINUSE."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
                if _listened_on(path):
                    raise OSError(errno.EADDRINUSE, "another server listens at this socket",
                                  path)
                os.unlink(path)
        except FileNotFoundError:
            pass
        # bind() creates the file with the umask: set it so that the file
        # never exists with more than 0600, even before the chmod.
        old = os.umask(0o177)
        try:
            s.bind(path)
        finally:
            os.umask(old)
        os.chmod(path, 0o600)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


def _listened_on(path: str) -> bool:
    """Whether a server accepts connections at the socket file path (a
    running export or QMP, which must not lose its socket to a second one)."""
    probe = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    probe.settimeout(1)
    try:
        probe.connect(path)
        return True
    except OSError:             # ECONNREFUSED: a file left by a server gone
        return False
    finally:
        probe.close()
