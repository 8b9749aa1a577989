"""`fastmirror bench --exports SRC DST`: fastmirror's NBD export against
qemu-storage-daemon's, on the same file, driven by the same client.

Each run starts one server on SRC (a fresh process: `fastmirror serve SRC
--socket S --qmp Q`, or `qemu-storage-daemon` with SRC as a raw node
exported writable over NBD on a unix socket, both with a QMP socket) and
drives it with `fio --ioengine=nbd --uri=nbd+unix:///?socket=S` (libnbd:
one connection, requests pipelined up to the iodepth):

  randwrite-4k   (a) 4 KiB random writes, iodepth 16
  write-1m       (b) 1 MiB sequential writes, iodepth 4
  randread-4k    (c) 4 KiB random reads, iodepth 16
  mirror-writer  (d) a guest-like writer, 4 KiB random writes paced to
                 2000 IOPS (--rate_iops, iodepth 4), while the server
                 mirrors the whole disk to DST: fastmirror by QMP
                 drive-mirror (mode existing), QEMU by QMP blockdev-mirror
                 onto a node of DST opened like SRC; sync=full, QEMU's
                 defaults both (granularity 64 KiB, buf-size 16 MiB,
                 background copy mode), block-job-complete at READY.  The
                 writer's completion latency (fio's clat, every write logged
                 with its time) is counted for the writes that completed
                 between drive-mirror and BLOCK_JOB_COMPLETED; the mirror's
                 duration is that span.

Rows (a)-(c) report fio's own IOPS, bandwidth and clat percentiles over a
time-based run of --export-seconds.

Cache: --export-cache direct (the default) serves SRC with O_DIRECT on both
sides (fastmirror serve --direct; QEMU cache.direct=on, aio=io_uring, or
aio=native where io_uring fails), buffered serves it through the page cache
(fastmirror serve; QEMU cache.direct=off, aio=threads).  A fastmirror too
old for --direct is run buffered, and the report says so.

Rounds: every round runs every row on both servers; the servers' order is
shuffled per row and round (seeded), so that neither always runs first.
Before each run: sync, the page cache dropped when root in buffered mode,
--settle seconds; a regular-file DST is truncated to empty and back to
SIZE before each mirror, so both mirrors write into the same sparse file.

The rows write random data into SRC: allowed for a SRC that --create made
in this run, otherwise only with --destroy-source, as writer rounds.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

from fastmirror.bench.disk import drop_caches, tool_version
from fastmirror.bench.qemu import QMP, QMPError, proc_cpu_seconds
from fastmirror.bench.records import GB, KiB, MiB
from fastmirror.bench.report import machine_line
from fastmirror.units import human

__all__ = ["ROWS", "SERVERS", "ExportSettings", "Server", "run_row", "summarize_exports",
           "format_exports", "run_exports", "serve_supports_direct"]

ROWS = ("randwrite-4k", "write-1m", "randread-4k", "mirror-writer")
SERVERS = ("fastmirror", "qemu")
TITLES = {
    "randwrite-4k": "(a) 4 KiB random writes, iodepth 16",
    "write-1m": "(b) 1 MiB sequential writes, iodepth %d",
    "randread-4k": "(c) 4 KiB random reads, iodepth 16",
    "mirror-writer": "(d) writer at %d IOPS during a mirror",
}
# rw, block size, iodepth of the fio rows; (b)'s depth is a setting.
FIO_ROWS = {
    "randwrite-4k": ("randwrite", 4 * KiB, 16),
    "write-1m": ("write", MiB, None),
    "randread-4k": ("randread", 4 * KiB, 16),
}
NOISY = 0.25                # a min-max spread above this (of the median) is noise
P99_GOAL_MS = 20.0


@dataclass
class ExportSettings:
    size: int
    seconds: float = 10.0               # rows (a)-(c): fio's runtime
    cache: str = "direct"               # "direct" or "buffered"
    write_depth: int = 4                # row (b)'s iodepth
    writer_iops: int = 2000             # row (d)'s pace
    writer_depth: int = 4               # row (d)'s iodepth
    timeout: float = 600.0              # one run, at most
    fio: str = "fio"
    qemu_aio: Optional[str] = None      # None: io_uring, else native (direct)


def serve_supports_direct() -> bool:
    """Whether this fastmirror's `serve` has --direct."""
    from fastmirror.cli.main import build_parser
    sub = next(a for a in build_parser()._actions if getattr(a, "choices", None)
               and "serve" in a.choices)
    return any("--direct" in a.option_strings for a in sub.choices["serve"]._actions)


