"""Bad input, through the API and the command line: a clear error before a
single byte is written (invariant 7).  The main table lives in
test_job_invariants.py; here are the absurd numbers, special files, and the
same cases as the command line sees them (exit code 2, a message on stderr)."""

import os

import pytest

from helpers import fm
from fastmirror import MirrorJob


def image(path, size, fill=None):
    with open(path, "wb") as f:
        f.write(os.urandom(size) if fill is None else bytes([fill]) * size)
    return str(path)


def snapshot(path):
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


@pytest.mark.parametrize("kwargs, words", [
    ({"speed": 1 << 62}, ["speed", "absurd"]),
    ({"speed": "fast"}, ["speed"]),
    ({"buf_size": -1}, ["buf_size"]),
    ({"buf_size": 0}, ["buf_size"]),
    ({"buf_size": 1 << 40}, ["buf_size", "absurd"]),
    ({"granularity": 1 << 40}, ["granularity"]),
    ({"copy_mode": "active"}, ["copy_mode"]),
])
def test_absurd_numbers_refused(tmp_path, kwargs, words):
    src = image(tmp_path / "s", 1 << 20)
    dst = image(tmp_path / "d", 1 << 20, fill=0xCD)
    with pytest.raises((ValueError, TypeError)) as info:
        MirrorJob(src, dst, **kwargs)
    for w in words:
        assert w in str(info.value)
    assert snapshot(dst) == bytes([0xCD]) * (1 << 20)


def test_target_character_device_refused(tmp_path):
    src = image(tmp_path / "s", 1 << 20)
    with pytest.raises(ValueError, match="character device"):
        MirrorJob(src, "/dev/zero")


def test_target_fifo_refused(tmp_path):
    src = image(tmp_path / "s", 1 << 20)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ValueError, match="fifo"):
        MirrorJob(src, str(fifo))


@pytest.mark.parametrize("case", [
    "smaller", "same", "symlink", "hardlink", "missing-source", "missing-folder",
    "granularity", "granularity-small", "speed", "buf-size", "source-dir", "source-chardev",
])
def test_command_line_bad_input_exit_2_nothing_written(tmp_path, case):
    src = image(tmp_path / "s.img", 2 << 20)
    dst = str(tmp_path / "d.img")
    args = []
    if case == "smaller":
        image(dst, 1 << 20, fill=0xCD)
    elif case == "same":
        dst = src
    elif case == "symlink":
        os.symlink(src, dst)
    elif case == "hardlink":
        os.link(src, dst)
    elif case == "missing-source":
        src = str(tmp_path / "nope.img")
    elif case == "missing-folder":
        dst = str(tmp_path / "nofolder" / "d.img")
    elif case == "granularity":
        args = ["--granularity", "100000"]
    elif case == "granularity-small":
        args = ["--granularity", "256"]
    elif case == "speed":
        args = ["--speed", "-5M"]
    elif case == "buf-size":
        args = ["--buf-size", "4T"]
    elif case == "source-dir":
        src = str(tmp_path)
    elif case == "source-chardev":
        src = "/dev/null"
    src_before = snapshot(src) if os.path.isfile(src) else None
    dst_before = snapshot(dst) if not os.path.isdir(dst) else None
    entries = sorted(os.listdir(tmp_path))
    r = fm("mirror", src, dst, *args)
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert r.stderr.strip(), "no message"
    assert "Traceback" not in r.stderr
    if src_before is not None:
        assert snapshot(src) == src_before
    if dst_before is not None or not os.path.exists(dst):
        assert snapshot(dst) == dst_before
    assert sorted(os.listdir(tmp_path)) == entries
