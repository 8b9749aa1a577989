"""The command line says exactly what happened: its figures, its messages,
its exit codes, and it touches no file that is not its own."""

import importlib
import io
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import fm, make_image
from fastmirror.cli.progress import Progress
from fastmirror.job.events import JobStatus
from fastmirror.units import human, parse_size

cli = importlib.import_module("fastmirror.cli.main")   # the package exports main()
README = Path(__file__).resolve().parent.parent / "README.md"
MiB = 1 << 20


def sparse_source(path, size=8 * MiB, data=((0, 1 * MiB), (4 * MiB, 1 * MiB))):
    """A file of `size` bytes with data only in `data`: the rest is holes."""
    holes, pos = [], 0
    for off, length in data:
        if off > pos:
            holes.append((pos, off - pos))
        pos = off + length
    if pos < size:
        holes.append((pos, size - pos))
    make_image(path, size, holes=holes)
    return path


def json_lines(text):
    return [json.loads(line) for line in text.splitlines()]


# --- item 4: the demo works in a folder of its own --------------------------

def test_demo_dir_leaves_the_users_files_alone(tmp_path):
    mine = {"source.img": b"my source " * 1000, "target.img": b"my target " * 1000,
            "notes.txt": b"keep me"}
    for name, data in mine.items():
        (tmp_path / name).write_bytes(data)
    r = fm("demo", "--size", "16M", "--dir", str(tmp_path), "--json", "--write-rate", "4M")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["verify_equal"] is True
    # The user's files are as they were, and the demo left nothing behind.
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == mine


def test_demo_keep_says_where(tmp_path):
    r = fm("demo", "--size", "8M", "--dir", str(tmp_path), "--write-rate", "4M", "--keep")
    assert r.returncode == 0, r.stderr
    kept = [p for p in tmp_path.iterdir()]
    assert len(kept) == 1 and kept[0].is_dir() and str(kept[0]) in r.stderr
    assert sorted(p.name for p in kept[0].iterdir()) == ["source.img", "target.img"]
    r = fm("demo", "--dir", str(tmp_path / "missing"))
    assert r.returncode == 2 and "--dir" in r.stderr


# --- item 5: no promise to keep a disk in sync that others write ------------

def test_no_complete_is_gone_and_no_text_promises_a_live_sync(tmp_path):
    src = sparse_source(tmp_path / "src.img")
    r = fm("mirror", str(src), str(tmp_path / "dst.img"), "--no-complete")
    assert r.returncode == 2 and "--no-complete" in r.stderr
    assert not (tmp_path / "dst.img").exists()
    helptext = fm("mirror", "--help").stdout
    readme = README.read_text()
    for text in (helptext, readme):
        assert "--no-complete" not in text
        assert "stay in sync after READY" not in text
    # What the help says instead: live sync needs the writes through fastmirror.
    assert "job.source" in " ".join(helptext.split())
    assert "cannot see writes" in " ".join(readme.split())


# --- item 6: exit codes that say whether the target is usable --------------

def test_help_lists_the_exit_codes():
    for args in (("--help",), ("mirror", "--help")):
        out = " ".join(fm(*args).stdout.split())
        for code in ("0 the target is complete", "1 the job failed",
                     "2 bad usage", "130 cancelled before the target was complete"):
            assert code in out, (args, out)
    readme = " ".join(README.read_text().split())
    assert "130" in readme and "partial" in readme


