"""`fastmirror bench SRC DST`: bulk mirror throughput, side by side with baselines.

Every round runs each tool once on the same source and target, in an order
that rotates from round to round (so no tool always runs first or last):

  fastmirror  MirrorJob(SRC, DST): start, wait for READY, complete, wait for
              COMPLETED (in this process; timed from building the job to the
              final event, and to READY).  The target is flushed (fdatasync)
              before READY and again at the end.
  dd          dd if=SRC of=DST bs=4M iflag=direct oflag=direct
              conv=notrunc,fdatasync status=none
  qemu-img    qemu-img convert -n -f raw -O raw -t none -T none -m 16 -W SRC DST
              (O_DIRECT on both sides, 16 requests in flight, out-of-order
              writes; flushes the target when it closes it)

so every tool reads with O_DIRECT, writes with O_DIRECT and makes the target
durable before it counts as done.  A baseline whose tool is not installed is
skipped, and the report says so.

Before each run (untimed): sync, drop the page cache when running as root
(echo 3 > /proc/sys/vm/drop_caches), and overwrite three 4 KiB blocks of the
target (start, middle, end) with a marker, so that a tool that silently did
nothing is caught: after each run those blocks must equal the source's.
--verify compares the whole target after each run (untimed).

Wall time is time.perf_counter(); CPU time is user + system seconds from
getrusage(): RUSAGE_CHILDREN deltas for the baselines (the whole process,
every thread), RUSAGE_SELF deltas for fastmirror (every thread of this
process: copy workers, the job's coordinator and the waiting caller).

Safety: a regular-file target is overwritten (created when missing); a block
device target is written only with --destroy-target, and never while mounted
or otherwise held exclusively.  SRC is only read, except that --create makes
it when it does not exist.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

__all__ = ["add_arguments", "run", "main", "TOOLS", "Run", "create_source",
           "tool_command", "find_tool", "run_tool", "reset_target", "check_markers",
           "drop_caches", "summarize", "parse_size", "default_timeout"]

TOOLS = ("fastmirror", "dd", "qemu-img")
GB = 1e9
GiB = 1 << 30
MiB = 1 << 20
MARK = 4096                 # bytes of each marker block written before a run
NOISY = 0.25                # a min-max spread above this (of the median) is noise
EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2

_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40, "p": 1 << 50}


class BenchError(Exception):
    """A refusal or bad input: exit status 2, nothing written."""


def parse_size(text: str) -> int:
    """'65536', '64K', '64KiB', '1.5G', '16MB' (binary units) -> bytes."""
    s = str(text).strip().lower()
    for suffix in ("ib", "b"):
        if s.endswith(suffix) and len(s) > len(suffix) and s[-len(suffix) - 1] in "kmgtp":
            s = s[: -len(suffix)]
            break
    unit = s[-1:] if s[-1:] in _UNITS and s[-1:] else ""
    number = s[: len(s) - len(unit)]
    try:
        value = float(number) if "." in number else int(number)
    except ValueError:
        raise argparse.ArgumentTypeError("not a size: %r" % text) from None
    if value < 0:
        raise argparse.ArgumentTypeError("size must not be negative: %r" % text)
    return int(value * _UNITS[unit])


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%.0f %s" if unit == "B" else "%.2f %s") % (n, unit)
        n /= 1024
    return "%.2f TiB" % n


def _tools_list(text: str) -> list[str]:
    tools = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in tools if t not in TOOLS]
    if bad or not tools:
        raise argparse.ArgumentTypeError("tools are a comma-separated list of %s, got %r"
                                         % (", ".join(TOOLS), text))
    return list(dict.fromkeys(tools))


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if n < 1:
        raise argparse.ArgumentTypeError("must be at least 1: %r" % text)
    return n


def _nonnegative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError("not an integer: %r" % text) from None
    if n < 0:
        raise argparse.ArgumentTypeError("must not be negative: %r" % text)
    return n


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `fastmirror bench`."""
    parser.description = "\n\n".join(textwrap.fill(p, 78) for p in (
        "Bulk mirror throughput of fastmirror on SRC -> DST, side by side with dd and "
        "qemu-img convert (all with O_DIRECT and a final flush of the target), in "
        "interleaved rounds.",
        "A regular-file DST IS OVERWRITTEN (and created when missing); a block device "
        "DST is written only with --destroy-target."))
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "\n\n".join(textwrap.fill(p, 78) for p in (
        "Before each run the page cache is dropped when running as root (sync; echo 3 > "
        "/proc/sys/vm/drop_caches), and three 4 KiB marker blocks of DST are overwritten, "
        "so that a tool that copied nothing is caught.",
        "Example: fastmirror bench --create 1G /var/tmp/src.img /var/tmp/dst.img"))
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
                        help="untimed rounds first (default 1): they load the tools and "
                             "leave the target fully allocated")
    parser.add_argument("--tools", type=_tools_list, default=list(TOOLS),
                        help="comma-separated subset of %s (default: all)" % ",".join(TOOLS))
    parser.add_argument("--granularity", type=parse_size, default=65536,
                        help="fastmirror: bytes per dirty-bitmap chunk (default 64K)")
    parser.add_argument("--buf-size", type=parse_size, default=16 << 20,
                        help="fastmirror: bytes of copy buffers in flight (default 16M)")
    parser.add_argument("--fresh-target", action="store_true",
                        help="truncate a file DST to zero and back to size before every "
                             "run, so each tool writes into unallocated space (default: "
                             "overwrite allocated blocks in place)")
    parser.add_argument("--no-drop-caches", dest="drop_caches", action="store_false",
                        help="do not drop the page cache between runs")
    parser.add_argument("--verify", action="store_true",
                        help="compare the whole target with the source after every run "
                             "(untimed)")
    parser.add_argument("--timeout", type=float, default=None, metavar="SECONDS",
                        help="give up on one run after this long (default: 60 s plus "
                             "1 s per 20 MB)")
    parser.add_argument("--destroy-target", action="store_true",
                        help="allow writing to a block device DST: ITS DATA WILL BE "
                             "DESTROYED")
    parser.add_argument("--json", metavar="FILE", default=None,
                        help="write every raw run and the summary as JSON to FILE "
                             "('-' for stdout)")


