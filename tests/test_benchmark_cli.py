"""`fastmirror bench` (fastmirror.bench.harness): a quick run end to end, and the
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

from fastmirror.bench import baselines, images, mirrors, records, report
from fastmirror.bench import harness as benchmark
from helpers.require import require

# This module reserves huge pages (nr_hugepages) and drops the page cache of
# the whole machine: make test runs it alone.
pytestmark = pytest.mark.serial

REQUIRE_ALL = os.environ.get("FASTMIRROR_REQUIRE_ALL") == "1"
MiB = 1 << 20


def _missing(reason: str) -> None:
    if REQUIRE_ALL:
        pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but " + reason, pytrace=False)
    pytest.skip(reason)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="fastmirror bench")
    benchmark.add_arguments(parser)
    argv = [str(a) for a in argv]
    if "--settle" not in argv:
        argv += ["--settle", "0"]      # no pause between runs: these are not timed
    return parser.parse_args(argv)


def _read(path, length=None) -> bytes:
    with open(path, "rb") as f:
        return f.read() if length is None else f.read(length)


def test_bench_runs_every_tool_and_copies(tmp_path, capsys):
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "bench.json"
    # Rotated, round 1 ends with fastmirror (fio writes garbage into DST),
    # so the target must equal the source at the end.
    args = _parse(["--create", "16M", "--rounds", "1", "--order", "rotate", src, dst,
                   "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr().err

    assert src.stat().st_size == 16 * MiB
    data = _read(src)
    assert data.count(0) < len(data) // 64, "the created source is mostly zeros"
    assert _read(dst) == data, "the target differs from the source after the bench"

    doc = json.loads(out.read_text())
    assert doc["size"] == 16 * MiB
    tools = ["fastmirror", "dd"]
    for tool, binary in (("qemu-img", "qemu-img"), ("qemu-mirror", "qemu-storage-daemon"),
                         ("fio", "fio")):
        if shutil.which(binary):
            tools.extend(records.FIO_PARTS if tool == "fio" else [tool])
        elif REQUIRE_ALL:
            pytest.fail("FASTMIRROR_REQUIRE_ALL=1 but %s is not installed" % binary,
                        pytrace=False)
        else:
            assert tool in doc["skipped"]
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
    if "qemu-mirror" in tools:
        q = next(r for r in doc["rounds"] if r["tool"] == "qemu-mirror" and not r["warmup"])
        assert 0 < q["ready_s"] <= q["wall_s"]
        assert q["detail"]["qemu_len"] == 16 * MiB
        qs = doc["summary"]["qemu-mirror"]
        # The daemon's CPU is read in clock ticks (10 ms): a 16 MiB copy can
        # take less than one, and a ratio to zero is no ratio.
        if qs["median_cpu_s_per_gib"] > 0:
            assert qs["fastmirror_cpu_ratio"] > 0
        else:
            assert "fastmirror_cpu_ratio" not in qs
    if "fio-rw" in tools:
        rw = next(r for r in doc["rounds"] if r["tool"] == "fio-rw" and not r["warmup"])
        assert rw["detail"]["read_gbps"] > 0 and rw["detail"]["write_gbps"] > 0
        assert rw["detail"]["engine"] in ("io_uring", "libaio", "psync")
        assert doc["settings"]["fio_engine"] == rw["detail"]["engine"]

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


def test_bench_refuses_fio_on_block_device_without_destroy_target(tmp_path, loop_target,
                                                                 capsys):
    dev, _ = loop_target
    src = tmp_path / "src.img"
    args = _parse(["--create", "16M", "--rounds", "1", "--tools", "fio", src, dev])
    assert benchmark.run(args) == 2
    assert "--destroy-target" in capsys.readouterr().err
    with open(dev, "rb") as f:
        assert f.read() == b"\x5a" * (16 * MiB), "the block device was written"


# ---------------------------------------------------------------------------
# Writer rounds: time to READY while a writer writes to the source
# ---------------------------------------------------------------------------

def test_parse_writer_rates_and_buf_sizes():
    assert benchmark.parse_rate("0") == 0
    assert benchmark.parse_rate("50M") == 50 * MiB
    assert benchmark.parse_rate("max") is None
    args = _parse(["a", "b", "--writer-rates", "0,50M,200M,max", "--buf-sizes",
                   "16M,64M:4M", "--copy-modes", "auto,write-blocking"])
    assert args.writer_rates == [("0", 0), ("50M", 50 * MiB), ("200M", 200 * MiB),
                                 ("max", None)]
    assert args.buf_sizes == [(16 * MiB, None), (64 * MiB, 4 * MiB)]
    bulk, writer = benchmark._variants(args, ["fastmirror", "qemu-mirror", "dd"])
    assert [v.label for v in bulk] == ["fastmirror 16M", "fastmirror 64M/4M",
                                       "qemu-mirror 16M", "qemu-mirror 64M", "dd"]
    assert [(v.label, v.copy_mode) for v in writer] == [
        ("fastmirror auto", "auto"), ("fastmirror write-blocking", "write-blocking"),
        ("qemu-mirror write-blocking", "write-blocking")]
    for bad in (["--writer-rates", "fast"], ["--copy-modes", "eager"],
                ["--buf-sizes", "0"], ["--tools", "cp"]):
        with pytest.raises(SystemExit):
            _parse(["a", "b"] + bad)


def test_bench_writer_rates(tmp_path, capsys):
    """Every mirror, copy mode and rate runs once, reports the time to READY
    (or that it did not converge), the rate its writer achieved, what was
    copied again and the copy mode; the table, the JSON and the exit status
    say the same."""
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "w.json"
    args = _parse(["--create", "16M", "--rounds", "1", "--no-bulk", "--writer-rates",
                   "0,20M,max", "--copy-modes", "auto,background,write-blocking",
                   "--writer-timeout", "3", src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr()
    table = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["rounds"] == [] and doc["writer"] is not None
    w = doc["writer"]
    labels = ["fastmirror auto", "fastmirror background", "fastmirror write-blocking"]
    if shutil.which("qemu-storage-daemon"):
        labels += ["qemu-mirror background", "qemu-mirror write-blocking"]
        assert w["qemu_writer"] in ("fio", "qemu-io")
        if REQUIRE_ALL:
            assert w["qemu_writer"] == "fio", w["qemu_writer_note"]
    else:
        _missing("qemu-storage-daemon is not installed")
    assert w["variants"] == labels
    for label in labels:
        assert label in table
        for rate in ("0", "20M", "max"):
            runs = [r for r in w["runs"] if r["tool"] == label and r["writer_rate"] == rate]
            assert len(runs) == 1, (label, rate)
            r = runs[0]
            assert r["ok"], (label, rate, r["error"])
            assert isinstance(r["converged"], bool)
            if rate == "0":
                assert r["converged"] and 0 < r["ready_s"] <= r["wall_s"], r
                assert "writer_bytes" not in r["detail"]
            else:
                assert r["detail"]["writer_bytes"] >= 0
                assert r["detail"]["writer_rate_asked"] == (20 * MiB if rate == "20M" else None)
                assert "writer_rate_to_ready" in r["detail"]
            assert r["detail"]["copy_mode_final"] in ("background", "write-blocking")
            if label.startswith("fastmirror"):
                assert r["detail"]["chunks_recopied"] >= 0
            if label.endswith("write-blocking"):
                assert r["detail"]["copy_mode_final"] == "write-blocking"
            s = w["summary"][label][rate]
            assert s["runs"] == 1 and s["converged"] == int(r["converged"])
            if rate != "0" and r["converged"]:
                assert s["ready_vs_idle"] > 0 and s["ready_vs_idle_paired"] > 0
    assert "to READY" in table and "vs idle" in table


def test_writer_round_that_does_not_converge_is_cancelled(tmp_path):
    """A job that is not READY in time is cancelled, reported as not
    converged, and leaves no thread or daemon behind."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    images.make_image(str(src), 16 * MiB, exclusive=True)
    with open(dst, "wb") as f:
        f.truncate(16 * MiB)
    variants = [records.Variant("fastmirror background", "fastmirror",
                                copy_mode="background")]
    if shutil.which("qemu-storage-daemon"):
        variants.append(records.Variant("qemu-mirror background", "qemu-mirror",
                                        copy_mode="background"))
    else:
        _missing("qemu-storage-daemon is not installed")
    for v in variants:
        t0 = __import__("time").monotonic()
        r = benchmark.run_writer(v, str(src), str(dst), 16 * MiB, "max", None,
                                 timeout=60, ready_timeout=0.001)
        assert r.ok, (v.label, r.error)
        assert r.converged is False and r.ready_s is None, r
        assert r.detail["ready_timeout"] == 0.001
        assert __import__("time").monotonic() - t0 < 30
    assert not [t for t in __import__("threading").enumerate()
                if t.name.startswith("bench-")]


