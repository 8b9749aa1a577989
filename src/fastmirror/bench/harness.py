"""`fastmirror bench SRC DST`: mirror throughput and convergence, side by side
with baselines, on the same source and target (files or block devices).

Bulk rounds.  Every round runs each tool once, in an order shuffled from
round to round with a fixed seed (--order rotate: rotated), so that no tool
always runs first or last, or right after the same other tool:

  fastmirror   MirrorJob(SRC, DST): start, wait for READY, complete, wait for
               COMPLETED (in this process; timed from building the job to the
               final event, and to READY).  The target is flushed (fdatasync)
               before READY and again at the end.
  qemu-mirror  QEMU's own mirror job: blockdev-mirror in qemu-storage-daemon
               (both images opened with cache.direct=on, aio=native), driven
               over its QMP socket; timed from the blockdev-mirror command to
               the BLOCK_JOB_READY event, block-job-complete, and to
               BLOCK_JOB_COMPLETED.  QEMU flushes the target before READY and
               at the end too.  The daemon's start-up is not timed.
  qemu-img     qemu-img convert -n -f raw -O raw -t none -T none -m 16 -W SRC DST
  dd           dd if=SRC of=DST bs=4M iflag=direct oflag=direct
               conv=notrunc,fdatasync status=none
  fio          the device's ceilings, four runs: fio-read (a sequential
               O_DIRECT read of SRC alone), fio-write (a sequential O_DIRECT
               write of DST alone, fsynced at the end) and fio-rw (both at
               once: two jobs in one fio run), bs=1M, iodepth=16, in buffers
               of ordinary 4 KiB pages; and fio-copy, the honest ceiling of a
               copy: SRC read and DST written at once (two jobs in one run)
               in requests of fastmirror's size (its io_size: 2 MiB with the
               default 16 MiB buf-size; with --buf-sizes, the first's), each
               job with as many in flight as fastmirror has copies (8 by
               default; so fio may have twice fastmirror's bytes in flight),
               in huge-page buffers
               (--mem=mmaphuge on a hugetlbfs mount).  io_uring when it works
               here, else libaio.  Throughput is fio's own (its runtime, not
               its start-up); fio-rw and fio-copy count SIZE bytes over the
               longer of the two jobs, the best a copy could do.

               Why huge pages: the block layer splits a request at the
               device's segment limit, and every 4 KiB page is a segment (a
               virtio disk's 254 segments carry at most about 1 MiB), while
               fastmirror's 2 MiB-aligned huge-page buffers reach the disk
               whole.  Against the ordinary-page rows fastmirror can look
               faster than the device; fio-copy compares like with like.  The
               bench sets the huge pages up itself when it is root: it raises
               /proc/sys/vm/nr_hugepages by what fio needs, mounts hugetlbfs
               on a temporary directory, and undoes both at the end.  When it
               cannot (not root, the kernel gives too few pages, mount fails,
               or FASTMIRROR_BENCH_NO_HUGEPAGES=1 is set, a switch for tests),
               fio-copy runs with ordinary buffers and the report says so.

so every tool reads with O_DIRECT, writes with O_DIRECT and makes the target
durable before it counts as done.  A tool that is not installed is skipped,
and the report says so.

Writer rounds (--writer-rates 0,50M,200M,max).  The mirror jobs run while a
writer writes random 4-64 KiB blocks (4 KiB aligned) to the source at each
rate ("max": unthrottled; "0": no writer), and the report gives the time to
READY, the total time to COMPLETED (complete() is asked at READY, the writer
keeps writing until COMPLETED), the rate the writer actually achieved until
READY, how much was copied again, and the copy mode in effect:

  fastmirror   --writer-depth threads (default 4) of this process write
               through job.source (buffered writes, as a VM's would go through
               the handle), sharing the rate; one job per --copy-modes value
               (auto, background, write-blocking).
  qemu-mirror  the mirrored node is exported over NBD (a Unix socket) and
               written by `fio --ioengine=nbd --iodepth=DEPTH` (--rate for paced
               writes; started before the mirror so it is in its stride), or by
               qemu-io (one write at a time) when fio or its nbd engine is
               missing; copy-mode background and/or write-blocking
               (blockdev-mirror copy-mode).

Several writes in flight, because one synchronous writer on a disk that the
bulk copy keeps busy waits behind the copy's queue on every write and reaches
a few MB/s whatever the rate asked.  The report gives the rate each writer
achieved.

A job that does not reach READY within --writer-timeout is cancelled and
reported as not converged; a QEMU job that reaches READY but does not
complete before --timeout (QEMU lets a busy writer go on during the final
drain) is cancelled and reported as not COMPLETED.  Both are results, not
failures.

Before each run (untimed): sync, drop the page cache when running as root
(echo 3 > /proc/sys/vm/drop_caches), wait --settle seconds (default 1), and
overwrite three 4 KiB blocks of the
target (start, middle, end) with a marker, so that a tool that silently did
nothing is caught: after each copy those blocks must equal the source's.
--verify compares the whole target after each bulk copy (untimed).

Wall time is time.perf_counter(); CPU time is user + system seconds:
RUSAGE_CHILDREN deltas for the command-line baselines (the whole process,
every thread), fio's own usr_cpu and sys_cpu of each job for the fio rows
(from its JSON report: without its start-up and set-up), the daemon's own
counters (/proc/PID/stat) for qemu-mirror,
RUSAGE_SELF deltas for fastmirror (every thread of this process: copy
workers, the job's coordinator, the waiting caller and, in writer rounds, the
writer thread).

Safety: a regular-file target is overwritten (created when missing); a block
device target is written (by any tool, fio included) only with
--destroy-target, and never while mounted or otherwise held exclusively.  SRC
is only read, except that --create makes it when it does not exist, and that
writer rounds write random data into it: allowed for a source this run
created, otherwise only with --destroy-source.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import mmap
import os
import platform
import random
import resource
import shutil
import signal
import stat
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional, Sequence

from fastmirror.units import human, parse_size, short

__all__ = ["add_arguments", "run", "main", "TOOLS", "Run", "Variant", "create_source",
           "tool_command", "find_tool", "run_tool", "run_writer", "reset_target",
           "check_markers", "drop_caches", "summarize", "summarize_writer", "parse_size",
           "parse_rate", "default_timeout", "default_writer_timeout", "fio_engine",
           "qemu_writer", "draw_chart", "chart_from_json", "CopyShape", "copy_shape",
           "HugePages"]

TOOLS = ("fastmirror", "qemu-mirror", "qemu-img", "dd", "fio")
FIO_PARTS = ("fio-read", "fio-write", "fio-rw", "fio-copy")
HUGEPAGES_OFF = "FASTMIRROR_BENCH_NO_HUGEPAGES"   # =1: fio-copy without huge pages (tests)
MIRRORS = ("fastmirror", "qemu-mirror")
COPY_MODES = ("auto", "background", "write-blocking")
QEMU_COPY_MODES = ("background", "write-blocking")
GB = 1e9
MB = 1e6
GiB = 1 << 30
MiB = 1 << 20
KiB = 1 << 10
MARK = 4096                 # bytes of each marker block written before a run
NOISY = 0.25                # a min-max spread above this (of the median) is noise
WRITE_ALIGN = 4096          # writer: offsets and lengths are multiples of this
WRITE_MIN, WRITE_MAX = 4 * KiB, 64 * KiB
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2



class BenchError(Exception):
    """A refusal or bad input: exit status 2, nothing written."""


def parse_rate(text: str) -> Optional[int]:
    """A writer rate: '0' (no writer), '50M' (bytes per second, binary units),
    'max' (unthrottled) -> 0, bytes/s, or None for max."""
    s = str(text).strip().lower()
    if s in ("max", "unlimited", "inf"):
        return None
    return parse_size(s)


def _list(text: str) -> list[str]:
    return list(dict.fromkeys(t.strip() for t in str(text).split(",") if t.strip()))


def _rates_list(text: str) -> list[tuple[str, Optional[int]]]:
    out = []
    for t in _list(text):
        rate = parse_rate(t)
        out.append(("max" if rate is None else "0" if rate == 0 else t, rate))
    if not out:
        raise argparse.ArgumentTypeError("writer rates are a comma-separated list such as "
                                         "0,50M,200M,max")
    return out


def _choices_list(what: str, choices: Callable[[], Sequence[str]]):
    """An argparse type: a comma-separated list, each item one of choices()
    (called when parsing: the I/O engines come from the compiled job
    module, which the chart command does not need)."""
    def parse(text: str) -> list[str]:
        items = _list(text)
        allowed = choices()
        if not items or any(i not in allowed for i in items):
            raise argparse.ArgumentTypeError("%s are a comma-separated list of %s, got %r"
                                             % (what, ", ".join(allowed), text))
        return items
    return parse


def _io_engines() -> Sequence[str]:
    from fastmirror.job.mirror import IO_ENGINES
    return IO_ENGINES


_tools_list = _choices_list("tools", lambda: TOOLS + FIO_PARTS)
_modes_list = _choices_list("copy modes", lambda: COPY_MODES)
_io_engines_list = _choices_list("I/O engines", _io_engines)


def _buf_sizes_list(text: str) -> list[tuple[int, Optional[int]]]:
    """'16M,64M,64M:4M' -> [(16M, None), (64M, None), (64M, 4M)]."""
    out = []
    for t in _list(text):
        buf, _, io = t.partition(":")
        b = parse_size(buf)
        m = parse_size(io) if io else None
        if b <= 0 or (m is not None and m <= 0):
            raise argparse.ArgumentTypeError("buffer sizes must be positive: %r" % t)
        out.append((b, m))
    if not out:
        raise argparse.ArgumentTypeError("a comma-separated list of BUF or BUF:IO sizes")
    return out


def _number(kind: type, minimum: float, strict: bool, what: str):
    """An argparse type: a finite `kind` (int or float) that is >= minimum,
    or > minimum when strict."""
    def parse(text: str):
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not %s: %r" % (what, text)) from None
        ok = v > minimum if strict else v >= minimum
        if not ok or math.isinf(v):
            raise argparse.ArgumentTypeError("%s must be %s %s: %r" % (
                what, "more than" if strict else "at least", minimum, text))
        return v
    return parse


_positive = _number(int, 1, False, "an integer")
_nonnegative = _number(int, 0, False, "an integer")
_seconds = _number(float, 0, True, "a number of seconds")
_nonneg_seconds = _number(float, 0, False, "a number of seconds")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmirror bench`."""
    parser.description = "\n\n".join(textwrap.fill(p, 78) for p in (
        "Mirror throughput of fastmirror on SRC -> DST, side by side with QEMU's mirror "
        "job (qemu-storage-daemon over QMP), qemu-img convert, dd and fio's read and "
        "write ceilings (all with O_DIRECT and a final flush of the target), in "
        "interleaved rounds; with --writer-rates, the time to READY of fastmirror and "
        "QEMU's mirror while a writer writes to the source at each rate.",
        "A regular-file DST IS OVERWRITTEN (and created when missing); a block device "
        "DST is written only with --destroy-target.  Writer rounds WRITE RANDOM DATA "
        "INTO SRC: allowed for a SRC that --create made in this run, otherwise only "
        "with --destroy-source."))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n\n".join(textwrap.fill(p, 78) for p in (
        "Before each run the page cache is dropped when running as root (sync; echo 3 > "
        "/proc/sys/vm/drop_caches), and three 4 KiB marker blocks of DST are overwritten, "
        "so that a tool that copied nothing is caught.",
        "Example: fastmirror bench --create 1G --rounds 5 /var/tmp/src.img "
        "/var/tmp/dst.img --json bench.json --chart bench.png",
        "Example: fastmirror bench --no-bulk --writer-rates 0,50M,max --copy-modes "
        "auto,background,write-blocking --destroy-source /var/tmp/src.img /var/tmp/dst.img"))
    parser.add_argument("source", metavar="SRC", help="file or block device to read")
    parser.add_argument("target", metavar="DST",
                        help="file (overwritten; created when missing) or block device "
                             "(needs --destroy-target)")
    parser.add_argument("--create", metavar="SIZE", type=parse_size, default=None,
                        help="when SRC does not exist, create it as a file of SIZE bytes of "
                             "non-zero pseudo-random data (no holes), e.g. 1G")
    parser.add_argument("--rounds", type=_positive, default=3,
                        help="timed rounds; each runs every tool once (default 3)")
    parser.add_argument("--warmup", type=_nonnegative, default=1,
                        help="untimed bulk rounds first (default 1): they load the tools "
                             "and leave the target fully allocated")
    parser.add_argument("--tools", type=_tools_list, default=list(TOOLS),
                        help="comma-separated subset of %s; fio runs fio-read, fio-write, "
                             "fio-rw (ordinary-page buffers) and fio-copy (huge-page "
                             "buffers, fastmirror's request size), which can also be "
                             "named alone (default: all)"
                             % ",".join(TOOLS))
    parser.add_argument("--granularity", type=parse_size, default=65536,
                        help="fastmirror and qemu-mirror: bytes per dirty-bitmap chunk "
                             "(default 64K)")
    parser.add_argument("--buf-size", type=parse_size, default=16 << 20,
                        help="fastmirror and qemu-mirror: bytes of copy buffers in flight "
                             "(default 16M, QEMU's default)")
    parser.add_argument("--buf-sizes", type=_buf_sizes_list, default=None, metavar="LIST",
                        help="run fastmirror and qemu-mirror once per buffer size, e.g. "
                             "16M,64M; an entry BUF:IO (e.g. 64M:4M) runs fastmirror with "
                             "copy requests of up to IO bytes (EXPERIMENTAL: it overrides "
                             "fastmirror's io_size for that job; QEMU derives its own, "
                             "max(BUF/16, 1M))")
    parser.add_argument("--io-engines", type=_io_engines_list, default=["auto"], metavar="LIST",
                        help="run fastmirror once per I/O engine, of auto,io_uring,threads "
                             "(default auto: io_uring where the kernel allows it)")
    parser.add_argument("--fresh-target", action="store_true",
                        help="truncate a file DST to zero and back to size before every "
                             "run, so each tool writes into unallocated space (default: "
                             "overwrite allocated blocks in place)")
    parser.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                        help="do not drop the page cache between runs")
    parser.add_argument("--verify", action="store_true",
                        help="compare the whole target with the source after every bulk "
                             "copy (untimed)")
    parser.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                        help="give up on one run after this long (default: 60 s plus "
                             "1 s per 20 MB)")
    parser.add_argument("--order", choices=("shuffle", "rotate"), default="shuffle",
                        help="order of the tools within a round: shuffled with --seed "
                             "(default; no tool always follows the same one) or rotated")
    parser.add_argument("--seed", type=_nonnegative, default=1,
                        help="seed of the shuffled order (default 1)")
    parser.add_argument("--settle", type=_nonneg_seconds, default=1.0, metavar="SECONDS",
                        help="pause after syncing and dropping the cache, before each run "
                             "(default 1 s), so that a run does not pay for the previous "
                             "one's writeback")
    parser.add_argument("--fio-engine", choices=("auto", "io_uring", "libaio", "psync"),
                        default="auto",
                        help="fio's I/O engine for the ceilings (default: io_uring when it "
                             "works here, else libaio)")
    w = parser.add_argument_group("writer rounds")
    w.add_argument("--writer-rates", type=_rates_list, default=None, metavar="LIST",
                   help="measure time to READY of fastmirror and qemu-mirror while a writer "
                        "writes random 4-64 KiB blocks to SRC at each rate: bytes/s with "
                        "binary units (50M = 50 MiB/s), 0 for none, max for unthrottled; "
                        "e.g. 0,50M,200M,max")
    w.add_argument("--copy-modes", type=_modes_list, default=["auto"], metavar="LIST",
                   help="writer rounds: fastmirror copy modes to run, of %s (default auto); "
                        "qemu-mirror runs those of background,write-blocking listed, or "
                        "background (its default) when none is" % ",".join(COPY_MODES))
    w.add_argument("--writer-timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="writer rounds: a job not READY after this long is cancelled and "
                        "reported as not converged (default: 10 s plus 1 s per 50 MB)")
    w.add_argument("--qemu-writer", choices=("auto", "fio", "qemu-io"), default="auto",
                   help="what writes to QEMU's NBD export (default: fio --ioengine=nbd "
                        "when it works, else qemu-io)")
    w.add_argument("--writer-depth", type=_positive, default=4,
                   help="writes in flight: fastmirror's writer threads (the rate is shared "
                        "between them), fio's iodepth for QEMU (qemu-io: always 1); "
                        "default 4 (one synchronous writer on a disk that the copy keeps "
                        "busy reaches a few MB/s, whatever the rate asked)")
    w.add_argument("--no-bulk", dest="bulk", action="store_false",
                   help="with --writer-rates: skip the bulk rounds")
    parser.add_argument("--destroy-target", action="store_true",
                        help="allow writing to a block device DST: ITS DATA WILL BE "
                             "DESTROYED")
    parser.add_argument("--destroy-source", action="store_true",
                        help="allow writer rounds to write random data into an existing "
                             "SRC (file or block device): ITS DATA WILL BE DESTROYED")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write every raw run and the summary as JSON to FILE "
                             "('-' for stdout)")
    parser.add_argument("--chart", metavar="FILE.png", default=None,
                        help="draw a bar chart (throughput per tool with min-max whiskers; "
                             "time to READY per writer rate) when matplotlib is installed")


