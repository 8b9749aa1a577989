"""The `fastmirror` command: mirror, verify, bench and demo.

Exit codes: 0 success, 1 a failed or cancelled job or a difference, 2 bad
usage or input refused before anything was written, 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from typing import Optional, Sequence

from fastmirror.cli.progress import Progress
from fastmirror.units import human, parse_size

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130

class _Interrupt:
    """SIGINT/SIGTERM: the first asks for a clean cancel, a second forces."""

    def __init__(self):
        self.count = 0
        self.event = threading.Event()
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._old[sig] = signal.signal(sig, self._handler)
        return self

    def _handler(self, signum, frame):
        self.count += 1
        self.event.set()

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


def _json_line(obj, out=None) -> None:
    out = out or sys.stdout
    out.write(json.dumps(obj, sort_keys=True) + "\n")
    out.flush()


def cmd_mirror(args) -> int:
    import fastmirror
    from fastmirror import trace
    from fastmirror.job.events import EventType
    from fastmirror.job.verify import first_difference

    if args.trace:
        try:
            trace.enable(args.trace)
        except ValueError as e:
            print("fastmirror: %s" % e, file=sys.stderr)
            return EXIT_USAGE
    try:
        job = fastmirror.MirrorJob(
            args.source, args.target, granularity=args.granularity,
            buf_size=args.buf_size, speed=args.speed, sync=args.sync,
            direct=not args.no_direct, target_is_zero=args.target_is_zero,
            on_source_error=args.on_source_error, on_target_error=args.on_target_error,
            copy_mode=args.copy_mode, io_engine=args.io_engine)
    except (ValueError, OSError) as e:
        print("fastmirror: %s" % _describe(e), file=sys.stderr)
        return EXIT_USAGE

    show_progress = sys.stderr.isatty() and not args.quiet and not args.no_progress
    progress = Progress() if show_progress else None
    if args.json:
        job.add_listener(lambda ev: _json_line(ev.to_dict()))
    if job.io_mode != "direct" and not args.quiet:
        print("fastmirror: %s" % job.io_mode, file=sys.stderr)
    if job.io_engine.startswith("threads (") and not args.quiet:
        print("fastmirror: copying with %s" % job.io_engine, file=sys.stderr)

    final = None
    with _Interrupt() as intr:
        job.start()
        completing = False
        interrupted_at = 0
        while True:
            final = job.wait(timeout=0.2)
            if final is not None:
                break
            if intr.count > interrupted_at:
                interrupted_at = intr.count
                # First signal: cancel (CANCELLED before READY, a drain and
                # COMPLETED after).  Another: stop at once.
                job.cancel(force=intr.count > 1)
            elif not completing and not args.no_complete and job.status().ready:
                completing = True
                try:
                    job.complete()
                except fastmirror.JobStateError:
                    completing = False   # paused by an error policy; retried
            if progress is not None:
                progress.draw(job.status())
        if progress is not None:
            progress.draw(job.status())
            progress.close()
    st = job.status()
    job.close()

    if final.type != EventType.COMPLETED:
        if not args.quiet:
            print("fastmirror: job %s%s" % (final.type.value.lower(),
                  ": " + _describe(final.error) if final.error else ""), file=sys.stderr)
        return EXIT_INTERRUPTED if intr.count else EXIT_FAIL
    if not args.quiet and not args.json:
        print("mirrored %s in %.2f s (%s/s), ready after %.2f s, %d chunks copied again"
              % (human(st.len), st.elapsed, human(st.len / st.elapsed if st.elapsed else 0),
                 st.time_to_ready or 0.0, st.chunks_recopied), file=sys.stderr)
    if args.verify:
        diff = first_difference(args.source, args.target)
        if args.json:
            _json_line({"event": "VERIFY", "equal": diff < 0, "first_difference": diff})
        if diff >= 0:
            print("fastmirror: verify: target differs from source at offset %d" % diff,
                  file=sys.stderr)
            return EXIT_FAIL
    return EXIT_INTERRUPTED if intr.count else EXIT_OK


def _describe(e: BaseException) -> str:
    if isinstance(e, OSError) and e.errno is not None:
        where = " at offset %d" % e.offset if getattr(e, "offset", None) is not None else ""
        path = ": %s" % e.filename if e.filename else ""
        return "%s%s%s" % (e.strerror, path, where)
    return str(e)


def cmd_verify(args) -> int:
    from fastmirror.job.verify import first_difference
    t0 = time.monotonic()
    try:
        diff = first_difference(args.source, args.target)
    except OSError as e:
        print("fastmirror: %s" % _describe(e), file=sys.stderr)
        return EXIT_USAGE if e.errno in (2, 21, 13) else EXIT_FAIL
    elapsed = time.monotonic() - t0
    if args.json:
        _json_line({"equal": diff < 0, "first_difference": diff, "seconds": round(elapsed, 3)})
    elif diff < 0:
        print("identical")
    else:
        print("differ at offset %d" % diff)
    return EXIT_OK if diff < 0 else EXIT_FAIL


def cmd_bench(args) -> int:
    from fastmirror.bench import harness as benchmark
    return benchmark.run(args)


def cmd_demo(args) -> int:
    from fastmirror.cli import demo
    return demo.run(args)


def build_parser() -> argparse.ArgumentParser:
    import fastmirror
    p = argparse.ArgumentParser(
        prog="fastmirror",
        description="Mirror a disk image or block device to a target while the source "
                    "stays in use.")
    p.add_argument("--version", action="version", version="fastmirror " + fastmirror.__version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser("mirror", help="mirror SRC to DST, complete when ready",
                       description="Copy SRC to DST; once the target is in sync, complete "
                                   "the job (flush, then COMPLETED).  Ctrl-C cancels cleanly.")
    m.add_argument("source", metavar="SRC")
    m.add_argument("target", metavar="DST", help="created sparse if missing")
    m.add_argument("--granularity", type=parse_size, default=65536,
                   help="bytes per dirty-bitmap chunk (power of two, default 64K)")
    m.add_argument("--buf-size", type=parse_size, default=16 << 20,
                   help="bytes of copy buffers in flight (default 16M)")
    m.add_argument("--speed", type=parse_size, default=0,
                   help="limit in bytes per second (0: none), e.g. 100M")
    m.add_argument("--sync", choices=("full", "none"), default="full")
    m.add_argument("--no-direct", action="store_true", help="use the page cache")
    m.add_argument("--copy-mode", choices=("auto", "background", "write-blocking"),
                   default="auto", help="how writes during the job are mirrored")
    m.add_argument("--io-engine", choices=("auto", "io_uring", "threads"), default="auto",
                   help="how copies are issued: io_uring (many in flight from two "
                        "threads), threads (one blocking thread per copy), or auto: "
                        "io_uring where the kernel allows it")
    m.add_argument("--target-is-zero", action="store_true",
                   help="promise the target already reads as zeros")
    m.add_argument("--on-source-error", choices=("report", "ignore", "stop", "enospc"),
                   default="report")
    m.add_argument("--on-target-error", choices=("report", "ignore", "stop", "enospc"),
                   default="report")
    m.add_argument("--trace", metavar="PATTERN",
                   help="print tracepoints matching PATTERN (e.g. 'mirror_*') on stderr")
    m.add_argument("--json", action="store_true", help="events as JSON lines on stdout")
    m.add_argument("--verify", action="store_true", help="compare after COMPLETED")
    m.add_argument("--no-complete", action="store_true",
                   help="after READY keep the target in sync until SIGINT or SIGTERM, "
                        "then drain and end COMPLETED (exit 130)")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_mirror)

    v = sub.add_parser("verify", help="compare SRC and DST",
                       description="Exit 0 when DST equals SRC over SRC's size, 1 with the "
                                   "first differing offset otherwise.")
    v.add_argument("source", metavar="SRC")
    v.add_argument("target", metavar="DST")
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_verify)

    # The same words as the README's command table.
    b = sub.add_parser("bench", help="throughput side by side with QEMU's mirror job, "
                                     "qemu-img convert, dd and fio's ceilings")
    try:
        from fastmirror.bench import harness as benchmark
        benchmark.add_arguments(b)
    except ImportError:
        pass
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser("demo", help="a live mirror of a generated 1 GiB image",
                       description="Generate an image with data and holes, mirror it while "
                                   "a writer keeps writing, complete, verify, summarize.")
    d.add_argument("--size", type=parse_size, default=1 << 30)
    d.add_argument("--dir", default=None, help="where to put the images (default: a "
                                                "temporary folder under /var/tmp)")
    d.add_argument("--write-rate", type=parse_size, default=32 << 20,
                   help="bytes per second the writer writes (default 32M)")
    d.add_argument("--keep", action="store_true", help="keep the images")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
