"""`fastmirror demo`: the main job on a built-in default.

A generated image with data and holes, a writer that keeps writing through
job.source during the mirror, READY, complete, verify, and a one-screen
summary.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import time

from fastmirror.bench.images import make_image
from fastmirror.bench.writers import RandomWriter

EXTENT = 4 << 20          # the generated image alternates data and holes in 4 MiB pieces
DATA_FRACTION = 0.7


def run(args) -> int:
    import fastmirror
    from fastmirror.cli.progress import Progress
    from fastmirror.units import human
    from fastmirror.job.verify import first_difference

    size = args.size
    out = sys.stderr
    if args.dir is not None and not os.path.isdir(args.dir):
        print("fastmirror demo: --dir %s is not an existing folder" % args.dir, file=out)
        return 2
    parent = args.dir if args.dir is not None else \
        "/var/tmp" if os.path.isdir("/var/tmp") else None
    # A new folder of our own, even inside the user's DIR: the demo never
    # overwrites or removes a file it did not create, and removes only this.
    workdir = tempfile.mkdtemp(prefix="fastmirror-demo-", dir=parent)
    src = os.path.join(workdir, "source.img")
    dst = os.path.join(workdir, "target.img")
    try:
        print("fastmirror demo: generating a %s image with data and holes in %s"
              % (human(size), workdir), file=out)
        t0 = time.monotonic()
        data = make_image(src, size, data_fraction=DATA_FRACTION, extent=EXTENT, seed=1)
        gen = time.monotonic() - t0
        print("  %s of data, %s of holes, written in %.1f s"
              % (human(data), human(size - data), gen), file=out)

        job = fastmirror.MirrorJob(src, dst)
        events = []
        job.add_listener(lambda ev: events.append(ev))
        progress = Progress() if sys.stderr.isatty() else None
        print("  mirroring to %s (%s) while a writer writes %s/s through job.source"
              % (dst, job.io_mode, human(args.write_rate)), file=out)
        t_start = time.monotonic()
        job.start()
        writer = RandomWriter(job.source.pwrite, size, args.write_rate, seed=2,
                              name="demo-writer")
        writer.start()
        while not job.wait_ready(timeout=0.2):
            if progress is not None:
                progress.draw(job.status())
            if job.wait(timeout=0) is not None:
                break
        if progress is not None:
            progress.draw(job.status())
            progress.close()
        st_ready = job.status()
        if not st_ready.ready:
            writer.stop()
            final = job.wait()
            print("fastmirror demo: the job ended before READY: %s %s"
                  % (final.type.value, final.error or ""), file=out)
            return 1
        # Phase 2: the target follows the writes for a moment.
        time.sleep(1.0)
        writer.stop()
        job.complete()
        final = job.wait()
        total = time.monotonic() - t_start
        st = job.status()
        job.close()
        t_verify = time.monotonic()
        diff = first_difference(src, dst)
        verify_s = time.monotonic() - t_verify

        src_alloc = os.stat(src).st_blocks * 512
        dst_alloc = os.stat(dst).st_blocks * 512
        summary = {
            "size": size,
            "data_bytes": data,
            "io_mode": st.io_mode,
            "io_engine": st.io_engine,
            "time_to_ready_s": round(st.time_to_ready or 0.0, 3),
            "bulk_throughput_Bps": round(st_ready.bytes_copied / st.time_to_ready)
            if st.time_to_ready else None,
            "total_s": round(total, 3),
            "writer_writes": writer.writes,
            "writer_bytes": writer.bytes,
            "bytes_copied": st.bytes_copied,
            "chunks_copied": st.chunks_copied,
            "chunks_recopied": st.chunks_recopied,
            "events": [e.type.value for e in events],
            "final": final.type.value,
            "verify_equal": diff < 0,
            "first_difference": diff,
            "verify_s": round(verify_s, 3),
            "source_allocated": src_alloc,
            "target_allocated": dst_alloc,
        }
        if args.json:
            print(json.dumps(summary, sort_keys=True))
        else:
            rate = summary["bulk_throughput_Bps"] or 0
            print("", file=out)
            print("  events          %s" % " -> ".join(summary["events"]), file=out)
            print("  time to READY   %.2f s  (bulk copy %s/s, %s, %s)"
                  % (summary["time_to_ready_s"], human(rate), st.io_mode, st.io_engine),
                  file=out)
            print("  total           %.2f s  (1 s in sync, then complete)" % total, file=out)
            print("  writer          %d writes, %s through job.source"
                  % (writer.writes, human(writer.bytes)), file=out)
            print("  chunks copied   %d, of which %d again because of writes"
                  % (st.chunks_copied, st.chunks_recopied), file=out)
            print("  allocated       source %s, target %s"
                  % (human(src_alloc), human(dst_alloc)), file=out)
            print("  verify          %s (%.2f s)"
                  % ("target equals source" if diff < 0
                     else "DIFFERENT at offset %d" % diff, verify_s), file=out)
        if writer.error is not None:
            print("fastmirror demo: the writer failed: %s" % writer.error, file=out)
            return 1
        return 0 if final.type.value == "COMPLETED" and diff < 0 else 1
    finally:
        if args.keep:
            print("fastmirror demo: the images are kept in %s" % workdir, file=out)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
