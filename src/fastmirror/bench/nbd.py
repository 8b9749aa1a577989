"""Mirroring into an NBD export: fastmirror side by side with nbdcopy and
with QEMU's mirror job writing to an NBD node.

The source is FASTMIRROR_BENCH_NBD_SIZE bytes (default 256 MiB) of
pseudo-random data with about half of it holes (4 MiB extents, seeded), made
once per session.  Two targets:

  qemu-nbd   qemu-nbd -t -k SOCK -f raw serving a file on this machine; the
             file is emptied (truncated) before every run, untimed
  delay      nbdkit's memory plugin behind the delay filter, 2 ms per WRITE
             and per WRITE_ZEROES; restarted (empty) before every run

and the tools, each doing the whole copy, holes made to read zeros:

  fastmirror   MirrorJob(SRC, URI) built untimed (it opens the source and
               connects, as QEMU's blockdev-add does before its clock);
               start, READY, complete, COMPLETED (the target flushed), in
               this process: CPU is getrusage of this process over the job,
               every thread included
  nbdcopy      nbdcopy SRC URI (libnbd; its defaults: 4 connections where
               the server allows multi-conn, 64 requests in flight): CPU of
               the child; it flushes nothing unless asked
  nbdcopy-flush  nbdcopy --flush SRC URI: the target made durable at the
               end, as fastmirror and QEMU's mirror do (qemu-nbd target only)
  qemu-mirror  qemu-storage-daemon with the source as a file node
               (cache.direct=on, aio=native) and the target as an nbd node;
               blockdev-mirror with QEMU's defaults, READY,
               block-job-complete, COMPLETED; the daemon's start is not
               timed, its CPU over the job is (qemu-nbd target only)

Rounds are interleaved (each round runs every tool once in a shuffled
order, the source's pages dropped from the page cache before each run:
drop_source), and the result
is the median per tool and the median of the per-round ratios, time and
CPU seconds per GiB of the source.  The target's own CPU (qemu-nbd,
nbdkit) is the same server for every tool and is not counted.

    python -m fastmirror.bench.nbd [ROUNDS] [OUT.txt]      # a text report
    pytest bench/bench_nbd_target.py --benchmark-only     # pytest-benchmark
"""

from __future__ import annotations

import os
import random
import resource
import shutil
import stat
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Callable, Optional

import fastmirror
from fastmirror.bench.images import make_image
from fastmirror.job.events import EventType
from fastmirror.units import parse_size

GiB = 1 << 30
# The size of the measurement, or FASTMIRROR_BENCH_SIZE when that
# is smaller (the CI smoke run).
SIZE = parse_size(os.environ.get("FASTMIRROR_BENCH_NBD_SIZE") or "256M")
if "FASTMIRROR_BENCH_NBD_SIZE" not in os.environ and "FASTMIRROR_BENCH_SIZE" in os.environ:
    SIZE = min(SIZE, parse_size(os.environ["FASTMIRROR_BENCH_SIZE"]))
ROUNDS = int(os.environ.get("FASTMIRROR_BENCH_NBD_ROUNDS", "5"))
DELAY = "2ms"


def _self_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


class Server:
    """The target: a server process on a unix socket in `folder`."""

    def __init__(self, kind: str, folder: str, size: int, file: Optional[str] = None):
        """`file`: what qemu-nbd serves (default FOLDER/target.img), emptied
        before every run; the delay target has none."""
        self.kind = kind
        self.folder = folder
        self.size = size
        self.sock = os.path.join(folder, "%s.sock" % kind)
        self.file = (file or os.path.join(folder, "target.img")) if kind == "qemu-nbd" else None
        self.proc: Optional[subprocess.Popen] = None

    @property
    def uri(self) -> str:
        return "nbd+unix:///?socket=%s" % self.sock

    def reset(self) -> None:
        """An empty target, the server started afresh (untimed)."""
        self.stop()
        if self.file is not None:
            with open(self.file, "wb") as f:
                f.truncate(self.size)
            argv = ["qemu-nbd", "-t", "-k", self.sock, "-f", "raw", self.file]
        else:
            argv = ["nbdkit", "-f", "-U", self.sock, "--filter=delay", "memory",
                    "size=%d" % self.size, "delay-write=" + DELAY, "delay-zero=" + DELAY]
        try:
            os.unlink(self.sock)
        except FileNotFoundError:
            pass
        self.proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while not os.path.exists(self.sock):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("%s did not start" % argv[0])
            time.sleep(0.01)
        time.sleep(0.05)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait()
        self.proc = None