def test_bench_writer_rates_refuse_to_write_an_existing_source(tmp_path, capsys):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(b"\x5a" * MiB)
    args = _parse(["--no-bulk", "--writer-rates", "0,50M", "--rounds", "1", src, dst])
    assert benchmark.run(args) == 2
    assert "--destroy-source" in capsys.readouterr().err
    assert _read(src) == b"\x5a" * MiB
    assert not dst.exists()
    # Writer rate 0 writes nothing to the source: allowed without the flag.
    args = _parse(["--no-bulk", "--writer-rates", "0", "--rounds", "1", "--tools",
                   "fastmirror", src, dst])
    assert benchmark.run(args) == 0, capsys.readouterr().err
    assert _read(src) == b"\x5a" * MiB
    assert benchmark.run(_parse(["--no-bulk", src, dst])) == 2


def test_bench_writer_rates_refuse_block_device_source(tmp_path, loop_target, capsys):
    dev, _ = loop_target
    dst = tmp_path / "dst.img"
    args = _parse(["--no-bulk", "--writer-rates", "50M", "--rounds", "1", "--tools",
                   "fastmirror", dev, dst])
    assert benchmark.run(args) == 2
    assert "--destroy-source" in capsys.readouterr().err
    with open(dev, "rb") as f:
        assert f.read() == b"\x5a" * (16 * MiB), "the source block device was written"


