"""The `fastmirror` command: mirror, verify, bench and demo.

Exit codes (EXIT_CODES below, also in --help): 0 the target is complete,
1 a failed job or a difference, 2 bad usage or input refused before anything
was written, 130 a cancel that left the target partial.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import signal
import sys
import textwrap
import threading
import time
from typing import Optional, Sequence

from fastmirror.cli.progress import Progress
from fastmirror.units import human, parse_size

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_CANCELLED = 0, 1, 2, 130

EXIT_CODES = """\
exit codes:
  0    the target is complete (COMPLETED), also when SIGINT or SIGTERM came
       after READY; verify: equal
  1    the job failed, or verify found a difference (or was interrupted)
  2    bad usage, or input refused before anything was written
  130  cancelled before the target was complete (CANCELLED): the target is
       partial and must not be used as a copy of the source
"""

SIZE_HELP = ("sizes: K, M, G, T (or KiB, MiB, ...) are binary, 1M = 1048576;\n"
             "       kB, MB, GB, TB are decimal, 1MB = 1000000\n")

JSON_PROGRESS_INTERVAL = 0.5    # seconds between PROGRESS lines of --json

# MirrorJob's parameters, as the command line spells them.
_OPTIONS = {"granularity": "--granularity", "buf_size": "--buf-size", "speed": "--speed",
            "sync": "--sync", "copy_mode": "--copy-mode", "io_engine": "--io-engine",
            "on_source_error": "--on-source-error", "on_target_error": "--on-target-error"}


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


_out_lock = threading.Lock()


def _json_line(obj, out=None) -> None:
    # Events come from the job's thread, progress from the main thread: one
    # line at a time.
    with _out_lock:
        out = out or sys.stdout
        out.write(json.dumps(obj, sort_keys=True) + "\n")
        out.flush()


def _size_words(n: int) -> str:
    """A size as a person reads it, exact: 65536 -> '64 KiB', 3000 -> '3000
    bytes', 1610612736 -> '1.5 GiB (1610612736 bytes)'."""
    if n < 1024:
        return "%d byte%s" % (n, "" if n == 1 else "s")
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift and n % (1 << shift) == 0:
            return "%d %s" % (n >> shift, unit)
    return "%s (%d bytes)" % (human(n), n)


def _offset_words(n: int) -> str:
    return "%d" % n if n < 1024 else "%d (%s)" % (n, human(n))


def _side(path, source: Optional[str], target: Optional[str]) -> Optional[str]:
    if path is None:
        return None
    path = os.fspath(path)
    for name, p in (("source", source), ("target", target)):
        if p is not None and (path == p or os.path.abspath(path) == os.path.abspath(p)):
            return name
    return None


def _options_text(text: str, source: Optional[str] = None,
                  target: Optional[str] = None) -> str:
    """MirrorJob's ValueError texts in the command line's words: option
    names for parameter names, sizes in units, the side for a path."""
    def size(m):
        return "%s %s" % (m.group(1), _size_words(int(m.group(2))))
    # MirrorJob's own texts begin with the parameter's name; other texts
    # (with paths, which may hold any word) are left as they are.
    for name, option in _OPTIONS.items():
        text = re.sub(r"^%s(?![\w-])" % name, option, text)
    text = re.sub(r"^(--granularity|--buf-size|--speed) (\d+)", size, text)
    text = re.sub(r"^(--[\w-]+)='([^']*)'", r"\1 \2", text)
    text = re.sub(r"(I/O alignment|more than) (\d+)", size, text)
    for name, p in (("source", source), ("target", target)):
        if p and not re.search(r"\b%s %s" % (name, re.escape(p)), text):
            text = re.sub(r"of %s$" % re.escape(p), "of the %s %s" % (name, p), text)
    return text


def _describe(e: BaseException, source: Optional[str] = None,
              target: Optional[str] = None) -> str:
    """One line for an error, naming the side (source or target) it is on."""
    if isinstance(e, OSError) and e.errno is not None:
        offset = getattr(e, "offset", None)
        where = " at offset %s" % _offset_words(offset) if offset is not None else ""
        side = _side(e.filename, source, target)
        text = e.strerror or os.strerror(e.errno)
        if side is not None and not text.startswith(side):
            return "%s %s: %s%s" % (side, e.filename, text, where)
        path = ": %s" % e.filename if e.filename else ""
        return "%s%s%s" % (text, path, where)
    return _options_text(str(e), source, target)


