"""The NBD export: fastmirror serve against qemu-storage-daemon, through fio.

One source file of FASTMIRROR_BENCH_SIZE bytes (default 1 GiB) of non-zero
pseudo-random data and a mirror target beside it, made once per session
under the session's temporary folder (on the disk, not tmpfs, where /tmp is
a disk).  Each benchmark is one row of `fastmirror bench --exports`
(fastmirror.bench.exports): every round starts each server afresh on the
source, in an order shuffled per round, and runs the same fio job against
its unix socket:

  randwrite-4k   4 KiB random writes, iodepth 16
  write-1m       1 MiB sequential writes, iodepth 4
  randread-4k    4 KiB random reads, iodepth 16
  mirror-writer  4 KiB random writes at 2000 IOPS while the server mirrors
                 the whole disk to the target: the writer's p99 latency
                 during the mirror, and the mirror's duration

both with O_DIRECT (fastmirror serve --direct; QEMU cache.direct=on).  The
benchmark's own time is one round of both servers; the figures to read are
in extra_info: per server the medians over the rounds (iops, bytes_per_s,
p50_ms, p99_ms; for mirror-writer p99_ms, mirror_s), and `ratio`, the
fastmirror/QEMU ratio of the medians of the row's main figure (throughput;
for mirror-writer the p99, lower is better), with the per-round ratios.

    pytest bench/bench_export.py --benchmark-only
    FASTMIRROR_BENCH_SIZE=32M pytest bench/bench_export.py --benchmark-disable
"""

from __future__ import annotations

import os
import random
import shutil

import pytest

from _common import SIZE, SIZE_LABEL, missing
from fastmirror.bench import exports
from fastmirror.bench.images import make_image

ROUNDS = 5
SECONDS = float(os.environ.get("FASTMIRROR_BENCH_SECONDS", 0) or 5.0)
SMOKE_SECONDS = 0.5


@pytest.fixture(scope="session")
def export_images(tmp_path_factory):
    """(source, target): the source written once; the rows change it."""
    folder = tmp_path_factory.mktemp("bench-export")
    src, dst = str(folder / "source.img"), str(folder / "target.img")
    make_image(src, SIZE, exclusive=True)
    with open(dst, "wb") as f:
        f.truncate(SIZE)
    yield src, dst
    shutil.rmtree(str(folder), ignore_errors=True)


@pytest.mark.parametrize("row", exports.ROWS)
def test_export(benchmark, row, export_images):
    fio = shutil.which("fio")
    if fio is None:
        missing("fio is not installed")
    if shutil.which("qemu-storage-daemon") is None:
        missing("qemu-storage-daemon is not installed")
    src, dst = export_images
    smoke = benchmark.disabled
    st = exports.ExportSettings(size=SIZE, seconds=SMOKE_SECONDS if smoke else SECONDS,
                                fio=fio, timeout=60.0 + SIZE / 20e6)
    direct_ok = exports.serve_supports_direct()
    runs: list[dict] = []

    def one_round():
        rnd = len({r["round"] for r in runs}) + 1
        order = list(exports.SERVERS)
        random.Random(rnd).shuffle(order)
        for kind in order:
            r = exports.run_row(row, kind, src, dst, st, direct_ok)
            r["round"] = rnd
            assert r["ok"], r["error"]
            runs.append(r)

    benchmark.group = "export-%s-%s" % (row, SIZE_LABEL)
    benchmark.pedantic(one_round, rounds=1 if smoke else ROUNDS, iterations=1)

    s = exports.summarize_exports(runs, [row])[row]
    info = benchmark.extra_info
    info["row"] = row
    info["seconds"] = st.seconds
    info["fastmirror_direct"] = direct_ok
    for kind in exports.SERVERS:
        info[kind] = {k: v for k, v in s[kind].items() if k != "errors"}
    for key in ("ratio", "ratio_paired", "ratio_rounds", "mirror_ratio", "goal_met"):
        if key in s:
            info[key] = s[key]
    main = exports.MAIN[row]
    for kind in exports.SERVERS:
        assert s[kind].get(main) is not None and s[kind][main] > 0, (kind, s[kind])