def test_bench_buf_sizes_and_max_io(tmp_path, capsys):
    """--buf-sizes runs a row per size; BUF:IO sets fastmirror's request size
    for that job only."""
    from fastmirror.job import mirror as jobmod
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "b.json"
    args = _parse(["--create", "16M", "--rounds", "1", "--warmup", "0", "--tools",
                   "fastmirror", "--buf-sizes", "16M,32M:2M", src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr().err
    doc = json.loads(out.read_text())
    runs = {r["tool"]: r for r in doc["rounds"]}
    # The default split of 16 MiB: copies of buf_size / IO_SPLIT.
    assert runs["fastmirror 16M"]["detail"]["max_io"] == \
        min(jobmod.MAX_IO, max(jobmod.MIN_IO, 16 * MiB // jobmod.IO_SPLIT))
    assert runs["fastmirror 32M/2M"]["detail"]["max_io"] == 2 * MiB
    assert runs["fastmirror 32M/2M"]["detail"]["nworkers"] == 16
    assert "fastmirror_ratio_paired" in doc["summary"]["fastmirror 32M/2M"]


def test_bench_chart(tmp_path, capsys, monkeypatch):
    """--chart draws a PNG when matplotlib imports, and says why not when it
    does not (it is an optional extra)."""
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    png = tmp_path / "chart.png"
    argv = ["--create", "8M", "--rounds", "1", "--warmup", "0", "--tools", "fastmirror,dd",
            src, dst, "--chart", png]
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)
    assert benchmark.run(_parse(argv)) == 0
    assert "chart: not drawn: matplotlib is not available" in capsys.readouterr().out
    assert not png.exists()
    monkeypatch.undo()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed (an optional extra)")
    assert benchmark.run(_parse(argv + ["--json", tmp_path / "run.json"])) == 0
    assert "chart: wrote" in capsys.readouterr().out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 200_000
    # ... and again from the saved JSON, without running anything.
    again = tmp_path / "again.png"
    assert benchmark.main(["chart", str(again), str(tmp_path / "run.json")]) == 0
    assert again.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert benchmark.main(["chart", str(again)]) == 2


def test_qemu_writer_round_not_completed_is_a_result(tmp_path, monkeypatch):
    """A QEMU job that is READY but does not complete in time (its writer
    keeps the source dirty) is cancelled and reported as not COMPLETED."""
    if not shutil.which("qemu-storage-daemon"):
        _missing("qemu-storage-daemon is not installed")
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    images.make_image(str(src), 16 * MiB, exclusive=True)
    with open(dst, "wb") as f:
        f.truncate(16 * MiB)
    real = mirrors._qemu_daemon_class

    def stuck_class():
        class Stuck(real()):
            def complete_job(self, timeout):
                return None          # as if the drain never ended
        return Stuck
    monkeypatch.setattr(mirrors, "_qemu_daemon_class", stuck_class)
    v = records.Variant("qemu-mirror background", "qemu-mirror", copy_mode="background")
    r = benchmark.run_writer(v, str(src), str(dst), 16 * MiB, "0", 0, timeout=30,
                             ready_timeout=30)
    assert r.ok, r.error
    assert r.converged and r.ready_s > 0
    assert r.detail["completed"] is False and "no COMPLETED" in r.detail["note"]
    s = report.summarize_writer([r], [v.label], ["0"])[v.label]["0"]
    assert s["converged"] == 1 and s["not_completed"] == 1 and "median_total_s" not in s
    assert "not COMPLETED" in report.format_writer_table({v.label: {"0": s}}, {})


# ---------------------------------------------------------------------------
# The honest ceiling: fio-copy, in huge pages, shaped as fastmirror's copies
# ---------------------------------------------------------------------------

def _hugetlbfs_mounts() -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[2:3] == ["hugetlbfs"]]


def _nr_hugepages() -> int:
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def _need_fio_as_root():
    if not shutil.which("fio"):
        _missing("fio is not installed")
    if os.geteuid() != 0:
        _missing("needs root to reserve huge pages (running as uid %d)" % os.geteuid())


def _run_fio_copy(tmp_path, capsys, rounds=2, tools="fastmirror,fio-rw,fio-copy"):
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "c.json"
    args = _parse(["--create", "16M", "--rounds", rounds, "--warmup", "0", "--tools",
                   tools, src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr().err
    return json.loads(out.read_text()), capsys.readouterr().out


def test_bench_fio_copy_ceiling_in_huge_pages(tmp_path, capsys, monkeypatch):
    """fio-copy reads and writes at once in fastmirror's request size with
    huge-page buffers; its CPU is fio's own; the report gives fastmirror
    against it round by round; the huge pages and the mount are undone."""
    _need_fio_as_root()
    # The mount point goes in a folder of this test's own, so that another
    # run of the suite on the machine cannot be taken for a leftover.
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(__import__("tempfile"), "tempdir", str(scratch))
    pages, mounts = _nr_hugepages(), _hugetlbfs_mounts()
    doc, table = _run_fio_copy(tmp_path, capsys)
    shape = baselines.copy_shape(16 * MiB, 65536)
    runs = [r for r in doc["rounds"] if r["tool"] == "fio-copy"]
    assert len(runs) == 2
    for r in runs:
        assert r["ok"], r["error"]
        d = r["detail"]
        assert r["gbps"] > 0 and d["read_gbps"] > 0 and d["write_gbps"] > 0
        assert d["buffers"] == "huge pages"
        assert (d["io_size"], d["iodepth"]) == (shape.io_size, shape.depth) == (2 * MiB, 8)
        # CPU: fio's own figures for its jobs, not the process's.
        assert r["cpu_s"] == pytest.approx(d["fio_user_s"] + d["fio_sys_s"])
        assert d["fio_user_s"] >= 0 and d["fio_sys_s"] >= 0
        assert "process_user_s" in d
    cmd = doc["commands"]["fio-copy"]
    assert "--bs=%d" % (2 * MiB) in cmd and "--iodepth=8" in cmd
    assert sum(a.startswith("--mem=mmaphuge:") for a in cmd) == 2
    s = doc["summary"]["fio-copy"]
    assert s["runs"] == 2 and s["median_gbps"] > 0 and s["median_cpu_s_per_gib"] >= 0
    assert s["buffers"] == "huge pages"
    assert [n for n, _ in s["fastmirror_ratio_rounds"]] == [1, 2]
    assert all(x > 0 for _, x in s["fastmirror_ratio_rounds"])
    assert doc["summary"]["fio-rw"]["buffers"] == "4K pages"
    assert doc["settings"]["fio_copy"]["hugepages_unavailable"] is None
    assert "fio-copy (huge pages)" in table and "fio-rw (4K pages)" in table
    assert "fastmirror/fio-copy per round: r1 " in table
    assert "huge pages unavailable" not in table
    # Undone: the pages given back, nothing left mounted.
    assert _nr_hugepages() == pages
    assert _hugetlbfs_mounts() == mounts
    assert not list(scratch.glob("fastmirror-bench-hugetlbfs-*"))


def test_bench_fio_copy_without_huge_pages_says_so(tmp_path, capsys, monkeypatch):
    """Without huge pages (here the switch for tests), fio-copy runs with
    ordinary buffers and the report says that it is not the honest ceiling."""
    if not shutil.which("fio"):
        _missing("fio is not installed")
    monkeypatch.setenv(baselines.HUGEPAGES_OFF, "1")
    pages = _nr_hugepages()
    doc, table = _run_fio_copy(tmp_path, capsys, rounds=1, tools="fastmirror,fio-copy")
    for r in (r for r in doc["rounds"] if r["tool"] == "fio-copy"):
        assert r["ok"] and r["gbps"] > 0, r["error"]
        assert r["detail"]["buffers"] == "4K pages"
    assert not any(a.startswith("--mem") for a in doc["commands"]["fio-copy"])
    why = doc["settings"]["fio_copy"]["hugepages_unavailable"]
    assert why == "disabled by %s=1" % baselines.HUGEPAGES_OFF
    assert "fio-copy (4K pages)" in table
    assert "note: fio-copy is not the honest ceiling here: huge pages unavailable " \
           "(disabled by FASTMIRROR_BENCH_NO_HUGEPAGES=1)" in table
    assert _nr_hugepages() == pages


def test_huge_pages_refused_when_not_root(monkeypatch):
    monkeypatch.delenv(baselines.HUGEPAGES_OFF, raising=False)
    monkeypatch.setattr(baselines.os, "geteuid", lambda: 1000)
    hp = baselines.HugePages()
    pages = _nr_hugepages()
    assert not hp.setup(10)
    assert hp.dir is None and "not root" in hp.why
    assert "huge pages unavailable (not root" in hp.describe()
    assert _nr_hugepages() == pages


def test_huge_pages_too_few_are_given_back(tmp_path, monkeypatch):
    """The kernel may reserve fewer pages than asked: setup() gives back
    what it got and says so, and mounts nothing."""
    monkeypatch.delenv(baselines.HUGEPAGES_OFF, raising=False)
    monkeypatch.setattr(baselines.os, "geteuid", lambda: 0)
    nr = tmp_path / "nr_hugepages"
    nr.write_text("5\n")
    hp = baselines.HugePages()
    hp.NR = str(nr)
    if hp.page is None:
        _missing("the kernel has no huge pages")
    real = hp._write_nr
    monkeypatch.setattr(hp, "_write_nr", lambda n: real(n - 3 if n > 5 else n))
    assert not hp.setup(10)
    assert "gave 7 of the 10" in hp.why and hp.dir is None
    assert nr.read_text().strip() == "5"


def test_huge_pages_undone_when_the_bench_is_interrupted(tmp_path, capsys, monkeypatch):
    _need_fio_as_root()
    pages, mounts = _nr_hugepages(), _hugetlbfs_mounts()
    seen = []
    real = benchmark.run_tool

    def interrupted(tool, *a, **k):
        if tool != "fio-copy":
            return real(tool, *a, **k)     # filling the new target, before the set-up
        seen.append((_nr_hugepages(), _hugetlbfs_mounts()))
        raise KeyboardInterrupt
    monkeypatch.setattr(benchmark, "run_tool", interrupted)
    args = _parse(["--create", "16M", "--rounds", "1", "--warmup", "0", "--tools",
                   "fio-copy", tmp_path / "src.img", tmp_path / "dst.img"])
    with pytest.raises(KeyboardInterrupt):
        benchmark.run(args)
    assert seen and seen[0][0] > pages and len(seen[0][1]) == len(mounts) + 1
    assert _nr_hugepages() == pages and _hugetlbfs_mounts() == mounts


@pytest.mark.parametrize("buf_size, granularity, io_size", [
    (16 * MiB, 65536, None), (64 * MiB, 65536, None), (4 * MiB, 65536, None),
    (64 * MiB, 65536, 4 * MiB), (16 * MiB, 4 * MiB, None), (1 * MiB, 65536, None),
    (2 * MiB, 8 * MiB, None), (64 * MiB, 1 << 20, 3 * MiB)])
def test_copy_shape_is_mirror_jobs(tmp_path, buf_size, granularity, io_size):
    """fio-copy's shape is what MirrorJob derives for the same settings."""
    from fastmirror import MirrorJob
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    src.write_bytes(b"\x01" * MiB)
    job = MirrorJob(str(src), str(dst), buf_size=buf_size, granularity=granularity,
                    io_size=io_size)
    try:
        shape = baselines.copy_shape(buf_size, granularity, io_size)
        assert (shape.io_size, shape.depth) == (job._engine.max_io, job._engine.nworkers)
    finally:
        job.close()


def test_fio_failure_names_the_jobs_error(monkeypatch):
    """fio reports a job's error in its JSON on stdout, not on stderr: the
    run's error names it rather than quoting the end of the JSON."""
    report = json.dumps({"jobs": [{"jobname": "read", "error": 0},
                                  {"jobname": "write", "error": 11}],
                         "disk_util": [{"name": "vda"}]}).encode()

    def failed(tool, cmd, size, timeout):
        run = records.Run(tool, 0, False, size, command=cmd, returncode=2,
                          error="exit status 2: " + report.decode()[-500:])
        return run, b"fio-3.33\n" + report
    monkeypatch.setattr(baselines, "run_command", failed)
    r = benchmark.run_tool("fio-rw", "/nonexistent/a", "/nonexistent/b", MiB, path="fio")
    assert not r.ok
    assert r.error == "exit status 2: job write: error 11 (%s)" % os.strerror(11)


# -- --exports: fastmirror serve against qemu-storage-daemon --------------------

def test_bench_exports_runs_every_row_on_both_servers(tmp_path, capsys):
    require("fio")
    require("qemu-storage-daemon")
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "exports.json"
    args = _parse(["--exports", "--create", "16M", "--rounds", "1", "--export-seconds", "0.3",
                   src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr()
    text = capsys.readouterr().out
    doc = json.loads(out.read_text())
    assert doc["kind"] == "exports" and doc["size"] == 16 * MiB
    assert doc["settings"]["cache"] == "direct"
    from fastmirror.bench import exports
    assert [r["row"] for r in doc["runs"]] == [row for row in exports.ROWS for _ in range(2)]
    for r in doc["runs"]:
        assert r["ok"], r
        assert r[exports.MAIN[r["row"]]] > 0, r
    for row in ("randwrite-4k", "write-1m", "randread-4k"):
        for kind in exports.SERVERS:
            run = next(r for r in doc["runs"] if r["row"] == row and r["server"] == kind)
            assert run["ios"] > 0 and run["bytes_per_s"] > 0 and run["p99_ms"] >= run["p50_ms"]
        assert doc["summary"][row]["ratio"] > 0
    for r in doc["runs"]:
        if r["row"] == "mirror-writer":
            assert r["writes"] > 0 and r["mirror_s"] > 0 and r["ready_s"] <= r["mirror_s"]
    assert "mirror_ratio" in doc["summary"]["mirror-writer"]
    for title in ("(a) 4 KiB random writes", "(b) 1 MiB sequential writes",
                  "(c) 4 KiB random reads", "(d) writer at 2000 IOPS"):
        assert title in text
    # The last mirror copied the source into the sparse target.
    data = _read(dst)
    assert len(data) == 16 * MiB and data.count(0) < len(data) // 2


def test_bench_exports_buffered(tmp_path, capsys):
    require("fio")
    require("qemu-storage-daemon")
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "exports.json"
    args = _parse(["--exports", "--create", "8M", "--rounds", "1", "--export-seconds", "0.2",
                   "--export-rows", "randwrite-4k", "--export-cache", "buffered", src, dst,
                   "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert doc["settings"]["cache"] == "buffered" and doc["settings"]["rows"] == ["randwrite-4k"]
    assert sorted(r["server"] for r in doc["runs"]) == ["fastmirror", "qemu"]
    assert all(r["ok"] and r["iops"] > 0 for r in doc["runs"]), doc["runs"]
    assert "cache.direct=off" in doc["commands"]["qemu"]
    assert "--direct" not in doc["commands"]["fastmirror"]


def test_bench_exports_refuses_to_write_an_existing_source(tmp_path, capsys):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    images.make_image(src, MiB)
    before = _read(src)
    args = _parse(["--exports", "--rounds", "1", src, dst])
    assert benchmark.run(args) == 2
    assert "--destroy-source" in capsys.readouterr().err
    assert _read(src) == before and not dst.exists()


def test_exports_summary_ratios_and_goals():
    from fastmirror.bench import exports

    def run(row, server, rnd, **figures):
        return dict(row=row, server=server, round=rnd, ok=True, error=None, **figures)
    runs = []
    for rnd, (fm, qe) in enumerate([(50000, 40000), (30000, 45000), (60000, 50000)], 1):
        runs += [run("randwrite-4k", "fastmirror", rnd, iops=fm, bytes_per_s=fm * 4096),
                 run("randwrite-4k", "qemu", rnd, iops=qe, bytes_per_s=qe * 4096)]
    for rnd, (fm, qe) in enumerate([(3.0, 5.0), (25.0, 4.0), (2.0, 9.0)], 1):
        runs += [run("mirror-writer", "fastmirror", rnd, p99_ms=fm, mirror_s=1.0),
                 run("mirror-writer", "qemu", rnd, p99_ms=qe, mirror_s=2.0)]
    runs.append(dict(row="randwrite-4k", server="qemu", round=4, ok=False, error="boom"))
    s = exports.summarize_exports(runs, ["randwrite-4k", "mirror-writer"])
    w = s["randwrite-4k"]
    assert w["fastmirror"]["iops"] == 50000 and w["qemu"]["iops"] == 45000
    assert w["qemu"]["runs"] == 3 and w["qemu"]["failed"] == 1 and w["qemu"]["errors"] == ["boom"]
    assert w["ratio"] == pytest.approx(50000 / 45000)
    assert w["ratio_paired"] == pytest.approx(1.2) and w["rounds_won"] == [2, 3]
    assert w["goal_met"]
    m = s["mirror-writer"]
    assert m["fastmirror"]["p99_ms"] == 3.0 and m["qemu"]["p99_ms"] == 5.0
    assert m["mirror_ratio"] == 0.5 and m["goal_met"] and m["rounds_won"] == [2, 3]
    assert exports._percentile([float(i) for i in range(1, 101)], 0.99) == 99.0
    assert exports._percentile([7.0], 0.99) == 7.0


# -- --nbd-target: mirroring into an NBD export, against nbdcopy and QEMU --------

NBD_PEERS = ("qemu-nbd", "nbdkit", "nbdcopy", "qemu-storage-daemon")


def _nbd_source(path, size=24 * MiB) -> bytes:
    images.make_image(path, size, data_fraction=0.5, seed=3)
    return _read(path)


def test_bench_nbd_target_runs_every_tool_on_both_targets(tmp_path, capsys):
    from helpers.require import require
    from fastmirror.bench import nbdtarget

    for tool in NBD_PEERS:
        require(tool)
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "nbd.json"
    data = _nbd_source(src)
    args = _parse(["--nbd-target", "--rounds", "1", "--seed", "5", src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr()
    text = capsys.readouterr().out

    doc = json.loads(out.read_text())
    assert doc["kind"] == "nbd-target" and doc["size"] == 24 * MiB
    assert doc["settings"]["seed"] == 5 and doc["settings"]["rounds"] == 1
    want = {"qemu-nbd": ["fastmirror", "nbdcopy", "nbdcopy-flush", "qemu-mirror"],
            "delay": ["fastmirror", "nbdcopy"]}
    assert doc["settings"]["tools"] == want
    got = sorted((r["target"], r["tool"]) for r in doc["runs"])
    assert got == sorted((k, t) for k, tools in want.items() for t in tools)
    for r in doc["runs"]:
        assert r["ok"] and r["verified"], r
        assert r["round"] == 1 and r["s"] > 0 and r["cpu"] >= 0 and r["bytes_per_s"] > 0, r
    assert doc["skipped"] == {"nbdcopy-flush on delay": "runs on the qemu-nbd target only",
                              "qemu-mirror on delay": "runs on the qemu-nbd target only"}
    for kind, tools in want.items():
        s = doc["summary"][kind]
        assert list(s) == tools
        for name in tools[1:]:
            assert s[name]["speedup"] > 0 and s[name]["rounds_paired"] == 1
    assert doc["summary"]["qemu-nbd"]["nbdcopy"]["goal_met"] in (True, False)
    assert "goal" not in doc["summary"]["qemu-nbd"]["nbdcopy-flush"]
    assert set(doc["goals"]) == {"qemu-nbd nbdcopy", "qemu-nbd qemu-mirror", "delay nbdcopy"}

    assert "machine: %d CPUs, load average" % os.cpu_count() in text
    assert "qemu-nbd target" in text and "delay target" in text
    for name in nbdtarget.TOOLS:
        assert name in text
    assert text.count("time >= 1.0x") == 3
    # Every run copied the source into DST (the last one on qemu-nbd
    # included); the source was only read.
    assert _read(dst) == data
    assert _read(src) == data


def test_bench_nbd_target_one_target_and_tools(tmp_path, capsys):
    from helpers.require import require

    for tool in ("qemu-nbd", "nbdcopy"):
        require(tool)
    src, dst, out = tmp_path / "src.img", tmp_path / "dst.img", tmp_path / "nbd.json"
    data = _nbd_source(src, 16 * MiB)
    dst.write_bytes(b"\x5a" * MiB)
    args = _parse(["--nbd-target", "--rounds", "1", "--nbd-targets", "qemu-nbd",
                   "--nbd-tools", "nbdcopy", "--connections", "1", "--destroy-target",
                   src, dst, "--json", out])
    assert benchmark.run(args) == 0, capsys.readouterr()
    doc = json.loads(out.read_text())
    assert [(r["target"], r["tool"]) for r in sorted(doc["runs"], key=lambda r: r["tool"])] \
        == [("qemu-nbd", "fastmirror"), ("qemu-nbd", "nbdcopy")]
    assert doc["settings"]["connections"] == 1
    assert "connections=1" in doc["commands"]["fastmirror"]
    assert all(r["ok"] and r["verified"] for r in doc["runs"])
    assert _read(dst) == data


def test_bench_nbd_target_refuses_bad_arguments(tmp_path, capsys):
    from helpers.require import fm

    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    data = _nbd_source(src, MiB)

    # DST is SRC: refused, SRC untouched.
    assert benchmark.run(_parse(["--nbd-target", "--rounds", "1", src, src])) == 2
    assert "same" in capsys.readouterr().err
    assert _read(src) == data
    link = tmp_path / "link.img"
    link.symlink_to(src)
    assert benchmark.run(_parse(["--nbd-target", "--rounds", "1", src, link])) == 2
    assert "same" in capsys.readouterr().err
    assert _read(src) == data

    # An unknown tool or target: argparse refuses, nothing is made.
    for bad in (["--nbd-tools", "fastmirror,bogus"], ["--nbd-targets", "nbd-ish"]):
        p = fm("bench", "--nbd-target", *bad, str(src), str(dst))
        assert p.returncode == 2, p
        assert "bogus" in p.stderr or "nbd-ish" in p.stderr
        assert not dst.exists()

    # A missing source without --create.
    assert benchmark.run(_parse(["--nbd-target", tmp_path / "nope.img", dst])) == 2
    assert "--create" in capsys.readouterr().err
    assert not dst.exists() and not (tmp_path / "nope.img").exists()

    # An existing DST that is not empty, without --destroy-target.
    dst.write_bytes(b"\x5a" * 4096)
    assert benchmark.run(_parse(["--nbd-target", src, dst])) == 2
    assert "--destroy-target" in capsys.readouterr().err
    assert _read(dst) == b"\x5a" * 4096

    # --exports and --nbd-target at once.
    assert benchmark.run(_parse(["--nbd-target", "--exports", src, tmp_path / "d2"])) == 2
    assert "choose one" in capsys.readouterr().err


def test_bench_nbd_target_without_peer_tools(tmp_path, capsys, monkeypatch):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    _nbd_source(src, MiB)
    monkeypatch.setattr(shutil, "which", lambda name, *a, **k: None)
    assert benchmark.run(_parse(["--nbd-target", "--rounds", "1", src, dst])) == 2
    err = capsys.readouterr().err
    assert "nothing to run" in err
    assert "qemu-nbd: qemu-nbd is not installed" in err
    assert "delay: nbdkit is not installed" in err
    assert not dst.exists()


def test_nbd_target_plan_skips_what_is_missing():
    from fastmirror.bench import nbdtarget

    def which(missing):
        return lambda name: None if name in missing else "/usr/bin/" + name
    every = list(nbdtarget.TARGETS), list(nbdtarget.TOOLS)
    runs, skipped = nbdtarget.plan(*every, which=which({"qemu-storage-daemon"}))
    assert runs == {"qemu-nbd": ["fastmirror", "nbdcopy", "nbdcopy-flush"],
                    "delay": ["fastmirror", "nbdcopy"]}
    assert skipped["qemu-mirror on qemu-nbd"] == "qemu-storage-daemon is not installed"
    runs, skipped = nbdtarget.plan(*every, which=which({"nbdkit"}))
    assert list(runs) == ["qemu-nbd"] and skipped["delay"] == "nbdkit is not installed"
    # Without nbdcopy the delay target has nothing to compare with (and
    # nothing to read it back).
    runs, skipped = nbdtarget.plan(*every, which=which({"nbdcopy"}))
    assert runs == {"qemu-nbd": ["fastmirror", "qemu-mirror"]}
    assert "nbdcopy" in skipped["delay"]
    runs, skipped = nbdtarget.plan(["delay"], ["fastmirror"], which=which(set()))
    assert runs == {} and skipped == {"delay": "no other tool to compare with"}


def test_nbd_target_summary_ratios_and_goals():
    from fastmirror.bench import nbdtarget

    def run(target, tool, rnd, s, cpu, ok=True):
        return dict(target=target, tool=tool, round=rnd, s=s, cpu=cpu, ok=ok,
                    error=None if ok else "boom")
    runs = []
    for rnd, (fm_s, nc_s, qm_s) in enumerate([(1.0, 2.0, 0.9), (2.0, 1.0, 1.0),
                                              (1.0, 3.0, 1.5)], 1):
        runs += [run("qemu-nbd", "fastmirror", rnd, fm_s, 0.1),
                 run("qemu-nbd", "nbdcopy", rnd, nc_s, 0.2),
                 run("qemu-nbd", "qemu-mirror", rnd, qm_s, 0.05)]
    runs.append(run("qemu-nbd", "nbdcopy", 4, 0, 0, ok=False))
    s = nbdtarget.summarize_runs(runs, 1 << 30)["qemu-nbd"]
    assert list(s) == ["fastmirror", "nbdcopy", "qemu-mirror"]
    nc, qm = s["nbdcopy"], s["qemu-mirror"]
    assert nc["s"] == 2.0 and nc["runs"] == 3 and nc["failed"] == 1
    assert nc["speedup"] == 2.0 and nc["cpu_ratio"] == 0.5 and nc["rounds_won"] == 2
    assert nc["goal_met"]            # 2.0x, CPU 0.1 s/GiB against 0.2
    assert qm["speedup"] == pytest.approx(0.9) and not qm["goal_met"]
    text = nbdtarget.format_report({"qemu-nbd": s}, 3)
    assert "NOT met" in text and ": met" in text and "nbdcopy: 1 failed (boom)" in text


def test_nbd_bench_drops_the_source_pages_only(tmp_path):
    """Before each NBD-target run the source's pages leave the page cache
    (each tool reads it from the disk) while other files' pages stay."""
    from fastmirror.bench import nbd
    from helpers.require import require
    fincore = require("fincore")

    def cached(path) -> int:
        out = subprocess.run([fincore, "--bytes", "--noheadings", "--output", "RES",
                              str(path)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        return int(out.stdout.strip())

    src, other = tmp_path / "src.img", tmp_path / "other.img"
    for p in (src, other):
        images.make_image(p, 8 * MiB, seed=3)
        with open(p, "rb") as f:
            while f.read(1 << 20):
                pass
    assert cached(src) > 4 * MiB and cached(other) > 4 * MiB
    nbd.drop_source(str(src))
    assert cached(src) == 0
    assert cached(other) > 4 * MiB