def run_fastmirror(src: str, server: Server, **options) -> dict:
    # Built before the clock, as QEMU's nodes are (blockdev-add opens the
    # source and connects to the server when its daemon starts): both are
    # timed from the start of the job to COMPLETED.
    job = fastmirror.MirrorJob(src, server.uri, **options)
    try:
        c0, t0 = _self_cpu(), time.perf_counter()
        job.start()
        if not job.wait_ready(600):
            raise RuntimeError("no READY: %s" % job.status().error)
        job.complete()
        ev = job.wait(600)
        if ev is None:
            raise RuntimeError("not COMPLETED within 600 s of complete()")
        t1, c1 = time.perf_counter(), _self_cpu()
        if ev.type != EventType.COMPLETED:
            raise RuntimeError("job ended %s: %s" % (ev.type.value, ev.error))
        calls = job.status().io_calls
    finally:
        job.close()
    return {"s": t1 - t0, "cpu": c1 - c0, "calls": calls}


def run_nbdcopy(src: str, server: Server, flush: bool = False) -> dict:
    t0 = time.perf_counter()
    argv = ["nbdcopy"] + (["--flush"] if flush else []) + [src, server.uri]
    with tempfile.TemporaryFile() as err:
        p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=err)
        _, status, ru = os.wait4(p.pid, 0)
        t1 = time.perf_counter()
        p.returncode = os.waitstatus_to_exitcode(status)
        if p.returncode != 0:
            err.seek(0)
            raise RuntimeError("nbdcopy failed (status %d): %s" % (
                p.returncode, err.read().decode(errors="replace").strip()[-500:]))
    return {"s": t1 - t0, "cpu": ru.ru_utime + ru.ru_stime}


def run_qemu_mirror(src: str, server: Server) -> dict:
    from fastmirror.bench import qemu
    folder = tempfile.mkdtemp(prefix="fastmirror-nbdq-")
    qmp_path = os.path.join(folder, "qmp.sock")
    argv = ["qemu-storage-daemon",
            "--chardev", "socket,id=qmp,path=%s,server=on,wait=off" % qmp_path,
            "--monitor", "chardev=qmp",
            "--blockdev", "driver=%s,node-name=src-file,filename=%s,cache.direct=on,"
                          "aio=native,read-only=on"
                          % ("host_device" if stat.S_ISBLK(os.stat(src).st_mode) else "file",
                             src),
            "--blockdev", "driver=raw,node-name=src,file=src-file",
            "--blockdev", "driver=nbd,node-name=dst,server.type=unix,server.path=%s"
                          % server.sock]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while not os.path.exists(qmp_path):
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read() if proc.stderr is not None else b""
                raise RuntimeError("qemu-storage-daemon did not start: %s"
                                   % err.decode(errors="replace"))
            time.sleep(0.01)
        q = qemu.QMP(qmp_path)
        try:
            c0, t0 = qemu.proc_cpu_seconds(proc.pid), time.perf_counter()
            q.execute("blockdev-mirror", job_id="m", device="src", target="dst", sync="full",
                      auto_finalize=True, auto_dismiss=True)
            q.wait_event("BLOCK_JOB_READY", 600, {"device": "m"})
            q.execute("block-job-complete", device="m")
            done = q.wait_event("BLOCK_JOB_COMPLETED", 600, {"device": "m"})
            t1, c1 = time.perf_counter(), qemu.proc_cpu_seconds(proc.pid)
            if done.get("data", {}).get("error"):
                raise RuntimeError("QEMU's mirror failed: %s" % done["data"]["error"])
            try:
                q.execute("quit")
            except (qemu.QMPError, OSError):
                pass
        finally:
            q.close()
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        shutil.rmtree(folder, ignore_errors=True)
    return {"s": t1 - t0, "cpu": c1 - c0}


