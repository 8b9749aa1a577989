"""Mirroring into an NBD export, side by side with nbdcopy and QEMU's mirror
job: the pytest-benchmark face of fastmirror.bench.nbd (which says what is
measured and how; `python -m fastmirror.bench.nbd` prints the same report).
"""

from __future__ import annotations

import pytest

from fastmirror.bench.images import make_image
from fastmirror.bench.nbd import ROUNDS, SIZE, measure, needs, summarize
from _common import missing


@pytest.fixture(scope="module")
def nbd_source(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("nbd-source") / "source.img")
    make_image(path, SIZE, data_fraction=0.5, seed=1)
    return path


@pytest.mark.parametrize("kind", ["qemu-nbd", "delay"])
def test_nbd_target(benchmark, kind, nbd_source, tmp_path):
    why = needs(kind)
    if why:
        missing(why)
    results = []
    benchmark.group = "nbd-target-%s" % kind
    benchmark.pedantic(lambda: results.append(measure(kind, nbd_source, str(tmp_path), 1)),
                       rounds=ROUNDS, iterations=1)
    rounds = [r for res in results for r in res["rounds"]]
    res = summarize(rounds, SIZE)
    info = benchmark.extra_info
    info["bytes"] = SIZE
    info["fastmirror.io_calls"] = res["calls"]
    for name, t in res["tools"].items():
        for key, value in t.items():
            info["%s.%s" % (name, key)] = value
    info["rounds"] = rounds


