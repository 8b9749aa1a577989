"""The fastmirror command, run as a user runs it: a separate process."""

import argparse
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import fm
from fastmirror.cli.main import parse_size


def write_image(path, size, seed=0):
    data = bytearray(os.urandom(size))
    # a hole in the middle
    with open(path, "wb") as f:
        f.write(data[: size // 4])
        f.truncate(size)
        f.seek(size // 2)
        f.write(data[size // 2:])
    with open(path, "rb") as f:
        return f.read()


def test_parse_size():
    assert parse_size("64K") == 65536
    assert parse_size("64KiB") == 65536
    assert parse_size("1M") == 1 << 20
    assert parse_size("1.5G") == 3 << 29
    assert parse_size("512") == 512
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("lots")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_size("-1M")


def test_mirror_json_events_and_verify(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    want = write_image(src, 8 << 20)
    r = fm("mirror", str(src), str(dst), "--json", "--verify")
    assert r.returncode == 0, r.stderr
    events = [json.loads(line) for line in r.stdout.splitlines()]
    events = [e for e in events if e["event"] != "PROGRESS"]
    kinds = [e["event"] for e in events]
    assert kinds == ["READY", "COMPLETED", "VERIFY", "SUMMARY"]
    assert events[2]["equal"] is True
    assert events[1]["offset"] == events[1]["len"] == 8 << 20
    assert dst.read_bytes() == want


def test_verify_exit_codes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\1" * 100000)
    b.write_bytes(b"\1" * 100000)
    r = fm("verify", str(a), str(b))
    assert r.returncode == 0 and "identical" in r.stdout
    with open(b, "r+b") as f:
        f.seek(77777)
        f.write(b"\2")
    r = fm("verify", str(a), str(b), "--json")
    assert r.returncode == 1
    assert json.loads(r.stdout)["first_difference"] == 77777
    r = fm("verify", str(a), str(tmp_path / "missing"))
    assert r.returncode == 2


def test_bad_usage_exit_2_and_nothing_written(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(src, 1 << 20)
    dst.write_bytes(b"\xab" * 4096)          # smaller than the source
    r = fm("mirror", str(src), str(dst))
    assert r.returncode == 2
    assert "smaller" in r.stderr
    assert dst.read_bytes() == b"\xab" * 4096
    r = fm("mirror", str(src), str(src))
    assert r.returncode == 2 and "same" in r.stderr
    r = fm("mirror", str(src), str(tmp_path / "nodir" / "dst.img"))
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = fm("mirror", str(src), str(tmp_path / "x.img"), "--granularity", "3000")
    assert r.returncode == 2 and "power of two" in r.stderr
    assert not (tmp_path / "x.img").exists()
    r = fm("mirror", str(src), str(tmp_path / "x.img"), "--sync", "bogus")
    assert r.returncode == 2
    r = fm("frobnicate")
    assert r.returncode == 2


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_before_ready_cancels_and_exits_130(tmp_path, sig):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(src, 32 << 20)
    # 1 MiB/s: the bulk copy takes half a minute, so the signal lands in phase 1.
    p = subprocess.Popen([sys.executable, "-m", "fastmirror", "mirror", str(src), str(dst),
                          "--json", "--speed", "1M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    p.send_signal(sig)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    kinds = [json.loads(line)["event"] for line in out.splitlines()]
    assert [k for k in kinds if k != "PROGRESS"] == ["CANCELLED", "SUMMARY"]


def test_api_cancel_on_signal_after_ready_completes(tmp_path):
    """After READY, a cancel drains and ends COMPLETED (the command's own
    signal handling: test_cli_honest)."""
    src = tmp_path / "src.img"
    write_image(src, 4 << 20)
    # --sync none is ready at once; the writer-less job then idles in phase 2
    # only if it does not complete by itself, so run it under a tiny helper
    # that mirrors and waits for a signal.
    script = r"""
import signal, sys, fastmirror, json
job = fastmirror.MirrorJob(sys.argv[1], sys.argv[2])
got = []
signal.signal(signal.SIGTERM, lambda *a: got.append(1))
job.start()
assert job.wait_ready(60)
print("ready", flush=True)
while not got:
    signal.pause()
job.cancel()
ev = job.wait(60)
print(ev.type.value, flush=True)
job.close()
"""
    p = subprocess.Popen([sys.executable, "-c", script, str(src), str(tmp_path / "d.img")],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 0, err
    assert out.strip() == "COMPLETED"
    assert (tmp_path / "d.img").read_bytes() == src.read_bytes()


def test_trace_option_prints_qemu_format(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    write_image(src, 2 << 20)
    r = fm("mirror", str(src), str(dst), "--trace", "mirror_*", "-q")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.splitlines()
    assert any(":mirror_start bs 0x" in line for line in lines)
    assert any(":mirror_one_iteration s 0x" in line and "sector_num 0 nb_sectors" in line
               for line in lines)
    assert any(":mirror_before_drain s 0x" in line for line in lines)
    r = fm("mirror", str(src), str(tmp_path / "e.img"), "--trace", "nothing_*")
    assert r.returncode == 2


def test_demo_small(tmp_path):
    r = fm("demo", "--size", "64M", "--dir", str(tmp_path), "--json",
           "--write-rate", "8M")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["final"] == "COMPLETED"
    assert summary["verify_equal"] is True
    assert summary["events"] == ["READY", "COMPLETED"]
    assert summary["writer_writes"] > 0
    assert not (tmp_path / "source.img").exists()    # cleaned up without --keep