def _refuse(args, message: str, error: Optional[BaseException] = None) -> int:
    """Say why nothing was done (and as a JSON line with --json): exit 2."""
    print("fastmirror: %s" % message, file=sys.stderr)
    if getattr(args, "json", False):
        d = {"event": "REFUSED", "error": message, "time": round(time.time(), 6)}
        if isinstance(error, OSError) and error.errno is not None:
            d["errno"] = error.errno
            d["path"] = error.filename
            d["side"] = _side(error.filename, args.source, args.target)
        _json_line(d)
    return EXIT_USAGE


def _check_sizes(args, say) -> Optional[str]:
    """The size options, checked with the options' names before the job is
    built; None when they are fine.  `say` reports an adjusted value."""
    from fastmirror.job import mirror
    g = args.granularity
    if g < 512 or g > mirror.MAX_GRANULARITY or g & (g - 1):
        return ("--granularity %s is not a power of two between 512 bytes and %s"
                % (_size_words(g), _size_words(mirror.MAX_GRANULARITY)))
    if args.buf_size <= 0 or args.buf_size > mirror.MAX_BUF_SIZE:
        return ("--buf-size %s is outside 1 byte to %s"
                % (_size_words(args.buf_size), _size_words(mirror.MAX_BUF_SIZE)))
    if args.speed > mirror.MAX_SPEED:
        return "--speed %s/s is absurd" % _size_words(args.speed)
    if 0 < args.speed < g:
        # The limit pays for a copy of at least one chunk before the next:
        # below one chunk a second the copy would wait minutes or days.
        return ("--speed %s/s is below one chunk (--granularity %s) per second: use at "
                "least %s, or 0 for no limit"
                % (_size_words(args.speed), _size_words(g), _size_words(g)))
    if args.buf_size < g:
        say("--buf-size %s is less than one chunk: using %s (--granularity)"
            % (_size_words(args.buf_size), _size_words(g)))
        args.buf_size = g
    return None


def _data_bytes(path: str) -> Optional[int]:
    """Bytes of the source that hold data (SEEK_DATA/SEEK_HOLE), as the
    job's first pass sees them; None if it cannot be told."""
    from fastmirror._core import blockio
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        return sum(length for _, length in blockio.data_extents(fd, 0, size))
    except OSError:
        return None
    finally:
        os.close(fd)


def _stats(st, final, duration: float, data_at_start: Optional[int],
           granularity: int) -> dict:
    """The run's figures: data apart from zeros and holes.  The engine's
    bytes_copied counts every byte the copy read, zero runs included."""
    copied = st.bytes_copied - st.bytes_zero_detected
    return {
        "event": "SUMMARY",
        "final": final.type.value,
        "len": st.len,
        "bytes_in_place": final.offset,
        "bytes_copied": copied,                     # data written, copies again included
        "bytes_zeros": st.bytes_zero_detected,      # read as zeros, stored as zeroed ranges
        "bytes_holes": None if data_at_start is None else st.len - data_at_start,
        "bytes_holes_zeroed": st.bytes_zeroed,      # holes made to read zeros on the target
        "chunks_copied": st.chunks_copied,
        "chunks_copied_again": st.chunks_recopied,
        "granularity": granularity,
        "duration": round(duration, 3),
        "time_to_ready": None if st.time_to_ready is None else round(st.time_to_ready, 3),
        "rate": round(st.bytes_copied / duration) if duration > 0 else None,
        "io_engine": st.io_engine,
        "io_mode": st.io_mode,
        "copy_mode": st.copy_mode,
        "speed": st.speed,
        "time": round(time.time(), 6),
    }


def _partial(args, final, stats) -> str:
    """How far a target got that the job did not complete."""
    data = ""
    if stats["bytes_holes"] is not None:
        data = "%s of %s of data copied, " % (human(stats["bytes_copied"]),
                                            human(stats["len"] - stats["bytes_holes"]))
    frac = final.offset / final.len if final.len else 0.0
    return ("the target %s is partial (%s%s of %s in place, %.1f %%): do not use it as "
            "a copy of %s" % (args.target, data, human(final.offset), human(final.len),
                              100 * frac, args.source))


