"""A QEMU VM on the export, as the README tells: qemu-system-x86_64 opens the
disk with `-drive file=nbd+unix:///?socket=...,format=raw,if=virtio,cache=none`
and writes through its own block layer and NBD client (the monitor's qemu-io
command, so that no guest OS is needed), while examples/qmp_mirror.py moves
the disk over fastmirror's QMP.  Every write the VM had acknowledged is in
the target; the ones after the pivot only there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

from helpers.files import make_image
from helpers.require import require, require_that

try:
    from qemu.qmp import QMPClient
except ImportError:     # pragma: no cover - gated below
    QMPClient = None

MiB = 1024 * 1024
REGION = 64 * 1024
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "qmp_mirror.py")


def wait_for_path(path: str, proc: subprocess.Popen, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        assert proc.poll() is None, "the process ended before creating %s" % path
        assert time.monotonic() < deadline, "no %s after %d s" % (path, timeout)
        time.sleep(0.02)


def test_a_vm_writes_through_the_export_while_the_example_moves_its_disk(tmp_path):
    qemu = require("qemu-system-x86_64")
    require_that(QMPClient is not None, "the qemu.qmp client is not installed")
    size = 8 * MiB
    src = make_image(tmp_path / "src.img", size, seed=21)
    with open(src, "rb") as f:
        original = f.read()
    dst = tmp_path / "dst.img"
    nbd, qmp_sock, vm_qmp = (str(tmp_path / n) for n in ("vm1.sock", "vm1.qmp", "qemu.qmp"))
    serve = subprocess.Popen([sys.executable, "-m", "fastmirror", "serve", src,
                              "--socket", nbd, "--qmp", qmp_sock],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    vm = None
    try:
        assert "nbd+unix:///?socket=" in serve.stdout.readline()
        wait_for_path(qmp_sock, serve)
        vm = subprocess.Popen([qemu, "-S", "-nodefaults", "-display", "none",
                               "-machine", "accel=tcg",
                               "-drive", "file=nbd+unix:///?socket=%s,format=raw,if=virtio,"
                                         "cache=none" % nbd,
                               "-qmp", "unix:%s,server=on,wait=off" % vm_qmp],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_path(vm_qmp, vm)
        acked: dict[int, int] = {}          # region -> pattern byte the VM acknowledged

        async def scenario() -> tuple[int, str, str, int, int]:
            c = QMPClient("test")
            await c.connect(vm_qmp)

            async def hmp_io(cmd: str) -> None:
                out = await c.execute("human-monitor-command",
                                      {"command-line": 'qemu-io virtio0 "%s"' % cmd})
                assert "error" not in out.lower() and "fail" not in out.lower(), out

            done = asyncio.Event()
            writes = {"before": 0, "after": 0}

            async def writer() -> None:
                i = 0
                while not done.is_set():
                    region = (i * 37) % (size // REGION)
                    pattern = 1 + i % 250
                    await hmp_io("write -P %d %d %d" % (pattern, region * REGION, REGION))
                    acked[region] = pattern
                    writes["after" if done_moving.is_set() else "before"] += 1
                    i += 1
                    await asyncio.sleep(0.005)

            done_moving = asyncio.Event()
            w = asyncio.create_task(writer())
            await asyncio.sleep(0.3)
            # 4 MiB/s: the bulk copy takes a couple of seconds of VM writes,
            # faster than that: write-blocking, so that the job gets READY.
            mover = await asyncio.create_subprocess_exec(
                sys.executable, EXAMPLE, qmp_sock, str(dst), "--speed", str(4 * MiB),
                "--copy-mode", "write-blocking",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
            try:
                out, err = await asyncio.wait_for(mover.communicate(), 30)
            except asyncio.TimeoutError:
                mover.kill()
                raise
            done_moving.set()
            await asyncio.sleep(0.3)            # the VM writes on, to the target now
            done.set()
            await w
            await hmp_io("flush")
            try:
                await c.execute("quit")
            except EOFError:
                pass
            try:
                await c.disconnect()
            except EOFError:
                pass
            return mover.returncode, out.decode(), err.decode(), writes["before"], \
                writes["after"]

        code, out, err, before, after = asyncio.run(asyncio.wait_for(scenario(), 120))
        assert code == 0, out + err
        assert "ready: " in out and "completed: the disk is now served from %s" % dst in out
        assert before > 10 and after > 3, (before, after)
        assert vm.wait(30) == 0, vm.stdout.read()
        serve.send_signal(signal.SIGTERM)
        assert serve.wait(30) == 0, serve.stderr.read()
    finally:
        for p in (vm, serve):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    with open(dst, "rb") as f:
        target = f.read()
    for region in range(size // REGION):
        want = bytes([acked[region]]) * REGION if region in acked else \
            original[region * REGION:(region + 1) * REGION]
        assert target[region * REGION:(region + 1) * REGION] == want, region
    with open(src, "rb") as f:
        assert f.read() != target               # the writes after the pivot are only there


def test_the_readme_shows_what_this_module_runs():
    """The README's -drive line is the one run above, and its QMP code is
    the example's own (an excerpt of examples/qmp_mirror.py), so neither
    can drift from what is tested."""
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(EXAMPLE) as f:
        example = f.read()
    assert "-drive file=nbd+unix:///?socket=/run/vm1.sock,format=raw,if=virtio,cache=none" \
        in readme
    section = readme[readme.index("### QMP"):]
    code = section[section.index("```python\n") + 10:]
    code = code[:code.index("```")]
    assert "drive-mirror" in code and "block-job-complete" in code
    assert code in example, "the README's QMP code is not examples/qmp_mirror.py's"