# ---------------------------------------------------------------------------
# What runs
# ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Variant:
    """One row of the report: a tool with its settings."""
    label: str
    tool: str                          # a TOOLS entry or a FIO_PARTS one
    buf_size: int = 16 << 20
    max_io: Optional[int] = None       # fastmirror: io_size (bytes per copy)
    copy_mode: Optional[str] = None    # writer rounds: the mirror's copy mode
    io_engine: str = "auto"            # fastmirror: MirrorJob's io_engine


@dataclass
class Run:
    tool: str                       # the variant's label
    round: int                      # 1-based; 0 for warm-up rounds
    warmup: bool
    bytes: int
    ok: bool = False
    wall_s: float = 0.0
    ready_s: Optional[float] = None  # mirrors: seconds to READY
    user_s: float = 0.0
    sys_s: float = 0.0
    returncode: Optional[int] = None
    error: Optional[str] = None
    command: Optional[list] = None
    detail: dict = field(default_factory=dict)
    # writer rounds
    writer_rate: Optional[str] = None      # the rate's label ("0", "50M", "max")
    copy_mode: Optional[str] = None        # the copy mode asked for
    converged: Optional[bool] = None       # READY reached within the writer timeout

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def bytes_per_s(self) -> float:
        return self.bytes / self.wall_s if self.wall_s > 0 else 0.0

    @property
    def gbps(self) -> float:
        return self.bytes_per_s / GB

    @property
    def mibps(self) -> float:
        return self.bytes_per_s / MiB

    @property
    def cpu_s_per_gib(self) -> float:
        return self.cpu_s / (self.bytes / GiB) if self.bytes else 0.0

    @property
    def ready_gbps(self) -> Optional[float]:
        if self.ready_s is None or self.ready_s <= 0:
            return None
        return self.bytes / self.ready_s / GB

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(cpu_s=self.cpu_s, bytes_per_s=self.bytes_per_s, gbps=self.gbps,
                 mibps=self.mibps, cpu_s_per_gib=self.cpu_s_per_gib,
                 ready_gbps=self.ready_gbps)
        return d


def find_tool(tool: str) -> tuple[Optional[str], Optional[str]]:
    """(path, None) when `tool` can run here, else (None, why not)."""
    if tool == "fastmirror":
        try:
            import fastmirror  # noqa: F401
        except ImportError as e:     # pragma: no cover - we are fastmirror
            return None, "fastmirror does not import: %s" % e
        return "fastmirror", None
    if tool == "qemu-mirror":
        path = shutil.which("qemu-storage-daemon")
        if path is None:
            return None, ("qemu-storage-daemon is not installed (Debian: "
                          "qemu-system-common)")
        return path, None
    if tool in FIO_PARTS:
        tool = "fio"
    path = shutil.which(tool)
    if path is None:
        return None, "%s is not installed (not on PATH)" % tool
    return path, None


def _fio_filename(path: str) -> str:
    return path.replace("\\", "\\\\").replace(":", "\\:")