def _cpu_seconds(pid: int) -> float:
    try:
        return proc_cpu_seconds(pid)
    except OSError:
        return 0.0


def _wait_for(path: str, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None:
            err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
            raise RuntimeError("%s exited (status %s): %s" % (what, proc.returncode,
                                                              err.strip()[-500:]))
        if time.monotonic() > deadline:
            raise RuntimeError("%s did not create %s in %.0f s" % (what, path, timeout))
        time.sleep(0.01)


class Server:
    """One server process on `image`, with an NBD socket and QMP; for QEMU
    `target` is opened as node "dst" (the mirror's target), like the image."""

    def __init__(self, kind: str, image: str, target: Optional[str], cache: str,
                 qemu_aio: Optional[str] = None, direct_ok: bool = True):
        self.kind = kind
        self.dir = tempfile.mkdtemp(prefix="fastmirror-exbench-")
        self.nbd = os.path.join(self.dir, "nbd.sock")
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.uri = "nbd+unix:///?socket=%s" % self.nbd
        self.qmp: Optional[QMP] = None
        self.note = ""
        if kind == "fastmirror":
            self.command = [sys.executable, "-m", "fastmirror", "serve", image,
                            "--socket", self.nbd, "--qmp", self.qmp_path]
            if cache == "direct":
                if direct_ok:
                    self.command.append("--direct")
                else:
                    self.note = "fastmirror serve has no --direct: served through the page cache"
        elif kind == "qemu":
            if cache == "direct":
                opts = "cache.direct=on,aio=%s" % (qemu_aio or "io_uring")
            else:
                opts = "cache.direct=off,aio=threads"

            def node(name: str, path: str) -> list[str]:
                import stat
                driver = "host_device" if stat.S_ISBLK(os.stat(path).st_mode) else "file"
                return ["--blockdev", "driver=%s,node-name=%s-file,filename=%s,%s"
                        % (driver, name, path, opts),
                        "--blockdev", "driver=raw,node-name=%s,file=%s-file" % (name, name)]
            self.command = ["qemu-storage-daemon",
                            "--chardev", "socket,id=qmp,path=%s,server=on,wait=off"
                            % self.qmp_path, "--monitor", "chardev=qmp"]
            self.command += node("src", image)
            if target is not None:
                self.command += node("dst", target)
            self.command += ["--nbd-server", "addr.type=unix,addr.path=%s" % self.nbd,
                             "--export", "type=nbd,id=exp,node-name=src,name=,writable=on"]
        else:
            raise ValueError("unknown server %r" % kind)
        self.proc = subprocess.Popen(self.command, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            _wait_for(self.qmp_path, self.proc, self.kind)
            _wait_for(self.nbd, self.proc, self.kind)
            self.qmp = QMP(self.qmp_path)
        except BaseException:
            self.close()
            raise

    def cpu_seconds(self) -> float:
        return _cpu_seconds(self.proc.pid)

    def mirror(self, target: str) -> None:
        assert self.qmp is not None
        if self.kind == "fastmirror":
            self.qmp.execute("drive-mirror", device="", job_id="mirror", target=target,
                             sync="full", mode="existing", format="raw")
        else:
            self.qmp.execute("blockdev-mirror", job_id="mirror", device="src", target="dst",
                             sync="full")

    def close(self) -> None:
        try:
            if self.qmp is not None:
                try:
                    self.qmp.execute("quit")
                except (QMPError, OSError, ValueError):
                    pass
                self.qmp.close()
                self.qmp = None
        finally:
            if self.proc.poll() is None:
                try:
                    self.proc.wait(10)
                except subprocess.TimeoutExpired:
                    self.proc.send_signal(signal.SIGTERM)
                    try:
                        self.proc.wait(10)
                    except subprocess.TimeoutExpired:
                        self.proc.kill()
                        self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _fio_json(text: str) -> dict:
    """fio's JSON report (its nbd engine prints a line before it)."""
    i = text.find("{")
    if i < 0:
        raise ValueError("no JSON in fio's output: %r" % text[-300:])
    return json.JSONDecoder().raw_decode(text, i)[0]


def _percentile(values: Sequence[float], q: float) -> float:
    """The q-quantile (0..1) by the nearest rank, as fio reports them."""
    s = sorted(values)
    if not s:
        return 0.0
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 1)) - 1))
    return s[k]


