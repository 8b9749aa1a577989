"""Serve a disk over NBD on a unix socket, and mirror it while it is served.

The export owns one TrackedDisk.  Untracked until mirror(), it then becomes
the job's source handle (MirrorJob(_disk=...)): every client's writes go
through the job's gate, claims and marks, and the job's pivot switches the
very disk the connections use, so no client is disconnected.  Each
connection is a thread that spends its life in serve_connection(), which
does not hold the GIL.
"""

from __future__ import annotations

import logging
import os
import socket as _socket
import stat
import threading
from typing import Optional
from urllib.parse import quote

from fastmirror._core.tracked import TrackedDisk
from fastmirror.nbd._server import serve_connection
from fastmirror.nbd.unixsock import listen_private

log = logging.getLogger("fastmirror.nbd")

MAX_CONNECTIONS = 64


class Export:
    """Export(path, socket=PATH, name="", read_only=False): serve the image
    file or block device `path` over NBD at the unix socket PATH (created
    with mode 0600; an existing socket file there is replaced).

    Use as a context manager or call close(); `url` is what clients open
    (nbd+unix:///NAME?socket=PATH).

    state=PATH: mirrors of this export keep their state in PATH (see
    MirrorJob's `state`).  If PATH holds an unfinished mirror of `path`, it
    is resumed before the first client is accepted (`job`); if it holds one
    that pivoted, the export serves its target, never the stale source."""

    def __init__(self, path, *, socket, name: str = "", read_only: bool = False,
                 max_connections: int = MAX_CONNECTIONS, state=None):
        self._path = os.fspath(path)
        self._state_path = os.fspath(state) if state is not None else None
        resume = self._resume_plan()
        self.socket_path = os.fspath(socket)
        self.name = name
        self.read_only = read_only
        self._name_bytes = name.encode()
        if len(self._name_bytes) > 4096:
            raise ValueError("an NBD export name is at most 4096 bytes")
        self._max = max_connections
        self._lock = threading.Lock()
        self._conns: dict[int, tuple[_socket.socket, threading.Thread]] = {}
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._job = None
        self._disk: Optional[TrackedDisk] = None
        self._listener: Optional[_socket.socket] = None

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
        try:
            if resume is not None:
                # Before the first client: no write may pass untracked.
                self.mirror(resume.target.get("path") or resume.target["uri"],
                            **resume.options)
            self._listener = self._listen()
        except BaseException:
            if self._job is not None:
                self._job.close()
            self._disk.close()
            raise
        self._acceptor = threading.Thread(target=self._accept, name="fastmirror-nbd-accept",
                                          daemon=True)
        self._acceptor.start()

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
                if _state.identity(st.target["path"], fd, 0)["kind"] == "uri" or \
                        not _state._same(st.target, _state.identity(st.target["path"], fd, 0)):
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
            return None         # cancelled or failed: a new drive-mirror resumes it
        return st

    @property
    def job(self):
        """The last mirror started (or resumed) on this export, or None."""
        return self._job

    def _listen(self) -> _socket.socket:
        return listen_private(self.socket_path, 16)

    @property
    def path(self) -> str:
        """The file served: the last mirror's target after its pivot."""
        job = self._job
        if job is not None and self._disk is not None and self._disk.pivoted:
            return job.source.path
        return self._path

    @property
    def url(self) -> str:
        return "nbd+unix:///%s?socket=%s" % (quote(self.name, safe=""), self.socket_path)

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

    def _accept(self) -> None:
        assert self._listener is not None
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return              # close() shut the listener down
            with self._lock:
                if self._closed or len(self._conns) >= self._max:
                    conn.close()
                    continue
                t = threading.Thread(target=self._serve, args=(conn,), name="fastmirror-nbd-conn",
                                     daemon=True)
                self._conns[conn.fileno()] = (conn, t)
                # close() joins every thread, also those whose client just
                # left (out of _conns, not yet returned).
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, conn: _socket.socket) -> None:
        key = conn.fileno()
        try:
            end = serve_connection(key, self._disk, self._name_bytes, self.read_only)
            if end == 1:
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
        sees every event (a small disk can be READY before mirror() returns)."""
        from fastmirror.job.mirror import MirrorJob
        if self.read_only:
            raise ValueError("a read-only export has no writes to track: mirror the file "
                             "with MirrorJob")
        with self._lock:
            if self._closed:
                raise ValueError("the export is closed")
            if self._job is not None and not self._job_done(self._job):
                raise RuntimeError("a mirror of this export is running already")
            previous = self._job
        # After a pivot the disk served is the previous target.
        self._path = self.path
        if previous is not None:
            previous.close()        # concluded: its descriptors, not the disk
            # wait() returns at the final event, a moment before the job's
            # thread lets go of the disk (stop_tracking): wait for that.
            coordinator = getattr(previous, "_coordinator", None)
            if coordinator is not None:
                coordinator.join()
        if self._state_path is not None:
            options.setdefault("state", self._state_path)
        job = MirrorJob(self._path, target, _disk=self._disk, **options)
        if listener is not None:
            job.add_listener(listener)
        with self._lock:
            self._job = job
        job.start()
        return job

    @staticmethod
    def _job_done(job) -> bool:
        from fastmirror.job.events import JobState
        return job.state == JobState.CONCLUDED

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
            job = self._job
        if self._listener is not None:
            try:
                self._listener.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
            self._acceptor.join()
            self._listener.close()
            try:
                os.unlink(self.socket_path)
            except OSError:
                pass
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
