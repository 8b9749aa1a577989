"""Targets that are NBD exports on another host (or this one).

A target given as an NBD URI, as the NetworkBlockDevice project's
doc/uri.md defines it:

    nbd://host[:port]/name            TCP, port 10809 by default
    nbd+unix:///name?socket=PATH      a unix socket

is opened here with the C client (_core/nbdclient.h) and checked before
anything is written: the server answers the handshake (within a timeout),
the export exists, is writable and is at least as large as the source, and
does not start with an image format header (read over NBD) unless
allow_image_target.  TLS (nbds://, nbds+unix://) is refused: the client
does not speak it.

The owner checks of files (QEMU's image locks, O_EXCL on block devices)
have no meaning over NBD: the server that exports the disk is its owner.
"""

from __future__ import annotations

import errno
import urllib.parse
from dataclasses import dataclass
from typing import Optional

from fastmirror._core.nbdclient import MAX_CONNECTIONS, NbdClient
from fastmirror.job import owners

DEFAULT_PORT = 10809
# Connections when the server allows multi-conn.  Measured with nbdkit's
# memory plugin behind the delay filter (2 ms per write), 256 MiB half holes,
# 4 interleaved rounds on a loaded 2-CPU machine: 1, 2, 4 and 8 connections
# took 0.35, 0.33, 0.38 and 0.46 s (medians): every copy is already a request
# in flight on one connection, and more connections only add threads to the
# server.  Two spread the server's work, no more.
DEFAULT_CONNECTIONS = 2
HANDSHAKE_TIMEOUT = 10.0      # seconds to connect and finish the handshake
SCHEMES = ("nbd", "nbd+unix", "nbds", "nbds+unix")


def is_nbd_uri(target) -> bool:
    """Does `target` name an NBD export (any of the URI schemes), rather
    than a file?"""
    if not isinstance(target, str):
        return False
    scheme, sep, _ = target.partition("://")
    return bool(sep) and scheme.lower() in SCHEMES


@dataclass(frozen=True)
class NbdUri:
    uri: str
    name: str                      # the export name (may be empty)
    host: Optional[str] = None
    port: int = DEFAULT_PORT
    socket: Optional[str] = None


def parse_uri(uri: str) -> NbdUri:
    """An NBD URI's parts; ValueError naming what is wrong."""
    try:
        u = urllib.parse.urlsplit(uri)
        port = u.port
    except ValueError as e:
        raise ValueError("malformed NBD URI %r: %s" % (uri, e)) from None
    scheme = u.scheme.lower()
    if scheme in ("nbds", "nbds+unix"):
        raise ValueError("NBD URI %r asks for TLS, which fastmirror's NBD client does not "
                         "speak: use nbd:// over a trusted network or a tunnel" % uri)
    if scheme not in SCHEMES:
        raise ValueError("not an NBD URI: %r" % uri)
    if u.fragment:
        raise ValueError("malformed NBD URI %r: a fragment (#...) means nothing here" % uri)
    # The export name: the path without its leading "/", percent-decoded
    # (nbd://h//disk names "/disk", nbd://h names "").
    path = u.path[1:] if u.path.startswith("/") else u.path
    name = urllib.parse.unquote(path, errors="strict")
    try:
        query = urllib.parse.parse_qs(u.query, keep_blank_values=True, strict_parsing=True) \
            if u.query else {}
    except ValueError:
        raise ValueError("malformed NBD URI %r: bad query %r" % (uri, u.query)) from None
    unknown = sorted(set(query) - {"socket"})
    if unknown:
        raise ValueError("NBD URI %r: unknown parameter%s %s" % (
            uri, "s" if len(unknown) > 1 else "", ", ".join(unknown)))
    if scheme == "nbd+unix":
        if u.netloc:
            raise ValueError("NBD URI %r: nbd+unix:// takes no host (nbd+unix:///name"
                             "?socket=PATH)" % uri)
        sockets = query.get("socket", [])
        if len(sockets) != 1 or not sockets[0]:
            raise ValueError("NBD URI %r: nbd+unix:// needs one socket=PATH" % uri)
        return NbdUri(uri, name, socket=sockets[0])
    if "socket" in query:
        raise ValueError("NBD URI %r: socket= is for nbd+unix://" % uri)
    if not u.hostname:
        raise ValueError("NBD URI %r names no host (nbd://host[:port]/name)" % uri)
    return NbdUri(uri, name, host=u.hostname, port=DEFAULT_PORT if port is None else port)