def _log_to_stderr() -> None:
    """The library's warnings (a source that is an image, a forced share)
    as "fastmirror: ..." lines on stderr; installed once per process."""
    log = logging.getLogger("fastmirror")
    if not any(getattr(h, "_fastmirror_cli", False) for h in log.handlers):
        h = logging.StreamHandler()     # sys.stderr at the time of each write
        h.setFormatter(logging.Formatter("fastmirror: %(message)s"))
        h.setLevel(logging.WARNING)
        h._fastmirror_cli = True        # type: ignore[attr-defined]
        log.addHandler(h)


def cmd_mirror(args) -> int:
    import fastmirror
    from fastmirror import trace
    from fastmirror.job.events import EventType
    from fastmirror.job.owners import InUseError
    from fastmirror.job.verify import first_difference

    _log_to_stderr()

    def say(text):
        if not args.quiet:
            print("fastmirror: %s" % text, file=sys.stderr)

    if args.trace:
        try:
            trace.enable(args.trace)
        except ValueError as e:
            return _refuse(args, "--trace: %s" % e)
    bad = _check_sizes(args, say)
    if bad is not None:
        return _refuse(args, bad)
    try:
        job = fastmirror.MirrorJob(
            args.source, args.target, granularity=args.granularity,
            buf_size=args.buf_size, speed=args.speed, sync=args.sync,
            direct=not args.no_direct, target_is_zero=args.target_is_zero,
            on_source_error=args.on_source_error, on_target_error=args.on_target_error,
            copy_mode=args.copy_mode, io_engine=args.io_engine,
            force_share=args.force_share, allow_image_target=args.overwrite_image,
            connections=args.connections, state=args.state)
    except (ValueError, OSError) as e:
        code = _refuse(args, _describe(e, args.source, args.target), e)
        if isinstance(e, InUseError) and e.side == "source" and e.lock:
            print("fastmirror: --force-share copies it anyway; the copy may then not be "
                  "consistent", file=sys.stderr)
        return code

    show_progress = sys.stderr.isatty() and not args.quiet and not args.no_progress
    progress = Progress() if show_progress else None
    if args.json:
        job.add_listener(lambda ev: _json_line(ev.to_dict()))
    if job.io_mode != "direct":
        say(job.io_mode)
    if job.io_engine.startswith("threads ("):
        say("copying with %s" % job.io_engine)
    if args.state is not None:
        say("%s %s" % ("resuming from" if job.resumed else "state in", args.state))
    data_at_start = _data_bytes(args.source) if args.sync == "full" else None

    final = None
    with _Interrupt() as intr:
        t_start = time.time()
        job.start()
        completing = False
        interrupted_at = 0
        next_json = time.monotonic() + JSON_PROGRESS_INTERVAL
        while True:
            final = job.wait(timeout=0.2)
            if final is not None:
                break
            if intr.count > interrupted_at:
                interrupted_at = intr.count
                # First signal: cancel (CANCELLED before READY, a drain and
                # COMPLETED after).  Another: stop at once.
                job.cancel(force=intr.count > 1)
            elif not completing and job.status().ready:
                completing = True
                try:
                    job.complete()
                except fastmirror.JobStateError:
                    completing = False   # paused by an error policy; retried
            if progress is not None or args.json:
                st = job.status()
                if progress is not None:
                    progress.draw(st)
                if args.json and time.monotonic() >= next_json:
                    next_json = time.monotonic() + JSON_PROGRESS_INTERVAL
                    _json_line({"event": "PROGRESS", "state": st.state,
                                "offset": st.offset, "len": st.len,
                                "bytes_copied": st.bytes_copied,
                                "dirty_bytes": st.dirty_bytes,
                                "copy_rate": round(st.copy_rate), "eta": st.eta,
                                "time": round(time.time(), 6)})
        if progress is not None:
            progress.draw(job.status())
            progress.close()
    st = job.status()
    job.close()
    stats = _stats(st, final, max(0.0, final.time - t_start), data_at_start,
                   args.granularity)

    if final.type != EventType.COMPLETED:
        if not args.quiet:
            what = ("cancelled" if final.type == EventType.CANCELLED else "job failed: %s"
                    % (_describe(final.error, args.source, args.target)
                       if final.error else "no error given"))
            print("fastmirror: %s; %s" % (what, _partial(args, final, stats)),
                  file=sys.stderr)
        if args.json:
            _json_line(stats)
        # A cancel leaves the target partial: 130 as for any interrupted
        # command; a failure is 1.
        return EXIT_CANCELLED if final.type == EventType.CANCELLED else EXIT_FAIL
    if not args.quiet and not args.json:
        rate = stats["rate"]
        parts = ["%s of data copied (%s/s)" % (human(stats["bytes_copied"]), human(rate or 0))]
        if stats["bytes_holes"] is not None:
            parts.append("%s of holes" % human(stats["bytes_holes"]))
        parts.append("%s of zeros" % human(stats["bytes_zeros"]))
        print("mirrored %s in %.2f s: %s; ready after %.2f s, %d chunk%s copied again"
              % (human(st.len), stats["duration"], ", ".join(parts),
                 st.time_to_ready or 0.0, st.chunks_recopied,
                 "" if st.chunks_recopied == 1 else "s"), file=sys.stderr)
    status = EXIT_OK
    if args.verify:
        t0 = time.monotonic()
        try:
            diff = first_difference(args.source, args.target)
        except OSError as e:
            print("fastmirror: verify: %s" % _describe(e, args.source, args.target),
                  file=sys.stderr)
            diff, status = None, EXIT_FAIL
        except KeyboardInterrupt:
            # Not 130: the target is complete, only the comparison is not.
            print("fastmirror: verify interrupted: the target is complete (COMPLETED) "
                  "but was not compared", file=sys.stderr)
            diff, status = None, EXIT_FAIL
        if args.json and diff is not None:
            _json_line({"event": "VERIFY", "equal": diff < 0,
                        "first_difference": diff if diff >= 0 else None,
                        "seconds": round(time.monotonic() - t0, 3),
                        "time": round(time.time(), 6)})
        if diff is not None and diff >= 0:
            print("fastmirror: verify: the target differs from the source at offset %s"
                  % _offset_words(diff), file=sys.stderr)
            status = EXIT_FAIL
    if args.json:
        _json_line(stats)
    return status


