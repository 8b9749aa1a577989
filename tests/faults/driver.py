"""Run one mirror job under the fault shim and report what happened as JSON
lines on stdout: every event, checks made while the job was paused by an
error policy, and the final status."""

import argparse
import json
import os
import sys
import time

import fastmirror


def main():
    p = argparse.ArgumentParser()
    p.add_argument("source")
    p.add_argument("target")
    p.add_argument("--on-source-error", default="report")
    p.add_argument("--on-target-error", default="report")
    p.add_argument("--resume-after-pause", type=int, default=0,
                   help="resume this many times when an error policy pauses the job")
    p.add_argument("--timeout", type=float, default=60)
    # The shim intercepts the C library's pread/pwrite/fdatasync; io_uring
    # I/O never passes through them, so shim runs use the threads engine.
    # (tests/test_faults_qemu.py injects faults below both engines.)
    p.add_argument("--io-engine", default="threads")
    p.add_argument("--copy-mode", default="auto")
    p.add_argument("--write-when-ready", type=int, default=0, metavar="N",
                   help="once READY, write N blocks of 64 KiB through job.source "
                        "(at offsets 0, 1 MiB, 2 MiB, ...), then complete")
    a = p.parse_args()

    def out(obj):
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()

    job = fastmirror.MirrorJob(a.source, a.target, on_source_error=a.on_source_error,
                               on_target_error=a.on_target_error, buf_size=1 << 20,
                               io_engine=a.io_engine, copy_mode=a.copy_mode)
    # bytes_copied when the event fired: READY's is what phase 1 copied.
    job.add_listener(lambda ev: out(dict(ev.to_dict(), kind="event",
                                         bytes_copied=job._engine.bytes_copied)))
    job.start()
    resumes = 0
    completing = False
    deadline = time.monotonic() + a.timeout
    while time.monotonic() < deadline:
        final = job.wait(timeout=0.05)
        if final is not None:
            break
        st = job.status()
        if st.paused and st.io_status != "ok":
            err = st.error
            off = getattr(err, "offset", None)
            # A failed range is never left clean.
            dirty = bool(job._bitmap.get(off)) if off is not None and off < job.size else None
            out({"kind": "paused", "state": st.state, "io_status": st.io_status,
                 "errno": err.errno if err else None, "offset": off,
                 "failed_chunk_dirty": dirty})
            if resumes >= a.resume_after_pause:
                job.cancel(force=True)
                continue
            resumes += 1
            job.resume()
        elif st.ready and not completing:
            completing = True
            for i in range(a.write_when_ready):
                job.source.pwrite(os.urandom(65536), i << 20)
            job.complete()
    else:
        job.cancel(force=True)
        final = job.wait()
    st = job.status()
    out({"kind": "final", "event": final.type.value, "io_status": st.io_status,
         "errno": final.error.errno if final.error else None,
         "operation": getattr(final.error, "operation", None),
         "path": final.error.filename if final.error else None,
         "bytes_copied": st.bytes_copied, "copy_mode": st.copy_mode})
    job.close()
    job.source.close()


if __name__ == "__main__":
    main()
