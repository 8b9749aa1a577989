"""QMP, QEMU's monitor protocol, for an Export: the commands and events of
QEMU's mirror job, with QEMU's names and fields, so that a program written
for QEMU (qemu.qmp, libvirt-style scripts) drives fastmirror unchanged.

Standard library only: one thread accepts, one thread per client reads and
answers, one thread sends events.  Several clients may be connected; each
event goes to every client that finished the capabilities negotiation.

QEMU's job status (JOB_STATUS_CHANGE, query-block-jobs "status") is derived
from MirrorJob.state, which a listener cannot follow (a verb changes it
without an event): the event thread polls the state every 50 ms and right
after each verb handled here, and emits a change as it sees it.  fastmirror's
DRAINING (after complete or cancel in READY) is still QEMU's "ready" (QEMU's
mirror keeps that status until it finishes).  At the end the job goes
through "waiting", "pending", "concluded", "null" (or "aborting",
"concluded", "null" when cancelled before READY or failed) and leaves
query-block-jobs, as with QEMU's auto-finalize and auto-dismiss.

Final events: fastmirror's COMPLETED after block-job-cancel in READY (a
drain without pivot) is BLOCK_JOB_COMPLETED, as QEMU emits (its
block-job-cancel documentation, iotest 218: the target is a consistent
copy); CANCELLED is BLOCK_JOB_CANCELLED; FAILED is BLOCK_JOB_COMPLETED with
"error".
"""

from __future__ import annotations

import codecs
import json
import logging
import os
import queue
import socket as _socket
import threading
import time
from typing import Callable, Optional

from fastmirror.job.events import EventType, JobEvent, JobState, JobStateError
from fastmirror.nbd.unixsock import listen_private

log = logging.getLogger("fastmirror.qmp")

__all__ = ["QMPServer", "QMP_VERSION"]

# The QEMU version announced: the QMP schema these commands follow.
QMP_VERSION = {"major": 9, "minor": 2, "micro": 0}

POLL = 0.05

_STATUS = {
    JobState.CREATED: "created",
    JobState.RUNNING: "running",
    JobState.PAUSED: "paused",
    JobState.READY: "ready",
    JobState.STANDBY: "standby",
    JobState.DRAINING: "ready",
    JobState.ABORTING: "aborting",
    JobState.CONCLUDED: "concluded",
}


MAX_REQUEST = 1 << 20


