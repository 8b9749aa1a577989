"""Serve a disk over NBD on a unix socket (and TCP when asked), and mirror
it while it is served.

The export owns one TrackedDisk.  Untracked until mirror(), it then becomes
the job's source handle (MirrorJob(_disk=...)): every client's writes go
through the job's gate, claims and marks, and the job's pivot switches the
very disk the connections use, so no client is disconnected.  Each
connection is a thread that spends its life in serve_connection(), which
does not hold the GIL.  One acceptor thread per listening socket; the
limit on connections counts them all.
"""

from __future__ import annotations

import errno
import logging
import os
import socket as _socket
import stat
import threading
import time
from typing import Optional
from urllib.parse import quote

from fastmirror._core.tracked import TrackedDisk
from fastmirror.nbd._server import MALFORMED, serve_connection
from fastmirror.nbd.unixsock import listen_private

log = logging.getLogger("fastmirror.nbd")

MAX_CONNECTIONS = 64

# What an unauthenticated TCP listener means, said wherever one is opened.
TCP_WARNING = ("NBD over TCP has no authentication and no encryption (no TLS): anyone "
               "who can reach %s can %s the disk")


def parse_listen(text: str) -> tuple[str, int]:
    """"HOST:PORT" as (host, port); an IPv6 host goes in brackets
    ("[::1]:10809").  Port 0 picks a free port.  ValueError otherwise."""
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise ValueError("expected HOST:PORT (an IPv6 host in brackets), not %r" % text)
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError("an IPv6 host goes in brackets: [%s]:%s" % (host, port))
    if not host:
        raise ValueError("no host in %r" % text)
    try:
        number = int(port, 10)
    except ValueError:
        number = -1
    if not 0 <= number <= 65535:
        raise ValueError("port %r is not a number from 0 to 65535" % port)
    return host, number