def _fio_base(fio: str, uri: str, name: str, rw: str, bs: int, depth: int,
              size: int) -> list[str]:
    return [fio, "--name=" + name, "--ioengine=nbd", "--uri=" + uri, "--rw=" + rw,
            "--bs=%d" % bs, "--iodepth=%d" % depth, "--size=%d" % size,
            "--norandommap", "--randrepeat=0", "--time_based", "--output-format=json"]


def fio_command(row: str, uri: str, st: ExportSettings) -> list[str]:
    """fio's command of row (a), (b) or (c)."""
    rw, bs, depth = FIO_ROWS[row]
    return _fio_base(st.fio, uri, row, rw, bs, depth or st.write_depth, st.size) + [
        "--runtime=%dms" % max(100, int(st.seconds * 1000))]


def _run_fio_row(row: str, server: Server, st: ExportSettings) -> dict:
    cmd = fio_command(row, server.uri, st)
    cpu0 = server.cpu_seconds()
    p = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                       timeout=st.timeout)
    cpu = server.cpu_seconds() - cpu0
    if p.returncode != 0:
        raise RuntimeError("fio failed (status %d): %s" % (
            p.returncode, (p.stderr or p.stdout).decode(errors="replace").strip()[-500:]))
    job = _fio_json(p.stdout.decode(errors="replace"))["jobs"][0]
    if job.get("error"):
        raise RuntimeError("fio reported error %s" % job["error"])
    d = job["read" if FIO_ROWS[row][0].endswith("read") else "write"]
    pct = d.get("clat_ns", {}).get("percentile", {})
    runtime = d.get("runtime", 0) / 1000.0
    return {"iops": d["iops"], "bytes_per_s": d["bw_bytes"], "ios": d["total_ios"],
            "runtime_s": runtime,
            "p50_ms": pct.get("50.000000", 0) / 1e6, "p99_ms": pct.get("99.000000", 0) / 1e6,
            "mean_ms": d.get("clat_ns", {}).get("mean", 0) / 1e6,
            "server_cpu_s": cpu,
            "server_cpu_per_gb": cpu / (d["io_bytes"] / GB) if d.get("io_bytes") else None,
            "fio_cpu": {"usr": job.get("usr_cpu"), "sys": job.get("sys_cpu")}}


def writer_command(uri: str, st: ExportSettings, log_prefix: str) -> list[str]:
    """Row (d)'s writer: paced 4 KiB random writes, every write's clat logged
    with its Unix time in ms."""
    return _fio_base(st.fio, uri, "writer", "randwrite", 4 * KiB, st.writer_depth,
                     st.size) + ["--runtime=%d" % int(st.timeout), "--rate_iops=%d"
                                 % st.writer_iops, "--write_lat_log=" + log_prefix,
                                 "--log_avg_msec=0", "--log_unix_epoch=1"]


def _read_clat_log(path: str) -> list[tuple[int, int]]:
    """(Unix time in ms, clat in ns) of each write in fio's clat log."""
    out = []
    with open(path) as f:
        for line in f:
            parts = line.split(",")
            if len(parts) >= 3 and parts[2].strip() == "1":
                out.append((int(parts[0]), int(parts[1])))
    return out