# ---------------------------------------------------------------------------
# One run of one tool
# ---------------------------------------------------------------------------

@dataclass
class Run:
    tool: str
    round: int                      # 1-based; 0 for warm-up rounds
    warmup: bool
    bytes: int
    ok: bool = False
    wall_s: float = 0.0
    ready_s: Optional[float] = None  # fastmirror: seconds to READY
    user_s: float = 0.0
    sys_s: float = 0.0
    returncode: Optional[int] = None
    error: Optional[str] = None
    command: Optional[list] = None
    detail: dict = field(default_factory=dict)

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
    path = shutil.which(tool)
    if path is None:
        return None, "%s is not installed (not on PATH)" % tool
    return path, None


def tool_command(tool: str, src: str, dst: str, path: Optional[str] = None) -> list[str]:
    """The baseline's command line, as run."""
    if tool == "dd":
        return [path or "dd", "if=" + src, "of=" + dst, "bs=4M", "iflag=direct",
                "oflag=direct", "conv=notrunc,fdatasync", "status=none"]
    if tool == "qemu-img":
        return [path or "qemu-img", "convert", "-n", "-f", "raw", "-O", "raw",
                "-t", "none", "-T", "none", "-m", "16", "-W", src, dst]
    raise ValueError("no command for %r" % tool)


def _rusage(who: int) -> tuple[float, float]:
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


