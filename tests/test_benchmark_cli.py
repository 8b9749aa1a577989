"""`fastmirror bench` (fastmirror.benchmark): a quick run end to end, and the
refusals that keep it from destroying data.

Timing is never asserted here (performance is measured in bench/); only that
every tool ran, moved the data, and reported positive throughput.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess

import pytest

from fastmirror import benchmark

REQUIRE_ALL = os.environ.get("FASTMIRROR_REQUIRE_ALL") == "1"
MiB = 1 << 20


def _missing(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but " + reason, pytrace=False)
    pytest.skip(reason)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fastmirror bench")
    benchmark.add_arguments(parser)
    return parser.parse_args([str(a) for a in argv])


def _read(path, length=None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if length is None else f.read(length)


def test_bench_runs_every_tool_and_copies(tmp_path, capsys):
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "bench.json"
    args = _parse(["--create", "16M", "--rounds", "1", src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr().err

    assert src.stat().st_size == 16 * MiB
    data = _read(src)
    assert data.count(0) < len(data) // 64, "the created source is mostly zeros"
    assert _read(dst) == data, "the target differs from the source after the bench"

    doc = json.loads(out.read_text())
    assert doc["size"] == 16 * MiB
    tools = ["fastmirror", "dd"]
    if shutil.which("qemu-img"):
        tools.append("qemu-img")
    elif REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but qemu-img is not installed", pytrace=False)
    else:
        assert "qemu-img" in doc["skipped"]
    for tool in tools:
        timed = [r for r in doc["rounds"] if r["tool"] == tool and not r["warmup"]]
        assert len(timed) == 1, (tool, doc["rounds"])
        r = timed[0]
        assert r["ok"], (tool, r["error"])
        assert r["bytes"] == 16 * MiB
        assert r["wall_s"] > 0 and r["bytes_per_s"] > 0 and r["gbps"] > 0, r
        assert r["cpu_s"] >= 0
        s = doc["summary"][tool]
        assert s["runs"] == 1 and s["median_gbps"] > 0 and s["median_mibps"] > 0
        assert s["fastmirror_ratio"] > 0
        if tool != "fastmirror":
            assert s["fastmirror_ratio_paired"] > 0
    fm = next(r for r in doc["rounds"] if r["tool"] == "fastmirror" and not r["warmup"])
    assert 0 < fm["ready_s"] <= fm["wall_s"]

    table = capsys.readouterr().out
    for tool in tools:
        assert tool in table
    assert "fastmirror/tool" in table


def test_bench_refuses_same_file(tmp_path, capsys):
    src = tmp_path / "src.img"
    src.write_bytes(b"\x5a" * MiB)
    assert benchmark.run(_parse([src, src, "--rounds", "1"])) == 2
    assert "same" in capsys.readouterr().err
    assert _read(src) == b"\x5a" * MiB


def test_bench_refuses_missing_source_without_create(tmp_path, capsys):
    assert benchmark.run(_parse([tmp_path / "nope.img", tmp_path / "dst.img"])) == 2
    assert "--create" in capsys.readouterr().err
    assert not (tmp_path / "dst.img").exists()


@pytest.fixture
def loop_target(tmp_path):
    """A 16 MiB loop device filled with 0x5a, detached afterwards."""
    if os.geteuid() != 0:
        _missing("needs root for a loop device (running as uid %d)" % os.geteuid())
    losetup = shutil.which("losetup")
    if losetup is None:
        _missing("losetup is not installed")
    backing = tmp_path / "loop-backing.img"
    backing.write_bytes(b"\x5a" * (16 * MiB))
    p = subprocess.run([losetup, "--find", "--show", str(backing)],
                       capture_output=True, text=True)
    if p.returncode != 0:
        _missing("cannot attach a loop device: %s" % p.stderr.strip())
    dev = p.stdout.strip()
    try:
        yield dev, backing
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_bench_refuses_block_device_without_destroy_target(tmp_path, loop_target, capsys):
    dev, backing = loop_target
    src = tmp_path / "src.img"
    args = _parse(["--create", "16M", "--rounds", "1", src, dev])
    assert benchmark.run(args) == 2
    err = capsys.readouterr().err
    assert "--destroy-target" in err and dev in err
    with open(dev, "rb") as f:
        assert f.read() == b"\x5a" * (16 * MiB), "the block device was written"

    # With the flag, the same command runs and the device ends up equal.
    args = _parse(["--rounds", "1", "--warmup", "0", "--tools", "fastmirror,dd",
                   "--destroy-target", src, dev])
    assert benchmark.run(args) == 0, capsys.readouterr().err
    with open(dev, "rb") as f:
        assert f.read() == _read(src)


def test_bench_refuses_loop_device_backed_by_the_source(loop_target, capsys):
    dev, backing = loop_target
    args = _parse(["--rounds", "1", "--destroy-target", backing, dev])
    assert benchmark.run(args) == 2
    assert "same" in capsys.readouterr().err
    assert _read(backing) == b"\x5a" * (16 * MiB)
