"""The state file and resuming: what is refused, what is resumed, and how
much a resumed job copies (job/state.py, _core/actlog.pyx; docs/design.md,
"The crash model")."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

import fastmirror
from fastmirror import EventType
from fastmirror._core.actlog import ActivityLog
from fastmirror.job import state as _state
from helpers.files import make_image
from helpers.jobs import run_to_end, stopped_export_state
from helpers.require import fm

KiB = 1024
MiB = 1024 * KiB


def same(a, b) -> bool:
    with open(a, "rb") as fa, open(b, "rb") as fb:
        return fa.read() == fb.read()


def mirror_to_end(src, dst, st, **kw):
    job = fastmirror.MirrorJob(src, dst, state=st, **kw)
    return run_to_end(job), job


# -- the file itself ------------------------------------------------------------------

def test_a_missing_state_file_is_created_and_says_pivoted_at_the_end(tmp_path):
    src = make_image(tmp_path / "src", 8 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st)
    first = _state.load(st)
    assert first is not None and first.phase == "mirroring"
    assert first.bitmap.dirty_bytes == 8 * MiB        # nothing known to be copied yet
    assert os.path.getsize(_state.al_path(st)) == 2 * _state.RECORD_SIZE
    job.close()
    final, job = mirror_to_end(src, dst, st)
    assert final.type == EventType.COMPLETED and same(src, dst)
    assert final.bytes_copied == job.status().bytes_copied == 8 * MiB
    assert final.to_dict()["bytes_copied"] == 8 * MiB
    assert _state.load(st).phase == "pivoted"


def test_the_checksum_catches_any_damage_and_nothing_is_written(tmp_path):
    src = make_image(tmp_path / "src", 4 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st)
    job.close()
    os.unlink(dst)
    good = open(st, "rb").read()
    for pos in (0, 9, len(good) // 2, len(good) - 1):
        bad = bytearray(good)
        bad[pos] ^= 0x40
        open(st, "wb").write(bad)
        with pytest.raises(_state.StateError, match="damaged|not a fastmirror state"):
            fastmirror.MirrorJob(src, dst, state=st)
        assert not os.path.exists(dst)          # not even created
        assert open(st, "rb").read() == bad     # and the state left alone
    open(st, "wb").write(good[:-10])
    with pytest.raises(_state.StateError):
        fastmirror.MirrorJob(src, dst, state=st)


def test_a_state_of_another_pair_size_or_granularity_is_refused(tmp_path):
    src = make_image(tmp_path / "src", 4 * MiB, seed=1)
    other = make_image(tmp_path / "other", 4 * MiB, seed=2)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    fastmirror.MirrorJob(src, dst, state=st).close()
    before = open(st, "rb").read()
    dst_before = open(dst, "rb").read()
    with pytest.raises(_state.StateError, match="mirror of .*src.*not of .*other"):
        fastmirror.MirrorJob(other, dst, state=st)
    with pytest.raises(_state.StateError, match="onto"):
        fastmirror.MirrorJob(src, str(tmp_path / "dst2"), state=st)
    assert not os.path.exists(tmp_path / "dst2")
    with pytest.raises(_state.StateError, match="granularity 65536, not 131072"):
        fastmirror.MirrorJob(src, dst, state=st, granularity=128 * KiB)
    # The same files, grown: another size.
    os.truncate(src, 6 * MiB)
    os.truncate(dst, 6 * MiB)
    with pytest.raises(_state.StateError, match="4194304-byte source"):
        fastmirror.MirrorJob(src, dst, state=st)
    assert open(st, "rb").read() == before
    assert open(dst, "rb").read() == dst_before + bytes(2 * MiB)


def test_a_pivoted_state_is_not_mirrored_again(tmp_path):
    src = make_image(tmp_path / "src", 2 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    mirror_to_end(src, dst, st)
    with pytest.raises(_state.StateError, match="has completed"):
        fastmirror.MirrorJob(src, dst, state=st)


# -- the activity log -------------------------------------------------------------------

def test_activity_log_records_before_and_evicts_only_covered_extents(tmp_path):
    path = str(tmp_path / "al")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    run = _state.new_run_id()
    al = ActivityLog(fd, 64 * MiB, 4 * MiB, 2, bytes.fromhex(run), 10)
    os.close(fd)
    assert _state.read_activity_log(path, run).extents == []
    assert al.begin(5 * MiB, 4096) == 1                 # extent 1 is on disk now
    assert _state.read_activity_log(path, run).extents == [1]
    records = al.records
    al.end(5 * MiB, 4096)
    assert al.begin(6 * MiB, 4096) == 1 and al.records == records   # active: no I/O
    al.end(6 * MiB, 4096)
    assert al.begin(9 * MiB, 4096) == 1                 # a free slot
    al.end(9 * MiB, 4096)
    assert sorted(_state.read_activity_log(path, run).extents) == [1, 2]
    # Full, nothing covered: a third extent waits for a state file.
    import threading
    got = []
    t = threading.Thread(target=lambda: got.append(al.begin(40 * MiB, 1)))
    t.start()
    assert al.wait_request(5.0)
    t.join(0.2)
    assert t.is_alive() and not got
    mark, extents = al.capture()
    assert sorted(extents) == [1, 2]
    al.covered(mark)
    t.join(5)
    assert got == [1]
    assert sorted(_state.read_activity_log(path, run).extents) in ([1, 10], [2, 10])
    # Records of another run are not ours.
    assert _state.read_activity_log(path, _state.new_run_id()) is None
    al.end(40 * MiB, 1)
    al.poison()
    assert al.begin(0, 1) == 0
    assert _state.read_activity_log(path, run).all_dirty


def test_a_torn_record_leaves_the_previous_one(tmp_path):
    path = str(tmp_path / "al")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    run = _state.new_run_id()
    al = ActivityLog(fd, 64 * MiB, 4 * MiB, 4, bytes.fromhex(run), 0)
    al.begin(0, 1)
    al.begin(4 * MiB, 1)
    rec = _state.read_activity_log(path, run)
    assert rec.extents == [0, 1]
    # Tear the newest record: the one before it (extent 0 only) is read.
    pos = (rec.seq & 1) * _state.RECORD_SIZE
    os.pwrite(fd, b"\xff" * 100, pos + 60)
    os.close(fd)
    older = _state.read_activity_log(path, run)
    assert older.seq == rec.seq - 1 and older.extents == [0]


# -- resuming ---------------------------------------------------------------------------

CHILD = r"""
import os, sys, time
import fastmirror
src, dst, st, speed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
job = fastmirror.MirrorJob(src, dst, state=st, speed=speed, buf_size=1 << 20)
job.start()
while True:
    s = job.status()
    print(s.offset, s.len, flush=True)
    time.sleep(0.02)
