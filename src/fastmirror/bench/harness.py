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

Export rounds (--exports): instead of the above, fastmirror's NBD export
(`fastmirror serve`) against qemu-storage-daemon's on the same SRC, driven by
fio --ioengine=nbd, and a writer's latency while each server mirrors SRC to
DST; see fastmirror.bench.exports.

NBD target rounds (--nbd-target): instead of the above, fastmirror mirroring
SRC into an NBD export (qemu-nbd serving DST; nbdkit's memory plugin behind
a 2 ms delay filter) against nbdcopy and QEMU's mirror job writing to an nbd
node; see fastmirror.bench.nbdtarget.  SRC is only read.

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
import math
import mmap
import os
import platform
import random
import stat
import sys
import textwrap
import time
from typing import Optional, Sequence

from fastmirror.bench import exports, mirrors, nbdtarget
from fastmirror.bench.baselines import (CopyShape, HugePages, copy_shape, find_tool,
                                        fio_engine, run_command, run_fio, tool_command)
from fastmirror.bench.chart import chart_from_json, draw_chart
from fastmirror.bench.disk import (check_markers, device_size, drop_caches, fs_type,
                                   full_compare, queue_limits, reset_target, tool_version)
from fastmirror.bench.images import make_image
from fastmirror.bench.records import FIO_PARTS, KiB, MiB, QEMU_COPY_MODES, TOOLS, Run, Variant
from fastmirror.bench.report import (ceiling_lines, format_table, format_writer_table,
                                     machine_line, summarize, summarize_writer, write_json,
                                     writer_line)
from fastmirror.bench.writers import WRITE_ALIGN, WRITE_MAX, WRITE_MIN, qemu_writer
from fastmirror.job.mirror import COPY_MODES, IO_ENGINES
from fastmirror.units import human, parse_size, short

__all__ = ["add_arguments", "run", "main", "run_tool", "run_writer", "parse_rate",
           "default_timeout", "default_writer_timeout"]

NOISY = 0.25                # a min-max spread above this (of the median) is noise
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


def _choices_list(what: str, allowed: Sequence[str]):
    """An argparse type: a comma-separated list, each item one of allowed."""
    def parse(text: str) -> list[str]:
        items = _list(text)
        if not items or any(i not in allowed for i in items):
            raise argparse.ArgumentTypeError("%s are a comma-separated list of %s, got %r"
                                             % (what, ", ".join(allowed), text))
        return items
    return parse


