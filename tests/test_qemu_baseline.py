"""QEMU's own mirror job, driven over QMP, as benchmarks use it: it must run
and produce an equal target, or benchmark ratios would measure nothing."""

import os
import shutil
import subprocess

from helpers import require_that

from fastmirror.bench import qemu
from fastmirror.job.verify import first_difference




def test_qemu_mirror_job_over_qmp(tmp_path):
    require_that(qemu.available(), "qemu-storage-daemon not installed (qemu-system-common)")
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(os.urandom(8 << 20))
    with open(dst, "wb") as f:
        f.truncate(8 << 20)
    with qemu.StorageDaemon(str(src), str(dst)) as d:
        cpu0 = d.cpu_seconds()
        d.mirror()
        ready = d.wait_ready(60)
        assert ready["data"]["len"] == 8 << 20
        done = d.complete(60)
        assert done["data"]["offset"] == done["data"]["len"] == 8 << 20
        assert d.cpu_seconds() >= cpu0
    assert first_difference(str(src), str(dst)) == -1


def test_qemu_mirror_tracks_writes_through_its_nbd_export(tmp_path):
    require_that(qemu.available(), "qemu-storage-daemon not installed (qemu-system-common)")
    require_that(shutil.which("qemu-io") is not None, "qemu-io not installed (qemu-utils)")
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    src.write_bytes(os.urandom(8 << 20))
    with open(dst, "wb") as f:
        f.truncate(8 << 20)
    with qemu.StorageDaemon(str(src), str(dst), export=True) as d:
        d.mirror()
        d.wait_ready(60)
        uri = "nbd+unix:///src?socket=%s" % d.nbd_path
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 1M 64k", uri],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        d.complete(60)
    data = dst.read_bytes()
    assert data[1 << 20:(1 << 20) + 65536] == b"\x5a" * 65536
    assert first_difference(str(src), str(dst)) == -1