def _size_of(path: str) -> Optional[int]:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def cmd_verify(args) -> int:
    from fastmirror.job.verify import first_difference
    t0 = time.monotonic()
    try:
        diff = first_difference(args.source, args.target)
    except OSError as e:
        refused = _refuse(args, _describe(e, args.source, args.target), e)
        return refused if e.errno in (errno.ENOENT, errno.EISDIR, errno.EACCES) \
            else EXIT_FAIL
    elapsed = time.monotonic() - t0
    ssize, tsize = _size_of(args.source), _size_of(args.target)
    shorter = ssize is not None and tsize is not None and tsize < ssize
    if args.json:
        _json_line({"equal": diff < 0, "first_difference": diff if diff >= 0 else None,
                    "source_size": ssize, "target_size": tsize,
                    "target_shorter": shorter, "seconds": round(elapsed, 3),
                    "time": round(time.time(), 6)})
    elif diff < 0:
        print("identical" + ("" if tsize is None or ssize is None or tsize == ssize else
                             " over the source's %s; the target is longer (%s)"
                             % (_size_words(ssize), _size_words(tsize))))
    else:
        print("differ at offset %s%s" % (_offset_words(diff), "" if not shorter else
              "%s the target is shorter than the source (%s, the source %s)"
              % (":" if diff == tsize else ";", _size_words(tsize), _size_words(ssize))))
    return EXIT_OK if diff < 0 else EXIT_FAIL


