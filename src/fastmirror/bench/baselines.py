"""The baselines beside fastmirror: finding and running dd, qemu-img and
fio (its ordinary-page ceilings, and fio-copy, the copy ceiling shaped as
fastmirror's copies, in huge pages set up here).  QEMU's mirror job is in
mirrors.py (and qemu.py)."""

from __future__ import annotations

import json
import mmap
import os
import resource
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from fastmirror.bench.records import FIO_PARTS, GB, KiB, Run
from fastmirror.units import short

__all__ = ["HUGEPAGES_OFF", "find_tool", "CopyShape", "copy_shape", "HugePages",
           "tool_command", "fio_engine", "run_command", "run_fio", "rusage"]

HUGEPAGES_OFF = "FASTMIRROR_BENCH_NO_HUGEPAGES"   # =1: fio-copy without huge pages (tests)


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


def rusage(who: int) -> tuple[float, float]:
    r = resource.getrusage(who)
    return r.ru_utime, r.ru_stime


def run_command(tool: str, cmd: list[str], size: int,
                timeout: Optional[float]) -> tuple[Run, bytes]:
    run = Run(tool, 0, False, size, command=cmd)
    u0, s0 = rusage(resource.RUSAGE_CHILDREN)
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
    u1, s1 = rusage(resource.RUSAGE_CHILDREN)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    run.returncode = p.returncode
    run.ok = p.returncode == 0
    if not run.ok:
        msg = (p.stderr or p.stdout or b"").decode(errors="replace").strip()
        run.error = "exit status %d%s" % (p.returncode, (": " + msg[-500:]) if msg else "")
    return run, p.stdout


def run_fio(part: str, src: str, dst: str, size: int, timeout: Optional[float],
            path: Optional[str], engine: str, shape: Optional[CopyShape] = None) -> Run:
    if part == "fio-copy":
        shape = shape or CopyShape()
    cmd = tool_command(part, src, dst, path, size=size, engine=engine, shape=shape)
    run, out = run_command(part, cmd, size, timeout)
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
