"""A private unix socket to listen on: the NBD export's and QMP's."""

from __future__ import annotations

import os
import socket as _socket
import stat


def listen_private(path: str, backlog: int) -> _socket.socket:
    """A listening unix socket at path, mode 0600 from its creation on.  A
    stale socket file at path is replaced; any other file is left alone
    (bind() then fails with EADDRINUSE)."""
    s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        try:
            if stat.S_ISSOCK(os.lstat(path).st_mode):
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