def cmd_serve(args) -> int:
    from fastmirror.nbd.export import Export, parse_listen
    if args.socket is None and args.listen is None:
        print("fastmirror: serve needs --socket PATH, --listen HOST:PORT or both",
              file=sys.stderr)
        return EXIT_USAGE
    listen = None
    if args.listen is not None:
        try:
            listen = parse_listen(args.listen)
        except ValueError as e:
            print("fastmirror: --listen: %s" % e, file=sys.stderr)
            return EXIT_USAGE
    limit = {}
    if args.max_connections is not None:
        if args.max_connections < 1:
            print("fastmirror: --max-connections must be at least 1", file=sys.stderr)
            return EXIT_USAGE
        limit["max_connections"] = args.max_connections
    # The export's warnings: TCP without authentication, refused and
    # dropped clients.
    _log_to_stderr()
    try:
        export = Export(args.source, socket=args.socket, listen=listen, name=args.name,
                        read_only=args.read_only, state=args.state, direct=args.direct,
                        **limit)
    except (OSError, ValueError) as e:
        print("fastmirror: cannot serve %s: %s" % (args.source, e), file=sys.stderr)
        return EXIT_USAGE if isinstance(e, ValueError) or \
            getattr(e, "errno", None) in (errno.ENOENT, errno.EISDIR, errno.EACCES) \
            else EXIT_FAIL
    with _Interrupt() as stop, export:
        qmp = None
        if args.qmp:
            from fastmirror.nbd.qmp import QMPServer
            try:
                qmp = QMPServer(export, socket=args.qmp, on_quit=stop.event.set)
            except OSError as e:
                print("fastmirror: cannot listen for QMP at %s: %s" % (args.qmp, e),
                      file=sys.stderr)
                return EXIT_FAIL
        print("serving %s (%s) at %s%s" % (
            export.path, _size_words(export.size), " and ".join(export.urls),
            "" if not args.direct else ", O_DIRECT" if export.direct else
            ", through the page cache (the filesystem refuses O_DIRECT)"), flush=True)
        if export.job is not None:
            print("resumed the mirror onto %s from %s" % (export.job.target_path, args.state),
                  flush=True)
        if qmp is not None:
            print("QMP at %s" % args.qmp, flush=True)
        stop.event.wait()
        if qmp is not None:
            qmp.close()
    print("stopped", flush=True)
    return EXIT_OK


def cmd_bench(args) -> int:
    from fastmirror.bench import harness as benchmark
    return benchmark.run(args)


def cmd_demo(args) -> int:
    from fastmirror.cli import demo
    return demo.run(args)