def _run_command(tool: str, cmd: list[str], size: int, timeout: Optional[float]) -> Run:
    run = Run(tool, 0, False, size, command=cmd)
    u0, s0 = _rusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    try:
        p = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        run.wall_s = time.perf_counter() - t0
        run.error = "timed out after %.0f s" % (timeout or 0)
        return run
    except OSError as e:
        run.error = "cannot run %s: %s" % (cmd[0], e)
        return run
    run.wall_s = time.perf_counter() - t0
    u1, s1 = _rusage(resource.RUSAGE_CHILDREN)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    run.returncode = p.returncode
    run.ok = p.returncode == 0
    if not run.ok:
        msg = (p.stderr or p.stdout or b"").decode(errors="replace").strip()
        run.error = "exit status %d%s" % (p.returncode, (": " + msg[-500:]) if msg else "")
    return run


def _run_fastmirror(src: str, dst: str, size: int, granularity: int, buf_size: int,
                    timeout: Optional[float]) -> Run:
    from fastmirror import EventType, MirrorJob

    run = Run("fastmirror", 0, False, size,
              command=["MirrorJob(%r, %r, granularity=%d, buf_size=%d)"
                       % (src, dst, granularity, buf_size)])
    u0, s0 = _rusage(resource.RUSAGE_SELF)
    t0 = time.perf_counter()
    deadline = None if timeout is None else time.monotonic() + timeout

    def left() -> Optional[float]:
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    try:
        job = MirrorJob(src, dst, granularity=granularity, buf_size=buf_size)
    except (OSError, ValueError) as e:
        run.error = "MirrorJob refused: %s" % e
        return run
    try:
        t_start = time.perf_counter()
        job.start()
        if job.wait_ready(left()):
            job.complete()
            final = job.wait(left())
        else:
            final = job.wait(0)
        run.wall_s = time.perf_counter() - t0
        st = job.status()
        if st.time_to_ready is not None:
            run.ready_s = (t_start - t0) + st.time_to_ready
        engine = getattr(job, "_engine", None)
        run.detail = {
            "io_mode": getattr(st, "io_mode", None),
            "bytes_copied": getattr(st, "bytes_copied", None),
            "nworkers": getattr(engine, "nworkers", None),
            "max_io": getattr(engine, "max_io", None),
            "bytes_zero_detected": getattr(engine, "bytes_zero_detected", None),
        }
        if final is None:
            run.error = "timed out after %.0f s (state %s)" % (timeout or 0, st.state)
        elif final.type != EventType.COMPLETED:
            run.error = "job ended %s%s" % (final.type.value,
                                             (": %s" % final.error) if final.error else "")
        else:
            run.ok = True
    finally:
        job.close()       # a job still running is cancelled (force) and joined
    u1, s1 = _rusage(resource.RUSAGE_SELF)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    return run


def run_tool(tool: str, src: str, dst: str, size: int, *, granularity: int = 65536,
             buf_size: int = 16 << 20, timeout: Optional[float] = None,
             path: Optional[str] = None) -> Run:
    """Run one tool once, copying [0, size) of src to dst; timed."""
    if tool == "fastmirror":
        return _run_fastmirror(src, dst, size, granularity, buf_size, timeout)
    return _run_command(tool, tool_command(tool, src, dst, path), size, timeout)


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
    from fastmirror.verify import first_difference
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
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                    best, fstype = mnt, parts[2]
        return fstype
    except OSError:
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