_tools_list = _choices_list("tools", TOOLS + FIO_PARTS)
_export_rows_list = _choices_list("export rows", exports.ROWS)
_nbd_targets_list = _choices_list("NBD targets", nbdtarget.TARGETS)
_nbd_tools_list = _choices_list("NBD tools", nbdtarget.TOOLS)
_modes_list = _choices_list("copy modes", COPY_MODES)
_io_engines_list = _choices_list("I/O engines", IO_ENGINES)


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
    x = parser.add_argument_group(
        "export rounds (--exports)",
        "fastmirror's NBD export (fastmirror serve) against qemu-storage-daemon's, both "
        "serving SRC, driven by fio --ioengine=nbd: (a) 4 KiB random writes at iodepth 16, "
        "(b) 1 MiB sequential writes, (c) 4 KiB random reads at iodepth 16, (d) a writer "
        "of 4 KiB random writes at a fixed rate while the server mirrors SRC to DST (its "
        "p99 latency during the mirror, and the mirror's duration).  --rounds, --seed, "
        "--settle, --timeout and --json apply; the bulk and writer rounds do not run.  "
        "The rows WRITE RANDOM DATA INTO SRC (a SRC made by --create, or --destroy-source)")
    x.add_argument("--exports", action="store_true",
                   help="run the export rounds instead of the mirror rounds")
    x.add_argument("--export-rows", type=_export_rows_list, default=list(exports.ROWS),
                   metavar="LIST", help="comma-separated subset of %s (default: all)"
                   % ",".join(exports.ROWS))
    x.add_argument("--export-seconds", type=_seconds, default=10.0, metavar="SECONDS",
                   help="fio's runtime in rows (a)-(c) (default 10)")
    x.add_argument("--export-cache", choices=("direct", "buffered"), default="direct",
                   help="direct (default): both servers open SRC (and DST) with O_DIRECT "
                        "(fastmirror serve --direct, QEMU cache.direct=on, aio=io_uring); "
                        "buffered: both through the page cache")
    x.add_argument("--export-write-depth", type=_positive, default=4, metavar="N",
                   help="fio's iodepth in row (b) (default 4)")
    x.add_argument("--export-writer-iops", type=_positive, default=2000, metavar="N",
                   help="row (d): the writer's pace in writes per second (default 2000)")
    x.add_argument("--export-writer-depth", type=_positive, default=4, metavar="N",
                   help="row (d): the writer's iodepth (default 4)")
    n = parser.add_argument_group(
        "NBD target rounds (--nbd-target)",
        "fastmirror mirroring SRC into an NBD export, against nbdcopy (with and without "
        "--flush) and QEMU's mirror job (qemu-storage-daemon, blockdev-mirror to an nbd "
        "node), in interleaved rounds shuffled with --seed.  Targets: qemu-nbd serving "
        "DST (a file, truncated before every run), and delay: nbdkit's memory plugin "
        "behind its delay filter, %s per write (no file).  SRC is only read; an existing "
        "DST that is not empty needs --destroy-target.  --rounds, --seed, --settle and "
        "--json apply; the other rounds do not run" % nbdtarget.nbd.DELAY)
    n.add_argument("--nbd-target", action="store_true",
                   help="run the NBD target rounds instead of the mirror rounds")
    n.add_argument("--nbd-targets", type=_nbd_targets_list, default=list(nbdtarget.TARGETS),
                   metavar="LIST", help="comma-separated subset of %s (default: all)"
                   % ",".join(nbdtarget.TARGETS))
    n.add_argument("--nbd-tools", type=_nbd_tools_list, default=list(nbdtarget.TOOLS),
                   metavar="LIST", help="comma-separated subset of %s (default: all; "
                   "fastmirror always runs, the base of the ratios; nbdcopy-flush and "
                   "qemu-mirror run on the qemu-nbd target only)" % ",".join(nbdtarget.TOOLS))
    n.add_argument("--connections", type=_positive, default=None, metavar="N",
                   help="fastmirror's NBD connections (default: MirrorJob's, 2 where the "
                        "server allows multi-conn)")
    parser.add_argument("--destroy-target", action="store_true",
                        help="allow writing to a block device DST (--nbd-target: truncating "
                             "a DST that is not empty): ITS DATA WILL BE DESTROYED")
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


# ---------------------------------------------------------------------------
# One run
# ---------------------------------------------------------------------------

def run_tool(tool: str, src: str, dst: str, size: int, *, granularity: int = 65536,
             buf_size: int = 16 << 20, timeout: Optional[float] = None,
             path: Optional[str] = None, max_io: Optional[int] = None,
             engine: str = "libaio", label: Optional[str] = None,
             io_engine: str = "auto", shape: Optional[CopyShape] = None) -> Run:
    """Run one tool once, copying [0, size) of src to dst; timed (fio parts:
    the ceilings, not a copy; fio-copy shaped by `shape`)."""
    if tool == "fastmirror":
        return mirrors.run_fastmirror(src, dst, size, granularity, buf_size, timeout,
                                      max_io=max_io, label=label or tool,
                                      io_engine=io_engine)
    if tool == "qemu-mirror":
        return mirrors.run_qemu_mirror(src, dst, size, granularity, buf_size, timeout,
                                       label=label or tool)
    if tool in FIO_PARTS:
        return run_fio(tool, src, dst, size, timeout, path, engine,
                       shape if tool == "fio-copy" else None)
    run, _ = run_command(label or tool, tool_command(tool, src, dst, path), size, timeout)
    return run


