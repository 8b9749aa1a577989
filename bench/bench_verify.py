"""`fastmirror verify` against reading both files with fio at the same time.

Two equal files of FASTMIRROR_BENCH_SIZE bytes (default 1 GiB) on the
filesystem of pytest's temporary folder.  In one benchmark group:

  fastmirror      fastmirror.job.verify.first_difference(SRC, DST): the whole
                  comparison, both files read and compared
  fio-libaio      fio reading SRC and DST at once, two jobs, O_DIRECT, bs=1M,
                  iodepth=16, libaio: the reads alone, nothing compared
  fio-io_uring    the same with io_uring

The page cache is dropped before every round (as root).  extra_info holds
the throughput over both files (bytes/s, median of the rounds) and, for
fastmirror, its ratio to each fio row.  A missing fio skips its rows, or fails
them when FASTMIRROR_REQUIRE_ALL=1.  CI smoke-runs it small and untimed.

    .venv/bin/python -m pytest bench/bench_verify.py
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import time

import pytest

from _common import SIZE, SIZE_LABEL, missing
from fastmirror.bench import harness as fmbench
from fastmirror.bench.images import make_image
from fastmirror.job.verify import first_difference

ROUNDS = 3
ROWS = ("fio-libaio", "fio-io_uring", "fastmirror")     # fio first: ratios name them
GROUP = "verify-" + SIZE_LABEL
_medians: dict[str, float] = {}


@pytest.fixture(scope="session")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench-verify")
    src, dst = str(folder / "a.img"), str(folder / "b.img")
    make_image(src, SIZE, exclusive=True)
    shutil.copyfile(src, dst)
    yield src, dst
    os.unlink(src)
    os.unlink(dst)


def _fio(engine: str, src: str, dst: str) -> float:
    """Seconds fio took to read both files at once (the longer job)."""
    r = subprocess.run(
        ["fio", "--output-format=json", "--direct=1", "--rw=read", "--bs=1M",
         "--iodepth=16", "--ioengine=" + engine,
         "--name=a", "--filename=" + src, "--name=b", "--filename=" + dst],
        capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    jobs = json.loads(r.stdout[r.stdout.index("{"):])["jobs"]
    for job in jobs:
        assert job["error"] == 0 and job["read"]["io_bytes"] == SIZE, job
    return max(job["read"]["runtime"] for job in jobs) / 1000.0


@pytest.mark.parametrize("row", ROWS)
def test_verify(benchmark, row, pair):
    src, dst = pair
    if row.startswith("fio") and shutil.which("fio") is None:
        missing("fio is not installed")
    seconds: list[float] = []

    def run():
        if row == "fastmirror":
            t = time.perf_counter()
            assert first_difference(src, dst) == -1
            seconds.append(time.perf_counter() - t)
        else:
            seconds.append(_fio(row.split("-", 1)[1], src, dst))

    benchmark.group = GROUP
    def setup():
        fmbench.drop_caches()          # sync always; drops the cache as root

    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, iterations=1)
    throughput = 2 * SIZE / statistics.median(seconds)
    _medians[row] = throughput
    info = benchmark.extra_info
    info["bytes_read"] = 2 * SIZE
    info["throughput"] = throughput
    info["throughput_gbps"] = throughput / 1e9
    if row == "fastmirror":
        for base, value in _medians.items():
            if base != row:
                info["ratio_vs_" + base] = throughput / value