def summarize(runs: Sequence[Run], tools: Sequence[str]) -> dict:
    """Per tool over the timed, successful runs: medians and ranges; and the
    ratio of fastmirror's median throughput to each tool's."""
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
            ready = [r.ready_gbps for r in ok if r.ready_gbps is not None]
            if ready:
                s.update(median_ready_gbps=statistics.median(ready),
                         min_ready_gbps=min(ready), max_ready_gbps=max(ready),
                         median_ready_s=statistics.median(r.ready_s for r in ok
                                                          if r.ready_s is not None))
        out[tool] = s
    fm = out.get("fastmirror", {}).get("median_gbps")
    fm_by_round = {r.round: r.gbps for r in runs
                   if r.tool == "fastmirror" and not r.warmup and r.ok}
    for tool, s in out.items():
        if fm and s.get("median_gbps"):
            s["fastmirror_ratio"] = fm / s["median_gbps"]
        # Rounds run every tool back to back, so the ratio within a round is
        # less exposed to a machine whose speed drifts between rounds.
        paired = [fm_by_round[r.round] / r.gbps for r in runs
                  if r.tool == tool and not r.warmup and r.ok and r.gbps > 0
                  and r.round in fm_by_round]
        if paired and tool != "fastmirror":
            s["fastmirror_ratio_paired"] = statistics.median(paired)
        if s.get("median_gbps"):
            s["spread"] = (s["max_gbps"] - s["min_gbps"]) / s["median_gbps"]
    return out


def format_table(summary: dict, skipped: dict) -> str:
    head = ("tool", "runs", "median GB/s", "min-max GB/s", "median MiB/s",
            "min-max MiB/s", "CPU s/GiB", "fastmirror/tool", "per round")
    rows = [head]
    for tool, s in summary.items():
        if not s.get("runs"):
            rows.append((tool, "0/%d" % s["failed"], "-", "-", "-", "-", "-", "-", "-"))
            continue
        runs = "%d" % s["runs"] if not s["failed"] else "%d (+%d failed)" % (s["runs"], s["failed"])
        ratio = s.get("fastmirror_ratio")
        rows.append((
            tool, runs, "%.3f" % s["median_gbps"],
            "%.3f-%.3f" % (s["min_gbps"], s["max_gbps"]),
            "%.0f" % s["median_mibps"], "%.0f-%.0f" % (s["min_mibps"], s["max_mibps"]),
            "%.3f" % s["median_cpu_s_per_gib"],
            "-" if tool == "fastmirror" or ratio is None else "%.2fx" % ratio,
            "%.2fx" % s["fastmirror_ratio_paired"] if "fastmirror_ratio_paired" in s else "-"))
        if "median_ready_gbps" in s:
            rows.append((
                "  (to READY)", "", "%.3f" % s["median_ready_gbps"],
                "%.3f-%.3f" % (s["min_ready_gbps"], s["max_ready_gbps"]),
                "%.0f" % (s["median_ready_gbps"] * GB / MiB),
                "%.0f-%.0f" % (s["min_ready_gbps"] * GB / MiB, s["max_ready_gbps"] * GB / MiB),
                "", "", ""))
    for tool, why in skipped.items():
        rows.append((tool, "skipped: " + why, "", "", "", "", "", "", ""))
    widths = [max(len(r[i]) for r in rows if not r[1].startswith("skipped"))
              for i in range(len(head))]
    lines = []
    for r in rows:
        if r[1].startswith("skipped"):
            lines.append("%-*s  %s" % (widths[0], r[0], r[1]))
            continue
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(lines)


# ---------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------

