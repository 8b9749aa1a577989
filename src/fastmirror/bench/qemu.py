"""QEMU's own mirror job as a baseline: qemu-storage-daemon driven over QMP.

Used by `fastmirror bench` and the benchmarks to run QEMU's mirror on the same
source and target, side by side with fastmirror.  The QMP client here is a
few lines of the standard library (QMP is JSON lines over a Unix socket), so
no extra package is needed.

The daemon opens both images with cache.direct=on (O_DIRECT, as fastmirror)
and aio=native; the mirror runs with QEMU's defaults (granularity 64 KiB,
buf-size 16 MiB, background copy mode) unless told otherwise.  An NBD export
of the mirrored node lets a writer (fio's nbd engine or qemu-io) write to the
source through QEMU, so the mirror tracks those writes.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Optional


class QMPError(RuntimeError):
    pass


class QMP:
    """A minimal synchronous QMP client."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self.sock.connect(path)
        self.file = self.sock.makefile("rwb", buffering=0)
        self.events: list[dict] = []
        greeting = self._read()
        if "QMP" not in greeting:
            raise QMPError("not a QMP greeting: %r" % greeting)
        self.execute("qmp_capabilities")

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def execute(self, command: str, **arguments) -> object:
        msg = {"execute": command}
        if arguments:
            # QMP spells its argument names with dashes.
            msg["arguments"] = {k.replace("_", "-"): v for k, v in arguments.items()}
        self.file.write(json.dumps(msg).encode() + b"\n")
        while True:
            reply = self._read()
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise QMPError("%s: %s" % (command, reply["error"].get("desc")))
            return reply.get("return")

    def wait_event(self, name: str, timeout: float = 300.0,
                   match: Optional[dict] = None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                if ev["event"] == name and all(ev.get("data", {}).get(k) == v
                                               for k, v in (match or {}).items()):
                    return self.events.pop(i)
            left = deadline - time.monotonic()
            if left <= 0:
                raise QMPError("timed out waiting for %s" % name)
            self.sock.settimeout(left)
            self.events.append(self._read())

    def close(self) -> None:
        try:
            self.file.close()
        finally:
            self.sock.close()


def proc_cpu_seconds(pid: int) -> float:
    """User and system CPU time of process `pid` so far (from /proc)."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def available() -> bool:
    return shutil.which("qemu-storage-daemon") is not None


class StorageDaemon:
    """qemu-storage-daemon with a QMP socket; source and target as nodes
    "src" and "dst"; optionally an NBD export of "src" on a Unix socket."""

    def __init__(self, source: str, target: str, export: bool = False):
        if not available():
            raise FileNotFoundError("qemu-storage-daemon is not installed "
                                    "(Debian: qemu-system-common)")
        self.dir = tempfile.mkdtemp(prefix="fastmirror-qsd-")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.nbd_path = os.path.join(self.dir, "nbd.sock") if export else None
        self.source = source
        self.target = target
        args = ["qemu-storage-daemon",
                "--chardev", "socket,id=qmp,path=%s,server=on,wait=off" % self.qmp_path,
                "--monitor", "chardev=qmp",
                "--blockdev", self._file("src-file", source, read_only=not export),
                "--blockdev", "driver=raw,node-name=src,file=src-file",
                "--blockdev", self._file("dst-file", target, read_only=False),
                "--blockdev", "driver=raw,node-name=dst,file=dst-file"]
        if export:
            args += ["--nbd-server", "addr.type=unix,addr.path=%s" % self.nbd_path,
                     "--export", "type=nbd,id=exp,node-name=src,name=src,writable=on"]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.qmp_path):
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace")
                shutil.rmtree(self.dir, ignore_errors=True)
                raise QMPError("qemu-storage-daemon exited: " + err.strip())
            if time.monotonic() > deadline:
                self.close()
                raise QMPError("qemu-storage-daemon did not create its QMP socket")
            time.sleep(0.01)
        self.qmp = QMP(self.qmp_path)

    @staticmethod
    def _file(name: str, path: str, read_only: bool) -> str:
        driver = "host_device" if _is_block(path) else "file"
        opts = ("driver=%s,node-name=%s,filename=%s,cache.direct=on,aio=native"
                % (driver, name, path))
        return opts + (",read-only=on" if read_only else "")

    def mirror(self, granularity: int = 65536, buf_size: int = 16 << 20, speed: int = 0,
               copy_mode: str = "background", sync: str = "full") -> None:
        self.qmp.execute("blockdev-mirror", job_id="mirror", device="src", target="dst",
                         sync=sync, granularity=granularity, buf_size=buf_size,
                         speed=speed, copy_mode=copy_mode, auto_finalize=True,
                         auto_dismiss=True)

    def wait_ready(self, timeout: float = 600.0) -> dict:
        return self.qmp.wait_event("BLOCK_JOB_READY", timeout, {"device": "mirror"})

    def complete(self, timeout: float = 600.0) -> dict:
        self.qmp.execute("block-job-complete", device="mirror")
        return self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout, {"device": "mirror"})

    def cancel(self, timeout: float = 600.0) -> dict:
        self.qmp.execute("block-job-cancel", device="mirror")
        return self.qmp.wait_event("BLOCK_JOB_COMPLETED", timeout, {"device": "mirror"})

    def cpu_seconds(self) -> float:
        """User and system CPU time of the daemon so far (from /proc)."""
        return proc_cpu_seconds(self.proc.pid)

    def close(self) -> None:
        try:
            if getattr(self, "qmp", None) is not None:
                try:
                    self.qmp.execute("quit")
                except (QMPError, OSError):
                    pass
                self.qmp.close()
        finally:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "StorageDaemon":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _is_block(path: str) -> bool:
    import stat
    try:
        return stat.S_ISBLK(os.stat(path).st_mode)
    except OSError:
        return False
