"""Threads writing through job.source while a job runs, every write logged
with the job's state just before and after it (built on the package's
RandomWriter, fastmirror.bench.writers)."""

from __future__ import annotations

import time

from fastmirror.bench.writers import RandomWriter

KiB = 1024


class Writers(RandomWriter):
    """`n` threads each writing random `min_len`-`max_len` blocks (multiples
    of `align`) at random `align`ed offsets of [lo, hi) through `handle`
    (job.source) until stop(), new random data every time, `pause` seconds
    apart.  Each write is logged as (writer, seq, offset, data, state
    before, state after); the states are "" without a `job`.
    regions=True: writer i owns its own slice of [lo, hi), so that
    per-writer order is the only order that matters (see model())."""

    def __init__(self, handle, n: int = 4, lo: int = 0, hi: int | None = None,
                 seed: int = 0, min_len: int = 4 * KiB, max_len: int = 64 * KiB,
                 align: int = 512, job=None, pause: float = 0.0,
                 regions: bool = False):
        super().__init__(handle.pwrite, handle.size, None, n, lo=lo, hi=hi,
                         min_len=min_len, max_len=max_len, align=align, seed=seed,
                         pause=pause, fresh=True, regions=regions, name="test-writer")
        self.handle = handle
        self.job = job
        self.log: list[tuple[int, int, int, bytes, str, str]] = []

    def _state(self) -> str:
        return self.job.state.value if self.job is not None else ""

    def write_one(self, worker: int, seq: int, offset: int, data) -> None:
        before = self._state()
        super().write_one(worker, seq, offset, data)
        after = self._state()
        with self._lock:
            self.log.append((worker, seq, offset, data, before, after))

    @property
    def count(self) -> int:
        """Writes made so far, by all the threads."""
        return self.writes

    def set_pause(self, seconds: float) -> None:
        """Change the pause between two writes of each writer, at once."""
        self.pause = seconds

    def wait_for(self, count: int, timeout: float = 60.0) -> None:
        """Wait until at least `count` writes were made in total."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.writes >= count or self.exception is not None:
                break
            time.sleep(0.005)
        self.check()

    def stop(self, timeout: float = 60.0) -> list[str]:
        alive = super().stop(timeout)
        assert not alive, "writer threads did not stop: %s" % alive
        self.check()
        return alive

    def states_seen(self) -> set[str]:
        """States of the job seen around writes (both before and after)."""
        with self._lock:
            return {s for w in self.log for s in (w[4], w[5])}

    def writes_in(self, state: str) -> int:
        """Writes that began and ended while the job was in `state`."""
        with self._lock:
            return sum(1 for w in self.log if w[4] == state and w[5] == state)

    def model(self, base: bytes) -> bytes:
        """`base` with every write applied in each writer's own order; only
        meaningful with regions=True (writers never overlap)."""
        assert self.regions, "model() needs disjoint writer regions"
        buf = bytearray(base)
        with self._lock:
            for _, _, off, data, _, _ in sorted(self.log, key=lambda w: (w[0], w[1])):
                buf[off:off + len(data)] = data
        return bytes(buf)


def phase1_then_phase2(job, writers, writes: int = 100, timeout: float = 90.0,
                       calm: float = 0.01) -> None:
    """Start a throttled job and the writers; once `writes` writes landed in
    phase 1, lift the limit and wait for READY, then let `writes` more land
    in phase 2.  The writers never stop; while the job catches up with them
    they pause `calm` seconds between writes, so that READY comes whatever
    the load of the machine (writers flat out can outrun any copy, in QEMU
    too).  Leaves the writers running at their own pace."""
    from fastmirror.job.events import JobState

    pace = writers.pause
    job.start()
    writers.start()
    writers.wait_for(writes)
    assert job.state in (JobState.RUNNING, JobState.PAUSED), \
        "the job left phase 1 before the writers ran: %s" % (job.status(),)
    writers.set_pause(calm)
    job.set_speed(0)
    assert job.wait_ready(timeout), "never ready: %s" % (job.status(),)
    writers.set_pause(pace)
    writers.wait_for(writers.count + writes, timeout)
    assert writers.writes_in("running") > 0, "no write landed in phase 1"
    assert writers.writes_in("ready") > 0, "no write landed in phase 2"
