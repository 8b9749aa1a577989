"""Bulk mirror throughput: fastmirror side by side with QEMU's mirror job, dd and
qemu-img convert.

One source file of FASTMIRROR_BENCH_SIZE bytes (default 1 GiB) of non-zero
pseudo-random data with no holes, made once per session on the filesystem of
pytest's temporary folder (ext4 on the reference machine), is copied to a
target of the same size by each tool, in the same pytest run and the same
benchmark group, so pytest-benchmark's table compares them directly:

  fastmirror  MirrorJob: start, READY, complete, COMPLETED (target flushed),
              with its default I/O engine (io_uring where the kernel allows it)
  fastmirror-threads  the same with io_engine="threads": one blocking thread
              per copy
  qemu-mirror QEMU's mirror job in qemu-storage-daemon over QMP (cache.direct=on,
              aio=native; blockdev-mirror with QEMU's defaults: 64 KiB chunks,
              buf-size 16 MiB, background copy mode): READY, block-job-complete,
              COMPLETED; the daemon's start-up is not timed
  dd          dd bs=4M iflag=direct oflag=direct conv=notrunc,fdatasync
  qemu-img    qemu-img convert -n -f raw -O raw -t none -T none -m 16 -W

Before every round (untimed): three marker blocks of the target are
overwritten (so a tool that copied nothing fails the check after it), the
page cache is dropped when running as root, and everything is synced.
extra_info holds bytes, throughput (bytes/s, median of the rounds),
cpu_s_per_gib (user + system CPU seconds per GiB: for qemu-mirror the
daemon's), for the mirror jobs throughput_to_ready, and for fastmirror the
ratio of its median throughput to each baseline measured before it in the
session.

test_copy_io_calls compares the ways fastmirror issues its reads and writes,
all in one benchmark with interleaved rounds (each round runs every variant
once, in a shuffled order, the target reset and the page cache dropped
before each): the threads engine (blocking preadv/pwritev) and the io_uring
driver with READ/WRITE, READV/WRITEV and registered buffers
(READ_FIXED/WRITE_FIXED).  Its extra_info holds each variant's median
throughput and CPU seconds per GiB (getrusage of this process, every thread
and io_uring worker included, from building the job to COMPLETED), and the
per-round ratios to ring-plain with their medians: on a loaded machine the
ratio within a round says more than the spread across rounds.

A missing baseline tool skips its benchmark with the reason, or fails it when
FASTMIRROR_REQUIRE_ALL=1.  CI smoke-runs this module with --benchmark-disable
and a small FASTMIRROR_BENCH_SIZE (e.g. 32M): then every tool runs once.

    make bench                          # 1 GiB, 3 rounds per tool
    FASTMIRROR_BENCH_SIZE=32M pytest bench/bench_copy.py --benchmark-disable
"""

from __future__ import annotations

import random
import resource
import statistics
import time

import pytest

from _common import SIZE, SIZE_LABEL, require_uring, tool_path
from fastmirror.bench import harness as fmbench

ROUNDS = 3
# Baselines first, so that fastmirror's ratios can name them.
TOOLS = ("dd", "qemu-img", "qemu-mirror", "fastmirror-threads", "fastmirror")
# Rows that run a tool with another setting: row -> (tool, fastmirror io_engine).
VARIANTS = {"fastmirror-threads": ("fastmirror", "threads")}
GROUP = "copy-" + SIZE_LABEL
_medians: dict[str, float] = {}


@pytest.mark.parametrize("tool", TOOLS)
def test_copy(benchmark, tool, bench_source, bench_target):
    row = tool
    tool, io_engine = VARIANTS.get(row, (row, "auto"))
    path = tool_path(tool)
    runs: list[fmbench.Run] = []

    def setup():
        fmbench.reset_target(bench_target, SIZE)
        fmbench.drop_caches()          # sync always; drops the cache as root

    def copy():
        r = fmbench.run_tool(tool, bench_source, bench_target, SIZE, path=path,
                             timeout=fmbench.default_timeout(SIZE), io_engine=io_engine)
        runs.append(r)
        assert r.ok, "%s failed: %s" % (tool, r.error)

    benchmark.group = GROUP
    benchmark.pedantic(copy, setup=setup, rounds=ROUNDS, iterations=1)

    bad = fmbench.check_markers(bench_source, bench_target, SIZE)
    assert bad is None, "%s left the target different from the source at %d" % (tool, bad)

    throughput = statistics.median(r.bytes_per_s for r in runs)
    _medians[row] = throughput
    info = benchmark.extra_info
    info["tool"] = row
    info["bytes"] = SIZE
    info["rounds_measured"] = len(runs)
    info["throughput"] = throughput                      # bytes/s, median
    info["throughput_gbps"] = throughput / 1e9
    info["throughput_min"] = min(r.bytes_per_s for r in runs)
    info["throughput_max"] = max(r.bytes_per_s for r in runs)
    info["cpu_s_per_gib"] = statistics.median(r.cpu_s_per_gib for r in runs)
    ready = [r.ready_s for r in runs if r.ready_s]
    if ready:
        info["throughput_to_ready"] = SIZE / statistics.median(ready)
        info["ready_s"] = statistics.median(ready)
    if tool == "fastmirror":
        info.update({k: v for k, v in runs[-1].detail.items() if v is not None})
        for base in TOOLS:
            if base != row and base in _medians:
                info["ratio_vs_" + base] = throughput / _medians[base]
    else:
        info["command"] = " ".join(fmbench.tool_command(tool, "SRC", "DST", path))
        if tool == "qemu-mirror":
            info["daemon_start_s"] = statistics.median(r.detail.get("daemon_start_s", 0)
                                                       for r in runs)