@dataclass(frozen=True)
class CopyShape:
    """fio-copy's requests, shaped as fastmirror's copies: `io_size` bytes
    each, `depth` in flight per fio job; buffers in huge pages of
    `huge_page` bytes from files under the hugetlbfs mount `huge_dir`, or
    ordinary pages when huge_dir is None."""
    io_size: int = 2 << 20
    depth: int = 8
    huge_dir: Optional[str] = None
    huge_page: int = 2 << 20

    @property
    def buffers(self) -> str:
        return "huge pages" if self.huge_dir else "%s pages" % short(mmap.PAGESIZE)

    def hugepages_needed(self) -> int:
        """Huge pages for both jobs: fio maps depth x io_size plus a page of
        slack for O_DIRECT alignment per job, rounded up to whole huge
        pages (fio's init_io_u); one spare per job in case a version asks
        for more."""
        per_job = -(-(self.depth * self.io_size + mmap.PAGESIZE) // self.huge_page)
        return 2 * (per_job + 1)


def copy_shape(buf_size: int, granularity: int, io_size: Optional[int] = None) -> CopyShape:
    """The bytes per copy and copies in flight of MirrorJob(buf_size=,
    granularity=, io_size=): the job's own derivation."""
    from fastmirror.job.mirror import copy_shape as job_copy_shape
    return CopyShape(*job_copy_shape(buf_size, granularity, io_size))


def _hugepage_size() -> Optional[int]:
    """The kernel's default huge page size (what nr_hugepages counts), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("Hugepagesize:"):
                    return int(line.split()[1]) * KiB
    except (OSError, ValueError, IndexError):
        pass
    return None


class HugePages:
    """Huge pages for fio-copy's buffers: setup() reserves `pages` more
    through /proc/sys/vm/nr_hugepages and mounts hugetlbfs on a temporary
    directory (root only); undo() unmounts, removes the directory and gives
    the pages back.  When setup() cannot, `why` says why and `dir` stays
    None: fio-copy then runs with ordinary buffers."""

    NR = "/proc/sys/vm/nr_hugepages"

    def __init__(self) -> None:
        self.dir: Optional[str] = None
        self.page = _hugepage_size()
        self.pages = 0                  # reserved by us
        self.why: Optional[str] = None
        self.before: Optional[int] = None
        self._mounted = False

    def _read_nr(self) -> int:
        with open(self.NR) as f:
            return int(f.read())

    def _write_nr(self, n: int) -> None:
        with open(self.NR, "w") as f:
            f.write("%d\n" % n)

    def setup(self, pages: int) -> bool:
        if os.environ.get(HUGEPAGES_OFF) == "1":
            self.why = "disabled by %s=1" % HUGEPAGES_OFF
        elif self.page is None:
            self.why = "the kernel has no huge pages (no Hugepagesize in /proc/meminfo)"
        elif os.geteuid() != 0:
            self.why = "not root: reserving huge pages and mounting hugetlbfs need root"
        elif shutil.which("mount") is None or shutil.which("umount") is None:
            self.why = "mount or umount is not installed"
        if self.why is not None:
            return False
        try:
            self.before = self._read_nr()
            self._write_nr(self.before + pages)
            got = self._read_nr() - self.before
        except (OSError, ValueError) as e:
            self.why = "cannot reserve huge pages in %s: %s" % (self.NR, e)
            return False
        self.pages = max(0, got)
        if got < pages:
            self.why = "the kernel gave %d of the %d huge pages asked (memory too " \
                       "fragmented or too little free)" % (got, pages)
            self.undo()
            return False
        self.dir = tempfile.mkdtemp(prefix="fastmirror-bench-hugetlbfs-")
        p = subprocess.run(["mount", "-t", "hugetlbfs", "-o", "mode=0700,pagesize=%dK"
                            % (self.page // KiB), "none", self.dir],
                           capture_output=True, text=True)
        if p.returncode != 0:
            self.why = "cannot mount hugetlbfs: %s" % (p.stderr.strip() or
                                                       "mount exit status %d" % p.returncode)
            self.undo()
            return False
        self._mounted = True
        return True

    def undo(self) -> None:
        """Unmount, remove the directory, give the pages back; idempotent."""
        if self._mounted:
            p = subprocess.run(["umount", self.dir], capture_output=True, text=True)
            if p.returncode != 0:   # a fio still running: detach now, freed when it exits
                subprocess.run(["umount", "-l", self.dir], capture_output=True)
            self._mounted = False
        if self.dir is not None:
            try:
                os.rmdir(self.dir)
            except OSError:
                pass
            self.dir = None
        if self.pages:
            try:
                # Give back only ours: another user may have raised it meanwhile.
                self._write_nr(max(0, self._read_nr() - self.pages))
            except (OSError, ValueError):
                pass
            self.pages = 0

    def describe(self) -> str:
        if self.dir is not None:
            return ("%d huge pages of %s reserved (nr_hugepages %d -> %d), hugetlbfs "
                    "mounted on %s; both undone at the end"
                    % (self.pages, short(self.page or 0, "iB"), self.before or 0,
                       (self.before or 0) + self.pages, self.dir))
        return ("huge pages unavailable (%s): fio-copy runs with ordinary %s-page buffers, "
                "whose requests the block layer splits; fastmirror can beat that ceiling"
                % (self.why, short(mmap.PAGESIZE, "iB")))


def tool_command(tool: str, src: str, dst: str, path: Optional[str] = None, *,
                 size: Optional[int] = None, engine: str = "libaio",
                 buf_size: int = 16 << 20, granularity: int = 65536,
                 copy_mode: str = "background",
                 shape: Optional[CopyShape] = None) -> list[str]:
    """The baseline's command line, as run (for qemu-mirror: the QMP command;
    for fio-copy: with `shape`, by default fastmirror's default copies)."""
    if tool == "dd":
        return [path or "dd", "if=" + src, "of=" + dst, "bs=4M", "iflag=direct",
                "oflag=direct", "conv=notrunc,fdatasync", "status=none"]
    if tool == "qemu-img":
        return [path or "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                "-t", "none", "-T", "none", "-m", "16", "-W", src, dst]
    if tool == "qemu-mirror":
        return [path or "qemu-storage-daemon", "--blockdev",
                "file,filename=%s,cache.direct=on,aio=native (+raw)" % src,
                "--blockdev", "file,filename=%s,cache.direct=on,aio=native (+raw)" % dst,
                "QMP:", "blockdev-mirror", "sync=full", "granularity=%d" % granularity,
                "buf-size=%d" % buf_size, "copy-mode=%s" % copy_mode,
                "; at BLOCK_JOB_READY:", "block-job-complete"]
    if tool in FIO_PARTS:
        bs, depth, extra = "1M", 16, []
        read = ["--name=read", "--filename=%s" % _fio_filename(src), "--rw=read"]
        write = ["--name=write", "--filename=%s" % _fio_filename(dst), "--rw=write",
                 "--end_fsync=1", "--fallocate=none"]
        if tool == "fio-copy":
            shape = shape or CopyShape()
            bs, depth = str(shape.io_size), shape.depth
            if shape.huge_dir:
                # A file per job: fio maps it shared, and the two jobs
                # must not share buffers.  fio unlinks it at the end.
                extra = ["--hugepage-size=%d" % shape.huge_page]
                read.append("--mem=mmaphuge:%s" % _fio_filename(
                    os.path.join(shape.huge_dir, "read")))
                write.append("--mem=mmaphuge:%s" % _fio_filename(
                    os.path.join(shape.huge_dir, "write")))
        cmd = [path or "fio", "--output-format=json", "--direct=1", "--bs=%s" % bs,
               "--iodepth=%d" % depth, "--ioengine=%s" % engine,
               "--size=%s" % (size if size is not None else "SIZE")] + extra
        if tool == "fio-read":
            return cmd + ["--readonly"] + read
        if tool == "fio-write":
            return cmd + write
        return cmd + read + write
    raise ValueError("no command for %r" % tool)


def fio_engine(fio: str, src: str, want: str = "auto") -> str:
    """The fio engine for the ceilings: `want`, or with "auto" the first of
    io_uring and libaio that reads 4 KiB of SRC with O_DIRECT here."""
    if want != "auto":
        return want
    for engine in ("io_uring", "libaio"):
        try:
            p = subprocess.run([fio, "--output-format=json", "--name=probe", "--readonly",
                                "--filename=%s" % _fio_filename(src), "--rw=read",
                                "--bs=4k", "--size=4k", "--direct=1",
                                "--ioengine=%s" % engine], capture_output=True, timeout=30)
            if p.returncode == 0 and not _fio_jobs(p.stdout)[0].get("error"):
                return engine
        except (OSError, subprocess.SubprocessError, ValueError, IndexError, KeyError):
            continue
    return "psync"


def _fio_jobs(out: bytes) -> list[dict]:
    text = out.decode(errors="replace")
    return json.loads(text[text.index("{"):])["jobs"]


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


def _rusage(who: int) -> tuple[float, float]:
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


def _run_command(tool: str, cmd: list[str], size: int,
                 timeout: Optional[float]) -> tuple[Run, bytes]:
    run = Run(tool, 0, False, size, command=cmd)
    u0, s0 = _rusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        run.wall_s = time.perf_counter() - t0
        run.error = "timed out after %.0f s" % (timeout or 0)
        return run, b""
    except OSError as e:
        run.error = "cannot run %s: %s" % (cmd[0], e)
        return run, b""
    run.wall_s = time.perf_counter() - t0
    u1, s1 = _rusage(resource.RUSAGE_CHILDREN)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    run.returncode = p.returncode
    run.ok = p.returncode == 0
    if not run.ok:
        msg = (p.stderr or p.stdout or b"").decode(errors="replace").strip()
        run.error = "exit status %d%s" % (p.returncode, (": " + msg[-500:]) if msg else "")
    return run, p.stdout


def _run_fio(part: str, src: str, dst: str, size: int, timeout: Optional[float],
             path: Optional[str], engine: str, shape: Optional[CopyShape] = None) -> Run:
    if part == "fio-copy":
        shape = shape or CopyShape()
    cmd = tool_command(part, src, dst, path, size=size, engine=engine, shape=shape)
    run, out = _run_command(part, cmd, size, timeout)
    if not run.ok:
        # fio prints why in its JSON (stdout), per job, not on stderr.
        try:
            why = ["job %s: error %d (%s)" % (j["jobname"], j["error"], os.strerror(j["error"]))
                   for j in _fio_jobs(out) if j.get("error")]
        except (ValueError, KeyError, IndexError, TypeError):
            why = []
        if why:
            run.error = "exit status %s: %s" % (run.returncode, "; ".join(why))
        return run
    try:
        jobs = {j["jobname"]: j for j in _fio_jobs(out)}
        runtimes = []
        user = system = 0.0
        for name in ("read", "write"):
            j = jobs.get(name)
            if j is None:
                continue
            if j.get("error"):
                raise ValueError("fio job %s failed with error %s" % (name, j["error"]))
            d = j[name]
            if d["io_bytes"] < size:
                raise ValueError("fio job %s moved %d bytes, not %d" % (name, d["io_bytes"],
                                                                       size))
            runtimes.append(d["runtime"] / 1000.0)
            run.detail[name + "_gbps"] = d["bw_bytes"] / GB
            run.detail[name + "_runtime_s"] = d["runtime"] / 1000.0
            # usr_cpu and sys_cpu are percentages of the job's run time.
            user += j["usr_cpu"] / 100.0 * j["job_runtime"] / 1000.0
            system += j["sys_cpu"] / 100.0 * j["job_runtime"] / 1000.0
        if not runtimes or min(runtimes) <= 0:
            raise ValueError("fio reported no runtime")
    except (ValueError, KeyError, IndexError, TypeError) as e:
        run.ok = False
        run.error = "cannot read fio's report: %s" % e
        return run
    # The process's CPU (RUSAGE_CHILDREN) also counts fio's start-up and
    # its set-up of the buffers; fio's own figures are of the I/O alone.
    run.detail.update(engine=engine, process_wall_s=run.wall_s, process_user_s=run.user_s,
                      process_sys_s=run.sys_s, fio_user_s=user, fio_sys_s=system,
                      buffers=(shape or CopyShape()).buffers)
    if shape is not None:
        run.detail.update(io_size=shape.io_size, iodepth=shape.depth)
    run.user_s, run.sys_s = user, system
    run.wall_s = max(runtimes)   # fio's own time, without its start-up
    return run


# ---------------------------------------------------------------------------
# Writers: random 4-64 KiB blocks, paced to a rate
# ---------------------------------------------------------------------------

def _blocks(size: int, seed: int):
    """Endless (offset, length): lengths uniform over 4..64 KiB in 4 KiB
    steps, offsets 4 KiB aligned and uniform over the disk."""
    rng = random.Random(seed)
    top = max(WRITE_ALIGN, min(WRITE_MAX, size // WRITE_ALIGN * WRITE_ALIGN))
    steps = top // WRITE_ALIGN
    while True:
        n = rng.randint(WRITE_MIN // WRITE_ALIGN, steps) * WRITE_ALIGN if steps >= 1 else top
        slots = (size - n) // WRITE_ALIGN + 1
        yield rng.randrange(slots) * WRITE_ALIGN, n


class _Writer:
    """Bytes written over time, as samples (perf_counter, bytes)."""

    kind = "writer"

    def __init__(self, size: int, rate: Optional[int]):
        self.size = size
        self.rate = rate                  # bytes/s; None: unthrottled
        self.samples: list[tuple[float, float]] = []
        self.bytes = 0
        self.writes = 0
        self.error: Optional[str] = None
        self._stop = threading.Event()
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

    def _pace(self, t0: float) -> None:
        if self.rate:
            delay = t0 + self.bytes / self.rate - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)

    def describe(self) -> str:
        return self.kind


class _ThreadWriter(_Writer):
    """fastmirror: `depth` threads of this process writing through
    job.source, each paced to rate/depth."""

    kind = "threads writing through job.source"

    def __init__(self, write: Callable, size: int, rate: Optional[int], depth: int = 1,
                 seed: int = 1):
        super().__init__(size, rate)
        self._write = write
        self.depth = depth
        self._threads = [threading.Thread(target=self._run, args=(seed + i,),
                                          name="bench-writer-%d" % i, daemon=True)
                         for i in range(depth)]

    def start(self) -> None:
        self._sample(force=True)
        for t in self._threads:
            t.start()

    def _run(self, seed: int) -> None:
        data = memoryview(os.urandom(WRITE_MAX))
        rate = self.rate / self.depth if self.rate else None
        mine = 0
        t0 = time.perf_counter()
        for off, n in _blocks(self.size, seed):
            if self._stop.is_set():
                break
            try:
                self._write(data[:n], off)
            except (OSError, ValueError) as e:
                if not self._stop.is_set():
                    self.error = "write of %d bytes at %d failed: %s" % (n, off, e)
                break
            mine += n
            with self._lock:
                self.bytes += n
                self.writes += 1
            self._sample()
            if rate:
                delay = t0 + mine / rate - time.perf_counter()
                if delay > 0:
                    self._stop.wait(delay)
        self._sample(force=True)

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            if t.ident is not None:
                t.join(60)

    def describe(self) -> str:
        return "%d thread%s writing through job.source" % (self.depth,
                                                            "s" if self.depth != 1 else "")


class _FioNbdWriter(_Writer):
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
        if self.proc is None or self._stop.is_set():
            return
        self._stop.set()
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


class _QemuIoWriter(_Writer):
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
            for off, n in _blocks(self.size, self._seed):
                if self._stop.is_set():
                    break
                self.proc.stdin.write(b"write -q %d %d\n" % (off, n))
                self.proc.stdin.flush()
                rest = self._wait_prompt(rest)
                self.bytes += n
                self.writes += 1
                self._started.set()
                self._sample()
                self._pace(t0)
        except (OSError, ValueError) as e:
            if not self._stop.is_set():
                self.error = "qemu-io writer: %s" % e
        finally:
            self._started.set()
            self._sample(force=True)

    def wait_started(self, timeout: float) -> bool:
        return self._started.wait(timeout) and self.bytes > 0

    def stop(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
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


# ---------------------------------------------------------------------------
# The mirror jobs
# ---------------------------------------------------------------------------

def _run_fastmirror(src: str, dst: str, size: int, granularity: int, buf_size: int,
                    timeout: Optional[float], *, max_io: Optional[int] = None,
                    copy_mode: str = "auto", writer: Optional[tuple[str, Optional[int]]] = None,
                    ready_timeout: Optional[float] = None, writer_depth: int = 4,
                    label: str = "fastmirror", io_engine: str = "auto") -> Run:
    """One fastmirror job.  writer=None: a bulk run, timed from building the
    job.  writer=(label, rate): a writer round, timed from start(); a job not
    READY after ready_timeout is cancelled (converged=False)."""
    from fastmirror import EventType, JobStateError, MirrorJob

    rate_label, rate = writer if writer is not None else (None, 0)
    run = Run(label, 0, False, size,
              command=["MirrorJob(%r, %r, granularity=%d, buf_size=%d, copy_mode=%r%s%s)"
                       % (src, dst, granularity, buf_size, copy_mode,
                          ", io_size=%d" % max_io if max_io else "",
                          ", io_engine=%r" % io_engine if io_engine != "auto" else "")],
              writer_rate=rate_label, copy_mode=copy_mode if writer is not None else None)
    if ready_timeout is None:
        ready_timeout = timeout
    u0, s0 = _rusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> Optional[float]:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    try:
        job = MirrorJob(src, dst, granularity=granularity, buf_size=buf_size,
                        copy_mode=copy_mode, io_size=max_io, io_engine=io_engine)
    except (OSError, ValueError) as e:
        run.error = "MirrorJob refused: %s" % e
        return run
    events: list[tuple[float, object]] = []
    job.add_listener(lambda ev: events.append((time.perf_counter(), ev)))
    w: Optional[_ThreadWriter] = None
    if writer is not None and rate != 0 and size >= WRITE_ALIGN:
        w = _ThreadWriter(job.source.pwrite, size, rate, writer_depth)
    final = None
    t_ready = None
    try:
        t_start = time.perf_counter()
        if writer is not None:
            t0 = t_start
        job.start()
        if w is not None:
            w.start()
        ready = job.wait_ready(ready_timeout)
        t_stop = time.perf_counter()
        if ready:
            t_ready = next((t for t, ev in events if ev.type == EventType.READY), t_stop)
            try:
                job.complete()
            except JobStateError:
                pass            # it ended meanwhile: wait() says how
            final = job.wait(left())
        else:
            if w is not None:
                w.stop()        # first: a busy writer can hold up the job's end
            if job.wait(0) is None:
                job.cancel(force=True)
            final = job.wait(60)
        t_end = time.perf_counter()
        run.wall_s = t_end - t0
        st = job.status()
        run.ready_s = (t_ready - t0) if t_ready is not None else None
        engine = getattr(job, "_engine", None)
        run.detail = {
            "io_mode": getattr(st, "io_mode", None),
            "io_engine": getattr(st, "io_engine", None),
            "bytes_copied": getattr(st, "bytes_copied", None),
            "nworkers": getattr(engine, "nworkers", None),
            "max_io": getattr(engine, "max_io", None),
            "buf_size": buf_size,
            "bytes_zero_detected": getattr(engine, "bytes_zero_detected", None),
        }
        if writer is not None:
            run.converged = bool(ready)
            switch = next((t for t, ev in events if ev.type == EventType.COPY_MODE), None)
            run.detail.update(
                copy_mode_final=getattr(st, "copy_mode", None),
                copy_mode_switch_s=(switch - t0) if switch is not None else None,
                chunks_copied=getattr(st, "chunks_copied", None),
                chunks_recopied=getattr(st, "chunks_recopied", None),
                extra_bytes_copied=max(0, (getattr(st, "bytes_copied", None) or 0) - size),
                ready_timeout=ready_timeout,
            )
        if writer is not None and ready:
            run.detail["completed"] = final is not None and final.type == EventType.COMPLETED
        if final is None:
            run.error = "timed out after %.0f s (state %s)" % (timeout or 0, st.state)
        elif ready and final.type != EventType.COMPLETED:
            run.error = "job ended %s%s" % (final.type.value,
                                             (": %s" % final.error) if final.error else "")
        elif not ready and final.type == EventType.FAILED:
            run.error = "job FAILED before READY: %s" % final.error
        elif not ready and writer is None:
            run.error = "no READY within %.0f s; cancelled" % (ready_timeout or 0)
        else:
            run.ok = True
    finally:
        if w is not None:
            if job.wait(0) is None:
                job.cancel(force=True)   # a drain holds writers at its gate: let them go
            w.stop()
        job.close()       # a job still running is cancelled (force) and joined
    u1, s1 = _rusage(resource.RUSAGE_SELF)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    if w is not None:
        _writer_detail(run, w, t0, t_ready if t_ready is not None else t_stop)
        if w.error and run.ok:
            run.ok = False
            run.error = w.error
    return run


def _writer_detail(run: Run, w: _Writer, t0: float, t1: float) -> None:
    """The writer's achieved rate from the job's start to READY (or to the
    timeout), and over its whole life."""
    to_ready = w.rate_between(t0, t1)
    whole = w.rate_between(w.samples[0][0], w.samples[-1][0]) if len(w.samples) > 1 else None
    run.detail.update(
        writer=w.describe(),
        writer_rate_asked=w.rate,
        writer_bytes=w.bytes,
        writer_writes=w.writes,
        writer_bytes_to_ready=(w.bytes_at(t1) - w.bytes_at(t0)),
        writer_rate_to_ready=to_ready,
        writer_rate_whole=whole,
        writer_error=w.error,
    )


def _qemu_daemon_class():
    from fastmirror.bench import qemu

    class BenchDaemon(qemu.StorageDaemon):
        """StorageDaemon plus what the bench needs: a mirror to a target
        larger than the source (a raw node of the source's size on top of
        it: QEMU refuses different sizes), waiting on events with select()
        (a timed-out socket read would break the QMP connection), a forced
        cancel, and user and system CPU apart."""

        def start_mirror(self, size: int, granularity: int, buf_size: int,
                         copy_mode: str) -> None:
            target = "dst"
            if _device_size(self.target) > size:
                self.qmp.execute("blockdev-add", driver="raw", node_name="dst-sized",
                                 file="dst-file", offset=0, size=size)
                target = "dst-sized"
            self.qmp.execute("blockdev-mirror", job_id="mirror", device="src",
                             target=target, sync="full", granularity=granularity,
                             buf_size=buf_size, copy_mode=copy_mode, auto_finalize=True,
                             auto_dismiss=True)

        def wait_for(self, names: Sequence[str], timeout: Optional[float]) -> Optional[dict]:
            import select
            deadline = None if timeout is None else time.monotonic() + timeout
            while True:
                for i, ev in enumerate(self.qmp.events):
                    if ev.get("event") in names and \
                            ev.get("data", {}).get("device") in ("mirror", None):
                        return self.qmp.events.pop(i)
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                readable, _, _ = select.select([self.qmp.sock], [], [], left)
                if readable:
                    self.qmp.sock.settimeout(60)
                    self.qmp.events.append(self.qmp._read())

        def complete_job(self, timeout: Optional[float]) -> Optional[dict]:
            self.qmp.execute("block-job-complete", device="mirror")
            return self.wait_for(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), timeout)

        def cancel_job(self, timeout: Optional[float]) -> Optional[dict]:
            try:
                self.qmp.execute("block-job-cancel", device="mirror", force=True)
            except qemu.QMPError:
                pass        # already gone: its event is queued
            return self.wait_for(("BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"), timeout)

        def cpu(self) -> tuple[float, float]:
            with open("/proc/%d/stat" % self.proc.pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks = os.sysconf("SC_CLK_TCK")
            return int(fields[11]) / ticks, int(fields[12]) / ticks

    return BenchDaemon


def _run_qemu_mirror(src: str, dst: str, size: int, granularity: int, buf_size: int,
                     timeout: Optional[float], *, copy_mode: str = "background",
                     writer: Optional[tuple[str, Optional[int]]] = None,
                     ready_timeout: Optional[float] = None, writer_kind: Optional[str] = None,
                     writer_path: Optional[str] = None, writer_depth: int = 4,
                     label: str = "qemu-mirror") -> Run:
    """QEMU's mirror job in qemu-storage-daemon: blockdev-mirror, READY,
    block-job-complete, COMPLETED.  writer=(label, rate): with the source
    exported over NBD and written by fio (or qemu-io) at that rate."""
    from fastmirror.bench import qemu

    rate_label, rate = writer if writer is not None else (None, 0)
    run = Run(label, 0, False, size, writer_rate=rate_label,
              copy_mode=copy_mode if writer is not None else None,
              command=tool_command("qemu-mirror", src, dst, buf_size=buf_size,
                                   granularity=granularity, copy_mode=copy_mode))
    if ready_timeout is None:
        ready_timeout = timeout
    t_launch = time.perf_counter()
    try:
        d = _qemu_daemon_class()(src, dst, export=writer is not None)
    except (OSError, qemu.QMPError) as e:
        run.error = "qemu-storage-daemon: %s" % e
        return run
    w: Optional[_Writer] = None
    t0 = t_ready = t_stop = None
    try:
        run.detail["daemon_start_s"] = time.perf_counter() - t_launch
        if writer is not None and rate != 0 and size >= WRITE_ALIGN:
            uri = "nbd+unix:///src?socket=%s" % d.nbd_path
            if writer_kind == "fio":
                w = _FioNbdWriter(writer_path or "fio", uri, size, rate, writer_depth)
            elif writer_kind == "qemu-io":
                w = _QemuIoWriter(writer_path or "qemu-io", uri, size, rate)
            else:
                run.error = "no writer for QEMU's NBD export (fio with nbd, or qemu-io)"
                return run
            w.start()
            if not w.wait_started(30):
                w.stop()
                run.error = w.error or "the %s writer did not start writing" % w.kind
                return run
        u0, s0 = d.cpu()
        t0 = time.perf_counter()
        d.start_mirror(size, granularity, buf_size, copy_mode)
        ready = d.wait_for(("BLOCK_JOB_READY", "BLOCK_JOB_COMPLETED", "BLOCK_JOB_CANCELLED"),
                           ready_timeout)
        t_stop = time.perf_counter()
        if ready is not None and ready["event"] == "BLOCK_JOB_READY":
            t_ready = t_stop
            run.ready_s = t_ready - t0
            left = None if timeout is None else max(1.0, timeout - (t_stop - t0))
            done = d.complete_job(left)
            if done is None and writer is not None:
                # QEMU lets the writer go on until the source is clean, which
                # a busy writer may never allow: a result, not a failure.
                if w is not None:
                    w.stop()
                not_completed = "no COMPLETED within %.0f s of READY (writer still " \
                                "writing); cancelled" % (left or 0)
                done = d.cancel_job(60)
                if done is not None:
                    run.detail["completed"] = False
                    run.detail["note"] = not_completed
        elif ready is not None:
            done = ready          # ended before READY
        else:
            if w is not None:
                w.stop()
            done = d.cancel_job(60)
        t_end = time.perf_counter()
        u1, s1 = d.cpu()
        run.wall_s = t_end - t0
        run.user_s, run.sys_s = u1 - u0, s1 - s0
        data = (done or {}).get("data", {})
        run.detail.update(buf_size=buf_size, max_io=max(buf_size // 16, MiB),
                          qemu_len=data.get("len"), qemu_offset=data.get("offset"))
        if writer is not None:
            run.converged = t_ready is not None
            run.detail.update(
                copy_mode_final=copy_mode,
                extra_bytes_copied=max(0, (data.get("len") or size) - size),
                ready_timeout=ready_timeout)
        if done is None:
            run.error = "timed out after %.0f s waiting for the job to end" % (timeout or 0)
        elif data.get("error"):
            run.error = "job ended %s: %s" % (done["event"], data["error"])
        elif t_ready is not None and done["event"] != "BLOCK_JOB_COMPLETED" \
                and run.detail.get("completed") is not False:
            run.error = "job ended %s after READY" % done["event"]
        elif t_ready is None and ready is not None:
            run.error = "job ended %s before READY" % ready["event"]
        elif t_ready is None and writer is None:
            run.error = "no READY within %.0f s; cancelled" % (ready_timeout or 0)
        else:
            run.ok = True
            if writer is not None and t_ready is not None:
                run.detail.setdefault("completed", True)
    except (OSError, qemu.QMPError, ValueError) as e:
        run.ok = False
        run.error = "QMP: %s" % e
    finally:
        if w is not None:
            w.stop()
        d.close()
    if w is not None and t0 is not None:
        _writer_detail(run, w, t0, t_ready if t_ready is not None else (t_stop or t0))
        if w.error and run.ok:
            run.ok = False
            run.error = w.error
    return run


def run_tool(tool: str, src: str, dst: str, size: int, *, granularity: int = 65536,
             buf_size: int = 16 << 20, timeout: Optional[float] = None,
             path: Optional[str] = None, max_io: Optional[int] = None,
             engine: str = "libaio", label: Optional[str] = None,
             io_engine: str = "auto", shape: Optional[CopyShape] = None) -> Run:
    """Run one tool once, copying [0, size) of src to dst; timed (fio parts:
    the ceilings, not a copy; fio-copy shaped by `shape`)."""
    if tool == "fastmirror":
        return _run_fastmirror(src, dst, size, granularity, buf_size, timeout,
                               max_io=max_io, label=label or tool, io_engine=io_engine)
    if tool == "qemu-mirror":
        return _run_qemu_mirror(src, dst, size, granularity, buf_size, timeout,
                                label=label or tool)
    if tool in FIO_PARTS:
        return _run_fio(tool, src, dst, size, timeout, path, engine,
                        shape if tool == "fio-copy" else None)
    run, _ = _run_command(label or tool, tool_command(tool, src, dst, path), size, timeout)
    return run


def run_writer(variant: Variant, src: str, dst: str, size: int, rate_label: str,
               rate: Optional[int], *, granularity: int = 65536,
               timeout: Optional[float] = None, ready_timeout: Optional[float] = None,
               writer_kind: Optional[str] = None, writer_path: Optional[str] = None,
               writer_depth: int = 4) -> Run:
    """One writer round of a mirror: the job runs while a writer writes at
    `rate` (0: none; None: unthrottled)."""
    if variant.tool == "fastmirror":
        return _run_fastmirror(src, dst, size, granularity, variant.buf_size, timeout,
                               max_io=variant.max_io, copy_mode=variant.copy_mode or "auto",
                               writer=(rate_label, rate), ready_timeout=ready_timeout,
                               writer_depth=writer_depth, label=variant.label,
                               io_engine=variant.io_engine)
    if variant.tool == "qemu-mirror":
        if writer_kind is None and rate != 0:
            writer_kind, writer_path, _ = qemu_writer()
        return _run_qemu_mirror(src, dst, size, granularity, variant.buf_size, timeout,
                                copy_mode=variant.copy_mode or "background",
                                writer=(rate_label, rate), ready_timeout=ready_timeout,
                                writer_kind=writer_kind, writer_path=writer_path,
                                writer_depth=writer_depth, label=variant.label)
    raise ValueError("%s is not a mirror job" % variant.tool)


# ---------------------------------------------------------------------------
# Source, target, page cache
# ---------------------------------------------------------------------------

def create_source(path: str, size: int, chunk: int = 8 << 20) -> None:
    """Create `path` (which must not exist) with `size` bytes of non-zero
    pseudo-random data and no holes: an 8 MiB block from os.urandom, rotated
    by a different offset for every chunk, so that no chunk repeats its
    neighbour and no block is zero (zero detection and hole skipping cannot
    spare anybody any work)."""
    pool = os.urandom(chunk)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        pos = i = 0
        while pos < size:
            k = (i * 7919 * 512) % chunk
            buf = pool[k:] + pool[:k]
            n = min(chunk, size - pos)
            view = memoryview(buf)[:n]
            while view:
                w = os.pwrite(fd, view, pos)
                view = view[w:]
                pos += w
            i += 1
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(path)
        except OSError:
            pass
        raise
    os.close(fd)


def drop_caches() -> bool:
    """sync, then drop clean page cache, dentries and inodes; True when
    dropped (needs root)."""
    os.sync()
    if os.geteuid() != 0:
        return False
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _device_size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _marker_offsets(size: int) -> list[int]:
    if size < MARK:
        return []
    last = (size - MARK) // MARK * MARK
    return sorted({0, (size // 2) // MARK * MARK, last})


def _open_maybe_direct(path: str, flags: int) -> int:
    direct = getattr(os, "O_DIRECT", 0)
    try:
        return os.open(path, flags | direct | os.O_CLOEXEC)
    except OSError:
        return os.open(path, flags | os.O_CLOEXEC)


def reset_target(dst: str, size: int, fresh: bool = False) -> None:
    """Before a run: a file target is truncated to nothing and back to `size`
    with fresh=True; then the marker blocks are overwritten with a pattern
    no source block holds, and flushed."""
    if fresh and stat.S_ISREG(os.stat(dst).st_mode):
        os.truncate(dst, 0)
        os.truncate(dst, size)
    offsets = _marker_offsets(size)
    if not offsets:
        return
    buf = mmap.mmap(-1, MARK)          # page aligned, for O_DIRECT
    try:
        buf.write(b"fastmirror-bench-marker\xa5" * (MARK // 24) + b"\xa5" * (MARK % 24))
        fd = _open_maybe_direct(dst, os.O_WRONLY)
        try:
            for off in offsets:
                if os.pwritev(fd, [buf], off) != MARK:
                    raise OSError("short write of a marker block to %s" % dst)
            os.fdatasync(fd)
        finally:
            os.close(fd)
    finally:
        buf.close()


def check_markers(src: str, dst: str, size: int) -> Optional[int]:
    """After a run: the first marker offset where dst differs from src, or None."""
    offsets = _marker_offsets(size)
    if not offsets:
        return None
    a, b = mmap.mmap(-1, MARK), mmap.mmap(-1, MARK)
    sfd = _open_maybe_direct(src, os.O_RDONLY)
    try:
        tfd = _open_maybe_direct(dst, os.O_RDONLY)
        try:
            for off in offsets:
                na, nb = os.preadv(sfd, [a], off), os.preadv(tfd, [b], off)
                if na != nb or a[:na] != b[:nb]:
                    return off
        finally:
            os.close(tfd)
    finally:
        os.close(sfd)
        a.close()
        b.close()
    return None


def _full_compare(src: str, dst: str, size: int) -> int:
    from fastmirror.job.verify import first_difference
    return first_difference(src, dst, size)


def _fs_type(path: str) -> Optional[str]:
    """The filesystem type holding path, from /proc/self/mounts."""
    try:
        real = os.path.realpath(path)
        if not os.path.exists(real):
            real = os.path.dirname(real)
        best, fstype = "", None
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 3:
                    continue
                mnt = parts[1].replace("\\040", " ")
                if ((real == mnt or real.startswith(mnt.rstrip("/") + "/"))
                        and len(mnt) >= len(best)):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
        return None


def _queue_limits(path: str) -> Optional[tuple[str, int, int]]:
    """(disk name, max_segments, max_sectors_kb) of the disk holding path
    (a file's filesystem, or the block device itself), or None."""
    try:
        st = os.stat(path)
        dev = st.st_rdev if stat.S_ISBLK(st.st_mode) else st.st_dev
        sys_dir = os.path.realpath("/sys/dev/block/%d:%d" % (os.major(dev), os.minor(dev)))
        if not os.path.isdir(os.path.join(sys_dir, "queue")):
            sys_dir = os.path.dirname(sys_dir)      # a partition: its disk's queue
        with open(os.path.join(sys_dir, "queue", "max_segments")) as f:
            segments = int(f.read())
        with open(os.path.join(sys_dir, "queue", "max_sectors_kb")) as f:
            sectors_kb = int(f.read())
        return os.path.basename(sys_dir), segments, sectors_kb
    except (OSError, ValueError):
        return None


def _tool_version(tool: str, path: Optional[str]) -> Optional[str]:
    if tool == "fastmirror":
        import fastmirror
        return "fastmirror " + fastmirror.__version__
    if path is None:
        return None
    try:
        p = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10)
        return (p.stdout or p.stderr).splitlines()[0].strip()
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ---------------------------------------------------------------------------
# Statistics and the report
# ---------------------------------------------------------------------------

def summarize(runs: Sequence[Run], tools: Sequence[str], base: str = "fastmirror") -> dict:
    """Per tool (variant label) over the timed, successful bulk runs: medians
    and ranges; and the ratio of `base`'s median throughput to each tool's,
    also per round (paired)."""
    runs = [r for r in runs if r.writer_rate is None]
    out: dict = {}
    for tool in tools:
        ok = [r for r in runs if r.tool == tool and not r.warmup and r.ok]
        failed = [r for r in runs if r.tool == tool and not r.warmup and not r.ok]
        s: dict = {"runs": len(ok), "failed": len(failed)}
        if ok:
            g = [r.gbps for r in ok]
            s.update(
                median_gbps=statistics.median(g), min_gbps=min(g), max_gbps=max(g),
                median_mibps=statistics.median(r.mibps for r in ok),
                min_mibps=min(r.mibps for r in ok), max_mibps=max(r.mibps for r in ok),
                median_bytes_per_s=statistics.median(r.bytes_per_s for r in ok),
                median_wall_s=statistics.median(r.wall_s for r in ok),
                median_cpu_s=statistics.median(r.cpu_s for r in ok),
                median_cpu_s_per_gib=statistics.median(r.cpu_s_per_gib for r in ok),
            )
            buffers = sorted({r.detail["buffers"] for r in ok if r.detail.get("buffers")})
            if buffers:
                s["buffers"] = ", ".join(buffers)
            ready = [r.ready_gbps for r in ok if r.ready_gbps is not None]
            if ready:
                s.update(median_ready_gbps=statistics.median(ready),
                         min_ready_gbps=min(ready), max_ready_gbps=max(ready),
                         median_ready_s=statistics.median(r.ready_s for r in ok
                                                          if r.ready_s is not None))
        out[tool] = s
    fm = out.get(base, {}).get("median_gbps")
    fm_by_round = {r.round: r for r in runs if r.tool == base and not r.warmup and r.ok}
    fm_cpu = out.get(base, {}).get("median_cpu_s_per_gib")
    for tool, s in out.items():
        if fm and s.get("median_gbps"):
            s["fastmirror_ratio"] = fm / s["median_gbps"]
        # Rounds run every tool back to back, so the ratio within a round is
        # less exposed to a machine whose speed drifts between rounds.
        mine = [r for r in runs if r.tool == tool and not r.warmup and r.ok
                and r.gbps > 0 and r.round in fm_by_round]
        if mine and tool != base:
            s["fastmirror_ratio_rounds"] = [[r.round, fm_by_round[r.round].gbps / r.gbps]
                                            for r in mine]
            s["fastmirror_ratio_paired"] = statistics.median(
                fm_by_round[r.round].gbps / r.gbps for r in mine)
            s["fastmirror_ratio_paired_min"] = min(fm_by_round[r.round].gbps / r.gbps
                                                   for r in mine)
            s["fastmirror_ratio_paired_max"] = max(fm_by_round[r.round].gbps / r.gbps
                                                   for r in mine)
            both = [r for r in mine if r.ready_s and fm_by_round[r.round].ready_s]
            if both:
                s["fastmirror_ready_ratio_paired"] = statistics.median(
                    r.ready_s / fm_by_round[r.round].ready_s for r in both)
            cpu = [r for r in mine if r.cpu_s > 0]
            if cpu:
                s["fastmirror_cpu_ratio_paired"] = statistics.median(
                    fm_by_round[r.round].cpu_s / r.cpu_s for r in cpu)
        if fm_cpu is not None and s.get("median_cpu_s_per_gib"):
            s["fastmirror_cpu_ratio"] = fm_cpu / s["median_cpu_s_per_gib"]
        if s.get("median_gbps"):
            s["spread"] = (s["max_gbps"] - s["min_gbps"]) / s["median_gbps"]
    return out


def summarize_writer(runs: Sequence[Run], labels: Sequence[str],
                     rates: Sequence[str]) -> dict:
    """Per variant and writer rate: how many runs reached READY, the medians
    and ranges of the time to READY and of the total time, the rate the
    writer achieved until READY, what was copied again, the copy mode; and
    the time to READY against the same variant with no writer ("0"), as the
    ratio of medians and the median of the per-round ratios."""
    runs = [r for r in runs if r.writer_rate is not None and not r.warmup]
    out: dict = {}
    for label in labels:
        per: dict = {}
        idle = {r.round: r for r in runs if r.tool == label and r.writer_rate == "0"
                and r.ok and r.converged}
        for rate in rates:
            mine = [r for r in runs if r.tool == label and r.writer_rate == rate]
            if not mine:
                continue
            ok = [r for r in mine if r.ok]
            # READY is READY even when the run failed later (e.g. no COMPLETED in time).
            conv = [r for r in mine if r.converged and r.ready_s is not None]
            done = [r for r in conv if r.ok and r.detail.get("completed") is not False]
            s: dict = {"runs": len(mine), "converged": len(conv), "failed": len(mine) - len(ok),
                       "not_completed": sum(1 for r in conv
                                            if r.detail.get("completed") is False),
                       "errors": sorted({r.error for r in mine if r.error})}
            if conv:
                rs = [r.ready_s for r in conv]
                s.update(median_ready_s=statistics.median(rs), min_ready_s=min(rs),
                         max_ready_s=max(rs))
            if done:
                s.update(median_total_s=statistics.median(r.wall_s for r in done),
                         min_total_s=min(r.wall_s for r in done),
                         max_total_s=max(r.wall_s for r in done))
            if ok:
                s["median_cpu_s"] = statistics.median(r.cpu_s for r in ok)
            for key, name in (("writer_rate_to_ready", "median_writer_bps"),
                              ("writer_rate_whole", "median_writer_bps_whole"),
                              ("extra_bytes_copied", "median_extra_bytes_copied"),
                              ("chunks_recopied", "median_chunks_recopied"),
                              ("copy_mode_switch_s", "median_copy_mode_switch_s")):
                vals = [r.detail[key] for r in ok if r.detail.get(key) is not None]
                if vals:
                    s[name] = statistics.median(vals)
            modes = sorted({r.detail.get("copy_mode_final") for r in ok
                            if r.detail.get("copy_mode_final")})
            if modes:
                s["copy_modes_final"] = modes
            timeouts = [r.detail.get("ready_timeout") for r in mine if not r.converged]
            if timeouts and any(t is not None for t in timeouts):
                s["ready_timeout"] = max(t for t in timeouts if t is not None)
            if rate != "0" and idle:
                base = statistics.median(r.ready_s for r in idle.values())
                if conv and base > 0:
                    s["ready_vs_idle"] = s["median_ready_s"] / base
                paired = [r.ready_s / idle[r.round].ready_s for r in conv
                          if r.round in idle and idle[r.round].ready_s]
                if paired:
                    s["ready_vs_idle_paired"] = statistics.median(paired)
                    s["ready_vs_idle_paired_min"] = min(paired)
                    s["ready_vs_idle_paired_max"] = max(paired)
            per[rate] = s
        out[label] = per
    return out


def _align(rows: list[tuple], head: tuple) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(head))]
    return ["  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w)
                      for i, (c, w) in enumerate(zip(r, widths))).rstrip() for r in rows]


def format_table(summary: dict, skipped: dict, base: str = "fastmirror") -> str:
    head = ("tool", "runs", "median GB/s", "min-max GB/s", "median MiB/s",
            "min-max MiB/s", "CPU s/GiB", "%s/tool" % base.split()[0], "per round")
    rows = [head]
    for tool, s in summary.items():
        if not s.get("runs"):
            rows.append((tool, "0/%d" % s["failed"], "-", "-", "-", "-", "-", "-", "-"))
            continue
        runs = "%d" % s["runs"] if not s["failed"] else "%d (+%d failed)" % (s["runs"], s["failed"])
        ratio = s.get("fastmirror_ratio")
        rows.append((
            "%s (%s)" % (tool, s["buffers"]) if s.get("buffers") else tool,
            runs, "%.3f" % s["median_gbps"],
            "%.3f-%.3f" % (s["min_gbps"], s["max_gbps"]),
            "%.0f" % s["median_mibps"], "%.0f-%.0f" % (s["min_mibps"], s["max_mibps"]),
            "%.3f" % s["median_cpu_s_per_gib"],
            "-" if tool == base or ratio is None else "%.2fx" % ratio,
            "%.2fx" % s["fastmirror_ratio_paired"] if "fastmirror_ratio_paired" in s else "-"))
        if "median_ready_gbps" in s:
            rows.append((
                "  (to READY)", "", "%.3f" % s["median_ready_gbps"],
                "%.3f-%.3f" % (s["min_ready_gbps"], s["max_ready_gbps"]),
                "%.0f" % (s["median_ready_gbps"] * GB / MiB),
                "%.0f-%.0f" % (s["min_ready_gbps"] * GB / MiB, s["max_ready_gbps"] * GB / MiB),
                "", "", ""))
    lines = _align(rows, head)
    width = max(len(r[0]) for r in rows)
    for tool, why in skipped.items():
        lines.append("%-*s  skipped: %s" % (width, tool, why))
    return "\n".join(lines)


def format_writer_table(wsummary: dict, skipped: dict) -> str:
    head = ("mirror", "writer", "READY", "to READY s (min-max)", "vs idle",
            "per round", "total s", "writer MB/s", "copied again", "copy mode")
    rows = [head]
    for label, per in wsummary.items():
        for rate, s in per.items():
            ready = "%d/%d" % (s["converged"], s["runs"])
            if s.get("median_ready_s") is not None:
                t = "%.3f (%.3f-%.3f)" % (s["median_ready_s"], s["min_ready_s"], s["max_ready_s"])
                total = "%.3f" % s["median_total_s"] if "median_total_s" in s else "-"
            else:
                t = "none in %.0f s" % s.get("ready_timeout", 0) if s.get("ready_timeout") \
                    else "-"
                total = "-"
            vs = "%.2fx" % s["ready_vs_idle"] if "ready_vs_idle" in s else "-"
            pr = "%.2fx" % s["ready_vs_idle_paired"] if "ready_vs_idle_paired" in s else "-"
            wb = "%.1f" % (s["median_writer_bps"] / MB) if s.get("median_writer_bps") else "-"
            if rate == "0":
                wb = "-"
            again = "-"
            if s.get("median_extra_bytes_copied") is not None:
                again = human(s["median_extra_bytes_copied"])
                if s.get("median_chunks_recopied") is not None:
                    again += " (%d chunks)" % s["median_chunks_recopied"]
            mode = ",".join(s.get("copy_modes_final", [])) or "-"
            if s.get("median_copy_mode_switch_s") is not None:
                mode += " @%.1fs" % s["median_copy_mode_switch_s"]
            if s.get("not_completed"):
                ready += " (%d not COMPLETED)" % s["not_completed"]
            if s["failed"]:
                ready += " (%d failed)" % s["failed"]
            rows.append((label, rate, ready, t, vs, pr, total, wb, again, mode))
    lines = _align(rows, head)
    for tool, why in skipped.items():
        lines.append("%s  skipped: %s" % (tool, why))
    return "\n".join(lines)


def draw_chart(path: str, summary: Optional[dict], wsummary: Optional[dict],
               title: str = "") -> Optional[str]:
    """A PNG: bulk throughput per tool (median, min-max whiskers) and time to
    READY per writer rate.  Returns None when drawn, else why not."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:   # ImportError, or a broken install
        return "matplotlib is not available (%s: %s); pip install matplotlib" % (
            type(e).__name__, e)
    panels = []
    if summary and any(s.get("runs") for s in summary.values()):
        panels.append("bulk")
    if wsummary and any(per for per in wsummary.values()):
        panels.append("writer")
    if not panels:
        return "nothing to draw"
    fig, axes = plt.subplots(1, len(panels), figsize=(6.2 * len(panels), 4.2), dpi=100,
                             squeeze=False)
    for ax, panel in zip(axes[0], panels):
        if panel == "bulk":
            items = [(t, s) for t, s in summary.items() if s.get("runs")]
            names = [t for t, _ in items][::-1]
            med = [s["median_gbps"] for _, s in items][::-1]
            lo = [s["median_gbps"] - s["min_gbps"] for _, s in items][::-1]
            hi = [s["max_gbps"] - s["median_gbps"] for _, s in items][::-1]
            colors = ["#d62728" if n.startswith("fastmirror") else
                      "#1f77b4" if n.startswith("qemu-mirror") else
                      "#7f7f7f" if n.startswith("fio") else "#2ca02c" for n in names]
            ax.barh(names, med, xerr=[lo, hi], color=colors, capsize=3)
            for y, (v, h) in enumerate(zip(med, hi)):
                ax.text(v + h, y, "  %.2f" % v, va="center", ha="left", fontsize=8)
            ax.set_xlabel("GB/s (median of rounds; whiskers min-max)")
            ax.set_title("Bulk mirror / copy throughput")
            ax.set_xlim(0, max(m + h for m, h in zip(med, hi)) * 1.18)
        else:
            labels = [lab for lab, per in wsummary.items() if per]
            rates: list[str] = []
            for lab in labels:
                for r in wsummary[lab]:
                    if r not in rates:
                        rates.append(r)
            reds = ["#d62728", "#ff7f0e", "#8c564b", "#e377c2"]
            blues = ["#1f77b4", "#17becf", "#9467bd", "#7f7f7f"]
            palette = {}
            for lab in labels:
                pool = reds if lab.startswith("fastmirror") else blues
                palette[lab] = pool[sum(1 for x in palette if (x.startswith("fastmirror")
                                                               == lab.startswith("fastmirror")))
                                    % len(pool)]
            width = 0.8 / max(1, len(labels))
            top = max([s.get("max_ready_s", 0) for lab in labels
                       for s in wsummary[lab].values()] + [0.001])
            for i, lab in enumerate(labels):
                xs, ys, lo, hi, miss = [], [], [], [], []
                for j, r in enumerate(rates):
                    s = wsummary[lab].get(r)
                    if not s:
                        continue
                    x = j + (i - (len(labels) - 1) / 2) * width
                    if s.get("median_ready_s") is not None:
                        xs.append(x)
                        ys.append(s["median_ready_s"])
                        lo.append(s["median_ready_s"] - s["min_ready_s"])
                        hi.append(s["max_ready_s"] - s["median_ready_s"])
                        if s["converged"] < s["runs"]:     # some never got READY
                            ax.text(x, s["max_ready_s"] + top * 0.02, "%d/%d\nREADY"
                                    % (s["converged"], s["runs"]), ha="center",
                                    va="bottom", fontsize=6)
                    else:
                        miss.append(x)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=lab,
                       color=palette[lab])
                for x in miss:
                    ax.bar([x], [top * 1.1], width, color="none", hatch="//",
                           edgecolor=palette[lab])
                    ax.text(x, top * 1.12, "no\nREADY", ha="center", va="bottom", fontsize=6)
            ax.set_xticks(range(len(rates)))
            ax.set_xticklabels(["writer %s%s" % (r, "" if r in ("0", "max") else "/s")
                                for r in rates])
            ax.set_ylabel("seconds to READY (median; whiskers min-max)")
            ax.set_title("Time to READY under a random 4-64 KiB writer")
            ax.set_ylim(0, top * 1.35)
            ax.legend(fontsize=7, loc="upper left", ncol=2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def _check_paths(args) -> tuple[str, str, int, bool, list[str], bool]:
    """Validate (and with --create, make) the source and the target; returns
    (src, dst, size, dst_is_block, notes, source_created).  Raises BenchError
    on a refusal."""
    from fastmirror.job.endpoints import check_not_same

    src, dst = os.path.abspath(args.source), os.path.abspath(args.target)
    notes: list[str] = []
    created = False
    if not os.path.exists(src):
        if args.create is None:
            raise BenchError("source %s does not exist (use --create SIZE to make one)" % src)
        if args.create <= 0:
            raise BenchError("--create needs a positive size")
        if not os.path.isdir(os.path.dirname(src)):
            raise BenchError("folder of source %s does not exist" % src)
        t0 = time.monotonic()
        create_source(src, args.create)
        created = True
        notes.append("created source %s: %s of pseudo-random data in %.1f s"
                     % (src, human(args.create), time.monotonic() - t0))
    elif args.create is not None:
        notes.append("source exists: --create ignored, using it as it is")
    sst = os.stat(src)
    if not (stat.S_ISREG(sst.st_mode) or stat.S_ISBLK(sst.st_mode)):
        raise BenchError("source %s is not a regular file or a block device" % src)
    size = _device_size(src)
    if size == 0:
        raise BenchError("source %s is empty" % src)

    try:
        dst_st: Optional[os.stat_result] = os.stat(dst)
    except FileNotFoundError:
        dst_st = None
    if dst_st is None:
        if not os.path.isdir(os.path.dirname(dst)):
            raise BenchError("folder of target %s does not exist" % dst)
        return src, dst, size, False, notes, created
    try:
        check_not_same(src, sst, dst, dst_st)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if stat.S_ISBLK(dst_st.st_mode):
        if not args.destroy_target:
            raise BenchError("target %s is a block device: refusing to write to it without "
                             "--destroy-target (every tool overwrites the first %s of it)"
                             % (dst, human(size)))
        try:   # O_EXCL on a block device: fails with EBUSY while mounted or held
            os.close(os.open(dst, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            raise BenchError("target %s is in use (mounted or held open exclusively): %s"
                             % (dst, e.strerror)) from None
        dsize = _device_size(dst)
        if dsize < size:
            raise BenchError("target %s (%d bytes) is smaller than source %s (%d bytes)"
                             % (dst, dsize, src, size))
        return src, dst, size, True, notes, created
    if not stat.S_ISREG(dst_st.st_mode):
        raise BenchError("target %s is not a regular file or a block device" % dst)
    return src, dst, size, False, notes, created




def default_timeout(size: int) -> float:
    """Seconds one run may take before it counts as hung."""
    return 60.0 + size / 20e6


def default_writer_timeout(size: int) -> float:
    """Writer rounds: seconds to wait for READY before cancelling the job."""
    return 10.0 + size / 50e6


def run(args) -> int:
    """`fastmirror bench`: returns the exit status."""
    # What the bench sets up on the machine (huge pages, a hugetlbfs mount)
    # is undone however it ends, Ctrl-C included.
    with contextlib.ExitStack() as undo:
        try:
            return _bench(args, undo)
        except BenchError as e:
            print("fastmirror bench: %s" % e, file=sys.stderr)
            return EXIT_USAGE


def _variants(args, base_tools: Sequence[str]) -> tuple[list[Variant], list[Variant]]:
    """The rows of the bulk rounds and of the writer rounds."""
    bufs = args.buf_sizes or [(args.buf_size, None)]
    multi = args.buf_sizes is not None
    engines = getattr(args, "io_engines", None) or ["auto"]
    bulk: list[Variant] = []
    for tool in base_tools:
        if tool == "fastmirror":
            for b, m in bufs:
                for e in engines:
                    label = "fastmirror" if not multi else "fastmirror %s%s" % (
                        short(b), "/%s" % short(m) if m else "")
                    if len(engines) > 1:
                        label += " " + e
                    bulk.append(Variant(label, tool, b, m, io_engine=e))
        elif tool == "qemu-mirror":
            for b in dict.fromkeys(b for b, _ in bufs):
                bulk.append(Variant("qemu-mirror" if not multi else "qemu-mirror %s" % short(b),
                                    tool, b))
        else:
            bulk.append(Variant(tool, tool))
    writer: list[Variant] = []
    b, m = bufs[0]
    if "fastmirror" in base_tools:
        for mode in args.copy_modes:
            writer.append(Variant("fastmirror %s" % mode, "fastmirror", b, m, mode,
                                  io_engine=engines[0]))
    if "qemu-mirror" in base_tools:
        for mode in [m_ for m_ in args.copy_modes if m_ in QEMU_COPY_MODES] or ["background"]:
            writer.append(Variant("qemu-mirror %s" % mode, "qemu-mirror", b, None, mode))
    return bulk, writer


def _prepare(args):
    """Tools, paths and refusals, before anything is written."""
    tools: list[str] = []
    for t in args.tools:
        tools.extend(FIO_PARTS if t == "fio" else [t])
    tools = list(dict.fromkeys(tools))
    paths: dict[str, str] = {}
    skipped: dict[str, str] = {}
    for tool in tools:
        path, why = find_tool(tool)
        if path is None:
            skipped["fio" if tool in FIO_PARTS else tool] = why or "not available"
        else:
            paths[tool] = path
    return [t for t in tools if t in paths], paths, skipped


def _bench(args, undo: contextlib.ExitStack) -> int:
    from fastmirror import MirrorJob  # noqa: F401  (fail early if the build is broken)

    if not args.bulk and not args.writer_rates:
        raise BenchError("--no-bulk needs --writer-rates")
    tools, paths, skipped = _prepare(args)
    bulk_variants, writer_variants = _variants(args, tools)
    if not args.bulk:
        bulk_variants = []
    if args.writer_rates and not writer_variants:
        if not bulk_variants:
            raise BenchError("writer rounds need fastmirror or qemu-mirror: %s"
                             % ("; ".join(skipped.values()) or "none selected"))
    if not bulk_variants and not writer_variants:
        raise BenchError("no tool to run: %s" % ("; ".join(skipped.values()) or "none"))
    rates = args.writer_rates or []
    writes_source = any(rate != 0 for _, rate in rates) and bool(writer_variants)

    src, dst, size, dst_is_block, notes, created = _check_paths(args)
    if writes_source:
        src_is_block = stat.S_ISBLK(os.stat(src).st_mode)
        if not created and not args.destroy_source:
            raise BenchError("writer rounds write random data into the source %s: refusing "
                             "without --destroy-source (only a source that --create made in "
                             "this run is written without it)" % src)
        if src_is_block:
            try:   # O_EXCL on a block device: fails with EBUSY while mounted or held
                os.close(os.open(src, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
            except OSError as e:
                raise BenchError("source %s is in use (mounted or held open exclusively): %s"
                                 % (src, e.strerror)) from None
        notes.append("writer rounds write random data into the source %s" % src)
    timeout = args.timeout if args.timeout is not None else default_timeout(size)
    wtimeout = (args.writer_timeout if args.writer_timeout is not None
                else default_writer_timeout(size))

    # A target file that is missing or too small is made the source's size;
    # the warm-up round (or, without one, an untimed copy) then writes all
    # of it, so that the timed runs all overwrite allocated blocks.
    fill = False
    if not dst_is_block:
        if not os.path.exists(dst):
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)
            os.close(fd)
            notes.append("created target %s (%s)" % (dst, human(size)))
            fill = True
        elif os.stat(dst).st_size < size:
            os.truncate(dst, size)
            notes.append("extended target %s to %s" % (dst, human(size)))
            fill = True
    if fill and (args.warmup == 0 or not bulk_variants) and not args.fresh_target:
        reset_target(dst, size)
        r = run_tool("fastmirror", src, dst, size, granularity=args.granularity,
                     buf_size=args.buf_size, timeout=timeout)
        if not r.ok:
            print("fastmirror bench: filling the target failed: %s" % r.error, file=sys.stderr)
            return EXIT_FAIL

    engine = "libaio"
    fio_path = next((paths[t] for t in FIO_PARTS if t in paths), None)
    if fio_path is not None:
        engine = fio_engine(fio_path, src, args.fio_engine)
    # fio-copy is shaped as the first fastmirror row's copies (the base of
    # the ratios), in huge pages when they can be set up here.
    buf0, io0 = (args.buf_sizes or [(args.buf_size, None)])[0]
    shape = copy_shape(buf0, args.granularity, io0)
    huge: Optional[HugePages] = None
    if any(v.tool == "fio-copy" for v in bulk_variants):
        huge = HugePages()
        undo.callback(huge.undo)
        if huge.setup(shape.hugepages_needed()):
            shape = CopyShape(shape.io_size, shape.depth, huge.dir, huge.page or 2 * MiB)
    wkind = wpath = None
    wnote = ""
    wskipped: dict[str, str] = {}
    if writes_source and any(v.tool == "qemu-mirror" for v in writer_variants):
        wkind, wpath, wnote = qemu_writer(args.qemu_writer)
        if wkind is None:
            wskipped["qemu-mirror with a writer"] = "nothing can write to QEMU's NBD " \
                                                    "export: %s" % wnote

    dropping = args.drop_caches and os.geteuid() == 0 and os.access(
        "/proc/sys/vm/drop_caches", os.W_OK)
    if args.fresh_target and dst_is_block:
        notes.append("--fresh-target ignored: the target is a block device")
    fresh = args.fresh_target and not dst_is_block

    header = [
        "fastmirror bench: %s -> %s, %s (%d bytes), %d round%s%s, %s"
        % (src, dst, human(size), size, args.rounds, "s" if args.rounds != 1 else "",
           " + %d warm-up" % args.warmup if bulk_variants else "",
           "order rotated each round" if args.order == "rotate" else
           "order shuffled each round (seed %d)" % args.seed),
        "target: %s, %s; page cache: %s" % (
            "block device" if dst_is_block else "regular file (%s)" % (_fs_type(dst) or "?"),
            "truncated before every run" if fresh else "overwritten in place",
            "dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches)"
            if dropping else "not dropped (%s), sync before every run"
            % ("--no-drop-caches" if not args.drop_caches else "not root")),
        "machine: %d CPUs, load average %.2f %.2f %.2f" % ((os.cpu_count() or 0,)
                                                          + os.getloadavg()),
        "fastmirror and qemu-mirror: granularity %s, buf-size %s" % (
            human(args.granularity), ", ".join(
                human(b) + (" (fastmirror requests of %s: io_size)" % human(m)
                             if m else "")
                for b, m in (args.buf_sizes or [(args.buf_size, None)]))),
    ]
    described = set()
    for v in bulk_variants + writer_variants:
        if v.tool == "fastmirror" or v.tool in described:
            continue
        described.add(v.tool)
        if v.tool == "qemu-mirror":
            header.append("qemu-mirror: qemu-storage-daemon, both images cache.direct=on, "
                          "aio=native; QMP blockdev-mirror sync=full granularity=%d "
                          "buf-size=BUF copy-mode=background (writer rounds: as listed), "
                          "block-job-complete at READY; QEMU copies up to max(BUF/16, 1 MiB) "
                          "per request, 16 in flight" % args.granularity)
        else:
            header.append("%s: %s" % (v.tool, " ".join(tool_command(
                v.tool, "SRC", "DST", size=size, engine=engine, shape=shape))))
            if v.tool == "fio-copy" and huge is not None:
                header.append("fio-copy: %s requests, %d in flight per job (fastmirror's "
                              "copies), %s" % (short(shape.io_size, "iB"), shape.depth,
                                               huge.describe()))
                limits = _queue_limits(dst)
                if limits is not None:
                    header.append("disk under the target: %s, max_segments %d, "
                                  "max_sectors_kb %d: a request in %s pages carries at "
                                  "most %s" % (limits + (short(mmap.PAGESIZE, "iB"),
                                                         human(min(limits[1] * mmap.PAGESIZE,
                                                                   limits[2] * KiB)))))
    if writer_variants and rates:
        header.append("writer rounds: rates %s; random %d-%d KiB writes, %d KiB aligned; "
                      "READY within %.0f s or cancelled; %d writes in flight: fastmirror: "
                      "%d threads writing through job.source; qemu-mirror: %s%s on an NBD "
                      "export of the source node" % (
                          ",".join(label for label, _ in rates), WRITE_MIN // KiB,
                          WRITE_MAX // KiB, WRITE_ALIGN // KiB, wtimeout, args.writer_depth,
                          args.writer_depth, wnote or "no writer needed",
                          " --iodepth=%d" % args.writer_depth if wkind == "fio" else ""))
    for line in notes + header:
        print(line)
    sys.stdout.flush()

    def before_run() -> None:
        reset_target(dst, size, fresh)
        if dropping:
            drop_caches()
        else:
            os.sync()
        if args.settle:
            time.sleep(args.settle)

    def ordered(items: list, n: int) -> list:
        """Round n's order: rotated by n, or shuffled (seeded) so that no
        tool always follows the same one (a run can slow the next, e.g.
        while a host flushes what it wrote)."""
        if args.order == "rotate" or n == 0:
            k = n % len(items)
            return items[k:] + items[:k]
        out = list(items)
        random.Random(args.seed * 1000003 + n).shuffle(out)
        return out

    runs: list[Run] = []
    failed = 0
    if bulk_variants:
        schedule = [(0, True)] * args.warmup + [(i + 1, False) for i in range(args.rounds)]
        for n, (rnd, warm) in enumerate(schedule):
            for v in ordered(bulk_variants, n):
                before_run()
                load = os.getloadavg()[0]
                r = run_tool(v.tool, src, dst, size, granularity=args.granularity,
                             buf_size=v.buf_size, timeout=timeout, path=paths[v.tool],
                             max_io=v.max_io, engine=engine, label=v.label,
                             io_engine=v.io_engine, shape=shape)
                r.tool = v.label
                r.round, r.warmup = rnd, warm
                r.detail["loadavg_1m"] = load
                if r.ok and v.tool not in FIO_PARTS:
                    bad = check_markers(src, dst, size)
                    if bad is None and args.verify:
                        diff = _full_compare(src, dst, size)
                        bad = diff if diff >= 0 else None
                    if bad is not None:
                        r.ok = False
                        r.error = "target differs from source at offset %d after the run" % bad
                runs.append(r)
                label = "warm-up" if warm else "round %d" % rnd
                if r.ok:
                    extra = (", READY at %.3f s (%.3f GB/s)" % (r.ready_s, r.ready_gbps)
                             if r.ready_s is not None and r.ready_gbps else "")
                    if v.tool in ("fio-rw", "fio-copy"):
                        extra = ", read %.3f GB/s, write %.3f GB/s at once" % (
                            r.detail.get("read_gbps", 0), r.detail.get("write_gbps", 0))
                    print("  %-8s %-16s %7.3f s  %6.3f GB/s  %7.1f MiB/s  CPU %.2f s (user "
                          "%.2f, sys %.2f)%s" % (label, v.label, r.wall_s, r.gbps, r.mibps,
                                                 r.cpu_s, r.user_s, r.sys_s, extra))
                else:
                    failed += 1
                    print("  %-8s %-16s FAILED: %s" % (label, v.label, r.error))
                sys.stdout.flush()

    wruns: list[Run] = []
    if writer_variants and rates:
        for rnd in range(1, args.rounds + 1):
            for ri, (rlabel, rate) in enumerate(rates):
                for v in ordered(writer_variants, (rnd - 1) * len(rates) + ri + 1):
                    if v.tool == "qemu-mirror" and rate != 0 and wkind is None:
                        continue
                    before_run()
                    load = os.getloadavg()[0]
                    r = run_writer(v, src, dst, size, rlabel, rate,
                                   granularity=args.granularity, timeout=timeout,
                                   ready_timeout=wtimeout, writer_kind=wkind,
                                   writer_path=wpath, writer_depth=args.writer_depth)
                    r.round = rnd
                    r.detail["loadavg_1m"] = load
                    if r.ok and rate == 0 and r.converged:
                        bad = check_markers(src, dst, size)
                        if bad is not None:
                            r.ok = False
                            r.error = "target differs from source at offset %d" % bad
                    wruns.append(r)
                    if not r.ok:
                        failed += 1
                    print("  round %-2d %-26s writer %-5s %s" % (rnd, v.label, rlabel,
                                                                 _writer_line(r)))
                    sys.stdout.flush()

    base = next((v.label for v in bulk_variants if v.tool == "fastmirror"), "fastmirror")
    summary = summarize(runs, [v.label for v in bulk_variants], base=base)
    wlabels = [v.label for v in writer_variants]
    wsummary = summarize_writer(wruns, wlabels, [label for label, _ in rates]) \
        if wruns else {}
    if bulk_variants:
        print()
        print(format_table(summary, skipped, base=base))
        fm = next((r for r in runs if r.tool == base and r.detail), None)
        if fm is not None:
            d = fm.detail
            print("%s ran %s copies of %s in flight, I/O %s, engine %s" % (
                base, d.get("nworkers"), human(d["max_io"]) if d.get("max_io") else "?",
                d.get("io_mode"), d.get("io_engine")))
        print("GB/s = 1e9 bytes/s; CPU = user + system seconds per GiB copied (fio: its "
              "own usr_cpu + sys_cpu); %s/tool = ratio of median throughputs (>1: %s "
              "faster; for fio: the share of the ceiling); per round = median of the "
              "ratios within each round" % (base, base))
        ceiling = _ceiling_lines(summary, base, shape, huge)
        if ceiling:
            print(ceiling)
        noisy = ["%s %.0f%%" % (t, 100 * s["spread"]) for t, s in summary.items()
                 if s.get("spread", 0) > NOISY and s.get("runs", 0) > 1]
        if noisy:
            print("note: noisy machine: min-max spread of %s around the median; "
                  "differences smaller than that need more --rounds" % ", ".join(noisy))
    if wruns or wskipped:
        print()
        print(format_writer_table(wsummary, {} if wruns else wskipped))
        for k_, why in wskipped.items():
            if wruns:
                print("%s: skipped: %s" % (k_, why))
        print("to READY: from the job's start (fastmirror: start(); QEMU: blockdev-mirror) "
              "to READY; total: to COMPLETED (complete() at READY, the writer still "
              "writing); vs idle: against the same job with writer 0 (ratio of medians, "
              "then the median of per-round ratios); writer MB/s: what the writer achieved "
              "until READY (1 MB = 1e6 bytes); copied again: bytes copied beyond the "
              "source's size (QEMU: the job's len minus the size, its own writes in "
              "write-blocking mode included)")

    chart_note = None
    if args.chart:
        why = draw_chart(args.chart, summary if bulk_variants else None, wsummary or None,
                         title="fastmirror bench: %s, %s -> %s, %s" % (
                             human(size), _fs_type(src) or "?", _fs_type(dst) or "?",
                             time.strftime("%Y-%m-%d")))
        chart_note = "chart: wrote %s" % args.chart if why is None else \
            "chart: not drawn: %s" % why
        print(chart_note)

    if args.json:
        doc = {
            "version": 2,
            "source": src,
            "target": dst,
            "size": size,
            "target_kind": "block" if dst_is_block else "file",
            "settings": {
                "rounds": args.rounds, "warmup": args.warmup, "order": args.order,
                "seed": args.seed, "settle": args.settle,
                "tools": [v.label for v in bulk_variants],
                "granularity": args.granularity, "buf_size": args.buf_size,
                "buf_sizes": [list(x) for x in args.buf_sizes] if args.buf_sizes else None,
                "fresh_target": fresh, "drop_caches": bool(dropping),
                "verify": bool(args.verify), "timeout": timeout, "fio_engine": engine,
                "fio_copy": {"io_size": shape.io_size, "iodepth": shape.depth,
                             "buffers": shape.buffers,
                             "hugepages": huge.describe() if huge else None,
                             "hugepages_unavailable": huge.why if huge else None},
            },
            "commands": {v.label: tool_command(v.tool, src, dst, paths.get(v.tool), size=size,
                                               engine=engine, buf_size=v.buf_size,
                                               granularity=args.granularity, shape=shape)
                         for v in bulk_variants if v.tool != "fastmirror"},
            "skipped": skipped,
            "machine": {
                "kernel": platform.release(), "cpus": os.cpu_count(),
                "python": platform.python_version(), "loadavg_end": os.getloadavg(),
                "fs_source": _fs_type(src), "fs_target": _fs_type(dst),
                "versions": {t: _tool_version("fio" if t in FIO_PARTS else t, paths[t])
                             for t in tools},
            },
            "notes": notes,
            "rounds": [r.to_dict() for r in runs],
            "summary": summary,
            "writer": {
                "rates": [{"label": label, "bytes_per_s": rate} for label, rate in rates],
                "copy_modes": list(args.copy_modes),
                "io_engines": list(getattr(args, "io_engines", None) or ["auto"]),
                "variants": wlabels,
                "ready_timeout": wtimeout,
                "qemu_writer": wkind, "qemu_writer_note": wnote,
                "writer_depth": args.writer_depth,
                "skipped": wskipped,
                "runs": [r.to_dict() for r in wruns],
                "summary": wsummary,
            } if rates else None,
            "chart": chart_note,
        }
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return EXIT_FAIL if failed else EXIT_OK


def _ceiling_lines(summary: dict, base: str, shape: CopyShape,
                   huge: Optional[HugePages]) -> str:
    """What the fio rows mean, and `base` against the honest ceiling
    (fio-copy) round by round."""
    lines = []
    ordinary = [t for t in FIO_PARTS if t != "fio-copy" and summary.get(t, {}).get("runs")]
    if ordinary:
        lines.append("%s: ceilings with ordinary %s-page buffers, bs=1M: the block layer "
                     "splits their requests at the device's segment limit, so a copy in "
                     "huge pages can beat them" % (", ".join(ordinary),
                                                   short(mmap.PAGESIZE, "iB")))
    s = summary.get("fio-copy", {})
    if s.get("runs"):
        lines.append("fio-copy: the honest ceiling: SRC read and DST written at once, %s "
                     "requests (%s's), %d in flight per job, buffers: %s"
                     % (short(shape.io_size, "iB"), base, shape.depth, s.get("buffers", "?")))
        rounds = s.get("fastmirror_ratio_rounds")
        if rounds:
            lines.append("%s/fio-copy per round: %s; median %.2fx (ratio of medians %.2fx)"
                         % (base, " ".join("r%d %.2fx" % (n, x) for n, x in rounds),
                            s["fastmirror_ratio_paired"], s["fastmirror_ratio"]))
        if huge is not None and huge.dir is None and huge.why:
            lines.append("note: fio-copy is not the honest ceiling here: " + huge.describe())
    return "\n".join(lines)


def _writer_line(r: Run) -> str:
    d = r.detail
    parts = []
    if r.converged and d.get("completed") is False:
        parts.append("READY %.3f s, %s" % (r.ready_s or 0, d.get("note") or "not COMPLETED"))
    elif r.converged:
        parts.append("READY %.3f s, total %.3f s" % (r.ready_s or 0, r.wall_s))
    elif r.converged is False:
        parts.append("no READY in %.0f s (cancelled)" % (d.get("ready_timeout") or 0))
    if d.get("writer_rate_to_ready") is not None:
        parts.append("writer %.1f MB/s" % (d["writer_rate_to_ready"] / MB))
    if d.get("extra_bytes_copied") is not None:
        again = "copied again %s" % human(d["extra_bytes_copied"])
        if d.get("chunks_recopied") is not None:
            again += " (%d chunks)" % d["chunks_recopied"]
        parts.append(again)
    if d.get("copy_mode_final"):
        parts.append("mode %s%s" % (d["copy_mode_final"],
                                    " from %.1f s" % d["copy_mode_switch_s"]
                                    if d.get("copy_mode_switch_s") is not None else ""))
    parts.append("CPU %.2f s" % r.cpu_s)
    if not r.ok:
        parts.append("FAILED: %s" % r.error)
    return ", ".join(parts)


def chart_from_json(png: str, json_paths: Sequence[str]) -> Optional[str]:
    """Draw the chart of earlier runs from their --json files: the bulk
    table of the first that has one, the writer table of the first that has
    one.  Returns None when drawn, else why not."""
    summary = wsummary = None
    sizes, fs, dates = set(), set(), set()
    for path in json_paths:
        with open(path) as f:
            doc = json.load(f)
        if summary is None and any(s.get("runs") for s in (doc.get("summary") or {}).values()):
            summary = doc["summary"]
        w = doc.get("writer") or {}
        if wsummary is None and w.get("summary"):
            wsummary = w["summary"]
        sizes.add(human(doc["size"]))
        m = doc.get("machine", {})
        fs.add("%s -> %s" % (m.get("fs_source") or "?", m.get("fs_target") or "?"))
        dates.add(time.strftime("%Y-%m-%d", time.localtime(os.path.getmtime(path))))
    return draw_chart(png, summary, wsummary, title="fastmirror bench: %s, %s, %s" % (
        ", ".join(sorted(sizes)), ", ".join(sorted(fs)), ", ".join(sorted(dates))))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m fastmirror.bench.harness SRC DST ...` (the same as `fastmirror bench`);
    `python -m fastmirror.bench.harness chart OUT.png RUN.json...` redraws the
    chart of earlier runs."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["chart"]:
        if len(argv) < 3:
            print("usage: python -m fastmirror.bench.harness chart OUT.png RUN.json...",
                  file=sys.stderr)
            return EXIT_USAGE
        why = chart_from_json(argv[1], argv[2:])
        if why is not None:
            print("chart: not drawn: %s" % why, file=sys.stderr)
            return EXIT_FAIL
        print("chart: wrote %s" % argv[1])
        return EXIT_OK
    parser = argparse.ArgumentParser(prog="fastmirror bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