def _check_paths(args) -> tuple[str, str, int, bool, list[str]]:
    """Validate (and with --create, make) the source and the target; returns
    (src, dst, size, dst_is_block, notes).  Raises BenchError on a refusal."""
    from fastmirror.paths import check_not_same

    src, dst = os.path.abspath(args.source), os.path.abspath(args.target)
    notes: list[str] = []
    if not os.path.exists(src):
        if args.create is None:
            raise BenchError("source %s does not exist (use --create SIZE to make one)" % src)
        if args.create <= 0:
            raise BenchError("--create needs a positive size")
        if not os.path.isdir(os.path.dirname(src)):
            raise BenchError("folder of source %s does not exist" % src)
        t0 = time.monotonic()
        create_source(src, args.create)
        notes.append("created source %s: %s of pseudo-random data in %.1f s"
                     % (src, _human(args.create), time.monotonic() - t0))
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
        return src, dst, size, False, notes
    try:
        check_not_same(src, sst, dst, dst_st)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if stat.S_ISBLK(dst_st.st_mode):
        if not args.destroy_target:
            raise BenchError("target %s is a block device: refusing to write to it without "
                             "--destroy-target (every tool overwrites the first %s of it)"
                             % (dst, _human(size)))
        try:   # O_EXCL on a block device: fails with EBUSY while mounted or held
            os.close(os.open(dst, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            raise BenchError("target %s is in use (mounted or held open exclusively): %s"
                             % (dst, e.strerror)) from None
        dsize = _device_size(dst)
        if dsize < size:
            raise BenchError("target %s (%d bytes) is smaller than source %s (%d bytes)"
                             % (dst, dsize, src, size))
        return src, dst, size, True, notes
    if not stat.S_ISREG(dst_st.st_mode):
        raise BenchError("target %s is not a regular file or a block device" % dst)
    return src, dst, size, False, notes


def default_timeout(size: int) -> float:
    """Seconds one run may take before it counts as hung."""
    return 60.0 + size / 20e6


def run(args) -> int:
    """`fastmirror bench`: returns the exit status."""
    try:
        return _bench(args)
    except BenchError as e:
        print("fastmirror bench: %s" % e, file=sys.stderr)
        return EXIT_USAGE


def _bench(args) -> int:
    from fastmirror import MirrorJob  # noqa: F401  (fail early if the build is broken)

    tools: list[str] = list(args.tools)
    paths: dict[str, Optional[str]] = {}
    skipped: dict[str, str] = {}
    for tool in tools:
        path, why = find_tool(tool)
        if path is None:
            skipped[tool] = why or "not available"
        else:
            paths[tool] = path
    tools = [t for t in tools if t in paths]
    if not tools:
        raise BenchError("no tool to run: %s" % "; ".join(skipped.values()))

    src, dst, size, dst_is_block, notes = _check_paths(args)
    timeout = args.timeout if args.timeout is not None else default_timeout(size)

    # A target file that is missing or too small is made the source's size;
    # the warm-up round (or, without one, an untimed copy) then writes all
    # of it, so that the timed runs all overwrite allocated blocks.
    fill = False
    if not dst_is_block:
        if not os.path.exists(dst):
            fd = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
            os.ftruncate(fd, size)
            os.close(fd)
            notes.append("created target %s (%s)" % (dst, _human(size)))
            fill = True
        elif os.stat(dst).st_size < size:
            os.truncate(dst, size)
            notes.append("extended target %s to %s" % (dst, _human(size)))
            fill = True
    if fill and args.warmup == 0 and not args.fresh_target:
        reset_target(dst, size)
        r = run_tool("fastmirror", src, dst, size, granularity=args.granularity,
                     buf_size=args.buf_size, timeout=timeout)
        if not r.ok:
            print("fastmirror bench: filling the target failed: %s" % r.error, file=sys.stderr)
            return EXIT_FAIL

    dropping = args.drop_caches and os.geteuid() == 0 and os.access(
        "/proc/sys/vm/drop_caches", os.W_OK)
    if args.fresh_target and dst_is_block:
        notes.append("--fresh-target ignored: the target is a block device")
    fresh = args.fresh_target and not dst_is_block

    header = [
        "fastmirror bench: %s -> %s, %s (%d bytes), %d round%s + %d warm-up, tool order "
        "rotated each round" % (src, dst, _human(size), size, args.rounds,
                                "s" if args.rounds != 1 else "", args.warmup),
        "target: %s, %s; page cache: %s" % (
            "block device" if dst_is_block else "regular file (%s)" % (_fs_type(dst) or "?"),
            "truncated before every run" if fresh else "overwritten in place",
            "dropped before every run (sync; echo 3 > /proc/sys/vm/drop_caches)"
            if dropping else "not dropped (%s), sync before every run"
            % ("--no-drop-caches" if not args.drop_caches else "not root")),
        "fastmirror: granularity %s, buf-size %s" % (_human(args.granularity),
                                                     _human(args.buf_size)),
    ]
    for tool in tools:
        if tool != "fastmirror":
            header.append("%s: %s" % (tool, " ".join(tool_command(tool, "SRC", "DST"))))
    for line in notes + header:
        print(line)
    sys.stdout.flush()

    runs: list[Run] = []
    failed = 0
    schedule = [(0, True)] * args.warmup + [(i + 1, False) for i in range(args.rounds)]
    for n, (rnd, warm) in enumerate(schedule):
        k = n % len(tools)
        for tool in tools[k:] + tools[:k]:
            reset_target(dst, size, fresh)
            if dropping:
                drop_caches()
            else:
                os.sync()
            r = run_tool(tool, src, dst, size, granularity=args.granularity,
                         buf_size=args.buf_size, timeout=timeout, path=paths[tool])
            r.round, r.warmup = rnd, warm
            if r.ok:
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
                print("  %-8s %-10s %7.3f s  %6.3f GB/s  %7.1f MiB/s  CPU %.2f s (user %.2f, "
                      "sys %.2f)%s" % (label, tool, r.wall_s, r.gbps, r.mibps, r.cpu_s,
                                       r.user_s, r.sys_s, extra))
            else:
                failed += 1
                print("  %-8s %-10s FAILED: %s" % (label, tool, r.error))
            sys.stdout.flush()

    summary = summarize(runs, tools)
    print()
    print(format_table(summary, skipped))
    if "fastmirror" in summary:
        fm = next((r for r in runs if r.tool == "fastmirror" and r.detail), None)
        if fm is not None:
            d = fm.detail
            print("fastmirror ran with %s workers x %s per copy, I/O %s" % (
                d.get("nworkers"), _human(d["max_io"]) if d.get("max_io") else "?",
                d.get("io_mode")))
    print("GB/s = 1e9 bytes/s; CPU = user + system seconds per GiB copied; "
          "fastmirror/tool = ratio of median throughputs (>1: fastmirror faster); "
          "per round = median of the ratios within each round")
    noisy = ["%s %.0f%%" % (t, 100 * s["spread"]) for t, s in summary.items()
             if s.get("spread", 0) > NOISY and s.get("runs", 0) > 1]
    if noisy:
        print("note: noisy machine: min-max spread of %s around the median; "
              "differences smaller than that need more --rounds" % ", ".join(noisy))

    if args.json:
        doc = {
            "version": 1,
            "source": src,
            "target": dst,
            "size": size,
            "target_kind": "block" if dst_is_block else "file",
            "settings": {
                "rounds": args.rounds, "warmup": args.warmup, "tools": tools,
                "granularity": args.granularity, "buf_size": args.buf_size,
                "fresh_target": fresh, "drop_caches": bool(dropping),
                "verify": bool(args.verify), "timeout": timeout,
            },
            "commands": {t: tool_command(t, src, dst, paths[t]) for t in tools
                         if t != "fastmirror"},
            "skipped": skipped,
            "machine": {
                "kernel": platform.release(), "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "fs_source": _fs_type(src), "fs_target": _fs_type(dst),
                "versions": {t: _tool_version(t, paths[t]) for t in tools},
            },
            "notes": notes,
            "rounds": [r.to_dict() for r in runs],
            "summary": summary,
        }
        text = json.dumps(doc, indent=2)
        if args.json == "-":
            print(text)
        else:
            with open(args.json, "w") as f:
                f.write(text + "\n")
    return EXIT_FAIL if failed else EXIT_OK


def main(argv: Optional[Sequence[str]] = None) -> int:
    """`python -m fastmirror.benchmark SRC DST ...` (the same as `fastmirror bench`)."""
    parser = argparse.ArgumentParser(prog="fastmirror bench")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