SMALL_IO = 64 << 10


@pytest.mark.parametrize("io_engine", ["io_uring", "threads"])
def test_copy_small_requests(benchmark, io_engine, bench_source, bench_target):
    """fastmirror copying in 64 KiB requests (io_size=64K, 16 in flight), as it
    does when writes dirty scattered chunks: the case where the io_uring
    driver's batched submission saves CPU over a blocking thread per copy."""
    if io_engine == "io_uring":
        require_uring()
    runs: list[fmbench.Run] = []

    def setup():
        fmbench.reset_target(bench_target, SIZE)
        fmbench.drop_caches()

    def copy():
        r = fmbench.run_tool("fastmirror", bench_source, bench_target, SIZE, max_io=SMALL_IO,
                             timeout=fmbench.default_timeout(SIZE), io_engine=io_engine)
        runs.append(r)
        assert r.ok, "fastmirror failed: %s" % r.error

    benchmark.group = "copy-64KiB-requests-" + SIZE_LABEL
    benchmark.pedantic(copy, setup=setup, rounds=ROUNDS, iterations=1)
    bad = fmbench.check_markers(bench_source, bench_target, SIZE)
    assert bad is None, "the target differs from the source at %d" % bad
    info = benchmark.extra_info
    info["io_engine"] = io_engine
    info["io_size"] = SMALL_IO
    info["throughput"] = statistics.median(r.bytes_per_s for r in runs)
    info["cpu_s_per_gib"] = statistics.median(r.cpu_s_per_gib for r in runs)


# Row -> (io_engine, CopyEngine.ring_calls).  ring-plain first: the ratios are
# to it (IORING_OP_READ/WRITE, the driver's calls before the others existed).
IO_CALLS = {
    "ring-plain": ("io_uring", "plain"),
    "ring-vectored": ("io_uring", "vectored"),
    "ring-fixed": ("io_uring", "fixed"),
    "threads": ("threads", None),
}
IO_CALLS_ROUNDS = 7


def _copy_with(src: str, dst: str, io_engine: str, ring_calls: str | None,
               io_size: int | None) -> dict:
    """One MirrorJob at the default buf_size, timed from building it to
    COMPLETED (target flushed); CPU of the whole process over the same span."""
    from fastmirror import EventType, MirrorJob

    timeout = fmbench.default_timeout(SIZE)
    r0 = resource.getrusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    job = MirrorJob(src, dst, io_engine=io_engine, io_size=io_size)
    try:
        if ring_calls is not None:
            job._engine.ring_calls = ring_calls
        job.start()
        assert job.wait_ready(timeout), "not READY after %.0f s" % timeout
        job.complete()
        final = job.wait(timeout)
        ring_io = job._engine.ring_io
    finally:
        job.close()
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    assert final is not None and final.type == EventType.COMPLETED, final
    cpu = (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)
    return {"bytes_per_s": SIZE / wall, "cpu_s_per_gib": cpu / (SIZE / (1 << 30)),
            "calls": ring_io or io_engine}


@pytest.mark.parametrize("io_size", [None, SMALL_IO], ids=["default-io", "64KiB-io"])
def test_copy_io_calls(benchmark, io_size, bench_source, bench_target):
    """Interleaved rounds of every way of issuing the copy's I/O: with the
    default copy size (buf_size/8), and in 64 KiB requests, where the work
    per request weighs most."""
    require_uring()
    rng = random.Random(1)
    rounds: list[dict[str, dict]] = []

    def one_round():
        order = list(IO_CALLS)
        rng.shuffle(order)
        got = {}
        for row in order:
            fmbench.reset_target(bench_target, SIZE)
            fmbench.drop_caches()
            got[row] = _copy_with(bench_source, bench_target, *IO_CALLS[row], io_size)
            bad = fmbench.check_markers(bench_source, bench_target, SIZE)
            assert bad is None, "%s left the target different at %d" % (row, bad)
        rounds.append(got)

    benchmark.group = "copy-io-calls-%s-%s" % ("64KiB" if io_size else "default", SIZE_LABEL)
    benchmark.pedantic(one_round, rounds=IO_CALLS_ROUNDS, iterations=1)

    info = benchmark.extra_info
    info["bytes"] = SIZE
    info["io_size"] = io_size or "default"
    info["rounds_measured"] = len(rounds)
    base = "ring-plain"
    for row in IO_CALLS:
        runs = [r[row] for r in rounds]
        info[row + ".calls"] = runs[-1]["calls"]
        info[row + ".throughput"] = statistics.median(x["bytes_per_s"] for x in runs)
        info[row + ".throughput_min"] = min(x["bytes_per_s"] for x in runs)
        info[row + ".throughput_max"] = max(x["bytes_per_s"] for x in runs)
        info[row + ".cpu_s_per_gib"] = statistics.median(x["cpu_s_per_gib"] for x in runs)
        if row != base:
            tput = [r[row]["bytes_per_s"] / r[base]["bytes_per_s"] for r in rounds]
            cpu = [r[row]["cpu_s_per_gib"] / r[base]["cpu_s_per_gib"] for r in rounds]
            info[row + ".throughput_ratio_rounds"] = tput
            info[row + ".throughput_ratio"] = statistics.median(tput)
            info[row + ".cpu_ratio_rounds"] = cpu
            info[row + ".cpu_ratio"] = statistics.median(cpu)
    info["rounds"] = rounds