def _run_mirror_row(server: Server, target: str, st: ExportSettings) -> dict:
    log_dir = tempfile.mkdtemp(prefix="fastmirror-exbench-lat-")
    prefix = os.path.join(log_dir, "writer")
    cmd = writer_command(server.uri, st, prefix)
    fio = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE)
    try:
        # In its stride before the mirror starts: connected and writing.
        time.sleep(0.5)
        if fio.poll() is not None:
            raise RuntimeError("fio writer exited at once: %s" % fio.stderr.read().decode(
                errors="replace").strip()[-500:])
        assert server.qmp is not None
        cpu0 = server.cpu_seconds()
        t0 = time.time()
        p0 = time.perf_counter()
        server.mirror(target)
        server.qmp.wait_event("BLOCK_JOB_READY", st.timeout, {"device": "mirror"})
        ready_s = time.perf_counter() - p0
        server.qmp.execute("block-job-complete", device="mirror")
        done = server.qmp.wait_event("BLOCK_JOB_COMPLETED", st.timeout, {"device": "mirror"})
        mirror_s = time.perf_counter() - p0
        t1 = time.time()
        cpu = server.cpu_seconds() - cpu0
        if done.get("data", {}).get("error"):
            raise RuntimeError("the mirror failed: %s" % done["data"]["error"])
        time.sleep(0.2)
    finally:
        if fio.poll() is None:
            fio.send_signal(signal.SIGINT)      # fio writes its logs and report
        try:
            out, err = fio.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            fio.kill()
            out, err = fio.communicate()
    try:
        logs = [f for f in os.listdir(log_dir) if f.startswith("writer_clat")]
        if not logs:
            raise RuntimeError("fio wrote no clat log: %s" % err.decode(
                errors="replace").strip()[-500:])
        entries = _read_clat_log(os.path.join(log_dir, logs[0]))
    finally:
        shutil.rmtree(log_dir, ignore_errors=True)
    lo, hi = int(t0 * 1000), int(t1 * 1000) + 1
    during = [ns / 1e6 for ms, ns in entries if lo <= ms <= hi]
    if not during:
        raise RuntimeError("no write of the writer completed during the mirror "
                           "(%d logged in all)" % len(entries))
    job = {}
    try:
        job = _fio_json(out.decode(errors="replace"))["jobs"][0]
    except (ValueError, KeyError, IndexError):
        pass
    return {"p99_ms": _percentile(during, 0.99), "p50_ms": _percentile(during, 0.50),
            "max_ms": max(during), "writes": len(during),
            "writer_iops": len(during) / (t1 - t0) if t1 > t0 else 0.0,
            "mirror_s": mirror_s, "ready_s": ready_s,
            "mirror_bytes_per_s": st.size / mirror_s if mirror_s > 0 else 0.0,
            "server_cpu_s": cpu,
            "writer_errors": job.get("error", 0)}


def _fresh(path: str, size: int) -> None:
    """A regular file made empty and SIZE again: the same sparse start for
    every mirror (a block device is left as it is)."""
    import stat
    if stat.S_ISREG(os.stat(path).st_mode):
        os.truncate(path, 0)
        os.truncate(path, size)


def run_row(row: str, kind: str, image: str, target: str, st: ExportSettings,
            direct_ok: bool = True) -> dict:
    """One run of `row` on a fresh `kind` server; a dict with ok, error and
    the row's figures."""
    out: dict = {"row": row, "server": kind, "ok": False, "error": None}
    mirror = row == "mirror-writer"
    if mirror:
        _fresh(target, st.size)
    t = time.perf_counter()
    try:
        with Server(kind, image, target if mirror else None, st.cache, st.qemu_aio,
                    direct_ok) as server:
            out["note"] = server.note or None
            out["start_s"] = time.perf_counter() - t
            out.update(_run_mirror_row(server, target, st) if mirror
                       else _run_fio_row(row, server, st))
        out["ok"] = True
    except Exception as e:      # a failed run is a result, not the end of the bench
        out["error"] = "%s: %s" % (type(e).__name__, e)
    return out


# -- what the runs come to -------------------------------------------------------

MAIN = {"randwrite-4k": "iops", "write-1m": "bytes_per_s", "randread-4k": "iops",
        "mirror-writer": "p99_ms"}
KEYS = {
    "randwrite-4k": ("iops", "bytes_per_s", "p50_ms", "p99_ms", "server_cpu_per_gb"),
    "write-1m": ("iops", "bytes_per_s", "p50_ms", "p99_ms", "server_cpu_per_gb"),
    "randread-4k": ("iops", "bytes_per_s", "p50_ms", "p99_ms", "server_cpu_per_gb"),
    "mirror-writer": ("p99_ms", "p50_ms", "max_ms", "writer_iops", "mirror_s", "ready_s",
                      "server_cpu_s"),
}