def _same(src: str, server: Server) -> bool:
    """The target equals the source: the file, or read back with nbdcopy."""
    if server.file is not None:
        path = server.file
    else:
        path = os.path.join(server.folder, "back.img")
        subprocess.run(["nbdcopy", server.uri, path], check=True)
    try:
        with open(src, "rb") as a, open(path, "rb") as b:
            left = server.size
            while left > 0:
                x, y = a.read(min(8 << 20, left)), b.read(min(8 << 20, left))
                if x != y or not x:
                    return False
                left -= len(x)
            return True
    finally:
        if server.file is None:
            os.unlink(path)


TARGETS = ("qemu-nbd", "delay")
TOOLS = ("fastmirror", "nbdcopy", "nbdcopy-flush", "qemu-mirror")
# The programs each target and tool needs.
BINARIES = {"qemu-nbd": "qemu-nbd", "delay": "nbdkit", "fastmirror": None,
            "nbdcopy": "nbdcopy", "nbdcopy-flush": "nbdcopy",
            "qemu-mirror": "qemu-storage-daemon"}


def scenario_tools(kind: str, connections: Optional[int] = None) -> dict[str, Callable]:
    """The tools run on target `kind`; `connections`: fastmirror's NBD
    connections (None: MirrorJob's default)."""
    options = {} if connections is None else {"connections": connections}
    tools: dict[str, Callable] = {
        "fastmirror": lambda src, server: run_fastmirror(src, server, **options),
        "nbdcopy": run_nbdcopy,
    }
    if kind == "qemu-nbd":
        # nbdcopy flushes nothing by default; fastmirror and QEMU's mirror
        # flush before READY and at the end: --flush is the same promise.
        tools["nbdcopy-flush"] = lambda src, server: run_nbdcopy(src, server, True)
        tools["qemu-mirror"] = run_qemu_mirror
    return tools


def needs(kind: str) -> Optional[str]:
    tools = ["nbdcopy"] + (["qemu-nbd", "qemu-storage-daemon"] if kind == "qemu-nbd"
                           else ["nbdkit"])
    for t in tools:
        if shutil.which(t) is None:
            return "%s is not installed" % t
    return None


def drop_source(src: str) -> None:
    """Sync, then evict the source's pages from the page cache (it is only
    read, so they are clean): every tool reads the source from the disk.
    Not the whole page cache: fastmirror runs in this process and would pay
    the page faults of its own code in the timed run, while QEMU's daemon
    loads its code before the clock starts; evicting only the source treats
    every tool alike.  Works on files and block devices, without root."""
    os.sync()
    fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def run_rounds(plan: dict[str, list[str]], src: str, folder: str, rounds: int, size: int, *,
               seed: int = 7, target_file: Optional[str] = None,
               connections: Optional[int] = None, keep_going: bool = False,
               before_run: Optional[Callable[[], None]] = None,
               log: Callable[[dict], None] = lambda r: None) -> list[dict]:
    """Interleaved rounds: each round runs, on every target of `plan` (kind
    -> tools) in turn, each of its tools once in an order shuffled with
    `seed`, into a fresh target (restarted, emptied; untimed), then checks
    that the target equals the source.  One record per run: target, round,
    tool, ok, error, s, cpu (and the tool's own figures), verified.  A run
    that fails raises, or with keep_going is recorded as not ok."""
    rng = random.Random(seed)
    servers = {kind: Server(kind, folder, size, target_file) for kind in plan}
    runs: list[dict] = []
    try:
        for i in range(rounds):
            for kind, names in plan.items():
                tools = scenario_tools(kind, connections)
                order = list(names)
                rng.shuffle(order)
                for name in order:
                    rec: dict = {"target": kind, "round": i + 1, "tool": name, "ok": False,
                                 "error": None, "verified": False}
                    try:
                        servers[kind].reset()
                        (before_run or (lambda: drop_source(src)))()
                        rec["loadavg_1m"] = os.getloadavg()[0]
                        rec.update(tools[name](src, servers[kind]))
                        if not _same(src, servers[kind]):
                            raise AssertionError("%s left the target different from the "
                                                 "source" % name)
                        rec["verified"] = rec["ok"] = True
                    except Exception as e:
                        if not keep_going:
                            raise
                        rec["error"] = str(e) or type(e).__name__
                    finally:
                        servers[kind].stop()
                    runs.append(rec)
                    log(rec)
    finally:
        for server in servers.values():
            server.stop()
    return runs