"""


def run_and_kill_at(src, dst, st, fraction, speed, settle=0.0):
    """A job in another process, killed with SIGKILL once its progress
    passed `fraction`, `settle` seconds later."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, src, dst, st, str(speed)],
                         stdout=subprocess.PIPE, text=True)
    try:
        for line in p.stdout:
            off, ln = map(int, line.split())
            if off >= fraction * ln:
                break
        time.sleep(settle)
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()


def test_a_job_killed_at_three_quarters_copies_at_most_half_on_resume(tmp_path):
    # The state file lags the copy by up to a second of copying (6 MiB
    # here, under a quarter of the disk).
    size = 32 * MiB
    src = make_image(tmp_path / "src", size)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    run_and_kill_at(src, dst, st, 0.75, 6 * MiB)
    saved = _state.load(st)
    assert saved.phase == "mirroring"
    final, job = mirror_to_end(src, dst, st)
    assert job.resumed
    assert final.type == EventType.COMPLETED and same(src, dst)
    assert 0 < final.bytes_copied <= size // 2, final.bytes_copied


def test_a_ready_job_killed_and_resumed_copies_little(tmp_path):
    size = 16 * MiB
    src = make_image(tmp_path / "src", size)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    run_and_kill_at(src, dst, st, 1.0, 0, settle=0.3)
    assert _state.load(st).phase == "ready"
    final, job = mirror_to_end(src, dst, st)
    assert final.type == EventType.COMPLETED and same(src, dst)
    assert final.bytes_copied <= 4 * MiB, final.bytes_copied


def test_cancel_then_resume_copies_the_rest_and_untracked_writes_copy_all(tmp_path):
    size = 16 * MiB
    src = make_image(tmp_path / "src", size)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st, speed=8 * MiB)
    job.start()
    time.sleep(1.2)
    job.cancel()
    assert job.wait().type == EventType.CANCELLED
    assert _state.load(st).phase == "stopped"
    job.close()
    final, job2 = mirror_to_end(src, dst, st)
    assert same(src, dst) and final.bytes_copied < size
    # A cancelled job's handle writes untracked: the log says so, and the
    # next resume copies everything.
    dst2, st2 = str(tmp_path / "dst2"), str(tmp_path / "state2")
    job = fastmirror.MirrorJob(dst, dst2, state=st2)
    job.start()
    assert job.wait_ready(30)
    job.cancel()
    job.wait()
    job.source.pwrite(b"\x5a" * 4096, 12 * MiB)
    job.source.close()
    job.close()
    final, _ = mirror_to_end(dst, dst2, st2)
    assert same(dst, dst2) and final.bytes_copied == size