def _listen_tcp(host: str, port: int, backlog: int) -> _socket.socket:
    """A listening TCP socket on the first address `host` resolves to."""
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    infos = _socket.getaddrinfo(host, port, type=_socket.SOCK_STREAM,
                                flags=_socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    s = _socket.socket(family, kind, proto)
    try:
        # A restarted server gets its port back while the old connections
        # linger in TIME_WAIT.
        s.setsockopt(_socket.SOL_SOCKET, _socket.SO_REUSEADDR, 1)
        s.bind(addr)
        s.listen(backlog)
    except BaseException:
        s.close()
        raise
    return s


class Export:
    """Export(path, socket=PATH, listen=(HOST, PORT), name="", read_only=False,
    max_connections=64, state=None, direct=False): serve the image file or
    block device `path` over NBD at the unix socket PATH (created with mode
    0600; an existing socket file there is replaced), over TCP at HOST:PORT,
    or both (at least one).  direct=True serves requests aligned to 4 KiB
    with O_DIRECT (the others through the page cache); `direct` then says
    whether it is in effect.

    TCP has no authentication and no encryption: anyone who can reach the
    port can read and write the disk (a warning is logged).  Port 0 picks
    a free port; `address` is the (host, port) bound.

    More than `max_connections` clients at once (unix and TCP together):
    the next one is closed before the handshake, the others go on.

    Use as a context manager or call close(); `url` is what clients open:
    nbd+unix:///NAME?socket=PATH, or nbd://HOST:PORT/NAME without a unix
    socket (`urls` lists both).

    state=PATH: mirrors of this export keep their state in PATH (see
    MirrorJob's `state`).  If PATH holds an unfinished mirror of `path`, it
    is resumed before the first client is accepted (`job`); if it holds one
    that pivoted, the export serves its target, never the stale source."""

    def __init__(self, path, *, socket=None, listen: Optional[tuple[str, int]] = None,
                 name: str = "", read_only: bool = False,
                 max_connections: int = MAX_CONNECTIONS, state=None,
                 direct: bool = False):
        if socket is None and listen is None:
            raise ValueError("an export needs a unix socket (socket=PATH), a TCP address "
                             "(listen=(HOST, PORT)) or both")
        if type(max_connections) is not int or max_connections < 1:
            raise ValueError("max_connections must be a positive integer, not %r"
                             % (max_connections,))
        if listen is not None:
            host, port = listen
            if not isinstance(host, str) or type(port) is not int or not 0 <= port <= 65535:
                raise ValueError("listen must be (host, port), not %r" % (listen,))
        self._path = os.fspath(path)
        self._state_path = os.fspath(state) if state is not None else None
        self._stopped = None        # a "stopped" state: served untracked until a mirror
        resume = self._resume_plan()
        self.socket_path = os.fspath(socket) if socket is not None else None
        self.address: Optional[tuple[str, int]] = None
        self.name = name
        self.read_only = read_only
        self._name_bytes = name.encode()
        if len(self._name_bytes) > 4096:
            raise ValueError("an NBD export name is at most 4096 bytes")
        self.max_connections = max_connections
        self._lock = threading.Lock()
        self._mirror_lock = threading.Lock()
        self._conns: dict[int, tuple[_socket.socket, threading.Thread]] = {}
        self._threads: list[threading.Thread] = []
        self._closed = True         # until the end of __init__: nothing for close() to do
        self._job = None
        self._disk: Optional[TrackedDisk] = None
        self._listeners: list[_socket.socket] = []
        self._acceptors: list[threading.Thread] = []
        self._refused = 0

        fd = os.open(self._path, (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC)
        try:
            st = os.fstat(fd)
            is_block = stat.S_ISBLK(st.st_mode)
            if not (is_block or stat.S_ISREG(st.st_mode)):
                raise ValueError("%s is neither a regular file nor a block device" % self._path)
            size = os.lseek(fd, 0, os.SEEK_END)
            self._disk = TrackedDisk(size, None)
        except BaseException:
            os.close(fd)
            raise
        self._disk.attach(fd, is_block)
        self.size = size
        # direct: requests aligned to 4 KiB bypass the page cache (O_DIRECT),
        # as QEMU's cache.direct=on; False where the filesystem refuses it.
        self.direct = self._disk.set_direct(True) if direct else False
        try:
            if resume is not None:
                # Before the first client: no write may pass untracked.
                self._closed = False
                self.mirror(resume.target.get("path") or resume.target["uri"],
                            **resume.options)
            elif self._stopped is not None and not read_only:
                self._log_untracked(self._stopped)
            if self.socket_path is not None:
                self._listeners.append(listen_private(self.socket_path, 16))
            if listen is not None:
                tcp = _listen_tcp(listen[0], listen[1], 16)
                self._listeners.append(tcp)
                bound = tcp.getsockname()
                self.address = (listen[0].strip("[]"), bound[1])
                log.warning(TCP_WARNING, self._tcp_where(),
                            "read" if read_only else "read and write")
        except BaseException:
            self._closed = True
            if self._job is not None:
                self._job.close()
            for s in self._listeners:
                s.close()
            if self.socket_path is not None and self._listeners:
                _unlink_quietly(self.socket_path)
            self._disk.close()
            raise
        self._closed = False
        for s in self._listeners:
            t = threading.Thread(target=self._accept, args=(s,), name="fastmirror-nbd-accept",
                                 daemon=True)
            self._acceptors.append(t)
            t.start()

    def _tcp_where(self) -> str:
        assert self.address is not None
        host, port = self.address
        return "%s:%d" % ("[%s]" % host if ":" in host else host, port)

    def _resume_plan(self):
        """With a state file: the State of a mirror to resume (None if
        none), and the file to serve (the target, after a pivot).  A
        damaged file or one of another disk raises StateError."""
        from fastmirror.job import state as _state
        if self._state_path is None:
            return None
        st = _state.load(self._state_path)
        if st is None:
            return None
        if st.phase == "pivoted":
            if st.target.get("kind") == "uri":
                raise _state.StateError(self._state_path, "its mirror pivoted to %s, which "
                                        "is not a file to serve" % st.target["uri"])
            fd = os.open(st.target["path"], os.O_RDONLY | os.O_CLOEXEC)
            try:
                if not _state._same(st.target, _state.identity(st.target["path"], fd, 0)):
                    raise _state.StateError(self._state_path, "its mirror pivoted to %s, and "
                                            "that path names another file now"
                                            % st.target["path"])
            finally:
                os.close(fd)
            self._path = st.target["path"]
            return None
        fd = os.open(self._path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            here = _state.identity(self._path, fd, 0)
        finally:
            os.close(fd)
        if not _state._same(st.source, here):
            raise _state.StateError(self._state_path, "it is the state of a mirror of %s, "
                                    "not of %s" % (_state._describe(st.source), self._path))
        if st.phase == "stopped":
            self._stopped = st
            return None         # cancelled or failed: a new drive-mirror resumes it
        return st

    def _log_untracked(self, st) -> None:
        """A "stopped" state, served untracked until a mirror resumes it:
        as after the cancel, a poisoned activity log on the disk records
        ALL_DIRTY before the first write lands, so that a mirror resumed
        after this process is gone still copies everything.  The state file
        is first written again under a new run id, with the extents of the
        old run's log folded into its bitmap (the new log replaces them)."""
        from fastmirror._core.actlog import RECORD_SIZE, ActivityLog
        from fastmirror._core.hbitmap import HBitmap
        from fastmirror.job import state as _state
        assert self._state_path is not None and self._disk is not None
        alp = _state.al_path(self._state_path)
        rec = _state.read_activity_log(alp, st.run_id)
        bits = st.bitmap
        if bits is None or (rec is not None and rec.all_dirty):
            bits = HBitmap(st.size, st.granularity)
            bits.set(0, st.size)
        else:
            _state.set_extents(bits, st.al_extents, st.al_extent)
            if rec is not None:
                _state.set_extents(bits, rec.extents, 1 << rec.shift)
        seq = max(st.al_seq, rec.seq if rec is not None else 0)
        st.bitmap, st.al_extents, st.al_seq = bits, [], seq
        st.run_id = _state.new_run_id()
        _state.save(self._state_path, st)
        fd = os.open(alp, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            os.ftruncate(fd, 2 * RECORD_SIZE)
            al = ActivityLog(fd, self.size, _state.AL_EXTENT, _state.AL_SLOTS,
                             bytes.fromhex(st.run_id), seq)
        finally:
            os.close(fd)
        _state.sync_folder(alp)
        al.poison()
        self._disk.set_activity_log(al)

    @property
    def job(self):
        """The last mirror started (or resumed) on this export, or None."""
        return self._job


    @property
    def path(self) -> str:
        """The file served: the last mirror's target after its pivot."""
        return self._path

    @property
    def urls(self) -> list[str]:
        """What clients open: nbd+unix:///NAME?socket=PATH for the unix
        socket, nbd://HOST:PORT/NAME for TCP (the NBD URI specification)."""
        out = []
        name = quote(self.name, safe="")
        if self.socket_path is not None:
            out.append("nbd+unix:///%s?socket=%s" % (name, self.socket_path))
        if self.address is not None:
            out.append("nbd://%s/%s" % (self._tcp_where(), name))
        return out

    @property
    def url(self) -> str:
        """The unix socket's URL, or TCP's when there is no unix socket."""
        return self.urls[0]

    @property
    def disk(self) -> TrackedDisk:
        """The TrackedDisk every connection serves."""
        assert self._disk is not None
        return self._disk

    @property
    def connections(self) -> int:
        with self._lock:
            return len(self._conns)

    # -- connections ------------------------------------------------------------

    def _accept(self, listener: _socket.socket) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError as e:
                if self._closed or e.errno in (errno.EBADF, errno.EINVAL):
                    return          # close() shut the listener down
                # ECONNABORTED, EMFILE...: this client is lost, not the server.
                log.warning("nbd: accept failed: %s", e)
                time.sleep(0.05)
                continue
            if conn.family != _socket.AF_UNIX:
                # Replies go out as header + data with MSG_MORE; without
                # Nagle nothing else waits.  Keepalive frees the slot of a
                # peer that vanished.
                try:
                    conn.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
                    conn.setsockopt(_socket.SOL_SOCKET, _socket.SO_KEEPALIVE, 1)
                except OSError:         # the peer is gone already
                    conn.close()
                    continue
            refused = 0
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                if len(self._conns) >= self.max_connections:
                    self._refused += 1
                    refused = self._refused
                else:
                    t = threading.Thread(target=self._serve, args=(conn,),
                                         name="fastmirror-nbd-conn", daemon=True)
                    self._conns[conn.fileno()] = (conn, t)
                    # close() joins every thread, also those whose client just
                    # left (out of _conns, not yet returned).
                    self._threads = [x for x in self._threads if x.is_alive()] + [t]
            if refused:
                # Before the handshake: the client sees the connection end at
                # once, and no thread or buffer is spent on it.
                conn.close()
                if refused == 1 or refused % 100 == 0:
                    log.warning("nbd: refused a client: %d connections already (the limit; "
                                "%d refused so far)", self.max_connections, refused)
                continue
            try:
                t.start()
            except RuntimeError as e:   # no thread to be had: this client only
                log.warning("nbd: cannot serve a client: %s", e)
                with self._lock:
                    self._conns.pop(conn.fileno(), None)
                    self._threads.remove(t)
                conn.close()

    def _serve(self, conn: _socket.socket) -> None:
        key = conn.fileno()
        try:
            end = serve_connection(key, self._disk, self._name_bytes, self.read_only)
            if end == MALFORMED:
                log.warning("nbd: dropped a client that sent a malformed handshake or request")
        finally:
            with self._lock:
                self._conns.pop(key, None)
            conn.close()

    # -- mirroring --------------------------------------------------------------

    def mirror(self, target, *, listener=None, **options):
        """Start a MirrorJob of the served disk onto `target` (MirrorJob's
        options): from now on every client's writes are tracked by it.
        After complete() and COMPLETED the export serves the target; after
        a cancel it keeps serving the source.  Returns the started job.
        `listener`: a callback(JobEvent) added before the start, so that it
        sees every event (a small disk can be READY before mirror() returns).

        One mirror at a time (RuntimeError while one runs); the next one,
        after a pivot, mirrors the target onward.  The job's `source` is the
        export's disk, borrowed: job.source.close() does not end the
        export's service."""
        from fastmirror.job.events import JobState
        from fastmirror.job.mirror import MirrorJob
        if self.read_only:
            raise ValueError("a read-only export has no writes to track: mirror the file "
                             "with MirrorJob")
        # Held from the check to the start: two callers cannot both pass the
        # check, and close() waits for a job being set up.
        with self._mirror_lock:
            with self._lock:
                if self._closed:
                    raise ValueError("the export is closed")
                previous = self._job
                path = self._path
            if previous is not None:
                if previous.state != JobState.CONCLUDED:
                    raise RuntimeError("a mirror of this export is running already")
                # Joins its threads: on return it has let go of the disk.
                previous.close()
            if self._state_path is not None:
                options.setdefault("state", self._state_path)
            job = MirrorJob(path, target, _disk=self._disk, **options)
            job.on_pivot(self._pivoted)
            if listener is not None:
                job.add_listener(listener)
            with self._lock:
                closing = self._closed
                if not closing:
                    self._job = job
            if closing:
                job.close()
                raise ValueError("the export is closed")
            job.start()
            return job

    def _pivoted(self, path: str) -> None:
        """The job's pivot (MirrorJob.on_pivot), clients still held at the
        gate: from now on the export serves `path`."""
        with self._lock:
            self._path = path

    # -- the end ------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, end every connection, stop a running mirror
        (cancelled), close the disk and remove the socket file.  Safe to
        call more than once."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            conns = list(self._conns.values())
            threads = list(self._threads)
        for s in self._listeners:
            try:
                s.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
        for t in self._acceptors:
            t.join()
        for s in self._listeners:
            s.close()
        if self.socket_path is not None and self._listeners:
            _unlink_quietly(self.socket_path)
        with self._mirror_lock:         # a mirror() under way has ended
            job = self._job
        if job is not None:
            # First: a drain holds clients' writes at the gate, and their
            # threads cannot end before it does.  A forced cancel opens it.
            job.cancel(force=True)
        for conn, _ in conns:
            try:
                conn.shutdown(_socket.SHUT_RDWR)    # wakes the nogil loop
            except OSError:
                pass
        for t in threads:
            t.join()
        if job is not None:
            job.close()
        if self._disk is not None:
            self._disk.close()

    def __enter__(self) -> "Export":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True):
            try:
                self.close()
            except Exception:
                pass

    def __repr__(self) -> str:
        return "<Export %s at %s%s>" % (self.path, self.url, " closed" if self._closed else "")


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