def run_writer(variant: Variant, src: str, dst: str, size: int, rate_label: str,
               rate: Optional[int], *, granularity: int = 65536,
               timeout: Optional[float] = None, ready_timeout: Optional[float] = None,
               writer_kind: Optional[str] = None, writer_path: Optional[str] = None,
               writer_depth: int = 4) -> Run:
    """One writer round of a mirror: the job runs while a writer writes at
    `rate` (0: none; None: unthrottled)."""
    if variant.tool == "fastmirror":
        return mirrors.run_fastmirror(src, dst, size, granularity, variant.buf_size, timeout,
                                      max_io=variant.max_io,
                                      copy_mode=variant.copy_mode or "auto",
                                      writer=(rate_label, rate), ready_timeout=ready_timeout,
                                      writer_depth=writer_depth, label=variant.label,
                                      io_engine=variant.io_engine)
    if variant.tool == "qemu-mirror":
        if writer_kind is None and rate != 0:
            writer_kind, writer_path, _ = qemu_writer()
        return mirrors.run_qemu_mirror(src, dst, size, granularity, variant.buf_size, timeout,
                                       copy_mode=variant.copy_mode or "background",
                                       writer=(rate_label, rate), ready_timeout=ready_timeout,
                                       writer_kind=writer_kind, writer_path=writer_path,
                                       writer_depth=writer_depth, label=variant.label)
    raise ValueError("%s is not a mirror job" % variant.tool)


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
        make_image(src, args.create, exclusive=True)
        created = True
        notes.append("created source %s: %s of pseudo-random data in %.1f s"
                     % (src, human(args.create), time.monotonic() - t0))
    elif args.create is not None:
        notes.append("source exists: --create ignored, using it as it is")
    sst = os.stat(src)
    if not (stat.S_ISREG(sst.st_mode) or stat.S_ISBLK(sst.st_mode)):
        raise BenchError("source %s is not a regular file or a block device" % src)
    size = device_size(src)
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
        dsize = device_size(dst)
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
            if getattr(args, "exports", False) and getattr(args, "nbd_target", False):
                raise BenchError("--exports and --nbd-target are different modes: "
                                 "choose one")
            if getattr(args, "exports", False):
                return _exports(args)
            if getattr(args, "nbd_target", False):
                return _nbd_target(args)
            return _bench(args, undo)
        except BenchError as e:
            print("fastmirror bench: %s" % e, file=sys.stderr)
            return EXIT_USAGE