# -- the command line ------------------------------------------------------------------

def test_cli_state_refusals_exit_2_and_json_says_bytes_copied(tmp_path):
    src = make_image(tmp_path / "src", 4 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    r = fm("mirror", src, dst, "--state", st, "--json", "-q")
    assert r.returncode == 0, r.stderr
    lines = [json.loads(x) for x in r.stdout.splitlines()]
    done = [x for x in lines if x["event"] == "COMPLETED"]
    assert done and done[0]["bytes_copied"] == 4 * MiB
    r = fm("mirror", src, dst, "--state", st)
    assert r.returncode == 2 and "has completed" in r.stderr
    data = bytearray(open(st, "rb").read())
    data[20] ^= 1
    open(st, "wb").write(data)
    r = fm("mirror", src, dst, "--state", st, "--json")
    assert r.returncode == 2 and "damaged" in r.stderr
    assert json.loads(r.stdout.splitlines()[-1])["event"] == "REFUSED"
    r = fm("serve", src, "--socket", str(tmp_path / "s"), "--state", st)
    assert r.returncode == 2 and "damaged" in r.stderr


def test_large_writes_go_through_the_log_in_pieces_and_land_whole(tmp_path):
    """With a log, a request over more than 8 extents is split (the log has
    slots for a few at a time): every byte still lands, once."""
    size = 48 * MiB
    src = make_image(tmp_path / "src", size, seed=4)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st)
    job.start()
    data = os.urandom(38 * MiB + 12345)
    mv = memoryview(data)
    assert job.source.pwrite(mv, 3 * MiB + 512) == len(data)
    job.source.write_zeroes(42 * MiB - 4096, 5 * MiB)
    assert job.source.pread(len(data), 3 * MiB + 512) == data
    assert job._al.active > 8
    assert job.wait_ready(60)
    job.complete()
    assert job.wait().type == EventType.COMPLETED
    job.source.close()
    job.close()
    assert same(src, dst)
    with open(dst, "rb") as f:
        f.seek(3 * MiB + 512)
        assert f.read(len(data)) == data
        f.seek(42 * MiB - 4096)
        assert f.read(5 * MiB) == bytes(5 * MiB)


def test_after_a_pivot_the_export_mirrors_onward_with_the_same_state(tmp_path):
    src = make_image(tmp_path / "src", 4 * MiB)
    dst, dst2, st = str(tmp_path / "dst"), str(tmp_path / "dst2"), str(tmp_path / "state")
    with fastmirror.Export(src, socket=str(tmp_path / "s"), state=st) as export:
        for target in (dst, dst2):
            job = export.mirror(target)
            assert job.wait_ready(30)
            job.complete()
            assert job.wait().type == EventType.COMPLETED
            assert export.path == target
        saved = _state.load(st)
        assert saved.phase == "pivoted" and saved.target["path"] == dst2
        assert saved.source["path"] == dst
        # A mirror of some other disk with this file: refused.
        with pytest.raises(_state.StateError, match="has completed"):
            fastmirror.MirrorJob(src, str(tmp_path / "dst3"), state=st)
    assert same(src, dst2)


def _answer_log(al, stop):
    """A state writer for a bare ActivityLog: answers its requests for
    room (a state file holding the bitmap would be on disk) until `stop`."""
    while not stop.is_set():
        if al.wait_request(0.05):
            mark, _ = al.capture()
            al.covered(mark)


