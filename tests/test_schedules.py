"""Randomized schedules: writers, pause, resume, set_speed, cancel and
complete at random points.  Whatever happens, the job ends CANCELLED, or
COMPLETED with the target equal to the source; every verb is accepted exactly
where the state table allows it."""

import random
import threading
import time

import pytest

import fastmirror
from fastmirror.job.events import JobState
from fastmirror.job.states import VERBS
from fastmirror.job.verify import first_difference
from helpers import Writers

SIZE = 6 << 20


def try_verb(job, verb, *args):
    """Call a verb; it must succeed exactly where the table allows it (the
    state may move on by itself in between, so only a clear mismatch fails)."""
    before = job.state
    try:
        getattr(job, verb)(*args)
        return True
    except fastmirror.JobStateError:
        after = job.state
        assert before not in VERBS[verb] or after not in VERBS[verb] or before != after, \
            "%s refused in state %s" % (verb, before)
        return False


@pytest.mark.parametrize("seed", range(14))
def test_random_schedule(tmp_path, seed):
    rng = random.Random(seed)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    with open(src, "wb") as f:
        f.truncate(SIZE)
        for _ in range(rng.randrange(1, 6)):
            off = rng.randrange(0, SIZE - (1 << 20))
            f.seek(off)
            f.write(rng.randbytes(rng.randrange(1, 1 << 20)))
    if rng.random() < 0.5:
        dst.write_bytes(b"\xee" * (SIZE + rng.choice([0, 4096, 1 << 20])))   # garbage
    job = fastmirror.MirrorJob(
        str(src), str(dst),
        granularity=rng.choice([4096, 65536, 1 << 20]),
        buf_size=rng.choice([1, 256 << 10, 4 << 20, 16 << 20]),
        speed=rng.choice([0, 0, 2 << 20, 8 << 20]),
        # From its own generator, so that each seed keeps its old schedule.
        io_engine=random.Random(seed + 1000).choice(["auto", "threads"]))
    events = []
    job.add_listener(events.append)
    job.start()
    # Unaligned writes of 1 byte to 64 KiB anywhere, up to 2 ms apart.
    writers = Writers(job.source, n=rng.randrange(0, 4), seed=seed, align=1, min_len=1,
                      max_len=65535, pause=0.001)
    writers.start()
    try:
        for _ in range(rng.randrange(2, 8)):
            time.sleep(rng.random() * 0.15)
            verb = rng.choice(["pause", "resume", "set_speed", "set_speed", "wait_ready"])
            if verb == "set_speed":
                try_verb(job, "set_speed", rng.choice([0, 1 << 20, 16 << 20]))
            elif verb == "wait_ready":
                job.wait_ready(timeout=rng.random() * 0.5)
            else:
                try_verb(job, verb)
        # Make sure the end is reachable: not paused, no limit.
        if job.state in (JobState.PAUSED, JobState.STANDBY):
            assert try_verb(job, "resume")
        end = rng.choice(["complete", "complete", "cancel", "force"])
        if end == "complete":
            job.set_speed(0)
            assert job.wait_ready(60), "never became ready"
        writers.stop()
        if end == "complete":
            job.complete()
        else:
            job.cancel(force=end == "force")
        final = job.wait(60)
    finally:
        writers.stop()
        if job.wait(0) is None:
            job.cancel(force=True)
            job.wait(60)
        job.close()
    assert final is not None
    assert final.type in (fastmirror.EventType.COMPLETED, fastmirror.EventType.CANCELLED)
    kinds = [e.type for e in events]
    assert kinds.count(fastmirror.EventType.READY) <= 1
    assert kinds[-1] == final.type and sum(e.type.final for e in events) == 1
    if end == "complete":
        assert final.type == fastmirror.EventType.COMPLETED
    if final.type == fastmirror.EventType.COMPLETED:
        assert first_difference(str(src), str(dst)) == -1
    assert not [t for t in threading.enumerate() if t.name.startswith("fastmirror-")]


@pytest.mark.parametrize("seed", range(4))
def test_writers_keep_writing_through_drain_and_pivot(tmp_path, seed):
    """Writers never stop: during the final drain they wait at the gate, after
    the pivot their writes land on the target.  Each writer owns a region, so
    the target must end equal to the original image with every write applied
    in order, wherever each write landed."""
    rng = random.Random(seed)
    src, dst = tmp_path / "s.img", tmp_path / "d.img"
    original = bytearray(rng.randbytes(SIZE))
    src.write_bytes(original)
    job = fastmirror.MirrorJob(str(src), str(dst), granularity=65536)
    # Three writers, each in its own third: unaligned writes of 1 byte to 32 KiB.
    writers = Writers(job.source, n=3, seed=seed, align=1, min_len=1, max_len=32767,
                      regions=True)
    job.start()
    writers.start()
    assert job.wait_ready(60)
    time.sleep(0.2)
    job.complete()
    final = job.wait(60)
    time.sleep(0.1)            # writers go on, now onto the target
    writers.stop()
    job.close()
    job.source.close()
    assert final.type == fastmirror.EventType.COMPLETED
    expected = writers.model(bytes(original))
    got = dst.read_bytes()
    assert len(got) == SIZE
    if got != bytes(expected):
        first = next(i for i in range(SIZE) if got[i] != expected[i])
        pytest.fail("target differs from the expected image at offset %d" % first)
    assert writers.count > 0
