"""The two mirror jobs, timed the same way: fastmirror's MirrorJob in this
process and QEMU's blockdev-mirror in qemu-storage-daemon (qemu.py), in
bulk rounds and in writer rounds (with a writer of writers.py)."""

from __future__ import annotations

import os
import resource
import select
import time
from typing import Optional, Sequence

from fastmirror.bench.baselines import rusage, tool_command
from fastmirror.bench.disk import device_size
from fastmirror.bench.records import MiB, Run
from fastmirror.bench.writers import (WRITE_ALIGN, FioNbdWriter, QemuIoWriter,
                                      RandomWriter, Writer)

__all__ = ["run_fastmirror", "run_qemu_mirror"]


def run_fastmirror(src: str, dst: str, size: int, granularity: int, buf_size: int,
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
    u0, s0 = rusage(resource.RUSAGE_SELF)
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
    w: Optional[RandomWriter] = None
    if writer is not None and rate != 0 and size >= WRITE_ALIGN:
        w = RandomWriter(job.source.pwrite, size, rate, writer_depth,
                         name="bench-writer")
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
    u1, s1 = rusage(resource.RUSAGE_SELF)
    run.user_s, run.sys_s = u1 - u0, s1 - s0
    if w is not None:
        _writer_detail(run, w, t0, t_ready if t_ready is not None else t_stop)
        if w.error and run.ok:
            run.ok = False
            run.error = w.error
    return run


def _writer_detail(run: Run, w: Writer, t0: float, t1: float) -> None:
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
            if device_size(self.target) > size:
                self.qmp.execute("blockdev-add", driver="raw", node_name="dst-sized",
                                 file="dst-file", offset=0, size=size)
                target = "dst-sized"
            self.qmp.execute("blockdev-mirror", job_id="mirror", device="src",
                             target=target, sync="full", granularity=granularity,
                             buf_size=buf_size, copy_mode=copy_mode, auto_finalize=True,
                             auto_dismiss=True)

        def wait_for(self, names: Sequence[str], timeout: Optional[float]) -> Optional[dict]:
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


def run_qemu_mirror(src: str, dst: str, size: int, granularity: int, buf_size: int,
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
    w: Optional[Writer] = None
    t0 = t_ready = t_stop = None
    try:
        run.detail["daemon_start_s"] = time.perf_counter() - t_launch
        if writer is not None and rate != 0 and size >= WRITE_ALIGN:
            uri = "nbd+unix:///src?socket=%s" % d.nbd_path
            if writer_kind == "fio":
                w = FioNbdWriter(writer_path or "fio", uri, size, rate, writer_depth)
            elif writer_kind == "qemu-io":
                w = QemuIoWriter(writer_path or "qemu-io", uri, size, rate)
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