def test_activity_log_many_writers_two_slots_never_deadlock(tmp_path):
    """16 threads over 8 extents with 2 slots, requests over 1 or 2 extents,
    and a state writer answering requests: every thread ends (a deadlock
    fails here instead of hanging), and every extent in use was on disk."""
    import threading
    path = str(tmp_path / "al")
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    run = _state.new_run_id()
    al = ActivityLog(fd, 32 * MiB, 4 * MiB, 2, bytes.fromhex(run), 0)
    os.close(fd)
    stop = threading.Event()
    bad = []

    def writer(i):
        import random
        rng = random.Random(i)
        for _ in range(150):
            off = rng.randrange(32 * MiB - 4 * MiB)
            length = rng.choice((4096, 4 * MiB))
            if al.begin(off, length) != 1:
                bad.append("begin failed")
                return
            on_disk = _state.read_activity_log(path, run).extents
            for e in range(off >> 22, (off + length - 1 >> 22) + 1):
                if e not in on_disk:
                    bad.append((e, on_disk))
            al.end(off, length)

    sw = threading.Thread(target=_answer_log, args=(al, stop))
    sw.start()
    threads = [threading.Thread(target=writer, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    stop.set()
    sw.join(10)
    assert not any(t.is_alive() for t in threads), "writers deadlocked"
    assert not bad, bad[:3]
    assert al.snapshot_waits > 0 and al.records > 10


def test_an_idle_ready_job_leaves_its_state_file_alone_until_a_write(tmp_path):
    src = make_image(tmp_path / "src", 4 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st)
    job.start()
    assert job.wait_ready(30)
    time.sleep(1.2 * _state.PERSIST_INTERVAL)       # the copies' last flush is recorded
    before = os.stat(st).st_ino
    time.sleep(2.2 * _state.PERSIST_INTERVAL)
    assert os.stat(st).st_ino == before             # not replaced: nothing new
    assert _state.load(st).bitmap.dirty_bytes == 0
    job.source.pwrite(b"\x11" * 4096, 2 * MiB)
    deadline = time.monotonic() + 10
    while os.stat(st).st_ino == before:
        assert time.monotonic() < deadline, "the write never reached the state file"
        time.sleep(0.05)
    assert _state.load(st).bitmap.dirty_bytes == 4 * MiB     # its extent, whole
    job.cancel()
    job.wait()
    job.source.close()
    job.close()


def test_an_untracked_write_while_a_resumed_export_mirror_starts_copies_all(tmp_path, monkeypatch):
    """A mirror of an export that resumes a "stopped" state file decides
    from the disk's untracked writes whether to trust the file's bitmap; a
    client's write that lands after that look but before the disk is
    tracked went through untracked all the same, and must not be lost: the
    job copies everything."""
    size = 8 * MiB
    src, dst, st = stopped_export_state(tmp_path, size)
    data = b"\xa5" * (64 * KiB)
    with fastmirror.Export(src, socket=str(tmp_path / "s"), state=st) as e:
        assert e.job is None and e.disk.untracked_writes == 0
        new_run_id = _state.new_run_id

        def write_then_new_run_id():
            # Between the look at untracked_writes and track(): a client's write.
            assert e.disk.pwrite(data, 2 * MiB) == len(data)
            return new_run_id()

        monkeypatch.setattr(_state, "new_run_id", write_then_new_run_id)
        job = e.mirror(dst)
        monkeypatch.setattr(_state, "new_run_id", new_run_id)
        assert job.wait_ready(30)
        job.complete()
        assert job.wait().type == EventType.COMPLETED
    assert same(src, dst)


def test_sync_none_resume_after_untracked_writes_still_copies_what_was_dirty(tmp_path):
    """sync="none" copies what is written after the start.  A resume that
    cannot trust its state file (a write went through untracked after the
    cancel: ALL_DIRTY in the log) must copy more than the file says, never
    less: here it copied nothing, not even the writes of the first run."""
    size = 8 * MiB
    src = make_image(tmp_path / "src", size)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    with open(dst, "wb") as f:
        f.truncate(size)
    job = fastmirror.MirrorJob(src, dst, state=st, sync="none", speed=1 * KiB)
    job.start()
    # The first copy spends the speed limit's budget for a minute: the
    # next write stays dirty.
    assert job.source.pwrite(b"\x33" * (64 * KiB), 0) == 64 * KiB
    time.sleep(0.5)
    first = b"\x11" * (64 * KiB)
    assert job.source.pwrite(first, 1 * MiB) == len(first)     # tracked, not copied yet
    job.cancel(force=True)
    assert job.wait().type == EventType.CANCELLED
    assert _state.load(st).phase == "stopped"
    later = b"\x22" * (64 * KiB)
    assert job.source.pwrite(later, 5 * MiB) == len(later)     # untracked: ALL_DIRTY
    job.source.close()
    job.close()
    rec = _state.read_activity_log(_state.al_path(st), _state.load(st).run_id)
    assert rec is not None and rec.all_dirty
    job = fastmirror.MirrorJob(src, dst, state=st, sync="none")
    job.start()
    assert job.wait_ready(30)
    job.complete()
    assert job.wait().type == EventType.COMPLETED
    job.source.close()
    job.close()
    with open(dst, "rb") as f:
        f.seek(1 * MiB)
        assert f.read(len(first)) == first
        f.seek(5 * MiB)
        assert f.read(len(later)) == later


def test_writes_served_after_a_stop_by_an_earlier_export_make_the_resume_copy_all(tmp_path):
    """serve --state with a "stopped" state serves the disk untracked until
    a new mirror resumes the file.  Writes served that way by an export
    that then went away (a restart, kill -9) must still make the resume
    copy everything: the process that counted them is gone, so the disk
    must say so before the first such write lands."""
    size = 8 * MiB
    src, dst, st = stopped_export_state(tmp_path, size)
    data = b"\x5a" * (64 * KiB)
    with fastmirror.Export(src, socket=str(tmp_path / "s"), state=st) as e:
        assert e.job is None
        assert e.disk.pwrite(data, 3 * MiB) == len(data)
    with fastmirror.Export(src, socket=str(tmp_path / "s"), state=st) as e:
        job = e.mirror(dst)
        assert job.wait_ready(30)
        job.complete()
        assert job.wait().type == EventType.COMPLETED
    assert same(src, dst)


def test_a_large_write_waiting_at_the_gate_while_a_log_is_attached_goes_in_pieces(tmp_path):
    """A write that chose its pieces before an activity log was attached
    (it waited at the closed gate meanwhile) is split again once it passes:
    over more extents than the log holds in one piece it would wait for
    room forever."""
    import threading
    from fastmirror._core.tracked import TrackedDisk
    size = 64 * MiB
    path = str(tmp_path / "disk")
    with open(path, "wb") as f:
        f.truncate(size)
    disk = TrackedDisk(size, None)
    disk.attach(os.open(path, os.O_RDWR), False)
    alpath = str(tmp_path / "al")
    fd = os.open(alpath, os.O_RDWR | os.O_CREAT, 0o600)
    run = _state.new_run_id()
    al = ActivityLog(fd, size, 4 * MiB, 8, bytes.fromhex(run), 0)
    os.close(fd)
    stop = threading.Event()

    data = os.urandom(40 * MiB)     # ten extents: more than the log's 8 slots
    result = []
    disk.close_gate()
    writer = threading.Thread(target=lambda: result.append(disk.pwrite(data, 2 * MiB)),
                              daemon=True)
    sw = threading.Thread(target=_answer_log, args=(al, stop))
    sw.start()
    try:
        writer.start()
        time.sleep(0.2)     # it read the (absent) log's window, and waits at the gate
        assert writer.is_alive() and not result
        disk.set_activity_log(al)       # leaves the gate as it was: closed
        disk.open_gate()
        writer.join(20)
        assert not writer.is_alive(), "the write waits for room in the log forever"
        assert result == [len(data)]
    finally:
        stop.set()
        sw.join(10)
    with open(path, "rb") as f:
        f.seek(2 * MiB)
        assert f.read(len(data)) == data
    disk.close()


def test_an_undone_pivot_whose_state_cannot_be_rewritten_leaves_no_pivoted_file(tmp_path):
    """complete(), the state file says "pivoted", then a cancel comes before
    the pivot and the file cannot be written again (ENOSPC: neither "ready"
    nor, after the failure, "stopped"): the job fails, and no file may say
    "pivoted" once writers reach the source again (a restarted serve
    --state would serve the stale target)."""
    import errno
    src = make_image(tmp_path / "src", 4 * MiB)
    dst, st = str(tmp_path / "dst"), str(tmp_path / "state")
    job = fastmirror.MirrorJob(src, dst, state=st)
    job.start()
    assert job.wait_ready(30)
    real = job._persist
    seen = []

    def persist(phase=None, news=None):
        seen.append(phase)
        if "pivoted" in seen[:-1]:
            raise OSError(errno.ENOSPC, "No space left on device", st)
        real(phase, news)
        if phase == "pivoted":
            job.cancel()            # comes while the gate is still closed

    job._persist = persist
    job.complete()
    final = job.wait(30)
    job.source.close()
    job.close()
    assert "pivoted" in seen and final.type == EventType.FAILED
    assert final.error.errno == errno.ENOSPC
    assert not os.path.exists(st) or _state.load(st).phase != "pivoted"
