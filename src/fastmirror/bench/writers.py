"""Writers that write to a source while a mirror job runs: random blocks
(4-64 KiB by default, aligned), paced to a rate, their progress sampled
over time.

  RandomWriter   threads of this process calling a write function (a job's
                 job.source.pwrite): fastmirror's writer rounds, the demo's
                 writer and, built upon, the tests' writers
  FioNbdWriter   fio --ioengine=nbd on QEMU's NBD export
  QemuIoWriter   qemu-io on QEMU's NBD export, one write at a time
"""

from __future__ import annotations

import errno
import json
import random
import shutil
import signal
import subprocess
import threading
import time
from typing import Callable, Iterator, Optional

__all__ = ["WRITE_ALIGN", "WRITE_MIN", "WRITE_MAX", "blocks", "Writer", "RandomWriter",
           "FioNbdWriter", "QemuIoWriter", "qemu_writer"]

KiB = 1 << 10
WRITE_ALIGN = 4096          # offsets and lengths are multiples of this
WRITE_MIN, WRITE_MAX = 4 * KiB, 64 * KiB


def blocks(lo: int, hi: int, seed: int, min_len: int = WRITE_MIN, max_len: int = WRITE_MAX,
           align: int = WRITE_ALIGN) -> Iterator[tuple[int, int]]:
    """Endless (offset, length) in [lo, hi): lengths uniform over
    min_len..max_len in `align` steps (at most the range), offsets `align`
    aligned and uniform over the range."""
    rng = random.Random(seed)
    span = (hi - lo) // align * align
    top = max(align, min(max_len // align * align, span))
    low = min(max(align, min_len // align * align), top)
    while True:
        n = rng.randrange(low, top + 1, align)
        yield lo + rng.randrange((span - n) // align + 1) * align, n


class Writer:
    """Bytes written over time, as samples (perf_counter, bytes)."""

    kind = "writer"

    def __init__(self, size: int, rate: Optional[int]):
        self.size = size
        self.rate = rate                  # bytes/s; None (or 0): unthrottled
        self.samples: list[tuple[float, float]] = []
        self.bytes = 0
        self.writes = 0
        self.error: Optional[str] = None
        self.stop_event = threading.Event()
        self._lock = threading.Lock()

    def _sample(self, force: bool = False) -> None:
        now = time.perf_counter()
        with self._lock:
            if force or not self.samples or now - self.samples[-1][0] >= 0.01:
                self.samples.append((now, float(self.bytes)))

    def bytes_at(self, t: float) -> float:
        """Bytes written by time t (linear between samples)."""
        with self._lock:
            s = list(self.samples)
        if not s or t <= s[0][0]:
            return s[0][1] if s else 0.0
        for (t0, b0), (t1, b1) in zip(s, s[1:]):
            if t <= t1:
                return b0 + (b1 - b0) * (t - t0) / (t1 - t0) if t1 > t0 else b1
        return s[-1][1]

    def rate_between(self, a: float, b: float) -> Optional[float]:
        if b <= a or not self.samples:
            return None
        return (self.bytes_at(b) - self.bytes_at(a)) / (b - a)

    def _pace(self, t0: float, done: int, rate: Optional[float]) -> None:
        """Wait until `done` bytes are due at `rate` since t0 (or stop())."""
        if rate:
            delay = t0 + done / rate - time.perf_counter()
            if delay > 0:
                self.stop_event.wait(delay)

    def describe(self) -> str:
        return self.kind


class RandomWriter(Writer):
    """`depth` threads each calling write(data, offset) with random blocks
    of [lo, hi) until stop(): `rate` bytes/s shared between them (None:
    unthrottled), and `pause` seconds after each write (changeable while
    they run).  regions=True gives thread i its own slice of [lo, hi), so
    that the writes of two threads never overlap.  fresh=True: new random
    data for every write (else slices of one random buffer).  hook(worker,
    seq, offset, data) is called after each write landed; write_one() is
    the place to wrap each write (a subclass may override it).

    A write that fails or comes back short stops its thread: `error` says
    which and `exception` holds it; failures after stop() are not errors
    (the job may be closing under the writer)."""

    kind = "threads writing through job.source"

    def __init__(self, write: Callable, size: int, rate: Optional[int] = None,
                 depth: int = 1, *, lo: int = 0, hi: Optional[int] = None,
                 min_len: int = WRITE_MIN, max_len: int = WRITE_MAX,
                 align: int = WRITE_ALIGN, seed: int = 1, pause: float = 0.0,
                 fresh: bool = False, regions: bool = False,
                 hook: Optional[Callable[[int, int, int, bytes], None]] = None,
                 name: str = "writer"):
        super().__init__(size, rate)
        self._write = write
        self.depth = depth
        self.lo = lo
        self.hi = size if hi is None else hi
        self.min_len, self.max_len, self.align = min_len, max_len, align
        self.seed = seed
        self.pause = pause
        self.fresh = fresh
        self.regions = regions
        self.hook = hook
        self.exception: Optional[BaseException] = None
        self.threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                         name="%s-%d" % (name, i) if depth > 1 else name)
                        for i in range(depth)]

    def range_of(self, worker: int) -> tuple[int, int]:
        """The [lo, hi) that thread `worker` writes."""
        if not self.regions:
            return self.lo, self.hi
        span = (self.hi - self.lo) // self.depth // self.align * self.align
        return self.lo + worker * span, self.lo + (worker + 1) * span

    def write_one(self, worker: int, seq: int, offset: int, data) -> None:
        n = self._write(data, offset)
        if n is not None and n != len(data):
            raise OSError(errno.EIO, "short write: %d of %d bytes" % (n, len(data)))

    def _run(self, worker: int) -> None:
        seed = self.seed * 1000 + worker
        rng = random.Random(~seed)          # the data, apart from the offsets
        pool = None if self.fresh else memoryview(rng.randbytes(self.max_len))
        rate = self.rate / self.depth if self.rate else None
        lo, hi = self.range_of(worker)
        mine = 0
        t0 = time.perf_counter()
        try:
            for seq, (off, n) in enumerate(blocks(lo, hi, seed, self.min_len, self.max_len,
                                                  self.align)):
                if self.stop_event.is_set():
                    break
                data = rng.randbytes(n) if pool is None else pool[:n]
                try:
                    self.write_one(worker, seq, off, data)
                except (OSError, ValueError) as e:
                    if self.stop_event.is_set():
                        break
                    self.error = "write of %d bytes at %d failed: %s" % (n, off, e)
                    raise
                mine += n
                with self._lock:
                    self.bytes += n
                    self.writes += 1
                if self.hook is not None:
                    self.hook(worker, seq, off, data)
                self._sample()
                self._pace(t0, mine, rate)
                if self.pause:
                    self.stop_event.wait(self.pause)
        except BaseException as e:   # noqa: BLE001 - kept for check() and the report
            if self.exception is None:
                self.exception = e
                if self.error is None:
                    self.error = "writer failed: %r" % (e,)
        self._sample(force=True)

    def start(self) -> "RandomWriter":
        self._sample(force=True)
        for t in self.threads:
            t.start()
        return self

    def stop(self, timeout: float = 60.0) -> list[str]:
        """Stop and join the threads; returns the names of those still alive."""
        self.stop_event.set()
        for t in self.threads:
            if t.ident is not None:
                t.join(timeout)
        return [t.name for t in self.threads if t.is_alive()]

    def check(self) -> None:
        """Raise the first failure of a thread, if any."""
        if self.exception is not None:
            raise self.exception

    def describe(self) -> str:
        return "%d thread%s writing through job.source" % (self.depth,
                                                            "s" if self.depth != 1 else "")


class FioNbdWriter(Writer):
    """QEMU: fio --ioengine=nbd writing to the daemon's export; its progress
    comes from fio's JSON status every 100 ms."""

    kind = "fio --ioengine=nbd"

    def __init__(self, fio: str, uri: str, size: int, rate: Optional[int], iodepth: int = 1):
        super().__init__(size, rate)
        self.command = [fio, "--name=writer", "--ioengine=nbd", "--uri=" + uri,
                        "--rw=randwrite", "--bsrange=%d-%d" % (WRITE_MIN, WRITE_MAX),
                        "--blockalign=%d" % WRITE_ALIGN, "--size=%d" % size,
                        "--norandommap", "--randrepeat=0", "--time_based", "--runtime=86400",
                        "--iodepth=%d" % iodepth, "--status-interval=100ms",
                        "--output-format=json"]
        if rate:
            self.command.append("--rate=%d" % rate)
        self.depth = iodepth
        self.proc: Optional[subprocess.Popen] = None
        self._reader: Optional[threading.Thread] = None
        self._stderr = b""

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._reader = threading.Thread(target=self._read, name="bench-fio-status",
                                        daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        dec = json.JSONDecoder()
        buf = ""
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):
            now = time.perf_counter()
            buf += chunk.decode(errors="replace")
            while True:
                i = buf.find("{")
                if i < 0:
                    buf = ""
                    break
                try:
                    obj, end = dec.raw_decode(buf, i)
                except ValueError:
                    buf = buf[i:]
                    break
                buf = buf[end:]
                try:
                    job = obj["jobs"][0]
                    io_bytes = job["write"]["io_bytes"]
                except (KeyError, IndexError, TypeError):
                    continue
                # fio's stdout is a pipe, so its reports arrive in bursts:
                # date each by fio's own clock (wall time when it was made).
                at = now
                if isinstance(obj.get("timestamp_ms"), (int, float)):
                    at = min(now, obj["timestamp_ms"] / 1000.0 - time.time()
                             + time.perf_counter())
                with self._lock:
                    self.bytes = io_bytes
                    self.writes = job["write"].get("total_ios", self.writes)
                    if not self.samples or at > self.samples[-1][0]:
                        self.samples.append((at, float(io_bytes)))
                if job.get("error"):
                    self.error = "fio writer: error %s" % job["error"]

    def describe(self) -> str:
        return "fio --ioengine=nbd --iodepth=%d" % self.depth

    def wait_started(self, timeout: float) -> bool:
        """True once fio reported writes (it is in its stride)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.bytes > 0:
                return True
            if self.proc is not None and self.proc.poll() is not None:
                break
            time.sleep(0.01)
        return False

    def stop(self) -> None:
        if self.proc is None or self.stop_event.is_set():
            return
        self.stop_event.set()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)   # fio stops and prints its report
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(15)
        if self.proc.stderr is not None:
            self._stderr = self.proc.stderr.read()
            self.proc.stderr.close()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if not self.samples and self.error is None:
            self.error = "fio writer wrote nothing: %s" % (
                self._stderr.decode(errors="replace").strip()[-300:] or
                "exit status %s" % self.proc.returncode)


class QemuIoWriter(Writer):
    """QEMU, when fio cannot: qemu-io on the export, fed one write command at
    a time (it prints its prompt when the write is done): one write in flight."""

    kind = "qemu-io"
    PROMPT = b"qemu-io> "

    def __init__(self, qemu_io: str, uri: str, size: int, rate: Optional[int], seed: int = 2):
        super().__init__(size, rate)
        self.command = [qemu_io, "-f", "raw", uri]
        self._seed = seed
        self.proc: Optional[subprocess.Popen] = None
        self._thread = threading.Thread(target=self._run, name="bench-qemu-io", daemon=True)
        self._started = threading.Event()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.command, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self._thread.start()

    def _wait_prompt(self, seen: bytes) -> bytes:
        assert self.proc is not None and self.proc.stdout is not None
        while self.PROMPT not in seen:
            b = self.proc.stdout.read1(4096)
            if not b:
                raise OSError("qemu-io exited: %s" % seen.decode(errors="replace")[-300:])
            seen += b
        return seen[seen.index(self.PROMPT) + len(self.PROMPT):]

    def _run(self) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            rest = self._wait_prompt(b"")
            self._sample(force=True)
            t0 = time.perf_counter()
            for off, n in blocks(0, self.size, self._seed):
                if self.stop_event.is_set():
                    break
                self.proc.stdin.write(b"write -q %d %d\n" % (off, n))
                self.proc.stdin.flush()
                rest = self._wait_prompt(rest)
                self.bytes += n
                self.writes += 1
                self._started.set()
                self._sample()
                self._pace(t0, self.bytes, self.rate)
        except (OSError, ValueError) as e:
            if not self.stop_event.is_set():
                self.error = "qemu-io writer: %s" % e
        finally:
            self._started.set()
            self._sample(force=True)

    def wait_started(self, timeout: float) -> bool:
        return self._started.wait(timeout) and self.bytes > 0

    def stop(self) -> None:
        if self.stop_event.is_set():
            return
        self.stop_event.set()
        if self._thread.ident is not None:
            self._thread.join(30)
        if self.proc is None:
            return
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.write(b"quit\n")
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def qemu_writer(want: str = "auto") -> tuple[Optional[str], Optional[str], str]:
    """What writes to QEMU's NBD export: (kind, path, note); kind None when
    nothing can."""
    notes = []
    if want in ("auto", "fio"):
        fio = shutil.which("fio")
        if fio is None:
            notes.append("fio is not installed")
        else:
            try:
                p = subprocess.run([fio, "--enghelp"], capture_output=True, text=True,
                                   timeout=30)
                engines = {line.strip() for line in p.stdout.splitlines()}
            except (OSError, subprocess.SubprocessError):
                engines = set()
            if "nbd" in engines:
                return "fio", fio, "fio --ioengine=nbd"
            notes.append("fio has no nbd engine")
        if want == "fio":
            return None, None, "; ".join(notes)
    qio = shutil.which("qemu-io")
    if qio is not None:
        return "qemu-io", qio, "qemu-io (%s)" % "; ".join(notes) if notes else "qemu-io"
    notes.append("qemu-io is not installed (Debian: qemu-utils)")
    return None, None, "; ".join(notes)