def _split(buf: str) -> tuple[list[str], str]:
    """The complete top-level JSON texts at the start of buf, and what is
    left (an incomplete one).  As QEMU's streaming parser, brackets are
    counted outside strings: a malformed text ends where its brackets close,
    so that it gets its own error and the next request is still read.  A
    stray token outside brackets is a text of its own (up to whitespace)."""
    texts = []
    i, n = 0, len(buf)
    while i < n:
        while i < n and buf[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        start = i
        if buf[i] not in "{[":
            while i < n and buf[i] not in " \t\r\n{[":
                i += 1
            texts.append(buf[start:i])
            continue
        depth, in_str, esc = 0, False, False
        while i < n:
            ch = buf[i]
            i += 1
            if in_str:
                if esc:
                    esc = False
                elif ch == "\\":
                    esc = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str = True
            elif ch in "{[":
                depth += 1
            elif ch in "}]":
                depth -= 1
                if depth == 0:
                    break
        else:
            return texts, buf[start:]      # incomplete: wait for more
        texts.append(buf[start:i])
    return texts, ""


class QMPError(Exception):
    def __init__(self, desc: str, cls: str = "GenericError"):
        super().__init__(desc)
        self.cls = cls
        self.desc = desc


def _timestamp() -> dict:
    t = time.time()
    return {"seconds": int(t), "microseconds": int((t - int(t)) * 1e6)}


class _Job:
    """A MirrorJob as QMP sees it: its id and what QMP asked of it."""

    def __init__(self, job_id: str, job):
        self.id = job_id
        self.job = job
        self.status = "created"
        self.ready_sent = False


class _Client:
    def __init__(self, conn: _socket.socket):
        self.conn = conn
        self.negotiated = False
        self.lock = threading.Lock()

    def send(self, obj) -> None:
        data = (json.dumps(obj) + "\r\n").encode()
        with self.lock:
            try:
                self.conn.sendall(data)
            except OSError:
                pass                # the client left: its reader thread ends it


# The arguments each command takes (QEMU's names).  Anything else is an
# error, as in QEMU: an argument misspelt or not supported here must not be
# ignored (a "sped" or a "replaces" would change what the caller expects).
_ARGUMENTS = {
    "qmp_capabilities": {"enable"},
    "drive-mirror": {"device", "target", "job-id", "sync", "format", "mode", "speed",
                     "granularity", "buf-size", "on-source-error", "on-target-error",
                     "copy-mode", "unmap", "auto-finalize", "auto-dismiss"},
    "block-job-complete": {"device"},
    "block-job-cancel": {"device", "force"},
    "block-job-pause": {"device"},
    "block-job-resume": {"device"},
    "block-job-set-speed": {"device", "speed"},
}
# QEMU's drive-mirror arguments that fastmirror does not implement.
_UNSUPPORTED = {"node-name", "replaces", "filter-node-name"}


def _check_arguments(name: str, args: dict) -> None:
    """QMPError for an argument that `name` does not take."""
    for key in sorted(args):
        if key not in _ARGUMENTS.get(name, ()):
            if name == "drive-mirror" and key in _UNSUPPORTED:
                raise QMPError("fastmirror does not support drive-mirror's '%s'" % key)
            raise QMPError("Parameter '%s' is unexpected" % key)


class QMPServer:
    """QMPServer(export, socket=PATH, on_quit=None): QMP at the unix socket
    PATH (mode 0600) for `export` (a fastmirror.Export).  `quit` answers,
    then calls on_quit() (fastmirror serve stops and exits 0).  close()
    disconnects every client and removes the socket file."""

    def __init__(self, export, *, socket, on_quit: Optional[Callable[[], object]] = None):
        import fastmirror
        self.export = export
        self.socket_path = os.fspath(socket)
        self.on_quit = on_quit
        self._version = fastmirror.__version__
        self._lock = threading.Lock()
        self._clients: dict[int, _Client] = {}
        self._threads: list[threading.Thread] = []
        self._jobs: dict[str, _Job] = {}
        self._events: queue.Queue = queue.Queue()
        self._closed = False
        self._adopt(getattr(export, "job", None))
        self._listener = self._listen()
        self._acceptor = threading.Thread(target=self._accept, name="fastmirror-qmp-accept",
                                          daemon=True)
        self._pump = threading.Thread(target=self._event_loop, name="fastmirror-qmp-events",
                                      daemon=True)
        self._acceptor.start()
        self._pump.start()

    def _listen(self) -> _socket.socket:
        return listen_private(self.socket_path, 8)

    def _adopt(self, job) -> None:
        """A job the export resumed from its state file (serve --state after
        a crash): listed in query-block-jobs under the export's name, as
        drive-mirror would have named it, and its events follow.  A READY
        that came before the listener is reported once here."""
        if job is None or job.state == JobState.CONCLUDED:
            return
        entry = _Job(self.export.name, job)
        self._jobs[entry.id] = entry
        job.add_listener(lambda ev, e=entry: self._events.put((e, ev)))
        if job.status().ready:
            self._events.put((entry, JobEvent(EventType.READY, job.size, job.size)))

    # -- connections -------------------------------------------------------------

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            client = _Client(conn)
            with self._lock:
                if self._closed:
                    conn.close()
                    return
                self._clients[id(client)] = client
                t = threading.Thread(target=self._serve, args=(client,),
                                     name="fastmirror-qmp-conn", daemon=True)
                self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _serve(self, client: _Client) -> None:
        client.send({"QMP": {"version": {"qemu": dict(QMP_VERSION),
                                         "package": "fastmirror %s" % self._version},
                             "capabilities": []}})
        buf = ""
        # A character may come in two reads: decoded across them.
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        try:
            while True:
                try:
                    data = client.conn.recv(65536)
                except OSError:
                    return
                if not data:
                    return
                buf += decoder.decode(data)
                texts, buf = _split(buf)
                if len(buf) > MAX_REQUEST:
                    client.send(self._error(None, "JSON parse error, request too large",
                                            "GenericError"))
                    return
                for text in texts:
                    try:
                        req = json.loads(text)
                    except ValueError as e:
                        # As QEMU: the error is answered, the stream goes on.
                        client.send(self._error(None, "JSON parse error, %s" % e,
                                                "GenericError"))
                        continue
                    reply = self._handle(client, req)
                    client.send(reply)
                    if isinstance(req, dict) and req.get("execute") == "quit" \
                            and "return" in reply:
                        # The answer first, then the end, as QEMU does.
                        self._broadcast("SHUTDOWN", {"guest": False,
                                                     "reason": "host-qmp-quit"})
                        if self.on_quit is not None:
                            self.on_quit()
        finally:
            with self._lock:
                self._clients.pop(id(client), None)
            client.conn.close()

    @staticmethod
    def _error(req, desc: str, cls: str) -> dict:
        reply: dict = {"error": {"class": cls, "desc": desc}}
        if isinstance(req, dict) and "id" in req:
            reply["id"] = req["id"]
        return reply

    def _handle(self, client: _Client, req) -> dict:
        if not isinstance(req, dict) or not isinstance(req.get("execute"), str):
            return self._error(req, "QMP input must be a JSON object with 'execute'",
                               "GenericError")
        name = req["execute"]
        args = req.get("arguments", {})
        if not isinstance(args, dict):
            return self._error(req, "QMP input member 'arguments' must be an object",
                               "GenericError")
        if not client.negotiated and name != "qmp_capabilities":
            return self._error(req, "Expecting capabilities negotiation with "
                               "'qmp_capabilities'", "CommandNotFound")
        try:
            _check_arguments(name, args)
            if name == "qmp_capabilities":
                if client.negotiated:
                    raise QMPError("Capabilities negotiation is already complete, "
                                   "command ignored", "CommandNotFound")
                if args.get("enable"):
                    raise QMPError("Capability '%s' not available" % args["enable"][0])
                client.negotiated = True
                ret = {}
            else:
                method = getattr(self, "_cmd_" + name.replace("-", "_"), None)
                if method is None:
                    raise QMPError("The command %s has not been found" % name,
                                   "CommandNotFound")
                ret = method(args)
        except QMPError as e:
            return self._error(req, e.desc, e.cls)
        except (JobStateError, ValueError, TypeError, RuntimeError) as e:
            return self._error(req, str(e), "GenericError")
        except OSError as e:
            desc = e.strerror or str(e)
            if e.filename:
                desc = "Could not open '%s': %s" % (e.filename, desc)
            return self._error(req, desc, "GenericError")
        reply: dict = {"return": ret}
        if "id" in req:
            reply["id"] = req["id"]
        return reply

    # -- commands ------------------------------------------------------------------

    @staticmethod
    def _arg(args: dict, key: str, kind, default=None, required: bool = False):
        if key not in args:
            if required:
                raise QMPError("Parameter '%s' is missing" % key)
            return default
        v = args[key]
        if kind is int and isinstance(v, bool) or not isinstance(v, kind):
            raise QMPError("Invalid parameter type for '%s', expected: %s"
                           % (key, {int: "integer", str: "string", bool: "boolean"}[kind]))
        return v

    def _cmd_query_version(self, args: dict) -> dict:
        return {"qemu": dict(QMP_VERSION), "package": "fastmirror %s" % self._version}

    def _cmd_query_commands(self, args: dict) -> list:
        names = ["qmp_capabilities"] + sorted(
            n[5:].replace("_", "-") for n in dir(self) if n.startswith("_cmd_"))
        return [{"name": n} for n in names]

    def _cmd_quit(self, args: dict) -> dict:
        return {}

    def _cmd_drive_mirror(self, args: dict) -> dict:
        device = self._arg(args, "device", str, required=True)
        target = self._arg(args, "target", str, required=True)
        if device not in ("", self.export.name):
            raise QMPError("Cannot find device='%s' nor node-name='%s'" % (device, device))
        job_id = self._arg(args, "job-id", str, device)
        sync = self._arg(args, "sync", str, required=True)
        fmt = self._arg(args, "format", str, "raw")
        if fmt != "raw":
            raise QMPError("fastmirror writes raw targets only, not format '%s'" % fmt)
        mode = self._arg(args, "mode", str, "absolute-paths")
        if mode not in ("existing", "absolute-paths"):
            raise QMPError("Parameter 'mode' does not accept value '%s'" % mode)
        for key in ("auto-finalize", "auto-dismiss"):
            if not self._arg(args, key, bool, True):
                raise QMPError("fastmirror jobs always finalize and dismiss themselves: "
                               "'%s' must be true" % key)
        opts = {"sync": sync,
                "speed": self._arg(args, "speed", int, 0),
                "on_source_error": self._arg(args, "on-source-error", str, "report"),
                "on_target_error": self._arg(args, "on-target-error", str, "report"),
                "copy_mode": self._arg(args, "copy-mode", str, "background"),
                "unmap": self._arg(args, "unmap", bool, True)}
        if "granularity" in args:
            opts["granularity"] = self._arg(args, "granularity", int)
        if "buf-size" in args:
            opts["buf_size"] = self._arg(args, "buf-size", int)
        with self._lock:
            if job_id in self._jobs:
                raise QMPError("Job ID '%s' already in use" % job_id)
            if self._jobs:
                raise QMPError("Node '%s' is busy: block device is in use by block job: "
                               "mirror" % device)
            entry = _Job(job_id, None)
            # The listener before the start: a small disk can be READY at once.
            entry.job = self.export.mirror(
                target, listener=lambda ev, e=entry: self._events.put((e, ev)), **opts)
            self._jobs[job_id] = entry
        self._kick()
        return {}

    def _job(self, args: dict) -> _Job:
        device = self._arg(args, "device", str, required=True)
        with self._lock:
            entry = self._jobs.get(device)
        if entry is None:
            raise QMPError("Block job '%s' not found" % device, "DeviceNotActive")
        return entry

    def _cmd_query_block_jobs(self, args: dict) -> list:
        with self._lock:
            entries = list(self._jobs.values())
        out = []
        for e in entries:
            st = e.job.status()
            out.append({"type": "mirror", "device": e.id, "len": st.len, "offset": st.offset,
                        "busy": st.busy, "paused": st.paused, "speed": st.speed,
                        "io-status": st.io_status, "ready": st.ready,
                        "status": _STATUS[JobState(st.state)],
                        "auto-finalize": True, "auto-dismiss": True})
        return out

    def _verb(self, args: dict, verb: str, fn) -> dict:
        entry = self._job(args)
        try:
            fn(entry)
        except JobStateError:
            raise QMPError("Job '%s' in state '%s' cannot accept command verb '%s'"
                           % (entry.id, _STATUS[entry.job.state], verb)) from None
        self._kick()
        return {}

    def _cmd_block_job_complete(self, args: dict) -> dict:
        return self._verb(args, "complete", lambda e: e.job.complete())

    def _cmd_block_job_cancel(self, args: dict) -> dict:
        force = self._arg(args, "force", bool, False)
        return self._verb(args, "cancel", lambda e: e.job.cancel(force=force))

    def _cmd_block_job_pause(self, args: dict) -> dict:
        return self._verb(args, "pause", lambda e: e.job.pause())

    def _cmd_block_job_resume(self, args: dict) -> dict:
        return self._verb(args, "resume", lambda e: e.job.resume())

    def _cmd_block_job_set_speed(self, args: dict) -> dict:
        speed = self._arg(args, "speed", int, required=True)
        return self._verb(args, "set-speed", lambda e: e.job.set_speed(speed))

    # -- events --------------------------------------------------------------------

    def _broadcast(self, name: str, data: dict) -> None:
        msg = {"event": name, "data": data, "timestamp": _timestamp()}
        with self._lock:
            clients = [c for c in self._clients.values() if c.negotiated]
        for c in clients:
            c.send(msg)

    def _kick(self) -> None:
        self._events.put(None)      # poll the states now

    def _status_to(self, e: _Job, status: str) -> None:
        if status != e.status:
            e.status = status
            self._broadcast("JOB_STATUS_CHANGE", {"id": e.id, "status": status})

    def _event_loop(self) -> None:
        while True:
            try:
                item = self._events.get(timeout=POLL)
            except queue.Empty:
                item = None
            if item is False:
                return
            if item is not None:
                try:
                    self._job_event(*item)
                except Exception:   # keep the events flowing for the next ones
                    log.exception("qmp: cannot report %r", item[1])
            with self._lock:
                entries = list(self._jobs.values())
            for e in entries:
                state = e.job.state
                if state != JobState.CONCLUDED:    # the final event says how it ended
                    self._status_to(e, _STATUS[state])

    def _job_event(self, e: _Job, ev: JobEvent) -> None:
        # drive-mirror holds the lock until the job is in the table: an event
        # that came first waits here for it (or the final one would pop a job
        # not yet added, which would then stay listed).
        with self._lock:
            pass
        st = e.job.status()
        base = {"type": "mirror", "device": e.id, "len": ev.len, "offset": ev.offset,
                "speed": st.speed}
        if ev.type == EventType.READY:
            if e.ready_sent:
                return              # an adopted job's READY, seen twice
            e.ready_sent = True
            self._status_to(e, "ready")
            self._broadcast("BLOCK_JOB_READY", base)
        elif ev.type == EventType.ERROR:
            self._broadcast("BLOCK_JOB_ERROR", {
                "device": e.id, "operation": "read" if ev.operation == "read" else "write",
                "action": ev.action or "report"})
        elif ev.type.final:
            if ev.type == EventType.COMPLETED:
                self._status_to(e, "waiting")
                self._status_to(e, "pending")
                # Also after a cancel without force in READY: QEMU reports
                # the consistent copy it left as completed.
                name = "BLOCK_JOB_COMPLETED"
            else:
                self._status_to(e, "aborting")
                if ev.type == EventType.FAILED:
                    name = "BLOCK_JOB_COMPLETED"
                    err = ev.error
                    base["error"] = (err.strerror or str(err)) if err is not None \
                        else "Input/output error"
                else:
                    name = "BLOCK_JOB_CANCELLED"
            self._broadcast(name, base)
            self._status_to(e, "concluded")
            with self._lock:
                self._jobs.pop(e.id, None)
            self._status_to(e, "null")

    # -- the end -------------------------------------------------------------------

    def close(self) -> None:
        """Stop accepting, disconnect every client, remove the socket file.
        The export (and its job) stays: close it separately."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            clients = list(self._clients.values())
            threads = list(self._threads)
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
        for c in clients:
            try:
                c.conn.shutdown(_socket.SHUT_RDWR)
            except OSError:
                pass
        for t in threads:
            if t is not threading.current_thread():
                t.join()
        self._events.put(False)
        if self._pump is not threading.current_thread():
            self._pump.join()

    def __enter__(self) -> "QMPServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