def measure(kind: str, src: str, folder: str, rounds: int,
            log: Callable[[str], None] = lambda s: None) -> dict:
    """Interleaved rounds of every tool into a fresh target of `kind`."""
    def line(r: dict) -> None:
        log("%s round %d %-13s %.3f s  cpu %.3f s" % (kind, r["round"], r["tool"], r["s"],
                                                   r["cpu"]))
    runs = run_rounds({kind: list(scenario_tools(kind))}, src, folder, rounds, SIZE, log=line)
    got: list[dict[str, dict]] = [{} for _ in range(rounds)]
    for r in runs:
        got[r["round"] - 1][r["tool"]] = {k: r[k] for k in ("s", "cpu", "calls") if k in r}
    return summarize(got, SIZE)


def summarize(rounds: list[dict[str, dict]], size: int) -> dict:
    out: dict = {"rounds": rounds, "tools": {}}
    gib = size / GiB
    for name in rounds[0]:
        out["tools"][name] = {
            "s": statistics.median(r[name]["s"] for r in rounds),
            "cpu_per_gib": statistics.median(r[name]["cpu"] / gib for r in rounds),
        }
    for name in rounds[0]:
        if name == "fastmirror":
            continue
        out["tools"][name]["speedup"] = statistics.median(
            r[name]["s"] / r["fastmirror"]["s"] for r in rounds)
        # A short run of a child can count 0 clock ticks: no ratio then.
        cpu = [r["fastmirror"]["cpu"] / r[name]["cpu"] for r in rounds if r[name]["cpu"] > 0]
        out["tools"][name]["cpu_ratio"] = statistics.median(cpu) if cpu else None
    out["calls"] = rounds[-1]["fastmirror"].get("calls")
    return out


def report(kind: str, res: dict) -> str:
    lines = ["%s target (%s): medians of %d interleaved rounds"
             % (kind, "qemu-nbd -t -k, a file on this machine" if kind == "qemu-nbd"
                else "nbdkit memory + delay filter, %s per WRITE and WRITE_ZEROES" % DELAY,
                len(res["rounds"])),
             "  fastmirror issues: %s" % res["calls"]]
    for name, t in res["tools"].items():
        line = "  %-13s %7.3f s  %6.2f CPU s/GiB" % (name, t["s"], t["cpu_per_gib"])
        if "speedup" in t:
            line += ("   fastmirror %.2fx as fast, %s its CPU (per-round medians)"
                     % (t["speedup"], "?" if t["cpu_ratio"] is None
                        else "%.2fx" % t["cpu_ratio"]))
        lines.append(line)
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    """[ROUNDS] [OUT.txt]: every scenario, the report printed (and saved)."""
    rounds = int(argv[1]) if len(argv) > 1 else ROUNDS
    out = argv[2] if len(argv) > 2 else None
    folder = tempfile.mkdtemp(prefix="fastmirror-bench-nbd-")
    try:
        src = os.path.join(folder, "source.img")
        make_image(src, SIZE, data_fraction=0.5, seed=1)
        texts = []
        for kind in ("qemu-nbd", "delay"):
            why = needs(kind)
            if why:
                texts.append("%s: skipped, %s" % (kind, why))
                continue
            res = measure(kind, src, folder, rounds, log=lambda s: print(s, file=sys.stderr))
            texts.append(report(kind, res))
        load = os.getloadavg()
        head = ("fastmirror into NBD targets, %d MiB source, about half holes; %s; "
                "load average %.2f %.2f %.2f at the end, %d CPUs"
                % (SIZE >> 20, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                   load[0], load[1], load[2], os.cpu_count() or 0))
        text = head + "\n\n" + "\n\n".join(texts) + "\n"
        print(text)
        if out:
            with open(out, "w") as f:
                f.write(text)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
