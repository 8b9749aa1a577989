"""`fastmirror demo`: the main job on a built-in default.

A generated image with data and holes, a writer that keeps writing through
job.source during the mirror, READY, complete, verify, and a one-screen
summary.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time

EXTENT = 4 << 20          # the generated image alternates data and holes in 4 MiB pieces
DATA_FRACTION = 0.7


def make_image(path: str, size: int, seed: int = 1) -> int:
    """A file of `size` bytes: about 70 % data in 4 MiB extents, the rest
    holes.  Returns the bytes of data written."""
    rng = random.Random(seed)
    base = os.urandom(EXTENT)
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.ftruncate(fd, size)
        for i, off in enumerate(range(0, size, EXTENT)):
            if rng.random() >= DATA_FRACTION:
                continue
            k = (i * 4099) % EXTENT           # a different rotation per extent
            piece = (base[k:] + base[:k])[: min(EXTENT, size - off)]
            os.pwrite(fd, piece, off)
            written += len(piece)
        os.fsync(fd)
    finally:
        os.close(fd)
    return written


class Writer(threading.Thread):
    """Random 4–64 KiB writes through job.source at a steady rate."""

    def __init__(self, handle, size: int, rate: int, seed: int = 2):
        super().__init__(name="demo-writer", daemon=True)
        self.handle = handle
        self.size = size
        self.rate = rate
        self.rng = random.Random(seed)
        self.stop_event = threading.Event()
        self.writes = 0
        self.bytes = 0
        self.error = None

    def run(self) -> None:
        start = time.monotonic()
        try:
            while not self.stop_event.is_set():
                length = self.rng.randrange(4096, 65537, 4096)
                offset = self.rng.randrange(0, max(1, self.size - length)) & ~4095
                self.handle.pwrite(os.urandom(length), offset)
                self.writes += 1
                self.bytes += length
                # Keep to the rate: sleep until this many bytes are due.
                due = start + self.bytes / self.rate
                delay = due - time.monotonic()
                if delay > 0:
                    self.stop_event.wait(delay)
        except BaseException as e:   # reported in the summary
            self.error = e

    def stop(self) -> None:
        self.stop_event.set()
        self.join()


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
        data = make_image(src, size)
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
        writer = Writer(job.source, size, args.write_rate)
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