def connect(uri: str, connections: Optional[int] = None,
            timeout: Optional[float] = None) -> NbdClient:
    """An NbdClient for an NBD URI: `connections` (default
    DEFAULT_CONNECTIONS) when the server allows multi-conn, else one.
    ValueError for a malformed URI; OSError naming the URI when the server
    cannot be reached or refuses."""
    p = parse_uri(uri)
    n = DEFAULT_CONNECTIONS if connections is None else connections
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_CONNECTIONS:
        raise ValueError("connections must be an integer in [1, %d], not %r"
                         % (MAX_CONNECTIONS, connections))
    return NbdClient(p.name, host=p.host, port=p.port, socket=p.socket, connections=n,
                     timeout=HANDSHAKE_TIMEOUT if timeout is None else timeout, where=uri)


class NbdInfo:
    """What the job needs to know of a side (as blockio.DeviceInfo)."""

    def __init__(self, size: int, alignment: int):
        self.size = size
        self.alignment = alignment
        self.is_block = False


class NbdEndpoint:
    """The target side of a job whose target is an NBD export: the client
    instead of descriptors (fd is -1)."""

    def __init__(self, uri: str, client: NbdClient):
        self.path = uri
        self.client = client
        self.fd = self.tail_fd = -1
        self.direct = True              # no page cache of ours in the way
        self.created = False
        self.locks = None
        self.image_format: Optional[str] = None
        # The export's minimum block is the alignment of every request.
        self.info = NbdInfo(client.size, client.block_sizes[0])

    def current_size(self) -> int:
        return self.client.size

    def open_buffered(self) -> int:
        raise OSError(errno.EOPNOTSUPP, "an NBD target has no descriptor", self.path)

    def remove_created(self) -> None:
        pass

    def describe(self) -> str:
        c = self.client
        return "NBD %d connection%s%s, blocks %d/%d/%d" % (
            c.connections, "" if c.connections == 1 else "s",
            " (multi-conn)" if c.multi_conn else "", *c.block_sizes)

    def close(self) -> None:
        self.client.close()


def open_target(uri: str, source_path: str, source_size: int, *,
                connections: Optional[int] = None, allow_image_target: bool = False,
                timeout: Optional[float] = None) -> NbdEndpoint:
    """Connect to the export and check it before anything is written."""
    client = connect(uri, connections, timeout)
    try:
        if client.read_only:
            raise PermissionError(errno.EROFS, "target NBD export is read-only", uri)
        if not allow_image_target and client.size:
            head = client.pread(min(client.size, max(owners.HEAD_BYTES,
                                                     client.block_sizes[0])), 0)
            fmt = owners.detect_format(head)
            if fmt is not None:
                raise owners.ImageTargetError(
                    "target %s is a %s image, not a raw disk; pass --overwrite-image "
                    "(allow_image_target=True) to overwrite it" % (uri, fmt), uri, fmt)
        if client.size < source_size:
            raise ValueError("target %s (%d bytes) is smaller than source %s (%d bytes)"
                             % (uri, client.size, source_path, source_size))
        bs = client.block_sizes[0]
        if source_size % bs and source_size - source_size % bs + bs > client.size:
            raise ValueError("target %s: the source's end (%d bytes) is not on the export's "
                             "minimum block of %d bytes and the export ends inside that "
                             "block, so it cannot be written" % (uri, source_size, bs))
        return NbdEndpoint(uri, client)
    except BaseException:
        client.close()
        raise


def validate_pair(src_path: str, uri: str, direct: bool, *, force_share: bool = False,
                  allow_image_target: bool = False,
                  connections: Optional[int] = None):
    """Open and check the source (as for any target) and the NBD target;
    on any refusal nothing was written and nothing stays open."""
    from fastmirror.job.endpoints import open_source
    parse_uri(uri)                  # a malformed URI before the source is even opened
    src = open_source(src_path, direct, force_share)
    try:
        dst = open_target(uri, src_path, src.info.size, connections=connections,
                          allow_image_target=allow_image_target)
    except BaseException:
        src.close()
        raise
    return src, dst