def _refuse_busy_device(src: str) -> None:
    """BenchError when the block device `src` is mounted or held open
    exclusively (O_EXCL on a block device fails with EBUSY then): the bench
    is about to write into it."""
    try:
        os.close(os.open(src, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
    except OSError as e:
        raise BenchError("source %s is in use (mounted or held open exclusively): %s"
                         % (src, e.strerror)) from None


def _print_report(args, doc: dict, text: str) -> int:
    """The export and NBD target rounds' end: the report printed, the JSON
    written with --json; the exit status (EXIT_FAIL when a run failed)."""
    print()
    print(text)
    if args.json:
        write_json(args.json, doc)
    return EXIT_FAIL if any(not r["ok"] for r in doc["runs"]) else EXIT_OK


def _exports(args) -> int:
    """`fastmirror bench --exports SRC DST`: the export rounds."""
    src, dst, size, dst_is_block, notes, created = _check_paths(args)
    if not created and not args.destroy_source:
        raise BenchError("the export rows write random data into the source %s: refusing "
                         "without --destroy-source (only a source that --create made in "
                         "this run is written without it)" % src)
    if stat.S_ISBLK(os.stat(src).st_mode):
        _refuse_busy_device(src)
    notes.append("the export rows write random data into the source %s" % src)
    if not dst_is_block:
        if not os.path.exists(dst):
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.close(fd)
            notes.append("created target %s (%s)" % (dst, human(size)))
        os.truncate(dst, size)      # each mirror starts from it empty (sparse)
    try:
        doc, text = exports.run_exports(args, src, dst, size, notes)
    except FileNotFoundError as e:
        raise BenchError(str(e)) from None
    return _print_report(args, doc, text)


def _nbd_target(args) -> int:
    """`fastmirror bench --nbd-target SRC DST`: the NBD target rounds.  Every
    refusal comes before anything is written."""
    from fastmirror.job.endpoints import check_not_same

    src, dst = os.path.abspath(args.source), os.path.abspath(args.target)
    if src == dst:
        raise BenchError("source %s and target %s are the same file" % (src, dst))
    src_exists = os.path.exists(src)
    if not src_exists and args.create is None:
        raise BenchError("source %s does not exist (use --create SIZE to make one)" % src)
    if not src_exists and (args.create <= 0 or not os.path.isdir(os.path.dirname(src))):
        raise BenchError("cannot create source %s: %s" % (src, "--create needs a positive "
                         "size" if args.create <= 0 else "its folder does not exist"))
    if src_exists:
        sst = os.stat(src)
        if not (stat.S_ISREG(sst.st_mode) or stat.S_ISBLK(sst.st_mode)):
            raise BenchError("source %s is not a regular file or a block device" % src)
        if device_size(src) == 0:
            raise BenchError("source %s is empty" % src)
    uses_dst = "qemu-nbd" in args.nbd_targets
    try:
        dst_st: Optional[os.stat_result] = os.stat(dst)
    except FileNotFoundError:
        dst_st = None
    if dst_st is None:
        if uses_dst and not os.path.isdir(os.path.dirname(dst)):
            raise BenchError("folder of target %s does not exist" % dst)
    else:
        if src_exists:
            try:
                check_not_same(src, os.stat(src), dst, dst_st)
            except ValueError as e:
                raise BenchError(str(e)) from None
        if not stat.S_ISREG(dst_st.st_mode):
            raise BenchError("target %s is not a regular file: qemu-nbd's target is a file "
                             "truncated before every run" % dst)
        if dst_st.st_size > 0 and uses_dst and not args.destroy_target:
            raise BenchError("target %s exists and is not empty: refusing to truncate it "
                             "without --destroy-target" % dst)
    runs_plan, skipped = nbdtarget.plan(args.nbd_targets, args.nbd_tools)
    if not runs_plan:
        raise BenchError("nothing to run: %s" % ("; ".join(
            "%s: %s" % kv for kv in skipped.items()) or "no target selected"))
    uses_dst = "qemu-nbd" in runs_plan
    notes: list[str] = []
    if not src_exists:
        t0 = time.monotonic()
        # Like fastmirror.bench.nbd's source: about half of it holes.
        make_image(src, args.create, data_fraction=0.5, seed=1, exclusive=True)
        notes.append("created source %s: %s, about half of it holes, in %.1f s"
                     % (src, human(args.create), time.monotonic() - t0))
    elif args.create is not None:
        notes.append("source exists: --create ignored, using it as it is")
    size = device_size(src)
    if uses_dst and dst_st is None:
        fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        notes.append("created target %s" % dst)
    doc, text = nbdtarget.run_nbd_target(args, src, dst, size, runs_plan, skipped, notes)
    return _print_report(args, doc, text)


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
            _refuse_busy_device(src)
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
            "block device" if dst_is_block else "regular file (%s)" % (fs_type(dst) or "?"),
            "truncated before every run" if fresh else "overwritten in place",
            "dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches)"
            if dropping else "not dropped (%s), sync before every run"
            % ("--no-drop-caches" if not args.drop_caches else "not root")),
        machine_line(),
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
                limits = queue_limits(dst)
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
                        diff = full_compare(src, dst, size)
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
                                                                 writer_line(r)))
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
        ceiling = ceiling_lines(summary, base, shape, huge)
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
                             human(size), fs_type(src) or "?", fs_type(dst) or "?",
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
                "fs_source": fs_type(src), "fs_target": fs_type(dst),
                "versions": {t: tool_version("fio" if t in FIO_PARTS else t, paths[t])
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
        write_json(args.json, doc)
    return EXIT_FAIL if failed else EXIT_OK


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