def summarize_exports(runs: Sequence[dict], rows: Sequence[str]) -> dict:
    """Per row and server: medians, min and max of each figure; per row the
    ratio fastmirror/QEMU of the medians of the main figure, also paired
    within each round (median, min, max); and the goals."""
    out: dict = {}
    for row in rows:
        s: dict = {}
        for kind in SERVERS:
            mine = [r for r in runs if r["row"] == row and r["server"] == kind]
            ok = [r for r in mine if r["ok"]]
            d: dict = {"runs": len(ok), "failed": len(mine) - len(ok),
                       "errors": sorted({r["error"] for r in mine if r["error"]})}
            for key in KEYS[row]:
                vals = [r[key] for r in ok if r.get(key) is not None]
                if vals:
                    d[key] = statistics.median(vals)
                    d[key + "_min"] = min(vals)
                    d[key + "_max"] = max(vals)
            main = MAIN[row]
            if d.get(main):
                d["spread"] = (d[main + "_max"] - d[main + "_min"]) / d[main]
            s[kind] = d
        main = MAIN[row]
        fm, qe = s["fastmirror"].get(main), s["qemu"].get(main)
        if fm is not None and qe:
            s["ratio"] = fm / qe
        by_round = {}
        for r in runs:
            if r["row"] == row and r["ok"] and r.get(main) is not None:
                by_round.setdefault(r["round"], {})[r["server"]] = r[main]
        paired = [v["fastmirror"] / v["qemu"] for v in by_round.values()
                  if "fastmirror" in v and v.get("qemu")]
        if paired:
            s["ratio_paired"] = statistics.median(paired)
            s["ratio_paired_min"] = min(paired)
            s["ratio_paired_max"] = max(paired)
            s["ratio_rounds"] = paired
        if row == "mirror-writer":
            fmt, qmt = s["fastmirror"].get("mirror_s"), s["qemu"].get("mirror_s")
            if fmt and qmt:
                s["mirror_ratio"] = fmt / qmt
            if fm is not None and qe is not None:
                s["goal_met"] = fm <= P99_GOAL_MS and fm <= qe
                wins = sum(1 for v in by_round.values()
                           if "fastmirror" in v and "qemu" in v and v["fastmirror"] <= v["qemu"])
                s["rounds_won"] = [wins, len(paired)]
        elif row != "randread-4k" and "ratio" in s:
            s["goal_met"] = s["ratio"] >= 1.0
        if row != "mirror-writer" and paired:
            s["rounds_won"] = [sum(1 for x in paired if x >= 1.0), len(paired)]
        out[row] = s
    return out


def _title(row: str, st: ExportSettings) -> str:
    if row == "write-1m":
        return TITLES[row] % st.write_depth
    if row == "mirror-writer":
        return TITLES[row] % st.writer_iops
    return TITLES[row]


def _fmt(row: str, d: dict) -> str:
    if not d.get("runs"):
        return "failed" if d.get("failed") else "-"
    if row == "mirror-writer":
        return "p99 %.2f ms" % d["p99_ms"]
    if row == "write-1m":
        return "%.2f GB/s" % (d["bytes_per_s"] / GB)
    return "{:,.0f} IOPS".format(d["iops"])


def _range(row: str, d: dict) -> str:
    main = MAIN[row]
    if main not in d:
        return "-"
    if main == "bytes_per_s":
        return "%.2f-%.2f" % (d[main + "_min"] / GB, d[main + "_max"] / GB)
    if main == "p99_ms":
        return "%.2f-%.2f" % (d[main + "_min"], d[main + "_max"])
    return "{:,.0f}-{:,.0f}".format(d[main + "_min"], d[main + "_max"])


