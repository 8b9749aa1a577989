"""QMP for the NBD export, driven by QEMU's own Python client (qemu.qmp):
what a program written for QEMU's mirror job sends and expects."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import time

import pytest

import fastmirror
from fastmirror.nbd.qmp import QMPServer
from helpers.files import make_image
from helpers.require import require_that

try:
    from qemu.qmp import ExecuteError, QMPClient
except ImportError:     # pragma: no cover - gated below
    QMPClient = None

MiB = 1024 * 1024


@pytest.fixture(autouse=True)
def _need_qemu_qmp():
    require_that(QMPClient is not None, "the qemu.qmp client is not installed "
                 "(pip install qemu.qmp)")


@pytest.fixture
def served(tmp_path):
    src = make_image(tmp_path / "src.img", 4 * MiB, holes=[(1 * MiB, 1 * MiB)])
    with fastmirror.Export(src, socket=str(tmp_path / "nbd.sock"), name="vm1") as export:
        with QMPServer(export, socket=str(tmp_path / "qmp.sock")) as qmp:
            yield src, export, qmp


async def client_for(qmp) -> "QMPClient":
    c = QMPClient("test")
    await c.connect(qmp.socket_path)
    return c


async def until(c, name: str, timeout: float = 20) -> tuple[dict, list]:
    """The next event called `name`, and every event seen up to it."""
    seen = []
    while True:
        ev = await asyncio.wait_for(c.events.get(), timeout)
        seen.append(ev)
        assert "seconds" in ev["timestamp"] and "microseconds" in ev["timestamp"]
        if ev["event"] == name:
            return ev, seen


def statuses(seen) -> list:
    return [e["data"]["status"] for e in seen if e["event"] == "JOB_STATUS_CHANGE"]


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_greeting_negotiation_version_and_socket_mode(served):
    _, _, qmp = served
    assert stat.S_IMODE(os.stat(qmp.socket_path).st_mode) == 0o600

    async def go():
        c = await client_for(qmp)
        greeting = c.greeting
        assert list(greeting.QMP.capabilities) == []
        assert greeting.QMP.version["package"].startswith("fastmirror ")
        assert greeting.QMP.version["qemu"]["major"] >= 0
        v = await c.execute("query-version")
        assert set(v["qemu"]) == {"major", "minor", "micro"}
        with pytest.raises(ExecuteError) as e:
            await c.execute("no-such-command")
        assert e.value.error_class == "CommandNotFound"
        await c.disconnect()
    run(go())


def raw_greeted(qmp):
    """A plain socket to `qmp` past its greeting, not negotiated: (the
    socket, a binary file on it)."""
    s = socket.socket(socket.AF_UNIX)
    s.connect(qmp.socket_path)
    f = s.makefile("rwb")
    assert "QMP" in json.loads(f.readline())
    return s, f


def test_commands_before_negotiation_are_refused_with_id(served):
    s, f = raw_greeted(served[2])
    f.write(b'{"execute": "query-version", "id": 7}\r\n')
    f.flush()
    reply = json.loads(f.readline())
    assert reply["error"]["class"] == "CommandNotFound" and reply["id"] == 7
    f.write(b'{"execute": "qmp_capabilities"}{"execute": "query-version", "id": "x"}')
    f.flush()
    assert json.loads(f.readline()) == {"return": {}}
    reply = json.loads(f.readline())
    assert reply["id"] == "x" and "qemu" in reply["return"]
    # Malformed input is answered and the stream goes on, as in QEMU.
    f.write(b'{"execute": } [1, 2] nonsense\r\n{"execute": "query-version", "id": 3}\r\n')
    f.flush()
    for _ in range(3):
        assert json.loads(f.readline())["error"]["class"] == "GenericError"
    assert json.loads(f.readline())["id"] == 3
    s.close()


def test_a_character_split_between_two_reads_is_read_whole(served):
    """UTF-8 over a stream: a character may come in two pieces."""
    s, f = raw_greeted(served[2])
    text = '{"execute": "qmp_capabilities", "id": "caf\u00e9"}'.encode("utf-8")
    cut = text.index(b"\xc3") + 1
    s.sendall(text[:cut])
    time.sleep(0.3)         # the server reads the first piece alone
    s.sendall(text[cut:] + b"\r\n")
    assert json.loads(f.readline()) == {"return": {}, "id": "caf\u00e9"}
    s.close()


def test_mirror_query_speed_pause_resume_complete_pivots(served, tmp_path):
    src, export, qmp = served
    dst = tmp_path / "dst.img"

    async def go():
        c = await client_for(qmp)
        with pytest.raises(ExecuteError) as e:
            await c.execute("drive-mirror", {"device": "nope", "target": str(dst),
                                             "sync": "full"})
        assert e.value.error_class == "GenericError" and "nope" in str(e.value)
        r = await c.execute("drive-mirror", {"device": "vm1", "target": str(dst),
                                             "sync": "full", "speed": 512 * 1024,
                                             "mode": "absolute-paths", "job-id": "j1",
                                             "copy-mode": "background"})
        assert r == {}
        jobs = await c.execute("query-block-jobs")
        assert len(jobs) == 1
        j = jobs[0]
        assert j["type"] == "mirror" and j["device"] == "j1" and j["len"] == 4 * MiB
        assert j["speed"] == 512 * 1024 and j["io-status"] == "ok" and j["ready"] is False
        assert j["status"] in ("created", "running") and j["paused"] is False
        assert j["auto-finalize"] is True and j["auto-dismiss"] is True
        assert set(j) >= {"offset", "busy"}
        with pytest.raises(ExecuteError) as e:
            await c.execute("block-job-complete", {"device": "j1"})
        assert e.value.error_class == "GenericError" and "complete" in str(e.value)
        with pytest.raises(ExecuteError):
            await c.execute("block-job-set-speed", {"device": "vm1", "speed": 0})
        await c.execute("block-job-pause", {"device": "j1"})
        _, seen = await until(c, "JOB_STATUS_CHANGE")
        while statuses(seen)[-1] != "paused":
            seen += (await until(c, "JOB_STATUS_CHANGE"))[1]
        assert (await c.execute("query-block-jobs"))[0]["paused"] is True
        await c.execute("block-job-resume", {"device": "j1"})
        ev, _ = await until(c, "JOB_STATUS_CHANGE")
        assert ev["data"] == {"id": "j1", "status": "running"}
        await c.execute("block-job-set-speed", {"device": "j1", "speed": 0})
        ev, seen = await until(c, "BLOCK_JOB_READY")
        assert ev["data"]["device"] == "j1" and ev["data"]["type"] == "mirror"
        assert ev["data"]["len"] == ev["data"]["offset"] == 4 * MiB
        assert ev["data"]["speed"] == 0
        assert (await c.execute("query-block-jobs"))[0]["ready"] is True
        await c.execute("block-job-complete", {"device": "j1"})
        ev, seen = await until(c, "BLOCK_JOB_COMPLETED")
        assert "error" not in ev["data"] and ev["data"]["device"] == "j1"
        _, more = await until(c, "JOB_STATUS_CHANGE")
        while statuses(more)[-1] != "null":
            more += (await until(c, "JOB_STATUS_CHANGE"))[1]
        assert statuses(seen + more)[-4:] == ["waiting", "pending", "concluded", "null"]
        assert await c.execute("query-block-jobs") == []
        await c.disconnect()
    run(go())
    # The export serves the target now: a write through it lands there.
    assert export.path == str(dst)
    export.disk.pwrite(b"\xab" * 4096, 0)
    export.disk.flush()
    with open(dst, "rb") as f:
        assert f.read(4096) == b"\xab" * 4096
    with open(src, "rb") as f:
        assert f.read(4096) != b"\xab" * 4096
    # And an NBD client reads the target through it.
    qemu_io = shutil.which("qemu-io")
    if qemu_io is not None:
        r = subprocess.run([qemu_io, "-f", "raw", "-c", "read -P 0xab 0 4k", export.url],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "fail" not in r.stdout.lower() \
            and "pattern verification" not in r.stdout.lower(), r.stdout + r.stderr


def test_cancel_in_ready_is_block_job_completed_without_pivot(served, tmp_path):
    """As QEMU (its qapi block-job-cancel, iotest 218): a cancel without
    force after READY leaves a consistent copy and ends BLOCK_JOB_COMPLETED."""
    src, export, qmp = served
    dst = tmp_path / "dst.img"

    async def go():
        c = await client_for(qmp)
        await c.execute("drive-mirror", {"device": "", "target": str(dst), "sync": "full"})
        ev, _ = await until(c, "BLOCK_JOB_READY")
        assert ev["data"]["device"] == ""          # job-id defaults to the device
        await c.execute("block-job-cancel", {"device": ""})
        ev, seen = await until(c, "BLOCK_JOB_COMPLETED")
        assert ev["data"]["len"] == 4 * MiB and "error" not in ev["data"]
        assert not any(e["event"] == "BLOCK_JOB_CANCELLED" for e in seen)
        await c.disconnect()
    run(go())
    with open(src, "rb") as a, open(dst, "rb") as b:
        assert a.read() == b.read()                 # consistent, as QEMU's
    assert export.path == src


def test_serve_qmp_quit_exits_zero(tmp_path):
    src = make_image(tmp_path / "src.img", 2 * MiB)
    nbd, qsock = tmp_path / "n", tmp_path / "q"
    p = subprocess.Popen([sys.executable, "-m", "fastmirror", "serve", src, "--socket", str(nbd),
                          "--qmp", str(qsock)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    try:
        assert "nbd+unix" in p.stdout.readline()
        assert "QMP" in p.stdout.readline()
        assert stat.S_IMODE(os.stat(qsock).st_mode) == 0o600

        async def go():
            c = QMPClient("test")
            await c.connect(str(qsock))
            try:
                assert await c.execute("quit") == {}
            except EOFError:
                # qemu.qmp may see the end of the stream before it hands out
                # the answer the server sent first (QEMU's own tests allow
                # for this too); the exit status below is what counts.
                pass
            try:
                await c.disconnect()
            except EOFError:
                pass    # qemu.qmp reports the server's hang-up here (documented)
        run(go())
        assert p.wait(30) == 0, p.stderr.read()
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert not qsock.exists() and not nbd.exists()


def test_cancel_before_ready_two_clients_and_bad_arguments(served, tmp_path):
    _, export, qmp = served
    dst = tmp_path / "dst.img"

    async def go():
        a, b = await client_for(qmp), await client_for(qmp)
        for bad in ({"sync": "top"}, {"sync": "full", "on-target-error": "explode"},
                    {"sync": "full", "speed": "fast"}, {"sync": "full", "format": "qcow2"},
                    {"sync": "full", "target": str(tmp_path / "no" / "dir.img")},
                    {"sync": "full", "sped": 1}, {"sync": "full", "replaces": "x"}):
            with pytest.raises(ExecuteError) as e:
                await a.execute("drive-mirror", {"device": "vm1", "target": str(dst), **bad})
            assert e.value.error_class == "GenericError", bad
        assert await a.execute("query-block-jobs") == []    # none of those started
        with pytest.raises(ExecuteError) as e:
            await a.execute("query-block-jobs", {"all": True})
        assert "'all' is unexpected" in str(e.value)
        await a.execute("drive-mirror", {"device": "vm1", "target": str(dst), "sync": "full",
                                         "speed": 64 * 1024})
        with pytest.raises(ExecuteError) as e:
            await a.execute("block-job-set-speed", {"device": "vm1", "speed": 1, "sped": 2})
        assert "'sped' is unexpected" in str(e.value)
        with pytest.raises(ExecuteError) as e:      # one job per export
            await b.execute("drive-mirror", {"device": "vm1", "target": str(dst),
                                             "sync": "full", "job-id": "other"})
        assert e.value.error_class == "GenericError"
        for verb in ("block-job-cancel", "block-job-complete", "block-job-pause"):
            with pytest.raises(ExecuteError) as e:  # QEMU's class: libvirt checks it
                await b.execute(verb, {"device": "no-such-job"})
            assert e.value.error_class == "DeviceNotActive", verb
        await b.execute("block-job-cancel", {"device": "vm1"})
        for c in (a, b):                            # every client sees the events
            ev, seen = await until(c, "BLOCK_JOB_CANCELLED")
            assert ev["data"]["device"] == "vm1" and ev["data"]["offset"] < 4 * MiB
            assert not any(e["event"] == "BLOCK_JOB_READY" for e in seen)
        _, more = await until(a, "JOB_STATUS_CHANGE")
        while statuses(more)[-1] != "null":
            more += (await until(a, "JOB_STATUS_CHANGE"))[1]
        assert "aborting" in statuses(seen + more)
        assert await a.execute("query-block-jobs") == []
        # The export takes a new mirror after the old one ended.
        await b.execute("drive-mirror", {"device": "vm1", "target": str(dst), "sync": "full"})
        await until(a, "BLOCK_JOB_READY")
        await a.execute("block-job-cancel", {"device": "vm1", "force": True})
        await until(b, "BLOCK_JOB_CANCELLED")
        await a.disconnect()
        await b.disconnect()
    run(go())
    assert export.path != str(dst)


def test_target_error_is_block_job_error_then_completed_with_error(served, tmp_path):
    from helpers.require import require_root
    require_root()
    _, export, qmp = served
    small = tmp_path / "small"
    small.mkdir()
    # A 1 MiB file system for a target of 3 MiB of data: ENOSPC on a write.
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(small)],
                       capture_output=True, text=True)
    require_that(r.returncode == 0, "cannot mount a tmpfs: " + r.stderr)
    try:
        async def go():
            c = await client_for(qmp)
            await c.execute("drive-mirror", {"device": "vm1", "target": str(small / "t.img"),
                                             "sync": "full", "on-target-error": "report"})
            ev, seen = await until(c, "BLOCK_JOB_COMPLETED")
            errors = [e for e in seen if e["event"] == "BLOCK_JOB_ERROR"]
            assert errors and errors[0]["data"] == {"device": "vm1", "operation": "write",
                                                    "action": "report"}
            assert ev["data"]["error"] and ev["data"]["offset"] < 4 * MiB
            await c.disconnect()
        run(go())
    finally:
        export_path = export.path
        subprocess.run(["umount", "-l", str(small)], check=False)
    assert export_path != str(small / "t.img")


def test_a_small_disk_ready_at_once_still_reports_every_event(tmp_path, monkeypatch):
    """READY can come before drive-mirror returns (a small disk): the events
    must not be lost and the job must leave query-block-jobs at its end.
    start() is made to return only after READY, the worst schedule."""
    from fastmirror.job.mirror import MirrorJob
    start = MirrorJob.start

    def start_then_ready(self):
        start(self)
        assert self.wait_ready(10)
        return self
    monkeypatch.setattr(MirrorJob, "start", start_then_ready)
    src = make_image(tmp_path / "src.img", 64 * 1024)
    with fastmirror.Export(src, socket=str(tmp_path / "n")) as export, \
            QMPServer(export, socket=str(tmp_path / "q")) as qmp:
        async def go():
            c = await client_for(qmp)
            for i in range(8):
                await c.execute("drive-mirror", {"device": "", "sync": "full",
                                                 "target": str(tmp_path / ("t%d" % i))})
                await until(c, "BLOCK_JOB_READY", timeout=5)
                await c.execute("block-job-cancel", {"device": ""})
                await until(c, "BLOCK_JOB_COMPLETED", timeout=5)
                for _ in range(100):
                    if await c.execute("query-block-jobs") == []:
                        break
                    await asyncio.sleep(0.02)
                assert await c.execute("query-block-jobs") == []
            await c.disconnect()
        run(go())