class _Parser(argparse.ArgumentParser):
    """argparse, with its refusals also as a JSON line when --json was given
    (a program reading stdout learns why nothing ran)."""

    json_errors = False

    def error(self, message):
        if _Parser.json_errors:
            _json_line({"event": "REFUSED", "error": message,
                        "time": round(time.time(), 6)})
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    import fastmirror
    p = _Parser(
        prog="fastmirror", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Mirror a disk image or block device to a target while the source "
                    "stays in use.",
        epilog=EXIT_CODES + "\n" + SIZE_HELP)
    p.add_argument("--version", action="version", version="fastmirror " + fastmirror.__version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    m = sub.add_parser(
        "mirror", help="mirror SRC to DST, complete when ready",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EXIT_CODES,
        description=textwrap.fill(
            "Copy SRC to DST; once the target is in sync, complete the job "
            "(flush, then COMPLETED) and exit.  The command cannot see writes "
            "that other processes make to SRC: mirror a disk that nothing else "
            "writes.  Keeping a live disk in sync needs its writes to come through "
            "fastmirror (the Python API's job.source).") + "\n\n" + textwrap.fill(
            "Ctrl-C or SIGTERM before READY cancels and leaves DST partial (exit "
            "130); after READY the job completes (exit 0).") + "\n\n" + SIZE_HELP)
    m.add_argument("source", metavar="SRC")
    m.add_argument("target", metavar="DST", help="created sparse if missing; or an NBD URI: "
                   "nbd://host[:port]/name, nbd+unix:///name?socket=PATH")
    m.add_argument("--granularity", type=parse_size, default=65536,
                   help="bytes per dirty-bitmap chunk (power of two, default 64K)")
    m.add_argument("--buf-size", type=parse_size, default=16 << 20,
                   help="bytes of copy buffers in flight (default 16M)")
    m.add_argument("--speed", type=parse_size, default=0,
                   help="limit in bytes per second (0: none, else at least one "
                        "--granularity chunk per second), e.g. 100M")
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
    m.add_argument("-U", "--force-share", action="store_true",
                   help="copy a source that another process holds for writing (QEMU's "
                        "image locks; as qemu-img -U): the copy may not be consistent")
    m.add_argument("--overwrite-image", action="store_true",
                   help="overwrite a target that starts with a qcow2, vmdk, vhdx, vdi, "
                        "vpc, qed or LUKS header (refused by default: fastmirror writes "
                        "raw bytes)")
    m.add_argument("--connections", type=int, default=None, metavar="N",
                   help="DST an NBD URI (nbd://host[:port]/name or nbd+unix:///name"
                        "?socket=PATH): connections to open when the server allows "
                        "multi-conn (default 2; one otherwise)")
    m.add_argument("--trace", metavar="PATTERN",
                   help="print tracepoints matching PATTERN (e.g. 'mirror_*') on stderr")
    m.add_argument("--json", action="store_true",
                   help="JSON lines on stdout: every event, PROGRESS twice a second, "
                        "VERIFY, and a final SUMMARY with the run's figures; a refusal "
                        "before the start is a REFUSED line")
    m.add_argument("--verify", action="store_true", help="compare after COMPLETED")
    m.add_argument("--state", metavar="PATH",
                   help="keep the job's state in PATH (and PATH.al): after a crash or a "
                        "kill, the same command resumes from it instead of copying it all")
    m.add_argument("--no-progress", action="store_true")
    m.add_argument("-q", "--quiet", action="store_true")
    m.set_defaults(func=cmd_mirror)

    v = sub.add_parser("verify", help="compare SRC and DST",
                       description="Exit 0 when DST equals SRC over SRC's size, 1 with the "
                                   "first differing offset otherwise (a DST shorter than "
                                   "SRC differs at its end), 2 when a side cannot be "
                                   "opened.")
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

    sv = sub.add_parser("serve", help="serve SRC over NBD on a unix socket (or TCP)",
                        description=textwrap.fill(
                            "Serve the image file or block device SRC over NBD at the "
                            "unix socket PATH (mode 0600), as nbd+unix:///NAME?socket=PATH, "
                            "and/or over TCP at HOST:PORT, as nbd://HOST:PORT/NAME, "
                            "until SIGTERM or SIGINT (exit 0 after a clean shutdown)."))
    sv.add_argument("source", metavar="SRC")
    sv.add_argument("--socket", metavar="PATH",
                    help="the unix socket to serve on (mode 0600)")
    sv.add_argument("--listen", metavar="HOST:PORT",
                    help="also (or only) serve over TCP; an IPv6 host in brackets "
                         "([::1]:10809); port 0 picks a free port.  NBD without TLS has "
                         "no authentication: anyone who can reach the port can read and "
                         "write the disk")
    sv.add_argument("--max-connections", type=int, metavar="N",
                    help="clients served at once, unix and TCP together (default 64); "
                         "one more is closed before the handshake")
    sv.add_argument("--name", default="", help='the export name (default "")')
    sv.add_argument("--read-only", action="store_true")
    sv.add_argument("--direct", action="store_true",
                    help="serve requests aligned to 4 KiB with O_DIRECT, bypassing the "
                         "host's page cache (QEMU's cache.direct=on); others, and a "
                         "filesystem that refuses O_DIRECT, through the page cache")
    sv.add_argument("--state", metavar="PATH",
                    help="mirrors of this export (drive-mirror) keep their state in PATH; "
                         "restarted with it, the export resumes an unfinished mirror, or "
                         "serves its target after a pivot")
    sv.add_argument("--qmp", metavar="PATH",
                    help="QMP (QEMU's monitor protocol: drive-mirror, query-block-jobs, "
                         "block-job-complete...) at the unix socket PATH (mode 0600); "
                         "its quit command stops serving (exit 0)")
    sv.set_defaults(func=cmd_serve)

    d = sub.add_parser("demo", help="a live mirror of a generated 1 GiB image",
                       description="Generate an image with data and holes, mirror it while "
                                   "a writer keeps writing, complete, verify, summarize.")
    d.add_argument("--size", type=parse_size, default=1 << 30)
    d.add_argument("--dir", default=None,
                   help="the demo makes a new folder inside DIR for its images and "
                        "removes only that (default: a new folder under /var/tmp)")
    d.add_argument("--write-rate", type=parse_size, default=32 << 20,
                   help="bytes per second the writer writes (default 32M)")
    d.add_argument("--keep", action="store_true", help="keep the images")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return EXIT_CANCELLED
    except BrokenPipeError:
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