def format_exports(summary: dict, st: ExportSettings) -> str:
    """The text table: a line per row, a detail line under it."""
    head = ("row", "fastmirror", "QEMU", "fastmirror/QEMU", "per round (min-max)",
            "fastmirror range", "QEMU range", "goal")
    lines = [head]
    details = {}
    for row, s in summary.items():
        fm, qe = s["fastmirror"], s["qemu"]
        ratio = "%.2fx" % s["ratio"] if "ratio" in s else "-"
        paired = ("%.2fx (%.2f-%.2f)" % (s["ratio_paired"], s["ratio_paired_min"],
                                         s["ratio_paired_max"])
                  if "ratio_paired" in s else "-")
        if "goal_met" not in s:
            goal = "-"
        elif row == "mirror-writer":
            goal = "p99 <= %.0f ms and <= QEMU's: %s" % (P99_GOAL_MS,
                                                         "met" if s["goal_met"] else "NOT met")
        else:
            goal = ">= 1.0x: %s" % ("met" if s["goal_met"] else "NOT met")
        lines.append((_title(row, st), _fmt(row, fm), _fmt(row, qe), ratio, paired,
                      _range(row, fm), _range(row, qe), goal))
        if row == "mirror-writer":
            det = []
            for kind in SERVERS:
                d = s[kind]
                if d.get("runs"):
                    det.append("%s: p50 %.2f ms, max %.1f ms, writer %.0f IOPS, mirror %.2f s "
                               "(READY %.2f s), server CPU %.2f s" % (
                                   kind, d["p50_ms"], d["max_ms"], d["writer_iops"],
                                   d["mirror_s"], d["ready_s"], d["server_cpu_s"]))
            if "mirror_ratio" in s:
                det.append("mirror duration fastmirror/QEMU %.2fx" % s["mirror_ratio"])
        else:
            det = []
            for kind in SERVERS:
                d = s[kind]
                if d.get("runs"):
                    det.append("%s: %.3f GB/s, clat p50 %.3f ms p99 %.3f ms%s" % (
                        kind, d["bytes_per_s"] / GB, d["p50_ms"], d["p99_ms"],
                        ", server CPU %.2f s/GB" % d["server_cpu_per_gb"]
                        if d.get("server_cpu_per_gb") is not None else ""))
        if "rounds_won" in s:
            det.append("fastmirror ahead in %d of %d rounds" % tuple(s["rounds_won"]))
        for kind in SERVERS:
            for e in s[kind].get("errors", []):
                det.append("%s failed: %s" % (kind, e))
        details[row] = det
    widths = [max(len(str(r[i])) for r in lines) for i in range(len(head))]
    out = []
    for r in lines:
        out.append("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
        if r is not head and r[0]:
            row = next(k for k in summary if _title(k, st) == r[0])
            for d in details[row]:
                out.append("    " + d)
    noisy = ["%s %s %.0f%%" % (row, kind, 100 * s[kind]["spread"])
             for row, s in summary.items() for kind in SERVERS
             if s[kind].get("spread", 0) > NOISY and s[kind].get("runs", 0) > 1]
    if noisy:
        out.append("noisy: min-max spread around the median of %s" % ", ".join(noisy))
    return "\n".join(out)


def _qemu_aio(image: str) -> tuple[Optional[str], str]:
    """io_uring when qemu-storage-daemon can open the image with it, else
    native."""
    probe = None
    try:
        probe = Server("qemu", image, None, "direct", "io_uring")
        return "io_uring", ""
    except Exception as e:     # noqa: BLE001 - any refusal means: try native
        return "native", "QEMU's aio=io_uring failed here (%s): aio=native" % str(e)[:200]
    finally:
        if probe is not None:
            probe.close()


def run_exports(args, src: str, dst: str, size: int, notes: list[str]) -> tuple[dict, str]:
    """The rounds; returns (the JSON document, the text report).  Progress
    lines go to stdout as the runs end."""
    rows = list(args.export_rows)
    fio = shutil.which("fio")
    if fio is None:
        raise FileNotFoundError("fio is not installed: the export rows need its nbd engine")
    if shutil.which("qemu-storage-daemon") is None:
        raise FileNotFoundError("qemu-storage-daemon is not installed (Debian: "
                                "qemu-system-common)")
    st = ExportSettings(size=size, seconds=args.export_seconds, cache=args.export_cache,
                        write_depth=args.export_write_depth,
                        writer_iops=args.export_writer_iops,
                        writer_depth=args.export_writer_depth,
                        timeout=args.timeout or 60.0 + size / 20e6, fio=fio)
    direct_ok = serve_supports_direct()
    if st.cache == "direct":
        st.qemu_aio, why = _qemu_aio(src)
        if why:
            notes.append(why)
        if not direct_ok:
            notes.append("fastmirror serve has no --direct here: it serves through the "
                         "page cache, QEMU with O_DIRECT")
    dropping = (st.cache == "buffered" and args.drop_caches and os.geteuid() == 0
                and os.access("/proc/sys/vm/drop_caches", os.W_OK))
    header = [
        "fastmirror bench --exports: %s (%s), mirror target %s, %d round%s, servers "
        "shuffled per row (seed %d)" % (src, human(size), dst, args.rounds,
                                         "s" if args.rounds != 1 else "", args.seed),
        "cache: %s" % ("O_DIRECT both: fastmirror serve --direct; qemu-storage-daemon "
                       "cache.direct=on,aio=%s" % st.qemu_aio if st.cache == "direct" else
                       "page cache both: fastmirror serve; qemu-storage-daemon "
                       "cache.direct=off,aio=threads%s" % (
                           ", dropped before every run" if dropping else "")),
        "client: fio %s --ioengine=nbd (one connection), rows (a)-(c) %s each; (d) 4 KiB "
        "random writes --rate_iops=%d --iodepth=%d while the server mirrors %s to the "
        "target (sync=full, granularity 64 KiB, buf-size 16 MiB, background), complete "
        "at READY" % (_fio_version(fio), _secs(st.seconds), st.writer_iops, st.writer_depth,
                      human(size)),
        machine_line(),
    ]
    for line in notes + header:
        print(line)
    sys.stdout.flush()

    runs: list[dict] = []
    for rnd in range(1, args.rounds + 1):
        for ri, row in enumerate(rows):
            order = list(SERVERS)
            random.Random(args.seed * 1000003 + rnd * 101 + ri).shuffle(order)
            for kind in order:
                if dropping:
                    drop_caches()       # syncs first
                else:
                    os.sync()
                if args.settle:
                    time.sleep(args.settle)
                load = os.getloadavg()[0]
                r = run_row(row, kind, src, dst, st, direct_ok)
                r["round"] = rnd
                r["loadavg_1m"] = load
                runs.append(r)
                print("  round %-2d %-13s %-10s %s" % (rnd, row, kind, _line(r)))
                sys.stdout.flush()
    summary = summarize_exports(runs, rows)
    text = format_exports(summary, st)
    doc = {
        "version": 1,
        "kind": "exports",
        "source": src, "target": dst, "size": size,
        "settings": {"rounds": args.rounds, "seed": args.seed, "rows": rows,
                     "seconds": st.seconds, "cache": st.cache, "qemu_aio": st.qemu_aio,
                     "write_depth": st.write_depth, "writer_iops": st.writer_iops,
                     "writer_depth": st.writer_depth, "settle": args.settle,
                     "drop_caches": bool(dropping), "fastmirror_direct": direct_ok},
        "commands": {
            "fastmirror": _describe("fastmirror", st, direct_ok),
            "qemu": _describe("qemu", st, direct_ok),
            "fio": {row: " ".join(fio_command(row, "URI", st)) for row in FIO_ROWS
                    if row in rows},
            "writer": " ".join(writer_command("URI", st, "LOG")),
        },
        "machine": {"cpus": os.cpu_count(), "loadavg_end": os.getloadavg(),
                    "kernel": os.uname().release, "fio": _fio_version(fio),
                    "qemu": _qemu_version()},
        "notes": notes,
        "runs": runs,
        "summary": summary,
        "header": header,
    }
    return doc, text


def _describe(kind: str, st: ExportSettings, direct_ok: bool) -> str:
    if kind == "fastmirror":
        return "fastmirror serve SRC --socket S --qmp Q%s" % (
            " --direct" if st.cache == "direct" and direct_ok else "")
    opts = ("cache.direct=on,aio=%s" % (st.qemu_aio or "io_uring") if st.cache == "direct"
            else "cache.direct=off,aio=threads")
    return ("qemu-storage-daemon --blockdev file,node-name=src-file,filename=SRC,%s "
            "--blockdev raw,node-name=src,file=src-file [dst: the same on DST] "
            "--nbd-server addr.type=unix,addr.path=S --export type=nbd,node-name=src,"
            "name=,writable=on (QMP on Q)" % opts)


def _line(r: dict) -> str:
    if not r["ok"]:
        return "FAILED: %s" % r["error"]
    if r["row"] == "mirror-writer":
        return ("writer p50 %.2f ms p99 %.2f ms max %.1f ms (%d writes, %.0f IOPS); mirror "
                "%.2f s (READY %.2f s), server CPU %.2f s" % (
                    r["p50_ms"], r["p99_ms"], r["max_ms"], r["writes"], r["writer_iops"],
                    r["mirror_s"], r["ready_s"], r["server_cpu_s"]))
    return "{:>9,.0f} IOPS {:6.3f} GB/s  clat p50 {:.3f} ms p99 {:.3f} ms  server CPU " \
        "{:.2f} s".format(r["iops"], r["bytes_per_s"] / GB, r["p50_ms"], r["p99_ms"],
                          r["server_cpu_s"])


def _secs(s: float) -> str:
    return "%g s" % s


def _fio_version(fio: str) -> str:
    return tool_version("fio", fio) or "?"


def _qemu_version() -> str:
    return tool_version("qemu-storage-daemon", "qemu-storage-daemon") or "?"