def test_sigint_before_ready_exits_130_and_says_the_target_is_partial(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, 32 * MiB)
    p = subprocess.Popen([sys.executable, "-m", "fastmirror", "mirror", str(src), str(dst),
                          "--json", "--speed", "2M"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # The first PROGRESS line: the job is copying, far from READY.
    first = json.loads(p.stdout.readline())
    assert first["event"] == "PROGRESS"
    p.send_signal(signal.SIGINT)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 130, err
    lines = [first] + json_lines(out)
    assert [e["event"] for e in lines if e["event"] != "PROGRESS"] == ["CANCELLED", "SUMMARY"]
    summary = lines[-1]
    assert summary["final"] == "CANCELLED"
    assert 0 < summary["bytes_copied"] < 32 * MiB
    # The message says the target is partial and how far it got.
    assert "partial" in err and str(dst) in err
    assert "%s of 32.0 MiB of data copied" % human(summary["bytes_copied"]) in err


# Sends itself the signal once the job is READY, and holds the job's thread
# a moment, so that the command's loop sees the signal before it completes.
_SIGNAL_AT_READY = r"""
import importlib, os, sys, time
import fastmirror
cli = importlib.import_module("fastmirror.cli.main")

start = fastmirror.MirrorJob.start
def start_and_signal_at_ready(self):
    def at_ready(ev):
        if ev.type.value == "READY":
            os.kill(os.getpid(), int(sys.argv[1]))
            time.sleep(0.5)
    self.add_listener(at_ready)
    return start(self)
fastmirror.MirrorJob.start = start_and_signal_at_ready
sys.exit(cli.main(sys.argv[2:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_after_ready_exits_0_with_completed(tmp_path, sig):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, 4 * MiB)
    r = subprocess.run([sys.executable, "-c", _SIGNAL_AT_READY, str(int(sig)), "mirror",
                        str(src), str(dst), "--json"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    events = [e["event"] for e in json_lines(r.stdout) if e["event"] != "PROGRESS"]
    assert events == ["READY", "COMPLETED", "SUMMARY"]
    assert dst.read_bytes() == src.read_bytes()


# --- item 8: true figures ---------------------------------------------------

def test_summary_counts_data_apart_from_holes(tmp_path):
    src = sparse_source(tmp_path / "src.img")            # 8 MiB, 2 MiB of data
    r = fm("mirror", str(src), str(tmp_path / "dst.img"))
    assert r.returncode == 0, r.stderr
    line = " ".join(r.stderr.split())
    assert "mirrored 8.0 MiB" in line
    assert "2.0 MiB of data copied" in line and "6.0 MiB of holes" in line
    assert "0 B of zeros" in line


def test_json_progress_summary_and_verify(tmp_path):
    src, dst = sparse_source(tmp_path / "src.img", 16 * MiB,
                             ((0, 3 * MiB), (8 * MiB, 1 * MiB))), tmp_path / "dst.img"
    t0 = time.monotonic()
    r = fm("mirror", str(src), str(dst), "--json", "--verify", "--speed", "2M")
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    lines = json_lines(r.stdout)
    kinds = [e["event"] for e in lines]
    progress = [e for e in lines if e["event"] == "PROGRESS"]
    assert [k for k in kinds if k != "PROGRESS"] == ["READY", "COMPLETED", "VERIFY", "SUMMARY"]
    assert 1 <= len(progress) <= 3 * took                # at most a few per second
    assert all(e["bytes_copied"] <= 4 * MiB for e in progress)
    verify = lines[kinds.index("VERIFY")]
    assert verify["equal"] is True and verify["first_difference"] is None
    assert isinstance(verify["time"], float)
    s = lines[-1]
    assert s["final"] == "COMPLETED"
    assert s["bytes_copied"] == 4 * MiB and s["bytes_holes"] == 12 * MiB
    assert s["bytes_zeros"] == 0 and s["chunks_copied_again"] == 0
    # The rate is over the data copied, not over the size with its holes.
    assert abs(s["rate"] * s["duration"] - 4 * MiB) < 0.1 * MiB
    assert s["io_engine"] and s["copy_mode"] in ("background", "write-blocking")


def test_json_refusal_before_the_start(tmp_path):
    src = sparse_source(tmp_path / "src.img")
    r = fm("mirror", str(tmp_path / "missing.img"), str(tmp_path / "d.img"), "--json")
    assert r.returncode == 2
    [refused] = json_lines(r.stdout)
    assert refused["event"] == "REFUSED" and refused["side"] == "source"
    assert refused["errno"] == 2
    r = fm("mirror", str(src), str(tmp_path / "d.img"), "--json", "--granularity", "lots")
    assert r.returncode == 2
    assert json_lines(r.stdout)[0]["event"] == "REFUSED"


def test_speed_below_one_chunk_per_second_is_refused(tmp_path):
    src = sparse_source(tmp_path / "src.img")
    r = fm("mirror", str(src), str(tmp_path / "d.img"), "--speed", "1", timeout=30)
    assert r.returncode == 2
    assert "--speed" in r.stderr and "64 KiB" in r.stderr
    assert not (tmp_path / "d.img").exists()


def test_one_unit_convention():
    assert parse_size("16M") == parse_size("16MiB") == parse_size("16 MiB") == 16 << 20
    assert parse_size("16MB") == 16_000_000          # decimal, never silently binary
    assert parse_size("64kB") == parse_size("64KB") == 64_000
    assert parse_size("1G") == 1 << 30 and parse_size("1GB") == 10 ** 9
    assert parse_size("512B") == 512
    from fastmirror.bench.harness import parse_rate
    assert parse_rate("50M") == 50 << 20 and parse_rate("50MB") == 50_000_000


def status(**kw):
    base = dict(state="running", offset=0, len=0, ready=False, paused=False, busy=True,
                speed=0, dirty_bytes=0, io_status="ok", error=None, bytes_copied=0,
                copy_rate=0.0, dirty_rate=0.0, eta=None, direct=True, io_mode="direct",
                elapsed=1.0, time_to_ready=None, chunks_copied=0, chunks_recopied=0)
    base.update(kw)
    return JobStatus(**base)


@pytest.mark.parametrize("columns", [80, 60, 40, 20])
def test_progress_fits_the_terminal(monkeypatch, columns):
    monkeypatch.setenv("COLUMNS", str(columns))
    stream = io.StringIO()
    bar = Progress(stream)
    big = 1023 * (1 << 40)
    for st in (status(len=big, dirty_bytes=big),
               status(len=big, offset=big // 3, bytes_copied=big // 3,
                      dirty_bytes=big - big // 3, copy_rate=1023.9 * MiB, eta=3 * 86400),
               status(len=big, offset=big, ready=True, state="ready"),
               status(len=big, offset=big, ready=True, state="concluded")):
        bar.draw(st)
    bar.close()
    lines = stream.getvalue().split("\r")
    assert all(len(line.rstrip("\n")) < columns for line in lines), lines


def test_progress_of_a_sparse_source_is_over_its_data(monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    stream = io.StringIO()
    bar = Progress(stream)
    # Before the first copy: the job's offset counts the holes (68 % here).
    size, data = 1 << 30, 346 * MiB
    bar.draw(status(len=size, offset=size - data, dirty_bytes=data))
    first = stream.getvalue()
    assert "68" not in first and "0 B/s" not in first
    bar.draw(status(len=size, offset=size - data // 2, dirty_bytes=data // 2,
                    bytes_copied=data // 2, copy_rate=50 * MiB))
    assert " 50.0%" in stream.getvalue().split("\r")[-1]


# --- item 9: messages a person understands ----------------------------------

def test_messages_name_options_sides_and_sizes(tmp_path):
    src = sparse_source(tmp_path / "src.img")
    r = fm("mirror", str(src), str(tmp_path / "a.img"), "--buf-size", "4K")
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("--buf-size") == 1 and "64 KiB" in r.stderr
    assert "buf_size" not in r.stderr
    r = fm("mirror", str(src), str(tmp_path / "b.img"), "--granularity", "3000")
    assert r.returncode == 2 and "--granularity" in r.stderr and "3000 bytes" in r.stderr
    r = fm("mirror", str(tmp_path / "nothing.img"), str(tmp_path / "c.img"))
    assert r.returncode == 2 and "source %s" % (tmp_path / "nothing.img") in r.stderr
    # A parameter's text from the job, in the command line's words.
    text = cli._describe(ValueError("granularity 512 is below the I/O alignment 4096 of "
                                    "/dev/x"), "/img", "/dev/x")
    assert text == ("--granularity 512 bytes is below the I/O alignment 4 KiB of the "
                    "target /dev/x")
    assert "--on-source-error" in cli._describe(
        ValueError("on_source_error must be one of ('report',), not 'x'"))
    assert cli._describe(ValueError("io_engine='io_uring' is not available here: x")) == \
        "--io-engine io_uring is not available here: x"
    same = "source /v/speed/a and target /v/speed/b are the same disk"
    assert cli._describe(ValueError(same), "/v/speed/a", "/v/speed/b") == same


def test_verify_says_the_target_is_shorter(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"\1" * 200000)
    b.write_bytes(b"\1" * 100000)
    r = fm("verify", str(a), str(b))
    assert r.returncode == 1 and "shorter" in r.stdout
    r = fm("verify", str(a), str(b), "--json")
    d = json.loads(r.stdout)
    assert d["target_shorter"] is True and d["first_difference"] == 100000
    r = fm("verify", str(a), str(tmp_path / "none"), "--json")
    assert r.returncode == 2 and "target" in r.stderr
    assert json.loads(r.stdout)["side"] == "target"
    r = fm("verify", str(a), str(a), "--json")
    assert json.loads(r.stdout)["first_difference"] is None


def test_readme_documents_preallocation_and_units():
    readme = " ".join(README.read_text().split())
    assert "preallocat" in readme
    assert "MB" in readme and "decimal" in readme


_SIGINT_IN_VERIFY = r"""
import importlib, os, signal, sys, time
import fastmirror.job.verify as verify
cli = importlib.import_module("fastmirror.cli.main")

def first_difference(*args, **kw):
    os.kill(os.getpid(), signal.SIGINT)
    time.sleep(5)
    return -1
verify.first_difference = first_difference
sys.exit(cli.main(sys.argv[1:]))
"""


def test_sigint_during_verify_does_not_say_the_target_is_partial(tmp_path):
    src, dst = tmp_path / "src.img", tmp_path / "dst.img"
    make_image(src, 2 * MiB)
    r = subprocess.run([sys.executable, "-c", _SIGINT_IN_VERIFY, "mirror", str(src),
                        str(dst), "--verify"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1, r.stderr          # not 130: the target is complete
    assert "the target is complete" in r.stderr and "not compared" in r.stderr
    assert dst.read_bytes() == src.read_bytes()
