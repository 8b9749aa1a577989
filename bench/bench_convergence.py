"""Convergence: time to READY while a writer keeps writing to the source.

One source file of FASTMIRROR_BENCH_SIZE bytes (default 1 GiB) of non-zero
pseudo-random data, made once per session on the filesystem of pytest's
temporary folder, is mirrored to a target of the same size while a writer
writes random 4-64 KiB blocks (4 KiB aligned) to it at 0, 50 MiB/s and
unthrottled ("max"):

  fastmirror   MirrorJob, copy_mode auto (the default) and background; the
               writer is a thread of this process writing through job.source
  qemu-mirror  QEMU's mirror job in qemu-storage-daemon, copy-mode background
               (QEMU's default) and write-blocking; the writer is
               `fio --ioengine=nbd` (or qemu-io) on an NBD export of the
               mirrored node

each with 16 MiB of buffers and 64 KiB chunks.  complete() is asked at READY
and the writer keeps writing until COMPLETED.  The benchmark's own time is the
whole run (start to COMPLETED, with the daemon's and fio's start-up for QEMU);
the figures to read are in extra_info: ready_s (median seconds to READY),
ready_s_all, total_s, converged (runs that reached READY), writer_bps (the rate
the writer achieved until READY: a Python writer thread may fall short of the
rate asked), extra_bytes_copied, chunks_recopied and copy_mode_final.

A job that does not reach READY within FASTMIRROR_BENCH_WRITER_TIMEOUT seconds
(default 5 s plus 1 s per 20 MB) is cancelled and recorded as not converged,
and one that reaches READY but does not complete within twice that plus 10 s
(QEMU's background mode lets a busy writer go on while it drains) is
cancelled and recorded as not completed: results, not failures.  After a run
that did not converge, the remaining rounds of that case are not run.  A
missing tool skips its benchmark with the reason, or fails it
when FASTMIRROR_REQUIRE_ALL=1.  CI smoke-runs this module with
--benchmark-disable and FASTMIRROR_BENCH_SIZE=32M: every case runs once.

    make bench
    FASTMIRROR_BENCH_SIZE=32M pytest bench/bench_convergence.py --benchmark-disable
"""

from __future__ import annotations

import os
import statistics

import pytest

from _common import SIZE, SIZE_LABEL, missing
from fastmirror.bench import harness as fmbench
from fastmirror.bench import qemu
from fastmirror.bench.report import final_copy_modes, median_details

ROUNDS = 3
RATES = (("0", 0), ("50M", 50 << 20), ("max", None))
VARIANTS = (
    fmbench.Variant("fastmirror auto", "fastmirror", copy_mode="auto"),
    fmbench.Variant("fastmirror background", "fastmirror", copy_mode="background"),
    fmbench.Variant("qemu-mirror background", "qemu-mirror", copy_mode="background"),
    fmbench.Variant("qemu-mirror write-blocking", "qemu-mirror", copy_mode="write-blocking"),
)
READY_TIMEOUT = float(os.environ.get("FASTMIRROR_BENCH_WRITER_TIMEOUT", 0)) or (
    5.0 + SIZE / 20e6)


@pytest.fixture(scope="session")
def qemu_writer():
    """What writes to QEMU's NBD export: (kind, path, note)."""
    return fmbench.qemu_writer()


@pytest.mark.parametrize("rate_label,rate", RATES, ids=[r for r, _ in RATES])
@pytest.mark.parametrize("variant", VARIANTS, ids=[v.label.replace(" ", "-") for v in VARIANTS])
def test_time_to_ready(benchmark, variant, rate_label, rate, bench_source, bench_target,
                       qemu_writer):
    kind = path = None
    if variant.tool == "qemu-mirror":
        if not qemu.available():
            missing("qemu-storage-daemon is not installed (Debian: qemu-system-common)")
        if rate != 0:
            kind, path, note = qemu_writer
            if kind is None:
                missing("nothing can write to QEMU's NBD export: %s" % note)
    runs: list[fmbench.Run] = []

    def setup():
        fmbench.reset_target(bench_target, SIZE)
        fmbench.drop_caches()          # sync always; drops the cache as root

    def one():
        if runs and not runs[-1].converged:
            return                     # it did not converge: once is enough
        r = fmbench.run_writer(variant, bench_source, bench_target, SIZE, rate_label, rate,
                               timeout=2 * READY_TIMEOUT + 10,
                               ready_timeout=READY_TIMEOUT, writer_kind=kind,
                               writer_path=path)
        runs.append(r)
        assert r.ok, "%s with writer %s failed: %s" % (variant.label, rate_label, r.error)

    benchmark.group = "convergence-%s-writer-%s" % (SIZE_LABEL, rate_label)
    benchmark.pedantic(one, setup=setup, rounds=ROUNDS, iterations=1)

    conv = [r for r in runs if r.converged]
    info = benchmark.extra_info
    info.update(variant=variant.label, tool=variant.tool, copy_mode=variant.copy_mode,
                bytes=SIZE, writer_rate=rate_label, writer_rate_asked=rate,
                rounds_measured=len(runs), converged=len(conv),
                completed=sum(1 for r in conv if r.detail.get("completed") is not False),
                ready_timeout=READY_TIMEOUT)
    if conv:
        info["ready_s"] = statistics.median(r.ready_s for r in conv)
        info["ready_s_all"] = [r.ready_s for r in conv]
        info["total_s"] = statistics.median(r.wall_s for r in conv)
    info.update(median_details(runs, (("writer_rate_to_ready", "writer_bps"),
                                      ("extra_bytes_copied", "extra_bytes_copied"),
                                      ("chunks_recopied", "chunks_recopied"))))
    info["copy_mode_final"] = ",".join(final_copy_modes(runs))
    if rate != 0 and variant.tool == "qemu-mirror":   # fio is in its stride first
        assert all(r.detail.get("writer_bytes", 0) > 0 for r in runs), \
            "the writer wrote nothing: %s" % [r.detail for r in runs]
